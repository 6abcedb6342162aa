"""Generation with the schema's stop strings: one answer, a token stream, or a batch.

Every prompt is encoded with :meth:`PromptSchema.encode_prompt`, so the ids a model is asked
with are the ids it was trained on (one BOS, no doubled special tokens). Generation ends at
EOS or when the text produces a stop string (any section header of the schema: the answer is
over when the model starts a new ``### Instruction:``); the stop string is trimmed, the prompt
is never echoed, and text that might still turn into a stop string is held back while
streaming, so what is streamed is exactly what :meth:`Generator.generate` returns.

Decoding is Hugging Face ``generate`` (greedy when ``temperature == 0``). A request may
change its decoding for one answer with a :class:`Decoding` (OpenAI's ``max_tokens``,
``temperature``, ``top_p``, ``seed``, ``stop``): unset fields keep the ``generate`` config's
values, and prompt + answer never exceed ``max_seq_length``. On CUDA a model
loaded through Unsloth is switched to Unsloth's inference mode, and ``generate.fast`` hands
greedy, non-streamed decoding to ``ragtune.fastdecode.FastDecoder`` (static KV cache and a
compiled step: the same tokens, faster); without CUDA it warns and keeps the standard path.

:meth:`Generator.start_batching` (the server: ``server.batching``) hands every greedy request
(plain, streamed, ``n`` > 1) to one ``ragtune.batching.StepBatcher``, so concurrent requests
share decode steps; each gets the tokens it gets alone. A streamed one is then a
``ragtune.batchstream.BatchedTextStream`` (no thread of its own; ``async for`` on an event
loop). Sampled requests, and those that ban first tokens (scoring), keep the standard path
and the generator's lock.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from ragtune.config import GenerateConfig
from ragtune.decoding import (
    NO_CHANGE,
    Decoding,
    GenerationResult,
    PieceStream,
    generate_settings,
)
from ragtune.schema import PromptSchema
from ragtune.stopping import StopOnText, cleans_up, finish_text, header_stops
from ragtune.textstream import TextStream

log = logging.getLogger(__name__)
_RECENT_PROMPTS = 128  # prompts whose ids Generator.encode keeps (> a server's rows)

# Special tokens that end a turn in common model families, stopped on when the vocabulary has
# them (SmolLM2's EOS is <|im_end|>, but it may also emit <|endoftext|>).
_END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>", "</s>", "<|end_of_text|>")


@dataclass
class Generator:
    """Decodes answers for prompts rendered by the one schema.

    ``stream`` and ``generate`` hold a lock for the whole generation, so one Generator can
    be shared by threads (a server's workers): requests run one after another, except greedy
    ones once :meth:`start_batching` ran (they share the batcher's decode steps).
    """

    model: Any
    tokenizer: Any
    schema: PromptSchema
    gcfg: Any = None
    extra_stop_strings: Sequence[str] = ()
    max_seq_length: int = 2048  # prompt + answer; sizes the fast path's static KV cache
    settings: GenerateConfig = field(init=False)

    def __post_init__(self) -> None:
        self.settings = generate_settings(self.gcfg)
        self._lock = threading.Lock()  # one generation at a time (outside the batcher)
        self._batcher: Any = None  # ragtune.batching.StepBatcher, once start_batching ran
        self._recent_ids: dict[str, tuple[int, ...]] = {}  # prompt text -> ids (encode)
        self._recent_lock = threading.Lock()
        stops = [*self.schema.stop_strings, *self.extra_stop_strings, *header_stops(self.schema)]
        self.stop_strings = list(dict.fromkeys(s for s in stops if s))
        self.eos_ids = self._eos_ids()
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids)
        self.device = _device_of(self.model)
        self._prepare_model()

    # ----------------------------------------------------------------- public API
    def encode(self, prompt_text: str) -> list[int]:
        """The prompt's ids, exactly as training encoded them; the recent prompts' are kept
        (by exact text): ``RagPipeline.prepare`` encodes a prompt to fit it, the generation
        asks again, and each encoding is GIL time the batcher's engine waits behind."""
        recent = getattr(self, "_recent_ids", None)  # (absent on a RemoteGenerator)
        if recent is not None and (ids := recent.get(prompt_text)) is not None:
            return list(ids)  # a copy: callers may change theirs
        ids = self.schema.encode_prompt(self.tokenizer, prompt_text)
        if recent is not None:
            with self._recent_lock:
                recent[prompt_text] = tuple(ids)
                while len(recent) > _RECENT_PROMPTS:
                    recent.pop(next(iter(recent)))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        # clean_up_tokenization_spaces only ever applied to WordPiece vocabularies; asking for
        # it explicitly keeps BPE tokenizers from warning on every call.
        return self.tokenizer.decode(
            list(ids),
            skip_special_tokens=True,
            clean_up_tokenization_spaces=cleans_up(self.tokenizer),
        )

    def exclusive(self) -> threading.Lock:
        """The lock each generation holds: hold it to use the model otherwise (scoring)."""
        return self._lock

    def start_batching(
        self,
        mode: str = "auto",
        max_batch: int = 32,
        warmup: bool = True,
        invariant: bool = True,
        weights: str = "auto",
    ) -> bool:
        """Serve greedy requests through one continuous batcher; returns whether it is on.

        ``mode``: ``auto`` = on for the CUDA fast path (``generate.fast`` on a GPU), ``true``
        = wherever the direct decode path runs (a CPU test of the server), ``false`` = off.
        ``weights``: ``server.batch_weights`` (auto | fp8 | dense, see
        :func:`ragtune.batchstream.batch_weights`). See :func:`ragtune.batchstream.batcher_for`;
        it replaces the batch-1 fast decoder.
        """
        mode = str(mode).lower()
        if mode not in ("auto", "true", "false"):
            raise ValueError(f"batching must be auto, true or false, got {mode!r}")
        auto_off = self._fast is None or self.device.type != "cuda"
        if self._batcher is None and mode != "false" and not (mode == "auto" and auto_off):
            from ragtune.batchstream import batcher_for

            self._fast = None  # the batcher serves every greedy request: free its copies
            self._batcher = batcher_for(
                self.model,
                self.tokenizer,
                self.max_seq_length,
                max_batch,
                warmup,
                invariant,
                weights,
            )
        return self._batcher is not None

    @property
    def concurrency(self) -> int:
        """Requests that can usefully generate at once: the batcher's rows, else 1."""
        return self._batcher.max_batch if self._batcher is not None else 1

    def batching_stats(self) -> dict[str, int] | None:
        """The batcher's counters (None without one): for /healthz and the tests."""
        return None if self._batcher is None else self._batcher.stats()

    def generate(self, prompt_text: str, decoding: Decoding = NO_CHANGE) -> GenerationResult:
        """One answer for a rendered prompt (``decoding`` changes this answer's decoding)."""
        return self.generate_batch([prompt_text], batch_size=1, decoding=decoding)[0]

    def stream(self, prompt_text: str, decoding: Decoding = NO_CHANGE) -> PieceStream:
        """The answer as it is generated: an iterator of text pieces (see :class:`TextStream`;
        a batched greedy answer is a ``BatchedTextStream``, also an async iterator)."""
        if self._batched(decoding):
            from ragtune.batchstream import BatchedTextStream

            return BatchedTextStream(self, prompt_text, decoding)
        return TextStream(self, prompt_text, decoding)

    def stops_for(self, decoding: Decoding = NO_CHANGE) -> list[str]:
        """The schema's stop strings plus a request's own."""
        return list(dict.fromkeys([*self.stop_strings, *(s for s in decoding.stop if s)]))

    def max_new_for(self, prompt_tokens: int, decoding: Decoding = NO_CHANGE) -> int:
        """New tokens an answer may have: the request's or the config's, within the model."""
        want = decoding.max_new_tokens or self.settings.max_new_tokens
        return max(1, min(int(want), self.max_seq_length - prompt_tokens))

    def samples(self, decoding: Decoding = NO_CHANGE) -> bool:
        """Whether this decoding samples (temperature > 0) rather than decoding greedily."""
        t = self.settings.temperature if decoding.temperature is None else decoding.temperature
        return t > 0

    def generate_batch(
        self,
        prompts: Sequence[str],
        batch_size: int = 8,
        decoding: Decoding = NO_CHANGE,
        on_batch: Callable[[int], Any] | None = None,
        block_first_tokens: Sequence[int] = (),
    ) -> list[GenerationResult]:
        """Answers for many prompts: left-padded batched decoding, results in input order.

        Prompts are sorted by length so that each batch pads little; with greedy decoding
        each answer is the one :meth:`generate` gives for the prompt alone. With a seed, a
        sampled batch is repeatable (the same prompts in the same order give the same
        answers). ``on_batch`` is called with each finished batch's size (progress bars).
        ``block_first_tokens``: ids the first generated token may not be
        (:class:`BlockFirstTokens`; e.g. the abstain answer's first token, for the best answer
        that does not abstain).
        """
        stops = self.stops_for(decoding)
        encoded = [self.encode(p) for p in prompts]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        out: list[GenerationResult | None] = [None] * len(encoded)
        for b in range(0, len(order), max(1, batch_size)):
            idx = order[b : b + max(1, batch_size)]
            t0 = time.perf_counter()
            with self._turn(decoding, block_first_tokens):
                rows = self._generate_ids(
                    [encoded[i] for i in idx], decoding, block=block_first_tokens
                )
            seconds = time.perf_counter() - t0
            for i, row in zip(idx, rows, strict=True):
                out[i] = self._result(row, seconds, len(encoded[i]), len(idx), stops)
            if on_batch is not None:
                on_batch(len(idx))
        return [r for r in out if r is not None]

    # ----------------------------------------------------------------- internals
    def _batched(self, decoding: Decoding, block: Sequence[int] = ()) -> bool:
        """Whether this request goes to the batcher (greedy, nothing banned)."""
        return (
            self._batcher is not None and self._greedy and not self.samples(decoding) and not block
        )

    def _turn(self, decoding: Decoding, block: Sequence[int] = ()) -> Any:
        """What a generation holds: nothing for the batcher (it orders its own work), else the
        lock, so that the model runs one standard generation at a time."""
        return contextlib.nullcontext() if self._batched(decoding, block) else self._lock

    def _result(
        self,
        row: list[int],
        seconds: float,
        prompt_tokens: int,
        rows: int = 1,
        stops: Sequence[str] | None = None,
    ) -> GenerationResult:
        got: list[int] = []
        eos = False
        for tok in row:
            if tok in self.eos_ids:
                eos = True
                break
            got.append(tok)
        stops = self.stop_strings if stops is None else stops
        text, hit = finish_text(self.decode(got), stops, final=True)
        reason = "eos" if eos else "stop_string" if hit else "length"
        new = len(got) + int(eos)
        return GenerationResult(text, got, reason, new, seconds, prompt_tokens, rows)

    def _generation_config(self, max_new: int, decoding: Decoding) -> GenerationConfig:
        s = self.settings
        sample = self.samples(decoding)
        temperature = s.temperature if decoding.temperature is None else decoding.temperature
        top_p = s.top_p if decoding.top_p is None else decoding.top_p
        return GenerationConfig(
            max_new_tokens=max_new,
            do_sample=sample,
            temperature=temperature if sample else 1.0,
            top_p=top_p if sample else 1.0,
            top_k=0 if sample else None,
            repetition_penalty=s.repetition_penalty,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_id,
            num_beams=1,
        )

    @torch.inference_mode()
    def _generate_ids(
        self,
        batch: Sequence[Sequence[int]],
        decoding: Decoding = NO_CHANGE,
        streamer: BaseStreamer | None = None,
        cancel: threading.Event | None = None,
        block: Sequence[int] = (),
    ) -> list[list[int]]:
        """Generated ids (prompt removed) for each left-padded row; ``block``: ids banned at
        the first step."""
        width = max(len(r) for r in batch)
        if width == 0:
            raise ValueError("empty prompt: nothing to generate from")
        max_new = self.max_new_for(width, decoding)
        stops = self.stops_for(decoding)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, row in enumerate(batch):
            if row:
                input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
                mask[i, width - len(row) :] = 1
        if self._batched(decoding, block):
            from ragtune.batchstream import run_rows

            rows = run_rows(self._batcher, batch, max_new, sorted(self.eos_ids), stops)
            if streamer is not None:  # (stream() gives a BatchedTextStream instead) all at once
                streamer.end()
            return rows
        greedy = self._greedy and not self.samples(decoding)
        if self._fast is not None and streamer is None and greedy and not block:
            # GPU fast path: static KV cache + compiled step; the same greedy tokens.
            return self._fast.generate_batch(
                [list(r) for r in batch], max_new, sorted(self.eos_ids), stops
            )
        if decoding.seed is not None:
            torch.manual_seed(int(decoding.seed))  # under the generator's lock: repeatable
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        stop = StopOnText(self.tokenizer, stops, width, cancel)
        extra = {"logits_processor": LogitsProcessorList([BlockFirstTokens(block, width)])}
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            generation_config=self._generation_config(max_new, decoding),
            stopping_criteria=StoppingCriteriaList([stop]),
            streamer=streamer,
            **(extra if block else {}),
        )
        return [row[width:].tolist() for row in out]

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for value in (
            self.tokenizer.eos_token_id,
            getattr(getattr(self.model, "generation_config", None), "eos_token_id", None),
        ):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        specials = set(getattr(self.tokenizer, "all_special_tokens", []) or [])
        for tok in _END_TOKENS:
            if tok in specials:
                tid = self.tokenizer.convert_tokens_to_ids(tok)
                if isinstance(tid, int) and tid >= 0:
                    ids.add(tid)
        if not ids:
            raise ValueError("the tokenizer has no EOS token: generation would never stop")
        return ids

    def _prepare_model(self) -> None:
        """Inference mode; Unsloth's fast inference on CUDA; the fast decode path if asked."""
        self._fast = None
        if hasattr(self.model, "eval"):
            self.model.eval()
        cuda = self.device.type == "cuda"
        if cuda and _is_unsloth(self.model):
            try:
                from unsloth import FastLanguageModel

                FastLanguageModel.for_inference(self.model)
                log.info("Unsloth inference mode on")
            except ImportError:
                warnings.warn(
                    "the model came from Unsloth but unsloth is not importable", stacklevel=2
                )
        if self.settings.fast:
            if not cuda:
                warnings.warn(
                    "generate.fast needs a CUDA GPU; using the standard decoding path",
                    stacklevel=3,
                )
                return
            try:
                from ragtune.fastdecode import FastDecoder
            except ImportError:
                warnings.warn(
                    "generate.fast: ragtune.fastdecode is not available; "
                    "using the standard decoding path",
                    stacklevel=3,
                )
                return
            if not self._greedy:
                warnings.warn(
                    "generate.fast decodes greedily only (temperature=0, repetition_penalty=1); "
                    "using the standard decoding path",
                    stacklevel=3,
                )
                return
            self._fast = FastDecoder(self.model, self.tokenizer, max_seq_len=self.max_seq_length)
            log.info("fast decode path on (ragtune.fastdecode, %d tokens)", self.max_seq_length)

    @property
    def _greedy(self) -> bool:
        return self.settings.temperature == 0 and self.settings.repetition_penalty == 1.0


class BlockFirstTokens(LogitsProcessor):
    """A logits processor: the first generated token may not be one of ``token_ids``."""

    def __init__(self, token_ids: Sequence[int], prompt_width: int):
        self.token_ids = list(token_ids)
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] == self.prompt_width:
            scores[:, self.token_ids] = -float("inf")
        return scores


def _device_of(model: Any) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _is_unsloth(model: Any) -> bool:
    """Whether a model was loaded through Unsloth (its classes or config say so)."""
    seen = model
    for _ in range(4):
        if seen is None:
            break
        if "unsloth" in type(seen).__module__.lower():
            return True
        cfg = getattr(seen, "config", None)
        if cfg is not None and getattr(cfg, "unsloth_version", None):
            return True
        seen = getattr(seen, "base_model", None) or getattr(seen, "model", None)
    return False
