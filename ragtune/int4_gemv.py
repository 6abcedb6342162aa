"""Batch-1 int4 GEMV (W4A16) for ``Int4Linear``'s one-row calls on CUDA: the decode step.

Why not gemlite's one-row kernels: on the H200 they read the 12B step's 6.5 GB of int4
weights at 1.6-1.7 TB/s (39% of the copy bandwidth), each program covering one or two K-blocks
of 8-64 inputs and adding its partial sums into the bf16 output with atomics (a memset per
call, K/32 bf16 roundings an output: 1.4-2.6% error a projection). This kernel
(``ragtune/int4_gemv_kernel.py``) gives each program a tile of outputs and a long K range (all
of K, or 1/SPLIT of it, SPLIT <= 32), reads gemlite's packed words as they are stored
(``fastweights.pack_int4``: contiguous along the outputs, so 16-byte coalesced loads),
accumulates in float32 and reduces split partial sums in a fixed order (deterministic; no
memset, no atomics on the output). The weights are the same tensors gemlite and the prompt
path (``unpack_int4``) use: nothing is packed twice.

Arithmetic: y[n] = sum_g (scale[g, n] * sum_{k in g} x[k] q[k, n] + shift[g, n] * sum_{k in g}
x[k]) in float32, i.e. x @ (q * scale + shift) with the float32 weights; ``dequantize_rtn``
rounds those weights to bf16 once more (relative 2**-9 each), so against the bf16 reference
the output differs by ~1e-3 relative, against the float32 weights by float32 rounding.

Settings per projection shape (out, in, group): the "gemv" list of the tuned-config file
(``int4_configs/<gpu>.json``, measured by ``bench/int4_gemv.py``) says which kernel is
faster and with what tile (``block``: 0 per-word, 1 block, 2 denormal), else
``default_config`` (the denormal kernel). ``RAGTUNE_INT4_GEMV``: ``auto`` (default:
the file's choice, this kernel for shapes it does not list), ``on`` (this kernel for every
shape), ``off`` (gemlite's).

The split workspace (float32 partials + per-tile counters, which the last program of a tile
resets) is one per (device, out, setting), shared by the layers of one shape: kernels on one
stream run one after another, so two calls never use it at once.
"""

from __future__ import annotations

import json
import os
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

import torch

from ragtune import pdl
from ragtune.cuda_check import cuda_unavailable_for

GEMV_ENV = "RAGTUNE_INT4_GEMV"
MODES = ("auto", "on", "off")
MAGIC = 0x4B000000  # float32 2**23: a code OR-ed into its mantissa reads as 2**23 + code
# the denormal kernel (block=2): x * 2**100, the code's bits alone q * 2**-149, so the sums carry
# 2**-49, undone on the output (all powers of two: exact)
DENORM_X = 2.0**100
# splits a tile's K range may take: the tile's last program adds this many partial rows; the
# 5-6 k output shapes want more programs than outputs / block_n (docs/benchmarks.md, gemv2)
MAX_SPLIT = 32
DENORM_Y = 2.0**49


class GemvError(ValueError):
    """A setting that cannot cover this shape."""


@dataclass(frozen=True)
class GemvConfig:
    """One program: ``block_n`` outputs x ``rows`` groups a step; ``split`` programs per tile
    share K; ``stages``: Triton's software pipelining of the group loop; ``block``: which of
    the two kernels (``int4_gemv_kernel.py``)."""

    block_n: int = 128
    rows: int = 4
    split: int = 1
    num_warps: int = 4
    stages: int = 1
    # 1: each step's words as one [rows, words, block_n] load (the block kernel); 2: the
    # per-word loop with codes read as float32 denormals (two instructions a weight)
    block: int = 0

    def as_list(self) -> list[int]:
        return list(astuple(self))


