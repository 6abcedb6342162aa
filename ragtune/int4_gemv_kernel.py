"""The Triton kernel of ``ragtune.int4_gemv`` (imported only where Triton is installed).

y[n] = sum_k x[k] * (q[k, n] * scale[k // 64, n] + shift[k // 64, n]) for one input row, over
gemlite's packed layout (``ragtune.fastweights.pack_int4``): int32 word [k // 8, n] holds the
codes of inputs 8*(k // 8) .. +7 of output n, input k at bits 4*(k % 8).

A program owns BLOCK_N outputs and a range of whole groups (all of K, or 1/SPLIT of it); its
ROWS rows of lanes each walk their own group, so one program streams ROWS * BLOCK_N * 32 bytes
of words per step, 16 contiguous bytes a thread along the outputs. Per group a lane adds
x[k] * q over its 64 inputs in float32, then multiplies by the group's scale and adds
shift * sum(x): 3 instructions a weight (below) instead of a shift, an int->float conversion
(16 a clock per SM on Hopper: that alone caps a GEMV at ~2.9 ms for the 12B step) and an
FMA with the scale.

Why the codes are read without shifts or conversions: ``(word & (15 << 4j)) | 0x4B000000``
is the float32 2**23 + q * 16**j exactly (the code lands in the mantissa, < 2**16), so one
logical op and one subtraction give q * 16**j; the four positions j = 0..3 of a half-word
are summed into four accumulators, scaled by 16**-j once per group (exact: powers of two).
The upper half-word is shifted down once per word.

Three kernels over that layout: per-word loads (the loop below), each step's words as one
block load, and the *denormal* kernel (the per-word loop with codes read as float32 denormals:
~2 instructions a weight in the loop instead of ~4; ``w4a16_gemv_denorm_kernel``), which the
H200 sweep chose for every 12B shape (docs/benchmarks.md, issue 20, branch gemv2).

SPLIT > 1: each program writes its float32 partial sums to ``part`` [SPLIT, N]; the last of a
tile's SPLIT programs to arrive (a counter per tile, reset by that program) adds the SPLIT
partials in a fixed order and writes the output: deterministic, no memset, no atomics on
the output.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def w4a16_gemv_kernel(
    x_ptr,  # [K] activations (bf16/fp16/fp32)
    w_ptr,  # [K // 8, N] int32 packed codes
    s_ptr,  # [K // GROUP, N] scales
    h_ptr,  # [K // GROUP, N] shifts
    out_ptr,  # [N]
    part_ptr,  # [SPLIT, N] float32 (SPLIT > 1)
    cnt_ptr,  # [cdiv(N, BLOCK_N)] int32 counters, zero between calls (SPLIT > 1)
    N,
    GROUP: tl.constexpr,
    ITERS: tl.constexpr,  # steps of ROWS groups a program (constexpr: a known trip count)
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    SPLIT: tl.constexpr,
    EVEN_N: tl.constexpr,
    STAGES: tl.constexpr,
):
    WORDS: tl.constexpr = GROUP // 8
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_n < N)[None, :]
    rows = tl.arange(0, ROWS)
    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    g_first = pid_s * (ITERS * ROWS)
    for it in tl.range(0, ITERS, num_stages=STAGES):
        g = g_first + it * ROWS + rows  # [ROWS] the group each row of lanes reads
        w_rows = w_ptr + (g * WORDS).to(tl.int64)[:, None] * N + offs_n[None, :]
        x_rows = x_ptr + (g * GROUP)[:, None]
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
        xsum = tl.zeros([ROWS, 1], dtype=tl.float32)
        for w in tl.static_range(WORDS):  # unrolled: the compiler issues the loads up front
            if EVEN_N:
                lo = tl.load(w_rows + w * N, eviction_policy="evict_first")
            else:
                lo = tl.load(w_rows + w * N, mask=mask, other=0, eviction_policy="evict_first")
            hi = lo >> 16
            for j in tl.static_range(4):
                xa = tl.load(x_rows + (w * 8 + j)).to(tl.float32)
                xb = tl.load(x_rows + (w * 8 + 4 + j)).to(tl.float32)
                qa = ((lo & (15 << (4 * j))) | 0x4B000000).to(tl.float32, bitcast=True)
                qb = ((hi & (15 << (4 * j))) | 0x4B000000).to(tl.float32, bitcast=True)
                # one subtraction and one FMA a weight (two accumulations, no temporary sum)
                if j == 0:
                    p0 += (qa - 8388608.0) * xa
                    p0 += (qb - 8388608.0) * xb
                elif j == 1:
                    p1 += (qa - 8388608.0) * xa
                    p1 += (qb - 8388608.0) * xb
                elif j == 2:
                    p2 += (qa - 8388608.0) * xa
                    p2 += (qb - 8388608.0) * xb
                else:
                    p3 += (qa - 8388608.0) * xa
                    p3 += (qb - 8388608.0) * xb
                xsum += xa + xb
        dot = p0 + p1 * 0.0625 + p2 * 0.00390625 + p3 * 0.000244140625
        acc += dot * sc + sh * xsum
    y = tl.sum(acc, axis=0)  # [BLOCK_N]: the rows' groups, one reduction a program
    _finish(y, offs_n, N, pid_n, pid_s, out_ptr, part_ptr, cnt_ptr, BLOCK_N, SPLIT)


@triton.jit
def w4a16_gemv_block_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    h_ptr,
    out_ptr,
    part_ptr,
    cnt_ptr,
    N,
    GROUP: tl.constexpr,
    ITERS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    SPLIT: tl.constexpr,
    EVEN_N: tl.constexpr,
    STAGES: tl.constexpr,
):
    """The same product with each step's words read as one [ROWS, WORDS, BLOCK_N] block: one
    load statement, so every word of the step is in flight at once (the per-word loads above
    can wait for one another), x scaled by 16**-j up front (one accumulator a word), and the
    group sums kept per word until the end (one reduction a program)."""
    WORDS: tl.constexpr = GROUP // 8
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_n < N)[None, None, :]
    rows = tl.arange(0, ROWS)
    offs_w = tl.arange(0, WORDS)
    acc = tl.zeros([ROWS, WORDS, BLOCK_N], dtype=tl.float32)
    g_first = pid_s * (ITERS * ROWS)
    for it in tl.range(0, ITERS, num_stages=STAGES):
        g = g_first + it * ROWS + rows
        w_row = (g * WORDS)[:, None, None] + offs_w[None, :, None]  # [ROWS, WORDS, 1]
        w_ptrs = w_ptr + w_row.to(tl.int64) * N + offs_n[None, None, :]
        m_off = g.to(tl.int64)[:, None, None] * N + offs_n[None, None, :]  # [ROWS, 1, BLOCK_N]
        if EVEN_N:
            lo = tl.load(w_ptrs, eviction_policy="evict_first")
            sc = tl.load(s_ptr + m_off, eviction_policy="evict_first").to(tl.float32)
            sh = tl.load(h_ptr + m_off, eviction_policy="evict_first").to(tl.float32)
        else:
            lo = tl.load(w_ptrs, mask=mask, other=0, eviction_policy="evict_first")
            sc = tl.load(s_ptr + m_off, mask=mask, other=0.0).to(tl.float32)
            sh = tl.load(h_ptr + m_off, mask=mask, other=0.0).to(tl.float32)
        hi = lo >> 16
        x_word = x_ptr + (g * GROUP)[:, None, None] + offs_w[None, :, None] * 8  # [ROWS, WORDS, 1]
        d = tl.zeros([ROWS, WORDS, BLOCK_N], dtype=tl.float32)
        xsum = tl.zeros([ROWS, WORDS, 1], dtype=tl.float32)
        for j in tl.static_range(4):
            xa = tl.load(x_word + j).to(tl.float32)
            xb = tl.load(x_word + (4 + j)).to(tl.float32)
            xsum += xa + xb
            # exact (a power of two): q * 16**j * x * 16**-j = q * x
            if j == 1:
                xa = xa * 0.0625
                xb = xb * 0.0625
            elif j == 2:
                xa = xa * 0.00390625
                xb = xb * 0.00390625
            elif j == 3:
                xa = xa * 0.000244140625
                xb = xb * 0.000244140625
            qa = ((lo & (15 << (4 * j))) | 0x4B000000).to(tl.float32, bitcast=True)
            qb = ((hi & (15 << (4 * j))) | 0x4B000000).to(tl.float32, bitcast=True)
            d += (qa - 8388608.0) * xa
            d += (qb - 8388608.0) * xb
        acc += d * sc + sh * xsum
    y = tl.sum(tl.sum(acc, axis=1), axis=0)
    _finish(y, offs_n, N, pid_n, pid_s, out_ptr, part_ptr, cnt_ptr, BLOCK_N, SPLIT)


@triton.jit
def w4a16_gemv_denorm_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    h_ptr,
    out_ptr,
    part_ptr,
    cnt_ptr,
    N,
    GROUP: tl.constexpr,
    ITERS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    SPLIT: tl.constexpr,
    EVEN_N: tl.constexpr,
    STAGES: tl.constexpr,
    PDL: tl.constexpr = False,  # launched early (ragtune.pdl)
):
    """The per-word kernel's loop at ~2 instructions a weight: a code masked in place is read
    as a float32 *denormal* (``word & (15 << 4c)`` is q * 16**c * 2**-149 exactly while the
    code stays below bit 23), so one logical op and one FMA against x * 2**100 give
    q * x * 16**c * 2**-49 in float32 (a denormal times a normal is exact before the FMA's one
    rounding; PTX ``fma.rn.f32`` keeps denormals). Codes 0-4 are read in place, codes 5-7
    after one shift a word; five sums by power of 16, combined once a group. No magic number
    to subtract, no shift a code. All sums carry 2**-49 (normal for |q x| > 2**-77); the
    output is scaled back once."""
    WORDS: tl.constexpr = GROUP // 8
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_n < N)[None, :]
    rows = tl.arange(0, ROWS)
    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    g_first = pid_s * (ITERS * ROWS)
    if PDL:  # launched while the kernel before still runs (ragtune.pdl): nothing read before
        gdc_launch_dependents()  # the next kernel may launch now (it waits for this one)
        gdc_wait()
    for it in tl.range(0, ITERS, num_stages=STAGES):
        g = g_first + it * ROWS + rows
        w_rows = w_ptr + (g * WORDS).to(tl.int64)[:, None] * N + offs_n[None, :]
        x_rows = x_ptr + (g * GROUP)[:, None]
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
            # codes 0-4 (bits 0-19) are denormals in place; codes 5-7 (bits 20-31) would touch
            # the exponent: one logical shift puts them at bits 8-19
            up = lo.to(tl.uint32, bitcast=True) >> 12
            # x * 2**100: exact; |x| < 2**28 stays finite
            x0 = tl.load(x_rows + w * 8).to(tl.float32) * 1.2676506002282294e30
            x1 = tl.load(x_rows + (w * 8 + 1)).to(tl.float32) * 1.2676506002282294e30
            x2 = tl.load(x_rows + (w * 8 + 2)).to(tl.float32) * 1.2676506002282294e30
            x3 = tl.load(x_rows + (w * 8 + 3)).to(tl.float32) * 1.2676506002282294e30
            x4 = tl.load(x_rows + (w * 8 + 4)).to(tl.float32) * 1.2676506002282294e30
            x5 = tl.load(x_rows + (w * 8 + 5)).to(tl.float32) * 1.2676506002282294e30
            x6 = tl.load(x_rows + (w * 8 + 6)).to(tl.float32) * 1.2676506002282294e30
            x7 = tl.load(x_rows + (w * 8 + 7)).to(tl.float32) * 1.2676506002282294e30
            p0 += (lo & 0xF).to(tl.float32, bitcast=True) * x0
            p1 += (lo & 0xF0).to(tl.float32, bitcast=True) * x1
            p2 += (lo & 0xF00).to(tl.float32, bitcast=True) * x2
            p3 += (lo & 0xF000).to(tl.float32, bitcast=True) * x3
            p4 += (lo & 0xF0000).to(tl.float32, bitcast=True) * x4
            p2 += (up & 0xF00).to(tl.float32, bitcast=True) * x5
            p3 += (up & 0xF000).to(tl.float32, bitcast=True) * x6
            p4 += (up & 0xF0000).to(tl.float32, bitcast=True) * x7
            xsum += ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
        # code at bit 4c carries 16**c: exact powers of two
        dot = p0 + p1 * 0.0625 + p2 * 0.00390625 + p3 * 0.000244140625 + p4 * 1.52587890625e-05
        # sum(x) * 2**100 -> * 2**-149 as the products carry: two normal power-of-two factors
        acc += dot * sc + sh * (xsum * 7.888609052210118e-31 * 1.7763568394002505e-15)
    y = tl.sum(acc, axis=0) * 562949953421312.0  # * 2**49
    _finish(y, offs_n, N, pid_n, pid_s, out_ptr, part_ptr, cnt_ptr, BLOCK_N, SPLIT)


@triton.jit
def _finish(
    y,
    offs_n,
    N,
    pid_n,
    pid_s,
    out_ptr,
    part_ptr,
    cnt_ptr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Write a tile's sums, or its split's partial sums and, for the tile's last split to
    arrive, their fixed-order total."""
    out_mask = offs_n < N
    if SPLIT == 1:
        tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(part_ptr + pid_s * N + offs_n, y, mask=out_mask)
        tl.debug_barrier()  # every lane's partial is written before the counter moves
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT - 1:  # the tile's last program: add the partials in split order
            total = tl.zeros([BLOCK_N], dtype=tl.float32)
            for s in tl.static_range(SPLIT):
                total += tl.load(
                    part_ptr + s * N + offs_n, mask=out_mask, other=0.0, cache_modifier=".cg"
                )
            tl.store(out_ptr + offs_n, total.to(out_ptr.dtype.element_ty), mask=out_mask)
            # ready for the next call (no memset): the tile's other programs have all counted
            # and the next launch is ordered after this one: a plain store, no fence
            tl.store(cnt_ptr + pid_n, 0)
