"""A small-M FP8 GEMM for the batcher's decode steps (``Fp8Linear`` inputs of <= 32 rows on CUDA).

Why: at 32 rows PyTorch's row-wise ``torch._scaled_mm`` read the 12B step's e4m3 weights at
1.5-3.3 TB/s on the H200 (in a CUDA graph; tiles of 128 output channels, no split-K: a
5120-wide projection gives 40 programs for 132 SMs), so the FP8 step gained 14% where halving
the weight bytes promised ~40%. This kernel reads them at 1.9-3.7 TB/s: a step's projections
4.42 -> 3.48 ms, the step 7.45 -> 6.51 ms (docs/benchmarks.md, issue 20.2, helper fp8b). This kernel (``ragtune/fp8_gemm_kernel.py``)
puts the weights on the MMA's wide side and the <= 32 tokens on its narrow side, tiles the
outputs narrowly and splits K where the projection has too few tiles, adding split partials in
a fixed order (deterministic; no atomics on the output). Prompts (hundreds of rows) keep
``_scaled_mm``, which runs them near the FP8 tensor cores' rate.

Arithmetic: the same e4m3 values and scales as ``_scaled_mm`` (per-token activation scale,
per-channel weight scale, applied in float32 to the float32 accumulator, one bf16 rounding);
Hopper's FP8 MMA accumulates without promotion, as ``rowwise_fast`` does (Triton's default).

Invariance: every input of <= ``SMALL_ROWS`` rows runs one tile of ``SMALL_ROWS`` tokens with
one setting per projection shape, so a row's result is the same whether it runs alone or with
31 others (the batcher's one-at-a-time == concurrent answers).

Settings per projection shape (out, in): the "small" list of ``fp8_configs/<gpu>.json``
(measured by ``bench/fp8_gemm.py --sweep``) names a setting, or ``"use": false`` where
``_scaled_mm`` measured faster; shapes it does not list get ``default_config`` on Hopper and
``_scaled_mm`` elsewhere. ``RAGTUNE_FP8_SMALL``: ``auto`` (default), ``on`` (this kernel for
every shape it can tile), ``off`` (``_scaled_mm`` always); ``RAGTUNE_FP8_SMALL_CONFIGS``: another
file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

import torch

from ragtune.cuda_check import cuda_unavailable_for

SMALL_ROWS = 32  # inputs of at most this many rows (a decode step) may take this kernel
MODE_ENV = "RAGTUNE_FP8_SMALL"
FILE_ENV = "RAGTUNE_FP8_SMALL_CONFIGS"
MODES = ("auto", "on", "off")
CONFIG_DIR = Path(__file__).with_name("fp8_configs")


class Fp8GemmError(ValueError):
    """A setting that cannot tile this shape, or a bad setting file."""


@dataclass(frozen=True)
class Fp8GemmConfig:
    """One program: ``block_n`` output channels x all tokens, ``block_k`` inputs a step;
    ``split`` programs share K; ``stages``: Triton's software pipelining of the K loop."""

    block_n: int = 64
    block_k: int = 128
    split: int = 1
    num_warps: int = 4
    stages: int = 4

    def as_list(self) -> list[int]:
        return list(astuple(self))


def plan(n: int, k: int, cfg: Fp8GemmConfig) -> int:
    """Tiles along the outputs; raises if ``cfg`` cannot tile (out, in) = (n, k) exactly."""
    for name in ("block_n", "block_k"):
        v = getattr(cfg, name)
        if v < 16 or v & (v - 1):
            raise Fp8GemmError(f"{name}={v} is not a power of two >= 16")
    if n % cfg.block_n:
        raise Fp8GemmError(f"out_features {n} is not a multiple of block_n {cfg.block_n}")
    if not 1 <= cfg.split <= 16 or k % (cfg.split * cfg.block_k):
        raise Fp8GemmError(f"in_features {k} is not a multiple of split x block_k {cfg}")
    return n // cfg.block_n


