"""One decode step's grouped-query attention as one kernel a layer (``ragtune::decode_attention``).

Why: at batch 1 the step's attention was three kernels a layer (cuBLAS Q.K^T, inductor's masked
softmax, cuBLAS P.V) plus the kernels that rotate q and k and write K/V to the cache: ~0.49
ms a token at the 12B shape on an H200 for ~125 MB of cache, i.e. launch latency, not bytes
(docs/benchmarks.md, issue 20, dec3). ``decode_attention_write`` (the decode step's op) does the
rotations, the cache write, the scores, the masked softmax and P.V in one Triton launch
(``ragtune/decode_attention_kernel.py``), split over chunks of the cache's slots (a program per
KV head and chunk; the last to arrive combines: deterministic, no memset).
``decode_attention`` is the attention alone (q optionally rotated).

Arithmetic: scores and sums in float32; 16-bit q/K/V go through tensor-core dots whose products
are exact (q is rounded to 16 bits after its rotation, as the step did), the probabilities are
rounded to V's dtype for P.V as the matmul path (and HF) round them; a float32 cache uses
float32 products (no TF32). The reference path (``reference``; CPU, shapes the kernel does not
take, or ``MODE = "off"``) is the matmul attention the step ran before: 16-bit Q.K^T, float32
softmax, probabilities rounded to 16 bits, 16-bit P.V. The two differ by the 16-bit rounding
of the scores and by where the softmax's maximum is taken (per chunk, then combined).

``MODE`` (``RAGTUNE_DECODE_ATTENTION``: ``auto`` = the kernel on CUDA where Triton imports,
``off`` = the reference) is read at each call: a CUDA graph keeps whichever path was on when
it was captured (``bench/decode.py`` captures both for its before/after).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

from ragtune import pdl

ENV = "RAGTUNE_DECODE_ATTENTION"
MODE = os.environ.get(ENV, "auto").lower()
BLOCK_S = 64  # slots a program reads per step of its loop
NUM_WARPS = 4
MAX_CHUNKS = 16  # programs along the slots (per row and KV head): 8 x 12 at 768 slots, 12B
# programs a layer to aim for when each row has its own slot (the batcher's 32 rows x 8 KV
# heads: 2 chunks of 8 blocks, not 16 of 1; at 16 each, H200: latency-bound, docs/benchmarks.md;
# not yet measured)
MANY_PROGRAMS = 512


def kernel_unsupported(q: torch.Tensor, k: torch.Tensor) -> str | None:
    """Why the Triton kernel cannot take this call, or None."""
    if MODE not in ("auto", "off"):
        raise ValueError(f"{ENV}={MODE!r}: use 'auto' or 'off'")
    if MODE == "off":
        return f"{ENV}=off"
    if os.environ.get("TRITON_INTERPRET") == "1":  # Triton's interpreter: CPU tensors
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
    else:
        from ragtune.cuda_check import cuda_unavailable_for

        why = cuda_unavailable_for("triton")
        if why or not q.is_cuda:
            return why or "not on CUDA"
    d = q.shape[-1]
    if d < 16 or d & (d - 1) or k.stride(-1) != 1:
        return f"head dim {d} (the kernel takes powers of two >= 16, rows contiguous)"
    if q.shape[1] // k.shape[1] > 16:
        return "more than 16 query heads a KV head"
    return None


def rotate(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor):
    """transformers' RoPE of q [B, H, D] at positions pos [B] (tables [positions, D]), in
    float32 with one rounding to q's dtype, as the compiled step computes it."""
    c, s = cos[pos][:, None, :].float(), sin[pos][:, None, :].float()
    half = q.shape[-1] // 2
    qf = q.float()
    turned = torch.cat((-qf[..., half:], qf[..., :half]), dim=-1)
    return (qf * c + turned * s).to(q.dtype)


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seen: torch.Tensor,
    scale: float,
    rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The matmul attention (what ``DirectStack`` ran before the kernel): q [B, H, D], K/V
    [B, Hkv, n, D], seen [B, n] bool -> [B, H, D]. Head h uses KV head h // G, as
    transformers' ``repeat_kv``; the G heads are folded into the query length so the cache is
    read once per KV head. ``rope``: (cos, sin, pos) to rotate q with first."""
    if rope is not None:
        q = rotate(q, *rope)
    bsz, n_heads, d = q.shape
    n_kv = k.shape[1]
    qg = q.reshape(bsz, n_kv, n_heads // n_kv, d)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [B, Hkv, G, n]
    scores = scores.masked_fill(~seen[:, None, None, :], float("-inf"))
    o = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)
    return o.reshape(bsz, n_heads, d)


def _pow2(x: int) -> int:
    """The least power of two >= x (x >= 1)."""
    return 1 << (x - 1).bit_length()


_workspaces: dict[tuple[Any, ...], tuple[torch.Tensor, ...]] = {}


def workspace(rows: int, gr: int, d: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Float32 partials of every chunk (``gr`` query heads a KV head: G rounded up to a power
    of two) and zeroed counters, one set per (device, shape), made at the first (uncaptured)
    call; kernels on one stream run one after another, so the layers share it."""
    key = (str(device), rows, gr, d, MAX_CHUNKS)
    ws = _workspaces.get(key)
    if ws is None:
        ws = (
            torch.empty(rows, MAX_CHUNKS, gr, d, dtype=torch.float32, device=device),
            torch.empty(rows, 2, MAX_CHUNKS, gr, dtype=torch.float32, device=device),
            torch.zeros(rows, dtype=torch.int32, device=device),
        )
        _workspaces[key] = ws
    return ws


