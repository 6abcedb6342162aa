"""The Triton kernel of ``ragtune.int4_down`` (imported only where Triton is installed).

``int4_gemv_kernel.w4a16_gemv_denorm_kernel`` (the denormal kernel the H200 sweep chose for
the 12B ``down`` shape) with its input computed where it is loaded: x[k] = SiLU(gate[k]) *
up[k] from the gate|up projection's output row [2K] (gate first, as ``gate_up`` returns it),
so the step needs no separate SiLU-times-up kernel before ``down``. Every program recomputes
the activations of the groups it reads (its tile's K-slice); the extra exp and reciprocal a
value are not measured against the kernel they replace (docs/benchmarks.md, issue 20).

Two ways (``STAGED``; ``RAGTUNE_FUSED_DOWN=inline`` / ``on``): inline, each lane computes the activations it multiplies (every lane
of a row of lanes computes the same ones: ~2 MUFU ops and ~8 others per input per lane, on top
of the denormal loop's ~2 instructions a weight); staged, a program first computes its
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

from ragtune.int4_gemv_kernel import _finish

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


@triton.jit
def _x(ptrs, K: tl.constexpr, STAGED: tl.constexpr):
    """The float32 input at ``ptrs``: from the scratch vector, or computed here."""
    if STAGED:  # noqa: SIM108 (a constexpr branch, as the other kernels write them)
        x = tl.load(ptrs).to(tl.float32)
    else:
        x = _silu_mul(ptrs, K)
    return x


@triton.jit
def w4a16_gemv_silu_denorm_kernel(
    gu_ptr,  # [2K] gate | up (bf16/fp16/fp32)
    xs_ptr,  # [K] scratch in gu's dtype (STAGED), else unused
    w_ptr,  # [K // 8, N] int32 packed codes
    s_ptr,  # [K // GROUP, N] scales
    h_ptr,  # [K // GROUP, N] shifts
    out_ptr,  # [N]
    part_ptr,  # [SPLIT, N] float32 (SPLIT > 1)
    cnt_ptr,  # [cdiv(N, BLOCK_N)] int32 counters, zero between calls (SPLIT > 1)
    N,
    GROUP: tl.constexpr,
    ITERS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    SPLIT: tl.constexpr,
    EVEN_N: tl.constexpr,
    STAGES: tl.constexpr,
    STAGED: tl.constexpr,
):
    """The denormal kernel's loop and arithmetic (``int4_gemv_kernel``), x from ``_silu_mul``
    (inline or staged: the module docstring)."""
    WORDS: tl.constexpr = GROUP // 8
    K: tl.constexpr = SPLIT * ITERS * ROWS * GROUP  # up starts K after gate
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_n < N)[None, :]
    rows = tl.arange(0, ROWS)
    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    g_first = pid_s * (ITERS * ROWS)
    if STAGED:  # this program's K-slice of x, once, then read as the unfused kernel reads x
        for it in tl.range(0, ITERS):
            offs = (g_first + it * ROWS) * GROUP + tl.arange(0, ROWS * GROUP)
            tl.store(xs_ptr + offs, _silu_mul(gu_ptr + offs, K).to(xs_ptr.dtype.element_ty))
        tl.debug_barrier()  # every lane's values written before any lane reads them
        x_base = xs_ptr
    else:
        x_base = gu_ptr
    for it in tl.range(0, ITERS, num_stages=STAGES):
        g = g_first + it * ROWS + rows
        w_rows = w_ptr + (g * WORDS).to(tl.int64)[:, None] * N + offs_n[None, :]
        x_rows = x_base + (g * GROUP)[:, None]
        m_off = g.to(tl.int64)[:, None] * N + offs_n[None, :]
        if EVEN_N:
            sc = tl.load(s_ptr + m_off, eviction_policy="evict_first").to(tl.float32)
            sh = tl.load(h_ptr + m_off, eviction_policy="evict_first").to(tl.float32)
        else:
            sc = tl.load(s_ptr + m_off, mask=mask, other=0.0).to(tl.float32)
            sh = tl.load(h_ptr + m_off, mask=mask, other=0.0).to(tl.float32)
        p0 = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        p1 = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        p2 = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        p3 = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        p4 = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        xsum = tl.zeros([ROWS, 1], dtype=tl.float32)
        for w in tl.static_range(WORDS):
            if EVEN_N:
                lo = tl.load(w_rows + w * N, eviction_policy="evict_first")
            else:
                lo = tl.load(w_rows + w * N, mask=mask, other=0, eviction_policy="evict_first")
            up = lo.to(tl.uint32, bitcast=True) >> 12
            x0 = _x(x_rows + w * 8, K, STAGED) * 1.2676506002282294e30  # * 2**100, exact
            x1 = _x(x_rows + (w * 8 + 1), K, STAGED) * 1.2676506002282294e30
            x2 = _x(x_rows + (w * 8 + 2), K, STAGED) * 1.2676506002282294e30
            x3 = _x(x_rows + (w * 8 + 3), K, STAGED) * 1.2676506002282294e30
            x4 = _x(x_rows + (w * 8 + 4), K, STAGED) * 1.2676506002282294e30
            x5 = _x(x_rows + (w * 8 + 5), K, STAGED) * 1.2676506002282294e30
            x6 = _x(x_rows + (w * 8 + 6), K, STAGED) * 1.2676506002282294e30
            x7 = _x(x_rows + (w * 8 + 7), K, STAGED) * 1.2676506002282294e30
            p0 += (lo & 0xF).to(tl.float32, bitcast=True) * x0
            p1 += (lo & 0xF0).to(tl.float32, bitcast=True) * x1
            p2 += (lo & 0xF00).to(tl.float32, bitcast=True) * x2
            p3 += (lo & 0xF000).to(tl.float32, bitcast=True) * x3
            p4 += (lo & 0xF0000).to(tl.float32, bitcast=True) * x4
            p2 += (up & 0xF00).to(tl.float32, bitcast=True) * x5
            p3 += (up & 0xF000).to(tl.float32, bitcast=True) * x6
            p4 += (up & 0xF0000).to(tl.float32, bitcast=True) * x7
            xsum += ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
        dot = p0 + p1 * 0.0625 + p2 * 0.00390625 + p3 * 0.000244140625 + p4 * 1.52587890625e-05
        acc += dot * sc + sh * (xsum * 7.888609052210118e-31 * 1.7763568394002505e-15)
    y = tl.sum(acc, axis=0) * 562949953421312.0  # * 2**49
    _finish(y, offs_n, N, pid_n, pid_s, out_ptr, part_ptr, cnt_ptr, BLOCK_N, SPLIT)
