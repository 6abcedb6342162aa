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

``compiled`` (the default with compiled steps; ``RAGTUNE_PREFILL_COMPILE=off``): the forward compiled by
inductor (one compilation with a symbolic length serves every padded length; the graphs
capture its kernels): its norms, RoPE, activation and FP8 activation scaling fuse into a few
passes a layer instead of ~40 eager kernels over [rows x t, hidden]. Its rounding differs
from the eager forward's, but every prompt takes the same compiled shapes, alone or not, so
the invariance above holds as it did.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)

COMPILE_ENV = "RAGTUNE_PREFILL_COMPILE"  # "off": the batcher's prompts run an eager forward


def compile_by_default(compiled_decoder: bool) -> bool:
    """Whether a batcher whose decoder compiles its steps compiles its prefill forward too:
    yes unless ``RAGTUNE_PREFILL_COMPILE=off`` (on the H200 a prompt pair takes 31 ms instead
    of 43, for a longer warm-up: the compile; docs/benchmarks.md)."""
    return compiled_decoder and os.environ.get(COMPILE_ENV, "on").lower() not in ("off", "0")


class Captured:
    """``fn(*args, state)`` captured once as a CUDA graph: a replay reruns it on the current
    values of ``args`` (static tensors whose addresses the graph keeps).

    Warm-up (compilation, cuBLAS handles) runs off-stream first: ``runs`` calls of
    ``warm[0](*warm[1], state)`` (default: ``fn`` on ``args``), so that a graph whose ``fn``
    changes live state (the batcher's next ids and positions) can be warmed on scratch inputs.
    ``pool``: a memory pool shared with graphs that replay one at a time on one stream.
    """

    def __init__(
        self,
        fn: Any,
        args: Sequence[torch.Tensor],
        state: Any,
        warm: tuple[Any, Sequence[torch.Tensor]] | None = None,
        runs: int = 1,
        pool: Any = None,
    ) -> None:
        self.args = list(args)
        warm_fn, warm_args = warm or (fn, self.args)
        dev = self.args[0].device
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(runs):
                warm_fn(*warm_args, state)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = fn(*self.args, state)

    def __call__(self, *new: torch.Tensor) -> torch.Tensor:
        """Copy ``new`` into the static inputs (pinned host tensors: without waiting), replay;
        the output tensor is the graph's own, valid until its next replay."""
        for static, t in zip(self.args, new, strict=False):
            static.copy_(t, non_blocking=True)
        self.graph.replay()
        return self.out