def chunking(n: int, rows: int = 0) -> tuple[int, int]:
    """(blocks of BLOCK_S slots a program walks, programs along the slots) for ``n`` slots;
    ``rows`` (row x KV head pairs; 0: as at batch 1): with many, fewer chunks each, so that
    there are about ``MANY_PROGRAMS`` programs, not ``MAX_CHUNKS`` a pair."""
    blocks = -(-n // BLOCK_S)
    most = MAX_CHUNKS if rows <= 0 else max(1, min(MAX_CHUNKS, -(-MANY_PROGRAMS // rows)))
    per = -(-blocks // most)
    return per, -(-blocks // per)


def launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seen: torch.Tensor,
    scale: float,
    rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    write: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The Triton kernel: q [B, H, D] (a view of the q|k|v output is fine), K/V
    [B, Hkv, n, D] (views of the cache are fine), seen [B, n] bool -> [B, H, D] in q's dtype;
    ``rope`` = (cos, sin, pos): q is rotated in the kernel; ``write`` = (k_new, v_new, slot):
    this step's K (rotated in the kernel) and V rows [B, Hkv, D] go to cache slot ``slot``
    ([1]: every row's, or [B]: each row's own; < n) first (needs ``rope``)."""
    from ragtune.decode_attention_kernel import decode_attention_kernel

    bsz, n_heads, d = q.shape
    n_kv, n = k.shape[1], k.shape[2]
    g = n_heads // n_kv
    gr = _pow2(g)
    acc, ml, cnt = workspace(bsz * n_kv, gr, d, q.device)
    per_row = int(write is not None and write[2].numel() > 1)
    per, chunks = chunking(n, bsz * n_kv if per_row else 0)
    if q.stride(2) != 1 or q.stride(1) != d:
        q = q.contiguous()
    out = torch.empty(bsz, n_heads, d, dtype=q.dtype, device=q.device)
    cos, sin, pos = rope if rope is not None else (q, q, q)  # unread without ROPE
    if rope is not None:
        cos, sin, pos = cos.contiguous(), sin.contiguous(), pos.reshape(-1)
    if write is not None and rope is None:
        raise ValueError("decode_attention: writing K/V needs the RoPE tables")
    kn, vn, slot = write if write is not None else (q, q, q)  # unread without WRITE
    if write is not None:
        kn, vn = (t if t.stride(2) == 1 and t.stride(1) == d else t.contiguous() for t in (kn, vn))
        slot = slot.reshape(-1)  # [B, 1] positions are [B] rows' slots
    # a view, not a conversion kernel a layer: bool and uint8 are both one byte
    mask = seen.contiguous().view(torch.uint8)
    # the decode step's launches go early (ragtune.pdl): the cache read while q|k|v still runs
    early = pdl.launch_options()
    decode_attention_kernel[(bsz * n_kv, chunks)](
        q,
        k,
        v,
        mask,
        out,
        cos,
        sin,
        pos,
        kn,
        vn,
        slot,
        acc,
        ml,
        cnt,
        n,
        chunks,
        float(scale),
        q.stride(0),
        kn.stride(0),
        vn.stride(0),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        HKV=n_kv,
        G=g,
        GP=16,
        GR=gr,
        D=d,
        BLOCK_S=BLOCK_S,
        PER=per,
        MAX_CHUNKS=MAX_CHUNKS,
        ROPE=rope is not None,
        WRITE=write is not None,
        ROW_SLOT=bool(per_row),
        # Triton 3.6's interpreter multiplies bf16 tl.dot operands wrongly: float32 there
        IEEE=k.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1",
        num_warps=NUM_WARPS,
        **early,
    )
    return out


@torch.library.custom_op("ragtune::decode_attention", mutates_args=())
def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seen: torch.Tensor,
    scale: float,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query a head over the first n cache slots: q [B, H, D], K/V
    [B, Hkv, n, D], seen [B, n] bool -> [B, H, D]; with RoPE tables ``cos``/``sin``
    [positions, D] and positions ``pos`` [B], q is rotated first (in the kernel: the step's
    q-rotation kernel goes). Opaque to torch.compile (one kernel in a CUDA graph); its only
    side effect is the workspace, which the kernel restores."""
    rope = (cos, sin, pos) if cos is not None and sin is not None and pos is not None else None
    if kernel_unsupported(q, k) is None:
        return launch(q, k, v, seen, scale, rope)
    return reference(q, k, v, seen, scale, rope)


@decode_attention.register_fake
def _decode_attention_fake(q, k, v, seen, scale, cos=None, sin=None, pos=None):  # noqa: ANN001, ANN202
    return q.new_empty(q.shape)


@torch.library.custom_op("ragtune::decode_attention_write", mutates_args=("k_cache", "v_cache"))
def decode_attention_write(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot: torch.Tensor,
    n: int,
    seen: torch.Tensor,
    scale: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
) -> torch.Tensor:
    """A decode step's layer from its q|k|v output on: q and this step's K (unrotated) and V
    rows [B, H|Hkv, D] at positions ``pos`` [B]; K rotated and K/V written to cache slot
    ``slot`` of ``k_cache``/``v_cache`` [B, Hkv, S, D] (``slot`` [1]: every row's, a
    left-padded batch; [B]: each row's own, the continuous batcher's rows; < n); attention
    over the first ``n`` slots (``seen`` [B, n]; with a slot per row, none past the row's own:
    the kernel does not read them) -> [B, H, D]. In
    the kernel this is one launch a layer where the step had three (q rotation, K rotation
    and cache write, attention); a row's result depends on its own inputs only."""
    k, v = k_cache[:, :, :n], v_cache[:, :, :n]
    if kernel_unsupported(q, k) is None:
        return launch(q, k, v, seen, scale, (cos, sin, pos), (k_new, v_new, slot))
    k_rot, slot = rotate(k_new, cos, sin, pos), slot.reshape(-1)
    if slot.numel() == 1:
        k_cache.index_copy_(2, slot, k_rot[:, :, None, :])
        v_cache.index_copy_(2, slot, v_new[:, :, None, :])
    else:  # a slot per row
        rows = torch.arange(q.shape[0], device=q.device)
        k_cache[rows, :, slot] = k_rot
        v_cache[rows, :, slot] = v_new
    return reference(q, k, v, seen, scale, (cos, sin, pos))


@decode_attention_write.register_fake
def _decode_attention_write_fake(q, k_new, v_new, k_cache, v_cache, slot, n, seen, *rest):  # noqa: ANN001, ANN002, ANN202
    return q.new_empty(q.shape)
