"""The Triton kernel of ``ragtune.decode_attention`` (imported only where Triton is installed).

One decode step's attention for one layer: each program takes one KV head of one row and a
chunk of the cache's slots, and computes, for the G query heads sharing that KV head, the
scores against the chunk, the masked softmax (online, float32) and the weighted sum of V;
the chunk's running max, denominator and unnormalised output (the G real rows only) go to a
float32 workspace. The last program of a (row, KV head) to arrive (a counter, as the int4
GEMV's split-K does) loads every chunk's partials in one go (a [chunks, G, D] tile), rescales
and sums them over the chunks and writes the output: one kernel a layer, deterministic (a
fixed reduction tree), no memset (that program resets its counter).

With WRITE (the decode step), the program also rotates this step's K, and the program whose
chunk holds the step's slot writes K/V there; with ROPE it rotates q: the step's rotation and
cache-write kernels go. The slot is one for every row (a left-padded batch) or, with ROW_SLOT,
each row's own (the continuous batcher's rows, each at its position, seeing no slot past it):
then slots past a row's own are not loaded, so it reads only its filled part of the cache.
Without ROW_SLOT the cache loads depend on the program ids and ``n`` only, so they are issued
before the RoPE tables and the slot arrive.

Scores and sums are float32. 16-bit operands: tensor-core dots with float32 accumulation (the
products of 16-bit values are exact); the probabilities go to V's dtype for P.V. A float32
cache: ``input_precision="ieee"`` (no TF32). The G <= 16 query heads are padded to 16 rows for
``tl.dot`` (a few kFLOP a block: the kernel's time is its launch and its memory round trips).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

# a finite "minus infinity": a chunk with no visible slot rescales to 0, not NaN
NEG = tl.constexpr(-1.0e30)


@triton.jit
def _block(
    q, seen, kb, vb, s, slot, kn, vn, m_i, l_i, acc, scale, WRITE: tl.constexpr, IEEE: tl.constexpr
):
    """One block of slots into the online softmax: (m_i, l_i, acc) updated."""
    if WRITE:  # this step's K/V at its slot: the values in registers, not the cache's
        at = (s == slot)[:, None]
        kb = tl.where(at, kn[None, :], kb)
        vb = tl.where(at, vn[None, :], vb)
    if IEEE:  # float32 cache: no TF32
        sc = tl.dot(q, tl.trans(kb.to(tl.float32)), input_precision="ieee")
    else:  # 16-bit: q is 16-bit exactly, so the products are exact, summed in float32
        sc = tl.dot(q.to(kb.dtype), tl.trans(kb))
    sc = sc * scale
    sc = tl.where((seen != 0)[None, :], sc, float("-inf"))  # [GP, BLOCK_S]
    m_new = tl.maximum(m_i, tl.max(sc, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(sc - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if IEEE:
        pv = tl.dot(p, vb.to(tl.float32), input_precision="ieee")
    else:  # the probabilities rounded to V's dtype, as the matmul path (and HF) do
        pv = tl.dot(p.to(vb.dtype), vb)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def decode_attention_kernel(
    q_ptr,  # [B, Hkv * G, D], heads and dims contiguous (rows: stride sqb)
    k_ptr,  # [B, Hkv, >= n, D], last dim contiguous
    v_ptr,  # same layout as K
    m_ptr,  # [B, n] uint8: 1 = the slot is seen
    o_ptr,  # [B, Hkv * G, D] contiguous, q's dtype
    cos_ptr,  # [positions, D] RoPE tables (ROPE)
    sin_ptr,
    pos_ptr,  # [B] int64: each row's position (ROPE)
    kn_ptr,  # [B, Hkv, D] this step's K (unrotated) and V rows (WRITE; rows: strides snb, svnb)
    vn_ptr,
    slot_ptr,  # int64: the cache slot they go to (WRITE; < n), [1] or [B] (ROW_SLOT)
    ws_acc,  # [B * Hkv, MAX_CHUNKS, GR, D] float32
    ws_ml,  # [B * Hkv, 2, MAX_CHUNKS, GR] float32: running max, denominator
    cnt_ptr,  # [B * Hkv] int32, zero between calls
    n,  # slots attended (the bucket)
    chunks,  # programs along the slots (<= MAX_CHUNKS)
    scale,
    sqb,
    snb,
    svnb,
    skb,
    skh,
    sks,
    svb,
    svh,
    svs,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,  # G padded to 16 rows (tl.dot's least)
    GR: tl.constexpr,  # G rounded up to a power of two: the rows kept in the workspace
    D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PER: tl.constexpr,  # blocks of BLOCK_S slots a program walks
    MAX_CHUNKS: tl.constexpr,
    ROPE: tl.constexpr,  # q comes unrotated: rotate it here (one kernel a layer fewer)
    WRITE: tl.constexpr,  # rotate this step's K and write K/V to the cache here (ROPE too)
    ROW_SLOT: tl.constexpr,  # a slot per row (WRITE): slots past a row's own are not read
    IEEE: tl.constexpr,  # a float32 cache: float32 products (else 16-bit tensor-core dots)
    PDL: tl.constexpr = False,  # launched early (ragtune.pdl): the cache read before the wait
):
    bh = tl.program_id(0)
    c = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    s_off = tl.arange(0, BLOCK_S)
    heads = h * G + g
    q_mask = (g < G)[:, None]
    q_at = q_ptr + b.to(tl.int64) * sqb + heads[:, None] * D
    if PDL:
        gdc_launch_dependents()  # the next kernel may launch now (it waits for this one)
        if ROW_SLOT:  # the cache loads need the slot: nothing before the wait
            gdc_wait()
    else:
        q = tl.load(q_at + d[None, :], mask=q_mask, other=0.0).to(tl.float32)
    k_base = k_ptr + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = v_ptr + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    first = c * PER * BLOCK_S
    if WRITE and not PDL:
        slot = tl.load(slot_ptr + b * ROW_SLOT)
    if not ROW_SLOT:  # the first block's loads go out before the tables and the slot arrive
        s0 = first + s_off
        if not PDL:
            seen0 = tl.load(m_ptr + b * n + s0, mask=s0 < n, other=0)
        kb0 = tl.load(k_base + s0[:, None] * sks + d[None, :], mask=(s0 < n)[:, None], other=0.0)
        vb0 = tl.load(v_base + s0[:, None] * svs + d[None, :], mask=(s0 < n)[:, None], other=0.0)
    if PDL:  # earlier steps wrote the cache; the kernels before this one write the rest
        if not ROW_SLOT:
            gdc_wait()
        q = tl.load(q_at + d[None, :], mask=q_mask, other=0.0).to(tl.float32)
        if WRITE:
            slot = tl.load(slot_ptr + b * ROW_SLOT)
        if not ROW_SLOT:
            seen0 = tl.load(m_ptr + b * n + s0, mask=s0 < n, other=0)
    if ROPE:  # transformers' q * cos + rotate_half(q) * sin, rounded once to q's dtype
        half: tl.constexpr = D // 2
        p_b = tl.load(pos_ptr + b).to(tl.int64)
        turned = tl.load(q_at + ((d + half) % D)[None, :], mask=q_mask, other=0.0)
        turned = tl.where((d < half)[None, :], -turned.to(tl.float32), turned.to(tl.float32))
        cs = tl.load(cos_ptr + p_b * D + d).to(tl.float32)
        sn = tl.load(sin_ptr + p_b * D + d).to(tl.float32)
        q = (q * cs[None, :] + turned * sn[None, :]).to(q_ptr.dtype.element_ty).to(tl.float32)
        if WRITE:  # the K/V rows of this step: rotated K rounded to the cache's dtype
            kn_at = kn_ptr + b.to(tl.int64) * snb + h * D
            kt = tl.load(kn_at + (d + half) % D).to(tl.float32)
            kt = tl.where(d < half, -kt, kt)
            kn = (tl.load(kn_at + d).to(tl.float32) * cs + kt * sn).to(k_ptr.dtype.element_ty)
            vn = tl.load(vn_ptr + b.to(tl.int64) * svnb + h * D + d).to(v_ptr.dtype.element_ty)
            # the program whose chunk holds the slot writes it (no other program reads it) and
            # uses these values in place of what it loads there (its own store may not be
            # visible to its other lanes yet)
            own = (slot >= first) & (slot < first + PER * BLOCK_S)
            tl.store(k_base + slot * sks + d, kn, mask=own & (d < D))
            tl.store(v_base + slot * svs + d, vn, mask=own & (d < D))
    m_i = tl.full([GP], NEG, dtype=tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, D], dtype=tl.float32)
    if ROW_SLOT:
        s0 = first + s_off
        inside = (s0 < n) & (s0 <= slot)  # a row with its own slot sees none past it: unread
        seen0 = tl.load(m_ptr + b * n + s0, mask=inside, other=0)
        kb0 = tl.load(k_base + s0[:, None] * sks + d[None, :], mask=inside[:, None], other=0.0)
        vb0 = tl.load(v_base + s0[:, None] * svs + d[None, :], mask=inside[:, None], other=0.0)
    if not WRITE:  # (unread: no slot)
        slot, kn, vn = 0, 0.0, 0.0
    m_i, l_i, acc = _block(q, seen0, kb0, vb0, s0, slot, kn, vn, m_i, l_i, acc, scale, WRITE, IEEE)
    for it in range(1, PER):
        s = first + it * BLOCK_S + s_off  # [BLOCK_S] cache slots
        inside = s < n
        if ROW_SLOT:
            inside = inside & (s <= slot)
        seen = tl.load(m_ptr + b * n + s, mask=inside, other=0)
        kb = tl.load(k_base + s[:, None] * sks + d[None, :], mask=inside[:, None], other=0.0)
        vb = tl.load(v_base + s[:, None] * svs + d[None, :], mask=inside[:, None], other=0.0)
        m_i, l_i, acc = _block(q, seen, kb, vb, s, slot, kn, vn, m_i, l_i, acc, scale, WRITE, IEEE)
    # this chunk's partials (the G real rows), then the (row, head)'s last program combines
    real = g < G
    part = bh * MAX_CHUNKS + c
    tl.store(ws_acc + (part * GR + g)[:, None] * D + d[None, :], acc, mask=real[:, None])
    tl.store(ws_ml + (bh * 2 * MAX_CHUNKS + c) * GR + g, m_i, mask=real)
    tl.store(ws_ml + ((bh * 2 + 1) * MAX_CHUNKS + c) * GR + g, l_i, mask=real)
    tl.debug_barrier()  # every lane's partials are written before the counter moves
    arrived = tl.atomic_add(cnt_ptr + bh, 1, sem="acq_rel")
    if arrived == chunks - 1:
        # every chunk at once: [MAX_CHUNKS, GR] maxima and denominators, [MAX_CHUNKS, GR, D]
        # outputs, chunks past `chunks` and rows past G masked; sums over the chunk axis
        j = tl.arange(0, MAX_CHUNKS)[:, None]
        r = tl.arange(0, GR)[None, :]
        ok = (j < chunks) & (r < G)
        at = (bh * 2 * MAX_CHUNKS + j) * GR + r
        mj = tl.load(ws_ml + at, mask=ok, other=NEG, cache_modifier=".cg")
        lj = tl.load(ws_ml + at + MAX_CHUNKS * GR, mask=ok, other=0.0, cache_modifier=".cg")
        aj = tl.load(
            ws_acc + ((bh * MAX_CHUNKS + j) * GR + r)[:, :, None] * D + d[None, None, :],
            mask=ok[:, :, None],
            other=0.0,
            cache_modifier=".cg",
        )
        w = tl.exp(mj - tl.max(mj, axis=0)[None, :])  # [MAX_CHUNKS, GR]
        o = tl.sum(aj * w[:, :, None], axis=0) / tl.sum(lj * w, axis=0)[:, None]  # [GR, D]
        rr = tl.arange(0, GR)
        o_rows = (b * HKV * G + h * G + rr)[:, None] * D + d[None, :]
        tl.store(o_ptr + o_rows, o.to(o_ptr.dtype.element_ty), mask=(rr < G)[:, None])
        # ready for the next call (no memset): every other program of the pair has counted, and
        # the next launch is ordered after this one, so a plain store (no fence) will do
        tl.store(cnt_ptr + bh, 0)