def plan(n: int, k: int, group: int, cfg: GemvConfig) -> tuple[int, int]:
    """(tiles along the outputs, groups each program reads); raises if ``cfg`` cannot tile."""
    if cfg.block not in (0, 1, 2):
        raise GemvError(f"block={cfg.block}: the kernels are 0 (per word), 1 (block), 2 (denormal)")
    for name in ("block_n", "rows"):
        v = getattr(cfg, name)
        if v < 1 or v & (v - 1):
            raise GemvError(f"{name}={v} is not a power of two")
    if group % 8 or k % group:
        raise GemvError(f"in_features {k} is not a multiple of the group {group} (itself of 8)")
    groups = k // group
    if not 1 <= cfg.split <= MAX_SPLIT or groups % cfg.split:
        raise GemvError(f"split {cfg.split} does not divide the {groups} groups")
    per_split = groups // cfg.split
    if per_split % cfg.rows:
        raise GemvError(f"rows {cfg.rows} do not divide the {per_split} groups of a split")
    return -(-n // cfg.block_n), per_split


def default_config(n: int, k: int, group: int, sms: int = 132) -> GemvConfig:
    """A setting that tiles any shape (``plan``) and keeps ~2 programs an SM where it can."""
    groups = k // group
    block_n = 128 if n >= 128 * sms else 64
    block_n = min(block_n, max(16, 1 << (max(n, 1) - 1).bit_length()))
    tiles = -(-n // block_n)
    split = 1
    for s in (4, 2):
        if groups % s == 0 and tiles * split < 2 * sms and tiles * s <= 4 * sms:
            split = s
            break
    rows = 4
    while (groups // split) % rows:
        rows //= 2
    # the denormal kernel: fewest instructions a weight (bench/int4_gemv.py, docs/benchmarks.md)
    return GemvConfig(block_n, rows, split, num_warps=4 if rows * block_n >= 256 else 2, block=2)


# --------------------------------------------------------------------------- which kernel
def read_table(path: str | Path) -> dict[tuple[int, int, int], GemvConfig | None]:
    """{(out, in, group): setting, or None where gemlite's kernel measured faster}."""
    data = json.loads(Path(path).read_text())
    table: dict[tuple[int, int, int], GemvConfig | None] = {}
    for e in data.get("gemv", []):
        key = (int(e["out"]), int(e["in"]), int(e["group"]))
        table[key] = GemvConfig(**e["config"]) if e.get("use", True) else None
        if table[key] is not None:
            plan(*key, table[key])  # a bad file fails at load, not inside a capture
    return table


def choose(
    n: int, k: int, group: int, table: dict[tuple[int, int, int], GemvConfig | None]
) -> list[int] | None:
    """The setting for this shape's one-row calls, or None for gemlite's kernel."""
    mode = os.environ.get(GEMV_ENV, "auto").lower()
    if mode not in MODES:
        raise GemvError(f"{GEMV_ENV}={mode!r}: use one of {MODES}")
    if mode == "off" or gemv_unavailable() is not None:
        return None
    cfg = table.get((n, k, group), default_config(n, k, group))
    if cfg is None:
        if mode == "auto":
            return None
        cfg = default_config(n, k, group)
    try:
        plan(n, k, group, cfg)
    except GemvError:
        return None
    return cfg.as_list()


def gemv_unavailable() -> str | None:
    """Why the kernel cannot run here, or None."""
    return cuda_unavailable_for("triton")


# --------------------------------------------------------------------------- the kernel
_workspaces: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}


def workspace(n: int, cfg: GemvConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 partials [split, n] and zeroed tile counters for a split setting (made once:
    call it outside a CUDA graph capture)."""
    key = (str(device), n, cfg.block_n, cfg.split)
    ws = _workspaces.get(key)
    if ws is None:
        tiles = -(-n // cfg.block_n)
        ws = (
            torch.empty(cfg.split, n, dtype=torch.float32, device=device),
            torch.zeros(tiles, dtype=torch.int32, device=device),
        )
        _workspaces[key] = ws
    return ws


def launch(
    x: torch.Tensor,
    w_q: torch.Tensor,
    scales: torch.Tensor,
    shifts: torch.Tensor,
    cfg: GemvConfig,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ W for one row x [..., K] and packed int4 W ([K/8, N] words, [K/g, N] meta),
    into ``out`` if given (x's dtype)."""
    from ragtune import int4_gemv_kernel as kernels

    k8, n = w_q.shape
    k = k8 * 8
    group = k // scales.shape[0]
    if x.numel() != k:
        raise GemvError(f"the GEMV takes one row of {k} inputs, got {tuple(x.shape)}")
    for t in (w_q, scales, shifts):
        if not t.is_contiguous():
            raise GemvError("packed int4 tensors must be contiguous")
    tiles, per_split = plan(n, k, group, cfg)
    if out is None:
        out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    part, cnt = workspace(n, cfg, x.device) if cfg.split > 1 else (out, out)
    kernel = (
        kernels.w4a16_gemv_kernel,
        kernels.w4a16_gemv_block_kernel,
        kernels.w4a16_gemv_denorm_kernel,
    )[cfg.block]
    # the decode step's launches go early (ragtune.pdl): the denormal kernel, which settings use
    early = pdl.launch_options() if cfg.block == 2 else {}
    kernel[(tiles, cfg.split)](
        x.contiguous(),
        w_q,
        scales,
        shifts,
        out,
        part,
        cnt,
        n,
        GROUP=group,
        ITERS=per_split // cfg.rows,
        BLOCK_N=cfg.block_n,
        ROWS=cfg.rows,
        SPLIT=cfg.split,
        EVEN_N=n % cfg.block_n == 0,
        STAGES=cfg.stages,
        num_warps=cfg.num_warps,
        num_stages=cfg.stages,
        **early,
    )
    return out


@torch.library.custom_op("ragtune::int4_gemv", mutates_args=())
def int4_gemv(
    x: torch.Tensor,
    w_q: torch.Tensor,
    scales: torch.Tensor,
    shifts: torch.Tensor,
    config: list[int],
) -> torch.Tensor:
    """The kernel as an op torch.compile keeps opaque (and a CUDA graph captures). Its only
    side effect is the split workspace, restored by the kernel itself."""
    return launch(x, w_q, scales, shifts, GemvConfig(*config))


@int4_gemv.register_fake
def _int4_gemv_fake(x, w_q, scales, shifts, config):  # noqa: ANN001, ANN202
    return x.new_empty(*x.shape[:-1], w_q.shape[1])


# --------------------------------------------------------------------------- CPU emulation
def emulate(
    x: torch.Tensor, w_q: torch.Tensor, scales: torch.Tensor, shifts: torch.Tensor, cfg: GemvConfig
) -> torch.Tensor:
    """The kernel's indexing and arithmetic in PyTorch (float32, on any device): the same
    tiles, splits, group rows, word offsets and float tricks, for CPU tests without Triton."""
    k8, n = w_q.shape
    k = k8 * 8
    group = k // scales.shape[0]
    words_per_group = group // 8
    tiles, per_split = plan(n, k, group, cfg)
    xf = x.reshape(-1).float()
    w_flat = w_q.reshape(-1)
    s_flat, h_flat = scales.reshape(-1).float(), shifts.reshape(-1).float()
    bits = (15 << (4 * torch.arange(4, dtype=torch.int32))).view(1, 1, 1, 4, 1)
    pow16 = torch.tensor([1.0, 1 / 16, 1 / 256, 1 / 4096]).view(1, 4, 1)
    partials = torch.zeros(cfg.split, n)
    for pid_n in range(tiles):
        offs_n = pid_n * cfg.block_n + torch.arange(cfg.block_n)
        inside = offs_n < n
        cols = offs_n.clamp(max=n - 1)
        for pid_s in range(cfg.split):
            acc = torch.zeros(cfg.rows, cfg.block_n)
            for it in range(0, per_split, cfg.rows):
                g = pid_s * per_split + it + torch.arange(cfg.rows)  # [rows]
                word_rows = g[:, None] * words_per_group + torch.arange(words_per_group)
                words = w_flat[word_rows[..., None] * n + cols]  # [rows, words, block_n]
                words = torch.where(inside, words, 0)
                halves = torch.stack([words, words >> 16], 2)[:, :, :, None, :]  # lo, hi
                xg = xf[(g[:, None] * group + torch.arange(group))].view(
                    cfg.rows, words_per_group, 2, 4, 1
                )  # x[8w + 4h + j]: lo half j = 0..3, hi half j = 4..7
                if cfg.block == 2:  # codes as denormals q * 16**j * 2**-149, x * 2**100
                    q = (halves & bits).view(torch.float32)
                    xg = xg * DENORM_X
                else:
                    q = ((halves & bits) | MAGIC).view(torch.float32) - 8388608.0  # q * 16**j
                p = (q * xg).sum((1, 2))  # [rows, 4 positions, block_n]
                dot = (p * pow16).sum(1)
                meta = g[:, None] * n + cols
                sc = torch.where(inside, s_flat[meta], 0.0)
                sh = torch.where(inside, h_flat[meta], 0.0)
                xsum = xg.sum((1, 2, 3))
                if cfg.block == 2:
                    xsum = xsum * (1 / DENORM_X) * (1 / DENORM_Y)  # the products' 2**-49
                acc += dot * sc + sh * xsum
            partials[pid_s, offs_n[inside]] = acc.sum(0)[inside]
    out = partials[0] if cfg.split == 1 else partials.sum(0)
    if cfg.block == 2:
        out = out * DENORM_Y
    return out.to(x.dtype).view(*x.shape[:-1], n)