def default_config(n: int, k: int, sms: int = 132) -> Fp8GemmConfig | None:
    """A setting that tiles (n, k) with at least one program an SM where it can, or None."""
    for block_n in (64, 128):
        if n % block_n:
            continue
        tiles = n // block_n
        for split in (1, 2, 4, 8):
            cfg = Fp8GemmConfig(block_n=block_n, block_k=128, split=split)
            if k % (split * 128):
                break
            if tiles * split >= sms:
                return cfg
        return Fp8GemmConfig(block_n=block_n, block_k=128, split=1) if k % 128 == 0 else None
    return None


# --------------------------------------------------------------------------- which kernel
def config_file_for(device_name: str) -> Path:
    """``fp8_configs/nvidia_h200.json`` for "NVIDIA H200"."""
    return CONFIG_DIR / (re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_") + ".json")


def read_table(path: str | Path) -> dict[tuple[int, int], Fp8GemmConfig | None]:
    """{(out, in): setting, or None where ``_scaled_mm`` measured faster} of a setting file."""
    data = json.loads(Path(path).read_text())
    table: dict[tuple[int, int], Fp8GemmConfig | None] = {}
    for e in data.get("small", []):
        key = (int(e["out"]), int(e["in"]))
        cfg = Fp8GemmConfig(**e["config"]) if e.get("use", True) else None
        if cfg is not None:
            plan(*key, cfg)  # a bad file fails at load, not inside a capture
        table[key] = cfg
    return table


_tables: dict[str, dict[tuple[int, int], Fp8GemmConfig | None]] = {}


def table_for(device: torch.device) -> dict[tuple[int, int], Fp8GemmConfig | None]:
    """The setting table for ``device`` (``RAGTUNE_FP8_SMALL_CONFIGS``, else the packaged file
    for its GPU, else empty), read once per file."""
    path = os.environ.get(FILE_ENV) or str(config_file_for(torch.cuda.get_device_name(device)))
    if path not in _tables:
        _tables[path] = read_table(path) if Path(path).is_file() else {}
    return _tables[path]


def choose(
    n: int,
    k: int,
    table: dict[tuple[int, int], Fp8GemmConfig | None],
    capability: tuple[int, int],
) -> list[int] | None:
    """The setting for this shape's inputs of <= ``SMALL_ROWS`` rows, or None: ``_scaled_mm``."""
    mode = os.environ.get(MODE_ENV, "auto").lower()
    if mode not in MODES:
        raise Fp8GemmError(f"{MODE_ENV}={mode!r}: use one of {MODES}")
    if mode == "off":
        return None
    if (n, k) in table:
        cfg = table[(n, k)]
        if cfg is None and mode == "on":
            cfg = default_config(n, k)
    elif mode == "on" or capability == (9, 0):  # untuned shapes: measured wins were on Hopper
        cfg = default_config(n, k)
    else:
        cfg = None
    return cfg.as_list() if cfg is not None else None


def small_gemm_unavailable() -> str | None:
    """Why the kernel cannot run here, or None."""
    return cuda_unavailable_for("triton")


def setting_for(n: int, k: int, device: torch.device) -> list[int] | None:
    """What ``Fp8Linear`` on ``device`` uses for its small inputs: a setting, or None."""
    if device.type != "cuda" or small_gemm_unavailable() is not None:
        return None
    cfg = choose(n, k, table_for(device), torch.cuda.get_device_capability(device))
    if cfg is not None:
        workspace(n, Fp8GemmConfig(*cfg), device)  # made here, never inside a capture
    return cfg


# --------------------------------------------------------------------------- the kernel
_workspaces: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}


