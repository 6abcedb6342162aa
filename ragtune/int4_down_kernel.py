"""The activation of ``ragtune.int4_down``'s kernel (imported only where Triton is installed).

``int4_gemv_kernel.w4a16_gemv_denorm_kernel`` (the denormal kernel the H200 sweep chose for
the 12B ``down`` shape) with ``ACT`` 1 or 2 (one kernel body for both: the default ``ACT=0``
compiles as it did without this) computes its input where it is loaded: x[k] = SiLU(gate[k]) *
up[k] from the gate|up projection's output row [2K] (gate first, as ``gate_up`` returns it),
so the step needs no separate SiLU-times-up kernel before ``down``. Every program recomputes
the activations of the groups it reads (its tile's K-slice); the extra exp and reciprocal a
value are not measured against the kernel they replace (docs/benchmarks.md, issue 20).

Two ways (``ACT`` 1 / 2; ``RAGTUNE_FUSED_DOWN=inline`` / ``on``): inline, each lane computes
the activations it multiplies (every lane of a row of lanes computes the same ones: ~2 MUFU
ops and ~8 others per input per lane, on top of the denormal loop's ~2 instructions a
weight); staged, a program first computes its
K-slice once (a 1-D layout, no lane repeats another) into a scratch vector in the input dtype,
waits at a block barrier, then runs the unfused kernel's loop over that vector. Programs of
different tiles write the same values to the same scratch words (identical bits; a program
reads its own writes after the barrier, CUDA's ``__syncthreads`` rule), so the result is the
same whichever write lands last. Which is faster is not measured (docs/benchmarks.md).

Rounding: the unfused compiled step computes ``F.silu(gate) * up`` in one inductor kernel,
float32 between its bf16 load and its bf16 store (inductor drops the bf16 round trip between
the two ops unless ``emulate_precision_casts``), SiLU as inductor's own decomposition
``x / (1 + exp(-x))`` with ``libdevice.exp`` and Triton's ``/`` (torch 2.11, default config:
no ``use_fast_math``, no ``division_rounding``); the GEMV then reads that bf16 vector. Here:
the same float32 operations, rounded once to the input dtype and read back as float32, so x
should be, bit for bit, the vector the unfused path hands ``down``.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

# Triton's interpreter (CPU tests) has no libdevice: numpy's exp stands in for inductor's there
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _exp(x):
    """inductor's exp in its Triton kernels (``libdevice.exp``, __nv_expf), as float32."""
    if _INTERPRET:  # noqa: SIM108 (a constexpr branch)
        y = tl.exp(x)
    else:
        y = libdevice.exp(x)
    return y


@triton.jit
def _silu_mul(gate_ptrs, K: tl.constexpr):
    """SiLU(gate) * up for gate at ``gate_ptrs`` and up K further, rounded as the unfused
    step rounds it (module docstring), as float32."""
    g = tl.load(gate_ptrs).to(tl.float32)
    u = tl.load(gate_ptrs + K).to(tl.float32)
    x = (g / (1.0 + _exp(-g))) * u  # inductor's SiLU, operation for operation
    return x.to(gate_ptrs.dtype.element_ty).to(tl.float32)
