"""GPU timings of the continuous batcher for bench/serve_load.py (issue 20.2).

One decode step and each prefill shape a wave ran (CUDA events on the idle batcher), the
attention of a step alone at several cache lengths, and a bitwise probe of whether prompts
prefilled in fixed groups keep the answers they get alone. GPU only.
"""

from __future__ import annotations

from typing import Any

import torch


def gpu_ms(batcher: Any, shapes: set[tuple[int, int]]) -> dict[str, Any]:
    """GPU milliseconds of one decode step (all rows) and of one prefill forward of each
    ``shapes`` (rows, padded length) the waves ran, as the graphs the batcher replays (eager
    where it has none), by CUDA events on the idle batcher (they write only unread slots and
    the spare row)."""
    dev, b, pre = batcher.device, batcher.max_batch, batcher.prefiller

    def packed(n: int, t: int) -> torch.Tensor:  # random prompts into the spare row
        ids = torch.randint(1000, 30000, (n, t)).tolist()
        return pre.pack(ids, [pre.spare_row] * n, n, t)

    def timed(fn: Any, n: int) -> float:
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return round(start.elapsed_time(end) / n, 2)

    prefill: dict[str, float] = {}
    with torch.inference_mode():
        # the step advances the (free) rows' own ids and positions, as when serving
        out: dict[str, Any] = {"step_ms": timed(lambda: batcher._step(b), 20)}
        for n, t in sorted(shapes):
            g, a = pre.graph(n, t), packed(n, t)
            dev_a = a.to(dev)
            fn = (
                (lambda g=g, a=a: g(a))
                if g is not None
                else (lambda n=n, t=t, a=dev_a: pre._packed(n, t, a, pre.kv))
            )
            prefill[f"{n}x{t}"] = timed(fn, 5)
    out["prefill_ms"] = prefill  # a whole forward of n rows (n prompts, or a prompt + dummies)
    return out


def attention_ms(batcher: Any, lengths: list[int]) -> dict[str, float]:
    """GPU milliseconds of one decode step's attention alone (every layer, all rows, in one
    CUDA graph) with every row at cache slot ``L`` - 1: ``attention_L_ms``, the matmul
    attention (``_attend``, the step's before helper srv4) over the first ``L`` slots (a
    cache-length bucket; the step read all of them); ``kernel_L_ms``, the step's kernel now
    (``ragtune::decode_attention_write``, a slot per row, its K/V write included) over the
    whole cache, which reads each row's slots up to its own only."""
    direct, dev, b, n = batcher.direct, batcher.device, batcher.max_batch, batcher.max_seq_len
    ks, vs = batcher.kv
    out = {}
    for L in lengths:
        q = torch.randn((b, direct.n_heads, 1, direct.head_dim), device=dev, dtype=direct.dtype)
        kn = torch.randn((b, direct.n_kv, direct.head_dim), device=dev, dtype=direct.dtype)
        mask = torch.ones((b, 1, 1, L), dtype=torch.bool, device=dev)
        slot = torch.full((b,), L - 1, dtype=torch.long, device=dev)
        seen = torch.arange(n, device=dev)[None, :] <= slot[:, None]

        def matmul(q: torch.Tensor = q, mask: torch.Tensor = mask, L: int = L) -> None:
            for i in range(len(direct.layers)):
                direct._attend(q, ks[i][:b, :, :L], vs[i][:b, :, :L], mask, direct.scaling[i])

        def kernel(q: Any = q[:, :, 0], kn: Any = kn, slot: Any = slot, seen: Any = seen) -> None:
            for i in range(len(direct.layers)):  # (free rows: the write is never read)
                torch.ops.ragtune.decode_attention_write(
                    q, kn, kn, ks[i][:b], vs[i][:b], slot, n, seen, direct.scaling[i],
                    direct.cos, direct.sin, slot,
                )  # fmt: skip

        for name, run in (("attention", matmul), ("kernel", kernel)):
            with torch.inference_mode():
                run()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    run()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                graph.replay()
                start.record()
                for _ in range(10):
                    graph.replay()
                end.record()
                end.synchronize()
            out[f"{name}_{L}_ms"] = round(start.elapsed_time(end) / 10, 3)
            del graph
    return out


def prefill_probe(batcher: Any, prompt: int, group: int) -> dict[str, Any]:
    """Would ``group`` prompts of one padded length per forward keep answers invariant? For
    every padded length: the bf16 logits of one prompt alone, in row 1 and in row 0 of
    ``group`` (same shape), bitwise."""
    direct, dev, pre = batcher.direct, batcher.device, batcher.prefiller
    unequal: dict[str, list[int]] = {"moved": [], "alone": []}
    lengths = sorted({pre.padded(n) for n in range(1, batcher.max_seq_len)})
    worst = 0.0
    for t in lengths:
        n = max(1, min(t - 3, prompt))
        ids = torch.randint(1000, 30000, (group, t), generator=torch.Generator().manual_seed(t))
        ids = ids.to(dev)

        def logits(x: torch.Tensor, n: int = n, t: int = t) -> torch.Tensor:
            rows, slots = x.shape[0], torch.arange(t, device=dev)
            shape = (rows, direct.n_kv, t, direct.head_dim)
            kv = tuple([torch.empty(shape, dtype=direct.dtype, device=dev) for _ in direct.layers]
                       for _ in range(2))  # fmt: skip
            last = torch.full((rows,), n - 1, dtype=torch.long, device=dev)
            causal = (slots[None, :] <= slots[:, None])[None, None]
            return direct.forward(x, slots[None].expand(rows, t), slots, causal, kv, last)

        with torch.inference_mode():
            batch, moved, alone = logits(ids), logits(ids.roll(-1, 0)), logits(ids[1:2])
        if not torch.equal(batch[1], moved[0]):  # row 1's prompt, now in row 0
            unequal["moved"].append(t)
        if not torch.equal(batch[1], alone[0]):
            unequal["alone"].append(t)
        worst = max(worst, float((batch[1] - alone[0]).abs().max()))
    return {
        "group": group,
        "lengths": len(lengths),
        "row_1_vs_row_0_unequal_at": unequal["moved"],
        "alone_vs_batched_unequal_at": unequal["alone"],
        "alone_vs_batched_max_diff": worst,
    }
