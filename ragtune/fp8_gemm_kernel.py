"""The Triton kernel of ``ragtune.fp8_gemm`` (imported only where Triton is installed).

y[m, n] = bf16(sx[m] * sw[n] * sum_k xq[m, k] * w[n, k]) for e4m3 ``xq`` [M, K] and ``w`` [N, K]
(both K-contiguous, as ``Fp8Linear`` stores them), float32 scales per token and per channel.

Why swapped operands: at 32 rows the product is a GEMV-like read of the weights; a program owns
BLOCK_N weight rows (the MMA's M side, >= 64 for Hopper's wgmma) and all BLOCK_M tokens (the
MMA's N side, which may be as narrow as 8), so narrow tiles of weights give enough programs to
cover the SMs without padding the 32 tokens up to a 64- or 128-row tile. Both operands are
K-major, which is what FP8 wgmma requires.

SPLIT > 1: each program covers 1/SPLIT of K and writes its float32 partial tile to ``part``
[SPLIT, M_MAX, N]; the last of a tile's SPLIT programs to arrive (a counter per tile, reset by
that program) adds the partials in split order, applies the scales and writes the output:
deterministic, no memset, no atomics on the output (the scheme of ``int4_gemv_kernel``).

A token's result depends on its own row only: each output element is one dot product over K
in a fixed order (the K loop, then the split order), whatever the other rows hold, and ``M`` is
not specialized (``do_not_specialize``), so one row alone runs the same code as 32 rows.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["M"])
def fp8_gemm_kernel(
    x_ptr,  # [M, K] e4m3
    w_ptr,  # [N, K] e4m3
    sx_ptr,  # [M] float32, one scale a token
    sw_ptr,  # [N] float32, one scale an output channel
    out_ptr,  # [M, N] bf16
    part_ptr,  # [SPLIT, M_MAX, N] float32 (SPLIT > 1)
    cnt_ptr,  # [tiles_n * tiles_m] int32 counters, zero between calls (SPLIT > 1)
    M,
    N: tl.constexpr,
    K: tl.constexpr,
    M_MAX: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,
    STAGES: tl.constexpr,
):
    ITERS: tl.constexpr = K // (SPLIT * BLOCK_K)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_s * (ITERS * BLOCK_K) + tl.arange(0, BLOCK_K)
    m_in = offs_m < M
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for _ in tl.range(0, ITERS, num_stages=STAGES):
        w = tl.load(w_ptrs, eviction_policy="evict_first")  # each weight is read once
        x = tl.load(x_ptrs, mask=m_in[:, None], other=0.0)
        acc = tl.dot(w, tl.trans(x), acc)  # [BLOCK_N, BLOCK_M]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    out_off = offs_m[None, :] * N + offs_n[:, None]  # the tile is [n, m]; out is [M, N]
    if SPLIT == 1:
        _store(acc, sx_ptr, sw_ptr, out_ptr, out_off, offs_n, offs_m, m_in)
    else:
        tile = pid_m * tl.num_programs(0) + pid_n
        p_off = offs_m[None, :] * N + offs_n[:, None]
        tl.store(part_ptr + pid_s * (M_MAX * N) + p_off, acc, mask=m_in[None, :])
        tl.debug_barrier()  # every lane's partial is written before the counter moves
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT - 1:  # the tile's last program: add the partials in split order
            total = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            for s in tl.static_range(SPLIT):
                total += tl.load(
                    part_ptr + s * (M_MAX * N) + p_off,
                    mask=m_in[None, :],
                    other=0.0,
                    cache_modifier=".cg",
                )
            _store(total, sx_ptr, sw_ptr, out_ptr, out_off, offs_n, offs_m, m_in)
            tl.atomic_xchg(cnt_ptr + tile, 0)  # ready for the next call (no memset)


@triton.jit
def _store(acc, sx_ptr, sw_ptr, out_ptr, out_off, offs_n, offs_m, m_in):
    """The scales in the epilogue (as ``_scaled_mm``'s row-wise path: float32, then one bf16
    rounding)."""
    sw = tl.load(sw_ptr + offs_n)
    sx = tl.load(sx_ptr + offs_m, mask=m_in, other=0.0)
    y = acc * sw[:, None] * sx[None, :]
    tl.store(out_ptr + out_off, y.to(out_ptr.dtype.element_ty), mask=m_in[None, :])
