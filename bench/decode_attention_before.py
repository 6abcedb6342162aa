"""Main's decode-attention kernel (before issue 20's dec5, 19b7e94) as a drop-in ``launch``, for
before/after timings in one process on the same graphs and inputs.

    python bench/decode.py ... --before-kernel FILE       # FILE: that commit's
    python bench/decode_attention_micro.py --before-kernel FILE   # ragtune/decode_attention_kernel.py

``launcher(FILE)`` loads the kernel from FILE (``git show 19b7e94:ragtune/decode_attention_kernel.py``)
and returns a function with ``ragtune.decode_attention.launch``'s signature that runs it the way
that commit's ``launch`` did (its own workspace: partials of 16 padded rows a chunk, a runtime
slot stride).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch


def launcher(path: str) -> Callable[..., torch.Tensor]:
    spec = importlib.util.spec_from_file_location("decode_attention_kernel_before", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    kernel = mod.decode_attention_kernel
    block_s, max_chunks, gp = 64, 16, 16  # that commit's constants
    workspaces: dict[tuple[Any, ...], tuple[torch.Tensor, ...]] = {}

    def launch(q, k, v, seen, scale, rope=None, write=None):  # noqa: ANN001, ANN202
        bsz, n_heads, d = q.shape
        n_kv, n = k.shape[1], k.shape[2]
        rows = bsz * n_kv
        key = (str(q.device), rows, d)
        if key not in workspaces:
            workspaces[key] = (
                torch.empty(rows, max_chunks, gp, d, dtype=torch.float32, device=q.device),
                torch.empty(rows, max_chunks, 2, gp, dtype=torch.float32, device=q.device),
                torch.zeros(rows, dtype=torch.int32, device=q.device),
            )
        acc, ml, cnt = workspaces[key]
        per_row = int(write is not None and write[2].numel() > 1)
        blocks = -(-n // block_s)
        most = max_chunks if not per_row else max(1, min(max_chunks, -(-512 // rows)))
        per = -(-blocks // most)
        chunks = -(-blocks // per)
        if q.stride(2) != 1 or q.stride(1) != d:
            q = q.contiguous()
        out = torch.empty(bsz, n_heads, d, dtype=q.dtype, device=q.device)
        cos, sin, pos = rope if rope is not None else (q, q, q)
        if rope is not None:
            cos, sin, pos = cos.contiguous(), sin.contiguous(), pos.reshape(-1)
        kn, vn, slot = write if write is not None else (q, q, q)
        if write is not None:
            kn, vn = (
                t if t.stride(2) == 1 and t.stride(1) == d else t.contiguous() for t in (kn, vn)
            )
            slot = slot.reshape(-1)
        mask = seen.contiguous().view(torch.uint8)
        kernel[(rows, chunks)](
            q, k, v, mask, out, cos, sin, pos, kn, vn, slot, acc, ml, cnt, n, chunks,
            float(scale), per_row, q.stride(0), kn.stride(0), vn.stride(0),
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            HKV=n_kv, G=n_heads // n_kv, GP=gp, D=d, BLOCK_S=block_s, PER=per,
            MAX_CHUNKS=max_chunks, ROPE=rope is not None, WRITE=write is not None,
            IEEE=k.dtype == torch.float32, num_warps=4,
        )  # fmt: skip
        return out

    return launch
