"""Step-level continuous batching of greedy requests over the fast decoder's direct path.

Why: one request at a time leaves a GPU streaming the weights for a single token per step;
the same step computes 32 rows for little more. Requests that arrive while others decode join
at the next step boundary (their prompt is run alone, into a free row of a shared KV cache),
and a finished row is free for the next request at once.

How: one engine thread owns the batcher's GPU work. The KV cache holds ``max_batch`` rows of
``max_seq_len`` slots; each request's prompt starts at slot 0 of its row, so a row's slot is
its position and no row needs padding. Requests waiting at a step boundary are prefilled
together (right-padded into one forward of up to ``prefill_tokens`` tokens, then copied into
their rows): one pass over the weights for the whole wave instead of one per prompt. A decode
step runs rows ``0..b-1``, with ``b`` the smallest bucket that covers the highest busy row
(new requests take the lowest free row), each ``b`` a compiled step captured once as a CUDA
graph on a GPU.

Hook for a server (one shared :class:`StepBatcher` per model; everything is thread-safe)::

    batcher = StepBatcher(FastDecoder(model, tokenizer, max_seq_len=2048), max_batch=32)
    for token_id in batcher.stream(prompt_ids, max_new_tokens, eos_ids, stop_strings):
        ...                       # one id at a time, as the step that made it finishes
    ids = batcher.generate(prompt_ids, max_new_tokens, eos_ids, stop_strings)  # all at once

Each request gets exactly the tokens ``FastDecoder.generate`` gives it alone (greedy; the EOS
or the token completing a stop string is kept), up to rounding differences between batch
shapes on a GPU; tests/test_batching.py checks equality in float32 on CPU.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ragtune.decodestep import GraphedStep
from ragtune.errors import RagtuneError
from ragtune.fastdecode import FastDecodeError, FastDecoder

log = logging.getLogger(__name__)

_DONE = object()


class BatchingError(RagtuneError):
    """The batcher cannot serve this model or request."""


class Request:
    """One submitted prompt: iterate for its token ids as they come, or call ``result``."""

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
        self._queue: queue.Queue[Any] = queue.Queue()
        self._finished = threading.Event()
        self.cancelled = False

    def cancel(self) -> None:
        """Stop decoding this request at the next step (a client went away)."""
        self.cancelled = True

    def __iter__(self) -> Iterator[int]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                if self.error is not None:
                    raise self.error
                return
            yield item

    def result(self, timeout: float | None = None) -> list[int]:
        if not self._finished.wait(timeout):
            raise TimeoutError("the request did not finish in time")
        if self.error is not None:
            raise self.error
        return list(self.tokens)

    # engine side
    def _emit(self, token: int) -> None:
        self.tokens.append(token)
        self._queue.put(token)

    def _finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self._finished.set()
        self._queue.put(_DONE)


class StepBatcher:
    """Continuous batching of greedy requests on one :class:`FastDecoder` (direct mode)."""

    def __init__(
        self,
        decoder: FastDecoder,
        max_batch: int = 32,
        buckets: Sequence[int] | None = None,
        warmup: bool = False,
        prefill_tokens: int = 16384,
    ) -> None:
        if decoder._direct is None:
            raise BatchingError(
                f"batching needs the fast decoder's direct path; this model runs in {decoder.mode}"
            )
        if max_batch < 1:
            raise BatchingError(f"max_batch must be >= 1, got {max_batch}")
        self.decoder = decoder
        self.direct = decoder._direct
        self.max_batch = int(max_batch)
        self.max_seq_len = decoder.max_seq_len
        self.device = decoder.device
        # step sizes, each compiled and captured once (1-2 min each at 12B on a GPU, so few):
        # a lone request runs alone, a few share 8 rows, more share all of them
        sizes = buckets or (1, 8)
        self.buckets = sorted({int(b) for b in sizes if 0 < int(b) < self.max_batch})
        self.buckets.append(self.max_batch)
        shape = (self.max_batch, self.direct.n_kv, self.max_seq_len, self.direct.head_dim)
        dtype, dev = self.direct.dtype, self.device
        self.kv = (
            [torch.zeros(shape, dtype=dtype, device=dev) for _ in self.direct.layers],
            [torch.zeros(shape, dtype=dtype, device=dev) for _ in self.direct.layers],
        )
        self._step_fn = self._rows_step
        if decoder.compiled:
            self._step_fn = torch.compile(self._rows_step, dynamic=False)
        self._graphs: dict[int, GraphedStep] = {}
        self._rows: list[Request | None] = [None] * self.max_batch
        self._last: list[int] = [0] * self.max_batch  # each row's latest token
        self._length: list[int] = [0] * self.max_batch  # tokens in each row's cache
        self._full: list[list[int] | None] = [None] * self.max_batch  # for stop strings
        self._checks: list[Any] = [None] * self.max_batch
        self._pending: queue.Queue[Request] = queue.Queue()
        self._wake = threading.Event()
        self._closed = False
        self._warmup = warmup
        # prompt tokens (padding included) per prefill forward: bounds its activations
        self.prefill_tokens = max(1, int(prefill_tokens))
        self.ready = threading.Event()  # set once warm (at once without warm-up)
        self.steps = 0  # decode steps run
        self.most_rows = 0  # the most rows one decode step carried
        self.requests = 0  # requests admitted
        self._thread = threading.Thread(target=self._run, name="ragtune-batcher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API
    def submit(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        eos_ids: Sequence[int] | int | None = None,
        stop_strings: Sequence[str] | None = None,
    ) -> Request:
        """Queue a prompt; the returned request yields its ids as they are decoded."""
        if self._closed:
            raise BatchingError("the batcher is closed")
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise FastDecodeError("empty prompt: give at least one input token")
        if len(prompt) >= self.max_seq_len:
            raise FastDecodeError(
                f"prompt of {len(prompt)} tokens does not fit the fast decoder's "
                f"max_seq_len={self.max_seq_len} (raise model.max_seq_length)"
            )
        eos = {eos_ids} if isinstance(eos_ids, int) else {int(e) for e in (eos_ids or [])}
        budget = min(int(max_new_tokens), self.max_seq_len - len(prompt))
        req = Request(prompt, budget, eos, stop_strings or [])
        if budget < 1:
            req._finish()
            return req
        self._pending.put(req)
        self._wake.set()
        return req

    def stream(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        eos_ids: Sequence[int] | int | None = None,
        stop_strings: Sequence[str] | None = None,
    ) -> Iterator[int]:
        """Token ids one at a time; closing the iterator early cancels the request."""
        req = self.submit(prompt_ids, max_new_tokens, eos_ids, stop_strings)
        try:
            yield from req
        finally:
            req.cancel()

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        eos_ids: Sequence[int] | int | None = None,
        stop_strings: Sequence[str] | None = None,
    ) -> list[int]:
        return self.submit(prompt_ids, max_new_tokens, eos_ids, stop_strings).result()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=30)

    def stats(self) -> dict[str, int]:
        return {
            "rows": self.max_batch,
            "busy": self.busy_rows,
            "steps": self.steps,
            "most_rows": self.most_rows,
            "requests": self.requests,
        }

    @property
    def busy_rows(self) -> int:
        return sum(r is not None for r in self._rows)

    # ------------------------------------------------------------------ engine
    def _rows_step(self, ids: torch.Tensor, pos: torch.Tensor, kv: Any) -> torch.Tensor:
        """One decode step of rows 0..b-1: each writes K/V at its own position; next ids [b]."""
        seen = torch.arange(self.max_seq_len, device=ids.device)[None, :] <= pos
        logits = self.direct.forward(ids, pos, pos, seen[:, None, None, :], kv)
        return logits.argmax(dim=-1)

    def _bucket_kv(self, b: int) -> Any:
        ks, vs = self.kv
        return ([k[:b] for k in ks], [v[:b] for v in vs])

    def _step(self, b: int, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.decoder.graph != "manual":
            return self._step_fn(ids, pos, self._bucket_kv(b))
        g = self._graphs.get(b)
        if g is None:
            # the warm-up writes K/V at slot max_seq_len - 1 of rows that are busy now: no
            # request reads that slot before writing it (prompt + new tokens < max_seq_len)
            last = torch.full((b, 1), self.max_seq_len - 1, dtype=torch.long, device=self.device)
            g = GraphedStep(self._step_fn, (torch.zeros_like(last), last), self._bucket_kv(b))
            self._graphs[b] = g
        return g(ids, pos)

    def _prefill(self, wave: Sequence[tuple[int, Request]]) -> list[int]:
        """Run the prompts of ``wave`` together; write their K/V into their rows.

        Right padding: a prompt's real tokens never see the padding after them (causal), and
        the slots the padding fills are rewritten by decode steps before any query reads them.
        """
        dev = self.device
        n, t = len(wave), max(len(req.prompt) for _, req in wave)
        ids = torch.zeros((n, t), dtype=torch.long)
        for j, (_, req) in enumerate(wave):
            ids[j, : len(req.prompt)] = torch.tensor(req.prompt, dtype=torch.long)
        ids = ids.to(dev)
        last = torch.tensor([len(req.prompt) - 1 for _, req in wave], device=dev)
        slots = torch.arange(t, device=dev)
        causal = slots[None, :] <= slots[:, None]
        shape = (n, self.direct.n_kv, t, self.direct.head_dim)
        dtype = self.direct.dtype
        scratch = (
            [torch.empty(shape, dtype=dtype, device=dev) for _ in self.direct.layers],
            [torch.empty(shape, dtype=dtype, device=dev) for _ in self.direct.layers],
        )
        pos = slots[None, :].expand(n, t)
        logits = self.direct.forward(ids, pos, slots, causal[None, None], scratch, last)
        rows = torch.tensor([row for row, _ in wave], device=dev)
        for cache, part in zip((*self.kv[0], *self.kv[1]), (*scratch[0], *scratch[1]), strict=True):
            cache[:, :, :t].index_copy_(0, rows, part)  # a slice is a view: writes the cache
        return logits.argmax(dim=-1).tolist()

    def _deliver(self, row: int, token: int) -> None:
        req = self._rows[row]
        assert req is not None
        req._emit(token)
        self._last[row] = token
        full = self._full[row]
        if full is not None:
            full.append(token)
        if (
            token in req.eos
            or len(req.tokens) >= req.max_new_tokens
            or (full is not None and self._checks[row](full))
        ):
            self._release(row)

    def _release(self, row: int, error: BaseException | None = None) -> None:
        req = self._rows[row]
        self._rows[row] = None
        self._full[row] = None
        self._checks[row] = None
        if req is not None:
            req._finish(error)

    def _admit(self) -> None:
        """Give waiting requests the free rows and prefill them, in waves of prefill_tokens."""
        wave: list[tuple[int, Request]] = []
        while not self._pending.empty() and None in self._rows:
            req = self._pending.get()
            if req.cancelled:
                req._finish()
                continue
            row = self._rows.index(None)
            self._rows[row] = req
            self.requests += 1
            self._length[row] = len(req.prompt)
            check = self.decoder._stop_checker(req.stop_strings)
            self._checks[row] = check
            self._full[row] = list(req.prompt) if check is not None else None
            longest = max([len(req.prompt), *(len(r.prompt) for _, r in wave)])
            if wave and longest * (len(wave) + 1) > self.prefill_tokens:
                self._prefill_wave(wave)
                wave = []
            wave.append((row, req))
        if wave:
            self._prefill_wave(wave)

    def _prefill_wave(self, wave: list[tuple[int, Request]]) -> None:
        try:
            tokens = self._prefill(wave)
        except Exception as e:  # these requests fail; the others go on
            log.exception("batcher: prefill failed")
            for row, _ in wave:
                self._release(row, e)
            return
        for (row, _), token in zip(wave, tokens, strict=True):
            self._deliver(row, token)

    def _decode_step(self) -> None:
        busy = [i for i, r in enumerate(self._rows) if r is not None]
        for i in busy:
            if self._rows[i].cancelled:  # type: ignore[union-attr]
                self._release(i)
        busy = [i for i, r in enumerate(self._rows) if r is not None]
        if not busy:
            return
        b = next(s for s in self.buckets if s > busy[-1])
        self.most_rows = max(self.most_rows, len(busy))
        ids = torch.tensor([[self._last[i]] for i in range(b)], dtype=torch.long)
        # a free row decodes at slot 0 of its own row: harmless, the next prompt rewrites it
        pos = torch.tensor(
            [[self._length[i] if self._rows[i] is not None else 0] for i in range(b)],
            dtype=torch.long,
        )
        out = self._step(b, ids.to(self.device), pos.to(self.device)).tolist()  # one sync
        self.steps += 1
        for i in busy:
            self._length[i] += 1
            self._deliver(i, int(out[i]))

    def _warm(self) -> None:
        """Compile and capture every step size, and run one prompt, before the first request."""
        for b in self.buckets:
            self._step(
                b,
                torch.zeros((b, 1), dtype=torch.long, device=self.device),
                torch.full((b, 1), self.max_seq_len - 1, dtype=torch.long, device=self.device),
            )
        n = max(1, min(512, self.max_seq_len // 2))
        self._prefill([(0, Request([0] * n, 1, set(), []))])
        log.info("batcher: warm (steps of %s rows)", self.buckets)

    @torch.inference_mode()
    def _run(self) -> None:
        if self._warmup:
            try:
                self._warm()
            except Exception:  # requests still run; they pay the compile instead
                log.exception("batcher: warm-up failed")
        self.ready.set()
        while not self._closed:
            if self.busy_rows == 0:
                self._wake.clear()
                if self._pending.empty():
                    self._wake.wait(timeout=0.5)
                    continue
            try:
                self._admit()
                self._decode_step()
            except Exception as e:  # a broken step fails the requests in it, not the server
                log.exception("batcher: decode step failed")
                for i, r in enumerate(self._rows):
                    if r is not None:
                        self._release(i, e)
        for i, r in enumerate(self._rows):
            if r is not None:
                self._release(i, BatchingError("the batcher closed"))
        while not self._pending.empty():
            self._pending.get()._finish(BatchingError("the batcher closed"))


# --------------------------------------------------------------------------- for the Generator
def batcher_for(
    model: Any,
    tokenizer: Any,
    max_seq_len: int,
    max_batch: int = 32,
    warmup: bool = True,
    invariant: bool = True,
) -> StepBatcher:
    """The server's batcher for a model; with ``warmup``, returns once it is warm.

    A bitsandbytes 4-bit model gets dense 16-bit copies of its weights (``quantize="dense"``:
    its own weights, cuBLAS speed at 32 rows and for prompts); a 16-bit model is used as it is.
    ``invariant``: one step size (all ``max_batch`` rows) and one prompt per prefill, so that
    every request runs the same kernels whatever else runs: in bf16 each batch shape rounds
    differently, and on the H200 answers diverged between steps of 1, 8 and 32 rows and
    batched prefills (docs/benchmarks.md). The GEMM of a fixed shape computes each row alone,
    so a row's tokens do not depend on the other rows. False: steps of 1, 8 and ``max_batch``
    rows and batched prefill (3 compiles). Returns only when warm: every step is compiled and
    captured before a request touches the model.
    """
    from ragtune.fastweights import has_bnb_4bit

    quantize = "dense" if has_bnb_4bit(model) else None
    decoder = FastDecoder(model, tokenizer, max_seq_len=max_seq_len, quantize=quantize)
    # each step size is one compile and CUDA graph (about a minute at 12B)
    buckets = (max_batch,) if invariant else tuple(b for b in (1, 8) if b < max_batch)
    batcher = StepBatcher(
        decoder,
        max_batch=max_batch,
        buckets=buckets,
        warmup=warmup,
        prefill_tokens=1 if invariant else 16384,  # 1: each prompt alone
    )
    batcher.ready.wait()
    log.info("continuous batching on: %d rows, steps of %s", max_batch, batcher.buckets)
    return batcher


def run_rows(
    batcher: StepBatcher,
    batch: Sequence[Sequence[int]],
    max_new: int,
    eos: Sequence[int],
    stops: Sequence[str],
    streamer: Any = None,
    cancel: threading.Event | None = None,
) -> list[list[int]]:
    """Each prompt as one request (all queued at once); ``streamer`` (a transformers streamer)
    gets the first row's tokens as they come, as ``generate`` would feed it."""
    reqs = [batcher.submit(list(r), max_new, eos, stops) for r in batch]
    if streamer is None:
        return [r.result() for r in reqs]
    got: list[int] = []
    streamer.put(torch.tensor([list(batch[0])]))  # the prompt: a skip_prompt streamer drops it
    try:
        for tok in reqs[0]:
            got.append(tok)
            streamer.put(torch.tensor([tok]))
            if cancel is not None and cancel.is_set():
                break
    finally:
        for r in reqs:
            r.cancel()  # no-op for a finished request; frees the row of an abandoned one
    streamer.end()
    return [got]
