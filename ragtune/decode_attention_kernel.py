"""The Triton kernel of ``ragtune.decode_attention`` (imported only where Triton is installed).

One decode step's attention for one layer: each program takes one KV head of one row and a
chunk of the cache's slots, and computes, for the G query heads sharing that KV head, the
scores against the chunk, the masked softmax (online, float32) and the weighted sum of V;
the chunk's running max, denominator and unnormalised output go to a float32 workspace.
The last program of a (row, KV head) to arrive (a counter, as the int4 GEMV's split-K does)
rescales and adds the chunks in chunk order and writes the output: one kernel a layer,
deterministic, no memset (that program resets its counter).

With WRITE (the decode step), the program also rotates this step's K, and the program whose
chunk holds the step's slot writes K/V there; with ROPE it rotates q: the step's rotation and
cache-write kernels go. The slot is one for every row (a left-padded batch) or each row's own
(the continuous batcher's rows, each at its position, seeing no slot past it): then slots past
a row's own are not loaded, so it reads only its filled part of the cache.

Scores and sums are float32. 16-bit operands: tensor-core dots with float32 accumulation (the
products of 16-bit values are exact); the probabilities go to V's dtype for P.V. A float32
cache: ``input_precision="ieee"`` (no TF32). The G <= 16 query heads are padded to 16 rows for
``tl.dot`` (a few kFLOP a block: the kernel's time is its launch and the cache's bytes).
"""

from __future__ import annotations

import triton
import triton.language as tl

