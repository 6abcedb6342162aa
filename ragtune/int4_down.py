"""The decode step's ``down(SiLU(gate) * up)`` as one int4 GEMV (``RAGTUNE_FUSED_DOWN=on``).

Why: the unfused step runs SiLU(gate) * up as its own inductor kernel before ``down``'s GEMV
(one kernel a layer, 40 a 12B step, each with its launch gap in the CUDA graph). Here
``down``'s denormal GEMV (``ragtune.int4_gemv``, block=2) reads the gate|up row itself and
computes the activation once a program into a scratch vector before its loop
(``RAGTUNE_FUSED_DOWN=on``) or where each lane loads it (``=inline``; ``int4_down_kernel``).
Off by default: the
gain is not measured yet (docs/benchmarks.md, issue 20); with the switch off nothing here is
imported and the step runs the same kernels as before.

``ragtune::int4_gemv_silu_mul(gate_up, w_q, scales, shifts, config)``: on CUDA the kernel; on
any other device ``reference`` (the reference kernel's product, for CPU tests of the decode
path). Only one-row calls of an ``Int4Linear`` whose one-row setting is the denormal kernel
(or the reference kernel) take it (``fused_setting``); others keep the unfused expression.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ragtune import int4_gemv
from ragtune.int4_gemv import GemvConfig, GemvError

FUSED_DOWN_ENV = "RAGTUNE_FUSED_DOWN"
MODES = ("off", "on", "inline")
DENORMAL = 2  # GemvConfig.block of the kernel this fusion extends


def fused_down_mode() -> str:
    """``RAGTUNE_FUSED_DOWN``: ``off`` (default), ``on`` (the activation staged: once a program,
    through a scratch vector) or ``inline`` (computed where each lane loads it; the kernel's
    docstring)."""
    mode = os.environ.get(FUSED_DOWN_ENV, "off").lower()
    if mode not in MODES:
        raise GemvError(f"{FUSED_DOWN_ENV}={mode!r}: use one of {MODES}")
    return mode


def fused_setting(gemv: list[int] | None, kernel: str) -> list[int] | None:
    """The op's setting for a ``down`` projection with one-row setting ``gemv`` (None: gemlite's
    kernel) and int4 ``kernel``: ``gemv`` and 1 (staged) or 0; [] for the reference kernel;
    None where the fusion does not apply or is off."""
    mode = fused_down_mode()
    if mode == "off":
        return None
    if kernel == "reference":
        return []  # the CPU reference product: no kernel setting
    if gemv is None or GemvConfig(*gemv).block != DENORMAL:
        return None
    return [*gemv, int(mode == "on")]


_scratch: dict[tuple[str, int, torch.dtype], torch.Tensor] = {}


def scratch(k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The staged kernel's activation vector [k], one per (device, k, dtype), shared by the
    layers (made once: call it outside a CUDA graph capture)."""
    key = (str(device), k, dtype)
    if key not in _scratch:
        _scratch[key] = torch.empty(k, dtype=dtype, device=device)
    return _scratch[key]


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of a [..., 2K] gate|up row in float32, rounded once to its dtype: the
    vector the unfused compiled step hands ``down`` (``int4_down_kernel``'s docstring)."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (gate / (1 + torch.exp(-gate)) * up).to(gate_up.dtype)  # inductor's SiLU


def reference(
    gate_up: torch.Tensor, w_q: torch.Tensor, scales: torch.Tensor, shifts: torch.Tensor
) -> torch.Tensor:
    """``silu_mul`` times the int4 weights rounded to the input dtype, as
    ``Int4Linear(kernel="reference")`` multiplies (``unpack_int4`` = ``dequantize_rtn``)."""
    from ragtune.fastweights import unpack_int4

    x = silu_mul(gate_up)
    return F.linear(x, unpack_int4(w_q, scales, shifts, x.dtype).t())


def launch(
    gate_up: torch.Tensor,
    w_q: torch.Tensor,
    scales: torch.Tensor,
    shifts: torch.Tensor,
    cfg: GemvConfig,
    staged: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """down(SiLU(gate) * up) for one gate|up row [..., 2K] and packed int4 ``down`` weights
    ([K/8, N] words, [K/g, N] meta) with the denormal kernel's setting ``cfg``, the activation
    computed inline or ``staged`` (``int4_gemv.launch``'s ``act``)."""
    k = w_q.shape[0] * 8
    xs = scratch(k, gate_up.dtype, gate_up.device) if staged else None
    return int4_gemv.launch(gate_up, w_q, scales, shifts, cfg, out, act=2 if staged else 1, xs=xs)


@torch.library.custom_op("ragtune::int4_gemv_silu_mul", mutates_args=())
def int4_gemv_silu_mul(
    gate_up: torch.Tensor,
    w_q: torch.Tensor,
    scales: torch.Tensor,
    shifts: torch.Tensor,
    config: list[int],
) -> torch.Tensor:
    """down(SiLU(gate) * up) as an op torch.compile keeps opaque and a CUDA graph captures
    (like ``ragtune::int4_gemv``); off CUDA, ``reference``. Side effects: the split workspace
    (restored by the kernel) and the staged scratch vector (written and read within a call)."""
    if gate_up.is_cuda and config:  # [] (the reference kernel's layers): the reference product
        return launch(gate_up, w_q, scales, shifts, GemvConfig(*config[:-1]), bool(config[-1]))
    return reference(gate_up, w_q, scales, shifts)


@int4_gemv_silu_mul.register_fake
def _int4_gemv_silu_mul_fake(gate_up, w_q, scales, shifts, config):  # noqa: ANN001, ANN202
    return gate_up.new_empty(*gate_up.shape[:-1], w_q.shape[1])
