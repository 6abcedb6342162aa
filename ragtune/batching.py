"""Step-level continuous batching of greedy requests over the fast decoder's direct path.

Why: one request at a time leaves a GPU streaming the weights for a single token per step;
the same step computes 32 rows for little more. Requests that arrive while others decode join
at the next step boundary (their prompt is run into a free row of a shared KV cache), and a
finished row is free for the next request.

How: one engine thread owns the batcher's GPU work. The KV cache holds ``max_batch`` rows of
``max_seq_len`` slots (plus a spare row that warm-ups and captures write); each request's
prompt starts at slot 0 of its row, so a row's slot is its position. A decode step runs rows
``0..b-1``, ``b`` the smallest bucket that covers the highest busy row, each ``b`` a compiled
step captured once as a CUDA graph on a GPU.

The host never stalls the GPU between steps: a step's input ids are its predecessor's output
ids, copied on the device, and its positions are advanced there too, so step k+1 is launched
before step k's tokens reach the host (a pinned copy and an event, no stream sync). The engine
keeps ``depth`` steps queued ahead of the one whose tokens it hands out; a row that finished
therefore runs ``depth`` more steps whose tokens are dropped (positions are clamped inside the
row, and a slot is always written before it is read). Tokens go out once per step
(:func:`ragtune.batchstream.wake`). Prompts are padded and run as CUDA graphs of a few
fixed shapes (:mod:`ragtune.batchprefill`: alone, or ``prefill_group`` of one padded length);
in the non-invariant mode waiting prompts are prefilled together as ``prefill_tokens`` allows.

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

import collections
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ragtune.batchprefill import Captured, Prefiller, compile_by_default
from ragtune.batchstream import HostIds, HostRing, Request, wake
from ragtune.errors import RagtuneError
from ragtune.fastdecode import FastDecodeError, FastDecoder

log = logging.getLogger(__name__)


class BatchingError(RagtuneError):
    """The batcher cannot serve this model or request."""


class _Entry:
    """GPU work whose tokens are not handed out yet: a decode step (``seq`` > 0) or a prefill;
    ``items``: (index in its output, row, request) for each request it computed."""

    def __init__(self, host: HostIds, items: list[tuple[int, int, Request]], seq: int = 0):
        self.host, self.items, self.seq = host, items, seq


class StepBatcher:
    """Continuous batching of greedy requests on one :class:`FastDecoder` (direct mode)."""

    def __init__(
        self,
        decoder: FastDecoder,
        max_batch: int = 32,
        buckets: Sequence[int] | None = None,
        warmup: bool = False,
        prefill_tokens: int = 16384,
        depth: int = 2,
        prefill_pad: int = 64,
        prefill_graphs: bool | None = None,
        prefill_group: int = 1,
        prefill_first: bool = False,
        fused_attention: bool = False,
        prefill_compiled: bool | None = None,
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
        # + 1: the spare row, written by warm-ups and captures, never read by a step
        shape = (self.max_batch + 1, self.direct.n_kv, self.max_seq_len, self.direct.head_dim)
        dtype, dev = self.direct.dtype, self.device
        self.kv = (
            [torch.zeros(shape, dtype=dtype, device=dev) for _ in self.direct.layers],
            [torch.zeros(shape, dtype=dtype, device=dev) for _ in self.direct.layers],
        )
        # each row's next input id and position (+ the spare row), kept on the device: a step
        # (its CUDA graph) reads and advances them, a prefill sets its rows'
        self._ids = torch.zeros((self.max_batch + 1, 1), dtype=torch.long, device=dev)
        self._pos = torch.zeros((self.max_batch + 1, 1), dtype=torch.long, device=dev)
        self._step_fn = self._rows_step
        if decoder.compiled:
            self._step_fn = torch.compile(self._rows_step, dynamic=False)
        self._graphs: dict[int, Captured] = {}
        if prefill_graphs is None:
            prefill_graphs = decoder.graph == "manual"
        if prefill_compiled is None:  # with compiled steps, unless RAGTUNE_PREFILL_COMPILE=off
            prefill_compiled = compile_by_default(decoder.compiled)
        self.prefiller = Prefiller(
            self.direct,
            self.kv,
            self.max_batch,
            prefill_pad,
            prefill_group,
            prefill_graphs,
            (self._ids, self._pos),
            prefill_compiled,
        )
        self._ring = HostRing(max(self.max_batch, self.prefiller.group), dev)
        self.depth = max(0, int(depth))
        # a cycle that queued prompts launches no step: while requests keep arriving their
        # prompts go first, so rows start together and fewer 32-row steps carry idle rows
        self.prefill_first = bool(prefill_first)
        # the step's attention as ragtune::decode_attention_write, a slot per row (off: the
        # matmul attention): on the H200 at 32 rows a step took 7.08 ms with it, 6.50 without
        self.fused_attention = bool(fused_attention)
        self._rows: list[Request | None] = [None] * self.max_batch
        self._inflight: collections.deque[_Entry] = collections.deque()
        self._queue: queue.Queue[Request] = queue.Queue()
        self._wake = threading.Event()
        self._closed = False
        self._warmup = warmup
        # prompt tokens (padding included) per prefill forward: bounds its activations
        self.prefill_tokens = max(1, int(prefill_tokens))
        self.ready = threading.Event()  # set once warm (at once without warm-up)
        self.steps = 0  # decode steps run
        self.most_rows = 0  # the most rows one decode step carried
        self.requests = 0  # requests admitted
        self.prefills = 0  # prompts prefilled
        self.prefill_runs = 0  # prefill forwards (a group of prompts is one)
        self.trace: list[Request] | None = None  # a list: every submitted request (benches)
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
        if self.trace is not None:
            self.trace.append(req)
        if budget < 1:
            req.finish()
            return req
        self._queue.put(req)
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
            "prefills": self.prefills,
            "prefill_runs": self.prefill_runs,
        }

    @property
    def busy_rows(self) -> int:
        return sum(r is not None for r in self._rows)

    # ------------------------------------------------------------------ GPU work
    def _rows_step(self, ids: torch.Tensor, pos: torch.Tensor, kv: Any) -> torch.Tensor:
        """One decode step of rows 0..b-1: each writes K/V at its own position; next ids [b]."""
        seen = torch.arange(self.max_seq_len, device=ids.device)[None, :] <= pos
        mask = seen[:, None, None, :]
        logits = self.direct.forward(ids, pos, pos, mask, kv, fused_attention=self.fused_attention)
        return logits.argmax(dim=-1)

    def _bucket_kv(self, b: int) -> Any:
        ks, vs = self.kv
        return ([k[:b] for k in ks], [v[:b] for v in vs])

    def _advance(self, ids: torch.Tensor, pos: torch.Tensor, kv: Any) -> torch.Tensor:
        """One step of rows ``ids``/``pos`` ([b, 1] views of the batcher's own), which it
        advances in place: each row's next input is its new id, at the next position (a
        finished or free row keeps stepping until the host knows: it stays inside its row)."""
        out = self._step_fn(ids, pos, kv)
        ids[:, 0].copy_(out)
        pos.add_(1).clamp_(max=self.max_seq_len - 1)
        return out

    def _step(self, b: int) -> torch.Tensor:
        """Queue one step of rows 0..b-1 (advancing their ids and positions); next ids [b].

        On a GPU one CUDA graph replay: the graph reads and writes the batcher's own tensors,
        so the engine thread makes no input copies (each torch call hands the GIL over)."""
        if self.decoder.graph != "manual":
            return self._advance(self._ids[:b], self._pos[:b], self._bucket_kv(b))
        return (self._graphs.get(b) or self._capture(b))()

    def _capture(self, b: int) -> Captured:
        """The step of ``b`` rows as a CUDA graph, warmed (compiled) and captured on the same
        tensors, the rows' own: for the warm-up they hold scratch values (ids 0, slot
        max_seq_len - 1, where no request reads K/V before writing it: prompt + new tokens <
        max_seq_len), restored after it; the warm-up runs the step, not the advance."""
        rows = [self._ids[:b], self._pos[:b]]
        saved = [t.clone() for t in rows]
        rows[0].zero_()
        rows[1].fill_(self.max_seq_len - 1)
        g = Captured(self._advance, rows, self._bucket_kv(b), warm=(self._step_fn, rows), runs=3)
        for t, before in zip(rows, saved, strict=True):
            t.copy_(before)
        self._graphs[b] = g
        return g

    def _prefill(self, wave: Sequence[tuple[int, Request]]) -> torch.Tensor:
        """Run the prompts of ``wave`` (rows, requests) into their rows (cache, next ids and
        positions); first ids [n or more] (device)."""
        return self.prefiller.run([req.prompt for _, req in wave], [row for row, _ in wave])

    # ------------------------------------------------------------------ engine
    def _launch(self) -> bool:
        """Queue one decode step of the busy rows, fed from the last step's ids on the device."""
        busy = [i for i, r in enumerate(self._rows) if r is not None]
        if not busy:
            return False
        b = next(s for s in self.buckets if s > busy[-1])
        self.most_rows = max(self.most_rows, len(busy))
        host = self._ring.put(self._step(b))  # queued before a replay can overwrite the output
        self.steps += 1
        items = [(i, i, r) for i, r in enumerate(self._rows[:b]) if r is not None]
        self._inflight.append(_Entry(host, items, self.steps))
        return True

    def _deliver(self, req: Request, token: int) -> bool:
        """Append ``token`` to ``req``; whether that ends it (EOS, budget, stop string)."""
        req.tokens.append(token)
        if req.full is not None:
            req.full.append(token)
        return (
            token in req.eos
            or len(req.tokens) >= req.max_new_tokens
            or (req.check is not None and req.check(req.full))
        )

    def _release(self, row: int, req: Request, error: BaseException | None = None) -> None:
        if self._rows[row] is req:
            self._rows[row] = None
        req.finish(error)

    def _process(self, entry: _Entry, touched: dict[int, Request]) -> None:
        """Hand out the tokens of one finished entry (waits for its copy only)."""
        tokens = entry.host.get()
        for j, row, req in entry.items:
            if req.done:  # finished at an earlier step: this token was computed in vain
                continue
            touched[id(req)] = req
            if req.cancelled or self._deliver(req, tokens[j]):
                self._release(row, req)

    def _admit(self, touched: dict[int, Request]) -> int:
        """Give waiting requests the free rows and prefill them, in waves of prefill_tokens;
        returns the requests given a row."""
        admitted = 0
        wave: list[tuple[int, Request]] = []
        while not self._queue.empty() and None in self._rows:
            req = self._queue.get()
            if req.cancelled:
                req.finish()
                touched[id(req)] = req
                continue
            row = self._rows.index(None)
            self._rows[row] = req
            req.row = row
            self.requests += 1
            admitted += 1
            req.check = self.decoder._stop_checker(req.stop_strings)
            req.full = list(req.prompt) if req.check is not None else None
            padded = self.prefiller.padded
            longest = padded(max([len(req.prompt), *(len(r.prompt) for _, r in wave)]))
            group = self.prefiller.group
            if wave and group == 1 and longest * (len(wave) + 1) > self.prefill_tokens:
                self._prefill_wave(wave, touched)
                wave = []
            wave.append((row, req))
        if self.prefiller.group > 1:  # fixed groups of prompts of one padded length
            by_length: dict[int, list[tuple[int, Request]]] = {}
            for row, req in wave:
                by_length.setdefault(self.prefiller.padded(len(req.prompt)), []).append((row, req))
            group = self.prefiller.group
            waves = [w[i : i + group] for w in by_length.values() for i in range(0, len(w), group)]
        else:
            waves = [wave] if wave else []
        for w in waves:
            self._prefill_wave(w, touched)
        return admitted

    def _prefill_wave(self, wave: list[tuple[int, Request]], touched: dict[int, Request]) -> None:
        try:
            host = self._ring.put(self._prefill(wave))
        except Exception as e:  # these requests fail; the others go on
            log.exception("batcher: prefill failed")
            for row, req in wave:
                self._release(row, req, e)
                touched[id(req)] = req
            return
        self.prefills += len(wave)
        self.prefill_runs += 1
        now = time.perf_counter()
        for _, req in wave:
            req.t_admit = now
        self._inflight.append(_Entry(host, [(j, row, req) for j, (row, req) in enumerate(wave)]))

    def _cycle(self) -> None:
        """Launch a step, hand out what is older than the newest ``depth`` steps, admit
        (with ``prefill_first``: admit first, and launch no step in a cycle that admitted)."""
        early: dict[int, Request] = {}
        older = len(self._inflight)
        admitted = self.prefill_first and not self._queue.empty() and self._admit(early)
        wake(early.values())
        launched = not admitted and self._launch()
        # no step launched while steps are in flight: hand out only what the newest ``depth``
        # steps leave behind, as if one had been; none in flight: what was queued before
        keep = self.depth if launched or (admitted and any(e.seq for e in self._inflight)) else 0
        upto = older if admitted and not keep else len(self._inflight)
        if keep:
            steps = [i for i, e in enumerate(self._inflight) if e.seq]
            upto = steps[-keep] if len(steps) >= keep else 0
        touched: dict[int, Request] = {}
        for _ in range(upto):
            entry = self._inflight.popleft()
            if touched and not entry.host.ready():  # (a burst of prefills) no token waits
                wake(touched.values())
                touched = {}
            self._process(entry, touched)
        wake(touched.values())  # once per step, as a rule: each event loop gets one call
        touched = {}
        self._admit(touched)
        wake(touched.values())  # (requests cancelled before a row, or failed prefills)

    def _fail_all(self, error: BaseException) -> None:
        touched: dict[int, Request] = {}
        for entry in self._inflight:
            for _, _, req in entry.items:
                touched[id(req)] = req
        self._inflight.clear()
        for i, r in enumerate(self._rows):
            if r is not None:
                touched[id(r)] = r
                self._release(i, r, error)
        for req in touched.values():
            if not req.done:
                req.finish(error)
        wake(touched.values())

    def _warm(self) -> None:
        """Compile and capture every step size and prefill length before the first request."""
        dev = self.device
        for b in self.buckets:
            if self.decoder.graph == "manual":
                self._capture(b)
            else:  # compile (free rows: nothing reads what it writes)
                self._step(b)
        self.prefiller.warm()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
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
            if not self._inflight and self.busy_rows == 0:
                self._wake.clear()
                if self._queue.empty():
                    self._wake.wait(timeout=0.5)
                    continue
            try:
                self._cycle()
            except Exception as e:  # a broken step fails the requests in it, not the server
                log.exception("batcher: decode step failed")
                self._fail_all(e)
        closed = BatchingError("the batcher closed")
        self._fail_all(closed)
        waiting = []
        while not self._queue.empty():
            waiting.append(self._queue.get())
            waiting[-1].finish(closed)
        wake(waiting)