# a finite "minus infinity": a chunk with no visible slot rescales to 0, not NaN
NEG = tl.constexpr(-1.0e30)


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
    slot_ptr,  # int64: the cache slot they go to (WRITE; < n), [1] or [B] (a slot per row)
    ws_acc,  # [B * Hkv, MAX_CHUNKS, GP, D] float32
    ws_ml,  # [B * Hkv, MAX_CHUNKS, 2, GP] float32: running max, denominator
    cnt_ptr,  # [B * Hkv] int32, zero between calls
    n,  # slots attended (the bucket)
    chunks,  # programs along the slots (<= MAX_CHUNKS)
    scale,
    ssl,  # slot stride: 0 = one slot for every row, 1 = a slot per row (the batcher's rows)
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
    D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PER: tl.constexpr,  # blocks of BLOCK_S slots a program walks (1-2 up to 2,048 slots)
    MAX_CHUNKS: tl.constexpr,
    ROPE: tl.constexpr,  # q comes unrotated: rotate it here (one kernel a layer fewer)
    WRITE: tl.constexpr,  # rotate this step's K and write K/V to the cache here (ROPE too)
    IEEE: tl.constexpr,  # a float32 cache: float32 products (else 16-bit tensor-core dots)
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
    q = tl.load(q_at + d[None, :], mask=q_mask, other=0.0).to(tl.float32)
    k_base = k_ptr + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = v_ptr + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    if ROPE:  # transformers' q * cos + rotate_half(q) * sin, rounded once to q's dtype
        half: tl.constexpr = D // 2
        p_b = tl.load(pos_ptr + b).to(tl.int64)
        turned = tl.load(q_at + ((d + half) % D)[None, :], mask=q_mask, other=0.0)
        turned = tl.where((d < half)[None, :], -turned.to(tl.float32), turned.to(tl.float32))
        cs = tl.load(cos_ptr + p_b * D + d).to(tl.float32)
        sn = tl.load(sin_ptr + p_b * D + d).to(tl.float32)
        q = (q * cs[None, :] + turned * sn[None, :]).to(q_ptr.dtype.element_ty).to(tl.float32)
        if WRITE:  # the K/V rows of this step: rotated K rounded to the cache's dtype
            slot = tl.load(slot_ptr + b * ssl)
            kn_at = kn_ptr + b.to(tl.int64) * snb + h * D
            kt = tl.load(kn_at + (d + half) % D).to(tl.float32)
            kt = tl.where(d < half, -kt, kt)
            kn = (tl.load(kn_at + d).to(tl.float32) * cs + kt * sn).to(k_ptr.dtype.element_ty)
            vn = tl.load(vn_ptr + b.to(tl.int64) * svnb + h * D + d).to(v_ptr.dtype.element_ty)
            # the program whose chunk holds the slot writes it (no other program reads it) and
            # uses these values in place of what it loads there (its own store may not be
            # visible to its other lanes yet)
            lo = c * PER * BLOCK_S
            own = (slot >= lo) & (slot < lo + PER * BLOCK_S)
            tl.store(k_base + slot * sks + d, kn, mask=own & (d < D))
            tl.store(v_base + slot * svs + d, vn, mask=own & (d < D))
    o_rows = (b * HKV * G + heads)[:, None] * D + d[None, :]
    m_i = tl.full([GP], NEG, dtype=tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, D], dtype=tl.float32)
    first = c * PER * BLOCK_S
    for it in range(0, PER):
        s = first + it * BLOCK_S + s_off  # [BLOCK_S] cache slots
        inside = s < n
        if WRITE:  # a row with its own slot sees none past it: those are not read
            inside = inside & ((s <= slot) | (ssl == 0))
        seen = tl.load(m_ptr + b * n + s, mask=inside, other=0) != 0
        kb = tl.load(k_base + s[:, None] * sks + d[None, :], mask=inside[:, None], other=0.0)
        vb = tl.load(v_base + s[:, None] * svs + d[None, :], mask=inside[:, None], other=0.0)
        if WRITE:
            at = (s == slot)[:, None]
            kb = tl.where(at, kn[None, :], kb)
            vb = tl.where(at, vn[None, :], vb)
        if IEEE:  # float32 cache: no TF32
            sc = tl.dot(q, tl.trans(kb.to(tl.float32)), input_precision="ieee")
        else:  # 16-bit: q is 16-bit exactly, so the products are exact, summed in float32
            sc = tl.dot(q.to(kb.dtype), tl.trans(kb))
        sc = sc * scale
        sc = tl.where(seen[None, :], sc, float("-inf"))  # [GP, BLOCK_S]
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            pv = tl.dot(p, vb.to(tl.float32), input_precision="ieee")
        else:  # the probabilities rounded to V's dtype, as the matmul path (and HF) do
            pv = tl.dot(p.to(vb.dtype), vb)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    # this chunk's partial result, then the (row, head)'s last program combines all chunks
    part = bh * MAX_CHUNKS + c
    tl.store(ws_acc + (part * GP + g)[:, None] * D + d[None, :], acc)
    tl.store(ws_ml + (part * 2) * GP + g, m_i)
    tl.store(ws_ml + (part * 2 + 1) * GP + g, l_i)
    tl.debug_barrier()  # every lane's partials are written before the counter moves
    arrived = tl.atomic_add(cnt_ptr + bh, 1, sem="acq_rel")
    if arrived == chunks - 1:
        # a loop of known length, chunks past `chunks` masked (Triton's interpreter takes no
        # runtime loop bounds)
        m_all = tl.full([GP], NEG, dtype=tl.float32)
        for j in range(0, MAX_CHUNKS):
            mj = tl.load(
                ws_ml + ((bh * MAX_CHUNKS + j) * 2) * GP + g,
                mask=(g < GP) & (j < chunks),
                other=NEG,
                cache_modifier=".cg",
            )
            m_all = tl.maximum(m_all, mj)
        l_all = tl.zeros([GP], dtype=tl.float32)
        o = tl.zeros([GP, D], dtype=tl.float32)
        for j in range(0, MAX_CHUNKS):  # chunk order: the same sums every call
            pj = bh * MAX_CHUNKS + j
            ok = j < chunks
            mj = tl.load(
                ws_ml + (pj * 2) * GP + g, mask=(g < GP) & ok, other=NEG, cache_modifier=".cg"
            )
            lj = tl.load(
                ws_ml + (pj * 2 + 1) * GP + g, mask=(g < GP) & ok, other=0.0, cache_modifier=".cg"
            )
            aj = tl.load(
                ws_acc + (pj * GP + g)[:, None] * D + d[None, :],
                mask=(d < D)[None, :] & ok,
                other=0.0,
                cache_modifier=".cg",
            )
            w = tl.exp(mj - m_all)
            l_all += lj * w
            o += aj * w[:, None]
        o = o / l_all[:, None]
        tl.store(o_ptr + o_rows, o.to(o_ptr.dtype.element_ty), mask=q_mask)
        tl.atomic_xchg(cnt_ptr + bh, 0)  # ready for the next call (no memset)
