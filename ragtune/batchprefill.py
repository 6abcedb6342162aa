"""How prompts enter the continuous batcher's KV cache (:mod:`ragtune.batching`).

A prompt is right-padded to a multiple of ``pad`` tokens (of 4 x ``pad`` past 16 x ``pad``) and
run in a forward of ``group`` rows, the missing rows dummies that write the cache's spare row:
a few fixed shapes, each captured once as a CUDA graph on a GPU, so that a prompt costs the
engine thread one replay instead of a thousand eager launches that each need the GIL (H200,
12B shape, 448 tokens: 29.5 ms of GPU time as a graph against 47.0 ms eager, which the host
could not keep fed). The graphs share one memory pool: they replay one at a time on the
engine's stream, and each one's output is copied out by the operations queued right after it,
before another replay can reuse that memory.

Why fixed shapes: the server's invariant mode promises that a request's tokens do not depend
on what else runs, and in bf16 a different batch shape rounds differently. ``group=1`` (the
default): each prompt alone. ``group`` > 1: up to ``group`` prompts of one padded length share
a forward (bigger GEMMs, better use of the GPU); a prompt's tokens then equal its lone ones
only if a row's result depends neither on its position in the batch nor on the other rows,
which bench/serve_load.py's probe checks, bitwise, per padded length.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)


class _Graph:
    """One prefill shape captured as a CUDA graph in the shared pool; replayed with new inputs."""

    def __init__(self, fn: Any, inputs: Sequence[torch.Tensor], kv: Any, pool: Any) -> None:
        self.inputs = [t.clone() for t in inputs]
        dev = self.inputs[0].device
        side = torch.cuda.Stream(device=dev)  # warm-up (cuBLAS handles, kernels) off-stream
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            fn(*self.inputs, kv)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = fn(*self.inputs, kv)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        for static, new in zip(self.inputs, args, strict=True):
            static.copy_(new)
        self.graph.replay()
        return self.out


class Prefiller:
    """Prompts into rows of ``kv`` (K and V lists of [rows, n_kv, max_seq_len, head_dim])."""

    def __init__(
        self,
        direct: Any,
        kv: Any,
        spare_row: int,
        pad: int = 64,
        group: int = 1,
        graphs: bool = False,
    ) -> None:
        self.direct = direct
        self.kv = kv
        self.max_seq_len = int(kv[0][0].shape[2])
        self.spare_row = spare_row
        self.pad = max(1, int(pad))
        self.group = max(1, int(group))
        self.device = kv[0][0].device
        self.graphs: dict[tuple[int, int], _Graph] | None = {} if graphs else None
        self.shapes: collections.Counter[tuple[int, int]] = collections.Counter()  # (rows, t) run
        self._pool: Any = torch.cuda.graph_pool_handle() if graphs else None

    def padded(self, n: int) -> int:
        """The length a prompt of ``n`` tokens is prefilled at."""
        unit = self.pad if n <= 16 * self.pad else 4 * self.pad
        return min(-(-n // unit) * unit, self.max_seq_len)

    def forward(
        self, ids: torch.Tensor, last: torch.Tensor, rows: torch.Tensor, kv: Any
    ) -> torch.Tensor:
        """Right-padded prompts ``ids`` [n, t] into cache ``rows``; first greedy ids [n].

        A prompt's real tokens never see the padding after them (causal), and the slots the
        padding fills are rewritten by decode steps before any query reads them. Shapes and
        addresses only: capturable as a CUDA graph.
        """
        n, t = ids.shape
        dev, direct = ids.device, self.direct
        slots = torch.arange(t, device=dev)
        causal = slots[None, :] <= slots[:, None]
        shape = (n, direct.n_kv, t, direct.head_dim)
        scratch = (
            [torch.empty(shape, dtype=direct.dtype, device=dev) for _ in direct.layers],
            [torch.empty(shape, dtype=direct.dtype, device=dev) for _ in direct.layers],
        )
        pos = slots[None, :].expand(n, t)
        logits = direct.forward(ids, pos, slots, causal[None, None], scratch, last)
        for cache, part in zip((*kv[0], *kv[1]), (*scratch[0], *scratch[1]), strict=True):
            cache[:, :, :t].index_copy_(0, rows, part)  # a slice is a view: writes the cache
        return logits.argmax(dim=-1)

    def graph(self, n: int, t: int) -> _Graph | None:
        """The captured graph of ``n`` rows of ``t`` tokens (captured now if new), or None."""
        if self.graphs is None:
            return None
        g = self.graphs.get((n, t))
        if g is None:
            dev = self.device
            example = (
                torch.zeros((n, t), dtype=torch.long, device=dev),
                torch.full((n,), t - 1, dtype=torch.long, device=dev),
                torch.full((n,), self.spare_row, dtype=torch.long, device=dev),
            )
            try:
                g = _Graph(self.forward, example, self.kv, self._pool)
            except Exception as e:  # best effort: the eager prefill gives the same tokens
                log.warning("batcher: prefill graph capture failed (%s); prefilling eagerly", e)
                self.graphs = None
                return None
            self.graphs[(n, t)] = g
        return g

    def _dev(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device without waiting for the queued steps (pinned, async)."""
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def run(self, prompts: Sequence[Sequence[int]], rows: Sequence[int]) -> torch.Tensor:
        """Prefill ``prompts`` into cache ``rows``: their first greedy ids [n], on the device.

        With ``group`` > 1 the prompts must be at most ``group``, of one padded length."""
        n = len(prompts)
        width = self.group if self.group > 1 else n
        if n > width:
            raise ValueError(f"{n} prompts in a prefill group of {width}")
        t = self.padded(max(len(p) for p in prompts))
        ids = torch.zeros((width, t), dtype=torch.long)
        last = torch.full((width,), t - 1, dtype=torch.long)
        dest = torch.full((width,), self.spare_row, dtype=torch.long)  # dummies: the spare row
        for j, (p, row) in enumerate(zip(prompts, rows, strict=True)):
            ids[j, : len(p)] = torch.tensor(list(p), dtype=torch.long)
            last[j], dest[j] = len(p) - 1, row
        args = (self._dev(ids), self._dev(last), self._dev(dest))
        self.shapes[(width, t)] += 1
        g = self.graph(width, t) if width == self.group else None
        out = g(*args) if g is not None else self.forward(*args, self.kv)
        return out[:n]

    def warm(self) -> None:
        """Capture every padded length now (or run the eager prefill once)."""
        lengths = sorted({self.padded(n) for n in range(1, self.max_seq_len)})
        for t in lengths:
            if self.graph(self.group, t) is None:
                break
        if self.graphs is None:
            self.run([[0] * min(512, self.max_seq_len - 1)], [self.spare_row])
