"""A continuous-batching request and its way out: tokens per decode step to waiting threads or
to an event loop, and the text pieces of a streamed answer.

Why: with 32 streaming clients, handing each token across threads (a queue per token, a
streamer thread, a worker-thread hop per SSE event) costs more host time than the GPU's step,
and every hop needs the GIL that the batcher's engine thread needs between two steps. Here the
engine only appends a step's tokens to its requests and then wakes their consumers once per
step (:func:`wake`): a waiting thread through its request's condition, an asyncio consumer
through ONE ``call_soon_threadsafe`` per event loop per step. The text is decoded where it is
consumed (:class:`BatchedTextStream`, on the server's event loop), never on the engine thread.

A step's ids reach the host through :class:`HostRing` (reused pinned rows and events: one
copy and one event record a step on the engine thread). Also the Generator's two hooks:
:func:`batcher_for` (the server's batcher for a model) and :func:`run_rows` (non-streamed
requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from ragtune.decoding import NO_CHANGE, Decoding, GenerationResult, PieceStream, new_text
from ragtune.stopping import finish_text

log = logging.getLogger(__name__)


class Request:
    """One submitted prompt. ``tokens`` grows as the batcher decodes it (the engine thread is
    its only writer); iterate for the ids, call ``result``, or ``await wait(n)`` on a loop."""

    def __init__(
        self,
        prompt: list[int],
        max_new_tokens: int,
        eos: set[int],
        stop_strings: Sequence[str],
    ) -> None:
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.eos = eos
        self.stop_strings = list(stop_strings)
        self.tokens: list[int] = []
        self.error: BaseException | None = None
        self.done = False
        self.cancelled = False
        self._cond = threading.Condition()
        self._waker: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        # the engine's own bookkeeping (ragtune.batching)
        self.row = -1
        self.check: Any = None  # the stop-string test, or None
        self.full: list[int] | None = None  # prompt + tokens, for the stop-string test
        # host times (perf_counter) for bench/serve_load.py's breakdown of a wave
        self.t_submit = time.perf_counter()
        self.t_admit = 0.0  # its prompt was queued on the device
        self.t_done = 0.0

    def cancel(self) -> None:
        """Stop decoding this request at the next step (a client went away)."""
        self.cancelled = True

    # ---------------------------------------------------------------- consumers
    def wait_for(self, seen: int, timeout: float | None = None) -> bool:
        """Block until there are more than ``seen`` tokens or the request is done."""
        with self._cond:
            return self._cond.wait_for(lambda: self.done or len(self.tokens) > seen, timeout)

    async def wait(self, seen: int) -> None:
        """On the running event loop: return once there are more than ``seen`` tokens or the
        request is done. The engine wakes this loop once per step, whatever number of its
        requests got a token."""
        if self._waker is None:  # bound before the check below: no wake-up is lost
            self._waker = (asyncio.get_running_loop(), asyncio.Event())
        event = self._waker[1]
        while not self.done and len(self.tokens) <= seen:
            event.clear()
            if self.done or len(self.tokens) > seen:
                break
            await event.wait()

    def __iter__(self) -> Iterator[int]:
        seen = 0
        while True:
            self.wait_for(seen)
            done, new = self.done, self.tokens[seen:]  # done first: every token came before it
            seen += len(new)
            yield from new
            if done and seen >= len(self.tokens):
                if self.error is not None:
                    raise self.error
                return

    def result(self, timeout: float | None = None) -> list[int]:
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError("the request did not finish in time")
        if self.error is not None:
            raise self.error
        return list(self.tokens)

    # ---------------------------------------------------------------- engine side
    def finish(self, error: BaseException | None = None) -> None:
        """Mark it done (its consumers learn it at the next :func:`wake`)."""
        self.t_done = time.perf_counter()
        self.error = error
        self.done = True


class HostIds:
    """A device tensor's values on their way to the host: a row of a pinned ring and an event,
    so that reading them waits for that copy only, not for the steps queued after it."""

    __slots__ = ("ring", "slot", "n")

    def __init__(self, ring: HostRing, slot: tuple[torch.Tensor, Any], n: int) -> None:
        self.ring, self.slot, self.n = ring, slot, n

    def ready(self) -> bool:
        """Whether the values are there (never waits)."""
        event = self.slot[1]
        return event is None or bool(event.query())

    def get(self) -> list[int]:
        """The values (waits for their copy only); the ring row is free again after this."""
        buf, event = self.slot
        if event is not None:
            event.synchronize()  # releases the GIL while it waits
        values = buf.tolist()[: self.n]
        self.ring.free.append(self.slot)
        return values


class HostRing:
    """Pinned host rows (and their events), reused: copying a step's ids out costs the batcher's
    engine thread one copy and one event record, no allocation. Engine thread only."""

    def __init__(self, width: int, device: torch.device) -> None:
        self.width, self.cuda = width, device.type == "cuda"
        self.free: list[tuple[torch.Tensor, Any]] = []
        self.stream: Any = None  # the engine thread's stream, read on its first copy

    def put(self, t: torch.Tensor) -> HostIds:
        """Queue the copy of ``t`` ([n] ids, n <= width) to the host."""
        if self.free:
            slot = self.free.pop()
        else:  # a new row (rows come back once read; an entry dropped on failure keeps its)
            buf = torch.empty(self.width, dtype=torch.long, pin_memory=self.cuda)
            slot = (buf, torch.cuda.Event() if self.cuda else None)
        buf, event = slot
        n = t.shape[0]
        if event is None:
            buf[:n].copy_(t)
        else:
            if self.stream is None:
                self.stream = torch.cuda.current_stream(t.device)
            buf[:n].copy_(t, non_blocking=True)
            event.record(self.stream)
        return HostIds(self, slot, n)


def _set_all(events: list[asyncio.Event]) -> None:
    for e in events:
        e.set()


def wake(requests: Iterable[Request]) -> int:
    """Wake the consumers of ``requests`` after a step: waiting threads now, and each event loop
    once (one ``call_soon_threadsafe`` for all of its requests). Returns the loops woken."""
    loops: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}
    for r in requests:
        with r._cond:
            r._cond.notify_all()
        if r._waker is not None:
            loops.setdefault(r._waker[0], []).append(r._waker[1])
    for loop, events in loops.items():
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits there
            loop.call_soon_threadsafe(_set_all, events)
    return len(loops)


class BatchedTextStream(PieceStream):
    """One greedy answer from the generator's batcher as text pieces, iterated in a thread
    (``for``) or on an event loop (``async for``: no thread hop per piece).

    Submitted at once (the first step may come before the first ``next``). The pieces
    concatenate to exactly ``result.text``, which is read from the ids as
    :meth:`ragtune.generate.Generator.generate` reads them; text that may still become a stop
    string or half a character is held back (:func:`ragtune.stopping.finish_text`).
    """

    def __init__(self, generator: Any, prompt_text: Any, decoding: Decoding = NO_CHANGE) -> None:
        self._gen = generator
        self._stops = generator.stops_for(decoding)
        ids = generator.encode(prompt_text)
        self._prompt_tokens = len(ids)
        self._t0 = time.perf_counter()
        max_new = generator.max_new_for(len(ids), decoding)  # what run_rows would ask for
        eos = sorted(generator.eos_ids)
        self._req: Request = generator._batcher.submit(ids, max_new, eos, self._stops)
        self._seen = 0
        self._emitted = ""
        self._hit = False
        self._ended = False
        self._it = self._run()
        self.result: GenerationResult | None = None

    def close(self) -> None:
        """Stop generating (the row is freed at the next step); safe from any thread."""
        self._req.cancel()
        self._stop_iterating()

    def __del__(self) -> None:
        req = getattr(self, "_req", None)
        if req is not None:
            req.cancel()

    def _advance(self) -> str:
        """The text that the tokens decoded since the last call add (maybe '')."""
        tokens = self._req.tokens
        n = len(tokens)
        if n == self._seen or self._hit:
            self._seen = n
            return ""
        self._seen = n
        eos = self._gen.eos_ids
        cut = next((i for i, t in enumerate(tokens[:n]) if t in eos), n)
        visible, self._hit = finish_text(self._gen.decode(tokens[:cut]), self._stops, final=False)
        if self._hit:
            self._req.cancel()  # the text ended it: the rest would be cut anyway
        piece = new_text(visible, self._emitted)
        if piece:
            self._emitted = visible
        return piece

    def _over(self) -> bool:
        return self._req.done and self._seen == len(self._req.tokens)

    def _end(self) -> str:
        """The answer, once the request is done; the text the pieces have not given yet."""
        self._ended = True
        if self._req.error is not None:
            raise self._req.error
        seconds = time.perf_counter() - self._t0
        row = list(self._req.tokens)
        self.result = self._gen._result(row, seconds, self._prompt_tokens, stops=self._stops)
        return new_text(self.result.text, self._emitted)

    def _run(self) -> Iterator[str]:
        try:
            while not self._over():
                self._req.wait_for(self._seen)
                if piece := self._advance():
                    yield piece
        finally:
            self._req.cancel()  # no-op once it is done; frees the row of an abandoned stream
        if tail := self._end():
            yield tail

    def __aiter__(self) -> BatchedTextStream:
        return self

    async def __anext__(self) -> str:
        try:
            while not self._ended:
                if piece := self._advance():
                    return piece
                if self._over():
                    if tail := self._end():
                        return tail
                    break
                await self._req.wait(self._seen)
        except BaseException:
            self._req.cancel()  # cancelled (client gone) or failed: free the row
            raise
        raise StopAsyncIteration


# --------------------------------------------------------------------------- for the Generator
WEIGHTS = ("auto", "fp8", "dense")


def batch_weights(model: Any, choice: str = "auto") -> str | None:
    """The batcher's ``FastDecoder(quantize=...)`` for ``server.batch_weights``.

    ``auto`` = ``"fp8"`` for a 16-bit or bitsandbytes 4-bit model (bf16/fp16) on a GPU with FP8
    GEMMs (compute capability >= 8.9: half the weight bytes of a decode step, FP8 tensor cores
    for prompts; docs/benchmarks.md), else as ``dense``; ``dense`` = dense 16-bit copies of a
    bitsandbytes 4-bit model's weights (its own weights), a 16-bit model's weights as they are;
    ``fp8`` = FP8 wherever the direct path runs (on CPU a float32 emulation, for tests).
    """
    import torch

    from ragtune.fastweights import has_bnb_4bit
    from ragtune.fp8weights import fp8_unsupported

    choice = str(choice).lower()
    if choice not in WEIGHTS:
        raise ValueError(f"server.batch_weights must be one of {WEIGHTS}, got {choice!r}")
    bnb4 = has_bnb_4bit(model)
    if choice == "fp8":
        return "fp8"
    if choice == "auto":
        embed = model.get_input_embeddings().weight  # the dtype a 4-bit model computes in too
        if embed.dtype in (torch.bfloat16, torch.float16) and fp8_unsupported(embed.device) is None:
            return "fp8"
    return "dense" if bnb4 else None


def batcher_for(
    model: Any,
    tokenizer: Any,
    max_seq_len: int,
    max_batch: int = 32,
    warmup: bool = True,
    invariant: bool = True,
    weights: str = "auto",
    prefill_group: int | None = None,
) -> Any:
    """The server's :class:`ragtune.batching.StepBatcher` for a model; with ``warmup``, returns
    once it is warm.

    ``weights`` (``server.batch_weights``, :func:`batch_weights`): FP8 copies of the weights on
    a GPU with FP8 GEMMs, else dense 16-bit copies of a bitsandbytes 4-bit model's weights (its
    own weights, cuBLAS speed at 32 rows and for prompts), a 16-bit model as it is.
    ``invariant``: one step size (all ``max_batch`` rows) and one prompt per prefill, so that
    every request runs the same kernels whatever else runs: in bf16 each batch shape rounds
    differently, and on the H200 answers diverged between steps of 1, 8 and 32 rows and
    batched prefills (docs/benchmarks.md). The GEMM of a fixed shape computes each row alone,
    so a row's tokens do not depend on the other rows. False: steps of 1, 8 and ``max_batch``
    rows and batched prefill (3 compiles). Returns only when warm: every step is compiled and
    captured before a request touches the model. ``prefill_group``: prompts per prefill
    forward in the invariant mode (:func:`prefill_group_for` when None).
    """
    from ragtune.batching import StepBatcher
    from ragtune.fastdecode import FastDecoder

    quantize = batch_weights(model, weights)
    decoder = FastDecoder(model, tokenizer, max_seq_len=max_seq_len, quantize=quantize)
    # each step size is one compile and CUDA graph (about a minute at 12B)
    buckets = (max_batch,) if invariant else tuple(b for b in (1, 8) if b < max_batch)
    if prefill_group is None:
        prefill_group = prefill_group_for(quantize, decoder.device, invariant)
    batcher = StepBatcher(
        decoder,
        max_batch=max_batch,
        buckets=buckets,
        warmup=warmup,
        prefill_tokens=1 if invariant else 16384,  # 1: each prompt alone
        prefill_group=prefill_group if invariant else 1,
    )
    batcher.ready.wait()
    log.info(
        "continuous batching on: %d rows, steps of %s, weights %s",
        max_batch,
        batcher.buckets,
        quantize or "the model's own",
    )
    return batcher


def prefill_group_for(quantize: str | None, device: Any, invariant: bool = True) -> int:
    """Prompts per prefill forward for the server's batcher: 2 for FP8 weights on a GPU in the
    invariant mode, else 1.

    Every prompt, a lone one too, then runs in a 2-row graph (a dummy beside a lone prompt), so
    its tokens still do not depend on what else runs. On the H200 (12B shape, FP8) a prompt of
    448 tokens costs 16.3 ms of GPU in a full pair against 21.1 alone, 32 streaming clients went
    from 2,155-2,265 to 2,254-2,338 tok/s, and a lone request's first piece from 69 to 84 ms;
    the bitwise probe found a prompt's logits the same alone, in row 0 and in row 1 of a pair
    at all 16 padded lengths (docs/benchmarks.md, helper srv3). bf16 pairs are not measured.
    """
    on_gpu = getattr(device, "type", str(device)) == "cuda"
    return 2 if invariant and quantize == "fp8" and on_gpu else 1


def run_rows(
    batcher: Any,
    batch: Sequence[Sequence[int]],
    max_new: int,
    eos: Sequence[int],
    stops: Sequence[str],
) -> list[list[int]]:
    """Each prompt as one request, all queued at once; their ids when all are done.
    (A streamed answer is a :class:`BatchedTextStream`.)"""
    reqs = [batcher.submit(list(r), max_new, eos, stops) for r in batch]
    try:
        return [r.result() for r in reqs]
    finally:
        for r in reqs:
            r.cancel()  # no-op for a finished request; frees the row of an abandoned one