def workspace(
    n: int, cfg: Fp8GemmConfig, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 partials [split, SMALL_ROWS, n] and zeroed tile counters of a split setting, one
    per (device, out, block_n, split): the layers of one shape share it (kernels on one stream
    run one after another)."""
    key = (str(device), n, cfg.block_n, cfg.split)
    ws = _workspaces.get(key)
    if ws is None:
        ws = (
            torch.empty(cfg.split, SMALL_ROWS, n, dtype=torch.float32, device=device),
            torch.zeros(n // cfg.block_n, dtype=torch.int32, device=device),
        )
        _workspaces[key] = ws
    return ws


def launch(
    xq: torch.Tensor, sx: torch.Tensor, w: torch.Tensor, sw: torch.Tensor, cfg: Fp8GemmConfig
) -> torch.Tensor:
    """bf16 (xq * sx) @ (w * sw)^T for ``xq`` [M <= SMALL_ROWS, K] and ``w`` [N, K] e4m3,
    ``sx`` [M, 1] and ``sw`` [1, N] float32."""
    from ragtune.fp8_gemm_kernel import fp8_gemm_kernel

    m, k = xq.shape
    n = w.shape[0]
    if m > SMALL_ROWS or w.shape[1] != k:
        raise Fp8GemmError(f"the small FP8 GEMM takes <= {SMALL_ROWS} rows of {w.shape[1]}")
    tiles = plan(n, k, cfg)
    out = torch.empty(m, n, dtype=torch.bfloat16, device=xq.device)
    part, cnt = workspace(n, cfg, xq.device) if cfg.split > 1 else (out, out)
    fp8_gemm_kernel[(tiles, cfg.split, 1)](
        xq.contiguous(),
        w,
        sx.contiguous(),
        sw.contiguous(),
        out,
        part,
        cnt,
        m,
        N=n,
        K=k,
        M_MAX=SMALL_ROWS,
        BLOCK_N=cfg.block_n,
        BLOCK_M=SMALL_ROWS,
        BLOCK_K=cfg.block_k,
        SPLIT=cfg.split,
        STAGES=cfg.stages,
        num_warps=cfg.num_warps,
        num_stages=cfg.stages,
    )
    return out


@torch.library.custom_op("ragtune::fp8_small_gemm", mutates_args=())
def fp8_small_gemm(
    xq: torch.Tensor, sx: torch.Tensor, w: torch.Tensor, sw: torch.Tensor, config: list[int]
) -> torch.Tensor:
    """The kernel as an op torch.compile keeps opaque (and a CUDA graph captures). Its only
    side effect is the split workspace, restored by the kernel itself."""
    return launch(xq, sx, w, sw, Fp8GemmConfig(*config))


@fp8_small_gemm.register_fake
def _fp8_small_gemm_fake(xq, sx, w, sw, config):  # noqa: ANN001, ANN202
    return xq.new_empty(xq.shape[0], w.shape[0], dtype=torch.bfloat16)


# --------------------------------------------------------------------------- CPU emulation
def emulate(
    xq: torch.Tensor, sx: torch.Tensor, w: torch.Tensor, sw: torch.Tensor, cfg: Fp8GemmConfig
) -> torch.Tensor:
    """The kernel's arithmetic in float32 on any device: per split a partial product over its
    K range, the partials added in split order, the scales applied, one bf16 rounding (the
    MMA's own accumulation order within a split is the hardware's)."""
    m, k = xq.shape
    plan(w.shape[0], k, cfg)
    step = k // cfg.split
    total = torch.zeros(m, w.shape[0], dtype=torch.float32, device=xq.device)
    for s in range(cfg.split):
        part = slice(s * step, (s + 1) * step)
        total += xq[:, part].float() @ w[:, part].float().t()
    return (total * sw.reshape(1, -1) * sx.reshape(-1, 1)).to(torch.bfloat16)


@fp8_small_gemm.register_kernel("cpu")
def _fp8_small_gemm_cpu(xq, sx, w, sw, config):  # noqa: ANN001, ANN202
    return emulate(xq, sx, w, sw, Fp8GemmConfig(*config))