class Prefiller:
    """Prompts into rows of ``kv`` (K and V lists of [rows, n_kv, max_seq_len, head_dim]).

    ``state``: the batcher's next input id and position of every row ([rows, 1] each, the
    spare row last), set on the device by the same forward (graph) that fills the cache, so
    that a prompt costs the engine thread one input copy, one replay and its output's copy.
    """

    def __init__(
        self,
        direct: Any,
        kv: Any,
        spare_row: int,
        pad: int = 64,
        group: int = 1,
        graphs: bool = False,
        state: tuple[torch.Tensor, torch.Tensor] | None = None,
        compiled: bool = False,
    ) -> None:
        self.direct = direct
        self.kv = kv
        self.state = state
        self.max_seq_len = int(kv[0][0].shape[2])
        self.spare_row = spare_row
        self.pad = max(1, int(pad))
        self.group = max(1, int(group))
        self.device = kv[0][0].device
        # the forward compiled, or eager; switchable while idle (benches): graphs per setting
        self.compiled = bool(compiled)
        self._compiled: Any = None
        self._graphs: dict[bool, dict[tuple[int, int], Captured]] | None = (
            {False: {}, True: {}} if graphs else None
        )
        self.shapes: collections.Counter[tuple[int, int]] = collections.Counter()  # (rows, t) run
        self._pool: Any = torch.cuda.graph_pool_handle() if graphs else None

    @property
    def graphs(self) -> dict[tuple[int, int], Captured] | None:
        """The captured graphs of the current setting ((rows, t) -> graph), None: eager."""
        return None if self._graphs is None else self._graphs[self.compiled]

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
        body = self._body
        if self.compiled:
            if self._compiled is None:
                self._compiled = torch.compile(self._body)
            # own copies: views of one packed input would make the compiled code guard on
            # their offsets (a new length = a new offset)
            body, ids, last = self._compiled, ids.clone(), last.clone()
            # the length alone symbolic (all sizes symbolic: a 12B compile ran > 3 min); an
            # error, not a silent recompile per length, if something specializes it
            torch._dynamo.mark_dynamic(ids, 1)
        first, ks, vs = body(ids, last)
        t = ids.shape[1]
        for cache, part in zip((*kv[0], *kv[1]), (*ks, *vs), strict=True):
            cache[:, :, :t].index_copy_(0, rows, part)  # a slice is a view: writes the cache
        return first

    def _body(
        self, ids: torch.Tensor, last: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """The prompts' first greedy ids [n] and their K and V [n, n_kv, t, head_dim] a layer
        (the part of :meth:`forward` that may be compiled: it writes no input)."""
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
        return logits.argmax(dim=-1), scratch[0], scratch[1]

    def _packed(self, n: int, t: int, flat: torch.Tensor, kv: Any) -> torch.Tensor:
        """:meth:`forward` on one packed input (ids [n*t], last [n], rows [n]: one host copy);
        also sets each row's next id and position in ``state`` (dummies: the spare row)."""
        ids, last, rows = flat[: n * t].view(n, t), flat[n * t : n * t + n], flat[n * t + n :]
        first = self.forward(ids, last, rows, kv)
        if self.state is not None:
            nxt, pos = self.state
            nxt[:, 0].index_copy_(0, rows, first)
            pos[:, 0].index_copy_(0, rows, last + 1)  # the first new token's position
        return first

    def pack(
        self, prompts: Sequence[Sequence[int]], rows: Sequence[int], width: int, t: int
    ) -> torch.Tensor:
        """The packed input of ``prompts`` (right-padded to ``t``) into cache ``rows``, the
        rest of ``width`` dummies (the spare row), in one host tensor (pinned on a GPU)."""
        cuda = self.device.type == "cuda"
        host = torch.empty(width * (t + 2), dtype=torch.long, pin_memory=cuda)
        a = host.numpy()  # filled without a torch call per value (each one a GIL hand-off)
        ids, last, dest = a[: width * t].reshape(width, t), a[width * t : -width], a[-width:]
        ids[:] = 0
        last[:] = t - 1
        dest[:] = self.spare_row
        for j, (p, row) in enumerate(zip(prompts, rows, strict=True)):
            ids[j, : len(p)] = p
            last[j], dest[j] = len(p) - 1, row
        return host

    def graph(self, n: int, t: int) -> Captured | None:
        """The captured graph of ``n`` rows of ``t`` tokens (captured now if new), or None."""
        graphs = self.graphs
        if graphs is None:
            return None
        g = graphs.get((n, t))
        if g is None:
            static = self.pack([], [], n, t).to(self.device, non_blocking=True)  # dummies only
            fn = functools.partial(self._packed, n, t)
            try:
                g = Captured(fn, [static], self.kv, pool=self._pool)
            except Exception as e:  # best effort: the eager forward gives the same invariance
                if self.compiled:
                    log.warning("batcher: compiled prefill failed (%s); prefilling eagerly", e)
                    self.compiled = False
                    return self.graph(n, t)
                log.warning("batcher: prefill graph capture failed (%s); prefilling eagerly", e)
                self._graphs = None
                return None
            graphs[(n, t)] = g
        return g

    def run(self, prompts: Sequence[Sequence[int]], rows: Sequence[int]) -> torch.Tensor:
        """Prefill ``prompts`` into cache ``rows``: their first greedy ids on the device, [n]
        or more (the group's dummies after them).

        With ``group`` > 1 the prompts must be at most ``group``, of one padded length."""
        n = len(prompts)
        width = self.group if self.group > 1 else n
        if n > width:
            raise ValueError(f"{n} prompts in a prefill group of {width}")
        t = self.padded(max(len(p) for p in prompts))
        host = self.pack(prompts, rows, width, t)
        self.shapes[(width, t)] += 1
        g = self.graph(width, t) if width == self.group else None
        if g is not None:
            return g(host)
        return self._packed(width, t, host.to(self.device, non_blocking=True), self.kv)

    def warm(self) -> None:
        """Capture every padded length now (or run the eager prefill once)."""
        lengths = sorted({self.padded(n) for n in range(1, self.max_seq_len)})
        for t in lengths:
            if self.graph(self.group, t) is None:
                break
        if self.graphs is None:
            self.run([[0] * min(512, self.max_seq_len - 1)], [self.spare_row])
