"""Generation by a remote OpenAI-compatible engine: ``generate.engine_url``.

A deployment that outgrows one GPU hands *generation* to an engine built for it (vLLM, SGLang,
llama.cpp's server, or ragtune's own server with ``server.generation_only=true``) and keeps the
rest here: retrieval, the training template, budgets, abstention and the OpenAI-compatible API
in front. :class:`RemoteGenerator` has :class:`ragtune.generate.Generator`'s interface, so
:class:`ragtune.rag.RagPipeline` uses it unchanged; only the tokenizer loads locally (prompts
are budgeted and encoded here, and the engine is sent **token ids**, so its own chat template
and BOS handling never touch them).

What goes over the wire (``POST {engine_url}/completions``): the prompt's ids, ``max_tokens``
(what ``model.max_seq_length`` leaves after the prompt), ``temperature`` (0: greedy), the
schema's stop strings, and with sampling ``top_p``/``seed``. Streaming uses ``"stream": true``.
Two features of the local path need more than plain completions, and are delegated through
the legacy completions API rather than refused, because a trained model's manifest carries an
answerability calibration by default and every answer is then scored:

- the answerability score (:mod:`ragtune.answerability`) needs teacher-forced log-probabilities
  of an answer after the prompt: ``"echo": true, "logprobs": 1`` returns them for the prompt
  tokens (vLLM, SGLang and ragtune's generation-only server do; an engine that does not gets a
  one-line :class:`EngineError`);
- the best non-abstaining candidate bans the abstain answer's first token at the first step
  only: one token with ``logit_bias`` -100, then the rest greedily after it (the token comes
  back as text: its id is the vocabulary entry that decodes to it, the likeliest if several).

A failure to reach the engine, or an HTTP error from it, is one :class:`EngineError` line
naming the URL (and ``generate.engine_url``), never a library traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ragtune.decoding import (
    NO_CHANGE,
    Decoding,
    GenerationResult,
    PieceStream,
    generate_settings,
    new_text,
)
from ragtune.errors import RagtuneError
from ragtune.generate import Generator
from ragtune.stopping import cleans_up, finish_text, header_stops

log = logging.getLogger(__name__)

API_KEY_ENV = "RAGTUNE_ENGINE_API_KEY"  # not a config key: settings are shown in /v1/models
MODEL_ALIAS = "ragtune"  # the name docs/beyond-one-gpu.md serves the model under
CONNECT_S = 10.0
READ_S = 600.0  # one long answer on a busy engine; a dead one fails at connect


class EngineError(RagtuneError):
    """The remote engine is unreachable or refused a request; the message names its URL."""


class Engine:
    """The HTTP client of one OpenAI-compatible engine (thread-safe: one pooled client).

    ``url`` is the base URL OpenAI clients take (``http://host:8000/v1``; ``/v1`` is added when
    missing). The served model is looked up once here, so a wrong URL fails at start.
    """

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None):
        import httpx

        base = url.rstrip("/")
        self.url = base if base.endswith("/v1") else f"{base}/v1"
        key = api_key or os.environ.get(API_KEY_ENV)
        self._client = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {key}"} if key else {},
            timeout=httpx.Timeout(READ_S, connect=CONNECT_S),
        )
        self.model_id = self._served_model(model)

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """One ``/completions`` request answered whole."""
        return self._call("POST", "/completions", {"model": self.model_id, **body})

    def stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The events of one streamed ``/completions`` request; leaving the loop closes the
        connection, which is how OpenAI-compatible engines learn to stop generating."""
        import httpx

        body = {"model": self.model_id, **body, "stream": True}
        try:
            with self._client.stream("POST", "/completions", json=body) as r:
                if r.status_code >= 400:
                    r.read()
                    raise self._refused("/completions", r)
                for line in r.iter_lines():
                    data = line[5:].strip() if line.startswith("data:") else ""
                    if not data:
                        continue
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if "error" in event:  # an in-band error once the stream had started
                        raise EngineError(f"engine {self.url}: {_message(event)}")
                    yield event
        except httpx.HTTPError as e:
            raise self._unreachable(e) from None

    def completion_logprobs(
        self,
        prompts: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        batch_size: int,
        first_token: int | None,
    ) -> tuple[list[float], list[float]]:
        """What :func:`ragtune.answerability._logprobs` computes from local weights: each
        completion's summed log-probability after its prompt, and the probability of
        ``first_token`` at the first completion position, from the engine's echoed prompt
        log-probabilities."""
        rows = [(list(p), list(c)) for p, c in zip(prompts, completions, strict=True)]
        first: dict[tuple[int, ...], float] = {}
        if first_token is not None:  # a row per prompt that starts with the token, at least
            have = {tuple(p) for p, c in rows if c[:1] == [first_token]}
            extra = list(dict.fromkeys(tuple(p) for p, _ in rows if tuple(p) not in have))
            rows += [(list(p), [first_token]) for p in extra]
        with ThreadPoolExecutor(max(1, batch_size)) as pool:
            got = list(pool.map(lambda pc: self._echo_logprobs(*pc), rows))
        for (p, c), lps in zip(rows, got, strict=True):
            if first_token is not None and c[:1] == [first_token]:
                first[tuple(p)] = math.exp(lps[0])
        sums = [sum(lps) for lps in got[: len(prompts)]]
        firsts = [first.get(tuple(p), 0.0) for p in prompts]
        return sums, firsts

    def close(self) -> None:
        self._client.close()

    # ----------------------------------------------------------------- internals
    def _echo_logprobs(self, prompt: list[int], completion: list[int]) -> list[float]:
        # max_tokens 1, not 0: not every engine accepts 0; the generated token is ignored.
        body = {"prompt": [*prompt, *completion], "max_tokens": 1, "temperature": 0}
        got = self.complete({**body, "echo": True, "logprobs": 1})
        lps = ((got.get("choices") or [{}])[0].get("logprobs") or {}).get("token_logprobs") or []
        part = lps[len(prompt) : len(prompt) + len(completion)]
        if len(part) != len(completion) or any(x is None for x in part):
            raise EngineError(
                f"engine {self.url} did not return the prompt's log-probabilities (echo with "
                "logprobs), which answer-or-abstain scoring needs; serve the model with vLLM, "
                "SGLang or ragtune's server.generation_only=true"
            )
        return [float(x) for x in part]

    def _served_model(self, wanted: str | None) -> str:
        ids = [m.get("id") for m in self._call("GET", "/models").get("data") or []]
        if wanted:
            if wanted not in ids:
                raise EngineError(
                    f"engine {self.url} does not serve generate.engine_model={wanted!r} "
                    f"(it serves {ids})"
                )
            return wanted
        if MODEL_ALIAS in ids:
            return MODEL_ALIAS
        if len(ids) == 1:
            return str(ids[0])
        raise EngineError(
            f"engine {self.url} serves {ids}: name the ragtune model with generate.engine_model"
        )

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        import httpx

        try:
            r = self._client.request(method, path, json=body)
        except httpx.HTTPError as e:
            raise self._unreachable(e) from None
        if r.status_code >= 400:
            raise self._refused(path, r)
        try:
            return r.json()
        except ValueError:
            raise EngineError(f"engine {self.url}{path} answered with no JSON") from None

    def _unreachable(self, e: Exception) -> EngineError:
        why = str(e).splitlines()[0] if str(e) else ""
        return EngineError(
            f"cannot reach the engine at {self.url} (generate.engine_url): "
            f"{type(e).__name__}{': ' + why if why else ''}"
        )

    def _refused(self, path: str, r: Any) -> EngineError:
        try:
            msg = _message(r.json())
        except ValueError:
            msg = r.text.strip().splitlines()[0][:300] if r.text.strip() else ""
        return EngineError(f"engine {self.url}{path} answered {r.status_code}: {msg}")


def _message(body: Any) -> str:
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return str(err.get("message", err))[:300]
    return str(err or body.get("detail", body) if isinstance(body, dict) else body)[:300]


class RemoteGenerator:
    """:class:`ragtune.generate.Generator`'s interface, generating on an :class:`Engine`.

    ``model`` is the Engine (where Generator holds weights; answerability scores through it).
    Batches are concurrent requests: the engine batches them itself (continuous batching).
    """

    # Prompt encoding, stop strings and the token budget are the local Generator's own code.
    encode = Generator.encode
    decode = Generator.decode
    stops_for = Generator.stops_for
    max_new_for = Generator.max_new_for
    samples = Generator.samples

    def __init__(
        self,
        model: Engine,
        tokenizer: Any,
        schema: Any,
        gcfg: Any = None,
        extra_stop_strings: Sequence[str] = (),
        max_seq_length: int = 2048,
    ):
        self.model = self.engine = model
        self.tokenizer, self.schema = tokenizer, schema
        self.settings = generate_settings(gcfg)
        self.max_seq_length = int(max_seq_length)
        stops = [*schema.stop_strings, *extra_stop_strings, *header_stops(schema)]
        self.stop_strings = list(dict.fromkeys(s for s in stops if s))
        self._by_text: dict[str, list[int]] | None = None  # token text -> ids (_first_id)
        self._concurrency = 1

    def exclusive(self) -> contextlib.nullcontext:
        """No lock: the engine schedules concurrent requests itself."""
        return contextlib.nullcontext()

    def start_batching(
        self,
        mode: str = "auto",
        max_batch: int = 32,
        warmup: bool = True,
        invariant: bool = True,
        weights: str = "auto",
    ) -> bool:
        """The engine batches concurrent requests itself: the server lets ``max_batch`` of
        them through at once (``concurrency``) and nothing starts here."""
        self._concurrency = max(1, int(max_batch))
        return False

    @property
    def concurrency(self) -> int:
        """Requests the server sends to the engine at once (``server.max_batch``)."""
        return self._concurrency

    def batching_stats(self) -> None:
        """No batcher here (the engine's own batching is not visible): /healthz shows null."""
        return None

    def generate(self, prompt_text: str, decoding: Decoding = NO_CHANGE) -> GenerationResult:
        return self.generate_batch([prompt_text], 1, decoding)[0]

    def stream(self, prompt_text: str, decoding: Decoding = NO_CHANGE) -> RemoteTextStream:
        return RemoteTextStream(self, prompt_text, decoding)

    def generate_batch(
        self,
        prompts: Sequence[str],
        batch_size: int = 8,
        decoding: Decoding = NO_CHANGE,
        on_batch: Callable[[int], Any] | None = None,
        block_first_tokens: Sequence[int] = (),
    ) -> list[GenerationResult]:
        """Answers for many prompts, ``batch_size`` requests in flight (see Generator's)."""

        def one(i: int) -> GenerationResult:
            # n sampled answers to one prompt must differ: each row gets its own seed
            seed = None if decoding.seed is None else decoding.seed + i
            ids = self.encode(prompts[i])
            got = self._complete(ids, dataclasses.replace(decoding, seed=seed), block)
            if on_batch is not None:
                on_batch(1)
            return got

        block = list(block_first_tokens)
        with ThreadPoolExecutor(max(1, min(batch_size, len(prompts)))) as pool:
            return list(pool.map(one, range(len(prompts))))

    # ----------------------------------------------------------------- internals
    def body(self, ids: list[int], decoding: Decoding, max_new: int) -> dict[str, Any]:
        """The request for ``ids``: the same decoding the local path would use."""
        s = self.settings
        temperature = s.temperature if decoding.temperature is None else decoding.temperature
        out: dict[str, Any] = {
            "prompt": ids,
            "max_tokens": max_new,
            "temperature": temperature,
            "stop": self.stops_for(decoding),
        }
        if temperature > 0:
            out["top_p"] = s.top_p if decoding.top_p is None else decoding.top_p
            if decoding.seed is not None:
                out["seed"] = int(decoding.seed)
        if s.repetition_penalty != 1.0:  # not OpenAI's; vLLM's and SGLang's extra field
            out["repetition_penalty"] = s.repetition_penalty
        return out

    def _complete(self, ids: list[int], decoding: Decoding, block: list[int]) -> GenerationResult:
        t0 = time.perf_counter()
        max_new = self.max_new_for(len(ids), decoding)
        head, text = [], ""
        if block:  # the first token without the banned ids, then the rest after it
            first = self.engine.complete(
                {**self.body(ids, decoding, 1), "logit_bias": {str(t): -100 for t in block}}
            )["choices"][0]
            text = first.get("text") or ""
            if first.get("finish_reason") != "length" or max_new == 1:
                return self.result(text, first, 1, time.perf_counter() - t0, len(ids), decoding)
            head = self._first_id(ids, text, block)
        got = self.engine.complete(self.body([*ids, *head], decoding, max_new - len(head)))
        choice = got["choices"][0]
        new = int((got.get("usage") or {}).get("completion_tokens") or 0) + len(head)
        return self.result(
            text + (choice.get("text") or ""),
            choice,
            new,
            time.perf_counter() - t0,
            len(ids),
            decoding,
        )

    def _first_id(self, ids: list[int], text: str, block: list[int]) -> list[int]:
        """The id of the engine's first token, which came back as text: the vocabulary entry
        that decodes to it (re-encoding the text could split it: "Athenian" is not "Athen" +
        "ian"); several such entries: the one the engine found likeliest, as greedy chose."""
        if self._by_text is None:  # once, and only when a candidate is asked for
            n = len(self.tokenizer)
            texts = self.tokenizer.batch_decode(
                [[i] for i in range(n)],
                skip_special_tokens=True,
                clean_up_tokenization_spaces=cleans_up(self.tokenizer),
            )
            table: dict[str, list[int]] = {}
            for i, t in enumerate(texts):
                table.setdefault(t, []).append(i)
            self._by_text = table
        # SentencePiece drops a lone token's leading space: " the" is "the" alone
        found = self._by_text.get(text) or self._by_text.get(text[1:] if text[:1] == " " else "")
        cands = [i for i in found or [] if i not in block]
        if len(cands) == 1:
            return cands
        if cands:
            lps = self.engine.completion_logprobs([ids] * len(cands), [[c] for c in cands], 8, None)
            return [cands[max(range(len(cands)), key=lambda k: lps[0][k])]]
        log.warning("engine token %r is no vocabulary entry: re-encoded, maybe inexactly", text)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def result(
        self,
        raw: str,
        choice: dict[str, Any],
        new_tokens: int,
        seconds: float,
        prompt_tokens: int,
        decoding: Decoding = NO_CHANGE,
    ) -> GenerationResult:
        """A GenerationResult from the engine's text (trimmed as the local path trims it)."""
        text, hit = finish_text(raw, self.stops_for(decoding), final=True)
        finish = choice.get("finish_reason")
        # vLLM names the stop string that ended it; otherwise an engine's "stop" is EOS
        if hit or isinstance(choice.get("stop_reason"), str):
            reason = "stop_string"
        else:
            reason = "length" if finish == "length" else "eos"
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        return GenerationResult(text, ids, reason, new_tokens or len(ids), seconds, prompt_tokens)


class RemoteTextStream(PieceStream):
    """:class:`ragtune.textstream.TextStream` over an engine's SSE stream: the same pieces (a
    tail that might become a stop string is held back), ``.result`` once exhausted, and
    ``close()`` (any thread) drops the connection so the engine stops generating."""

    def __init__(self, gen: RemoteGenerator, prompt_text: str, decoding: Decoding = NO_CHANGE):
        self._gen, self._prompt, self._decoding = gen, prompt_text, decoding
        self._closed = False
        self._it = self._run()
        self.result: GenerationResult | None = None

    def close(self) -> None:
        self._closed = True  # seen at the next event when another thread is iterating
        self._stop_iterating()

    def _run(self) -> Iterator[str]:
        gen, decoding = self._gen, self._decoding
        ids = gen.encode(self._prompt)
        stops = gen.stops_for(decoding)
        t0 = time.perf_counter()
        raw = emitted = ""
        last: dict[str, Any] = {}
        new = 0
        events = gen.engine.stream(gen.body(ids, decoding, gen.max_new_for(len(ids), decoding)))
        try:
            for event in events:
                if self._closed:
                    return
                new = int((event.get("usage") or {}).get("completion_tokens") or new)
                for choice in event.get("choices") or []:
                    raw += choice.get("text") or ""
                    last = {**last, **{k: v for k, v in choice.items() if v is not None}}
                visible, hit = finish_text(raw, stops, final=False)
                if piece := new_text(visible, emitted):
                    yield piece
                    emitted = visible
                if hit:
                    break
        finally:
            events.close()  # drops the connection when the answer ended early
        result = gen.result(raw, last, new, time.perf_counter() - t0, len(ids), decoding)
        if tail := new_text(result.text, emitted):
            yield tail
        self.result = result


def load_or_connect(path: str, gcfg: Any, **load: Any) -> tuple[Any, Any]:
    """``load_model(path, **load)``, or with ``generate.engine_url`` the :class:`Engine` in
    place of the weights and the folder's tokenizer (the weights are never read)."""
    from pathlib import Path

    from ragtune.loading import LoadError, load_model, load_tokenizer
    from ragtune.models import ModelNotFoundError, resolve_model

    settings = generate_settings(gcfg)
    if not settings.engine_url:
        return load_model(path, **load)
    engine = Engine(settings.engine_url, settings.engine_model)
    try:  # a model name, as load_model takes it: its local copy's tokenizer
        folder = path if Path(path).expanduser().is_dir() else resolve_model(path)
    except ModelNotFoundError as e:
        raise LoadError(str(e)) from None
    tokenizer = load_tokenizer(folder, trust_remote_code=bool(load.get("trust_remote_code")))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    log.info("generation on %s (model %s); local tokenizer %s", engine.url, engine.model_id, path)
    return engine, tokenizer


def generator_of(model: Any, *args: Any, **kwargs: Any) -> Generator | RemoteGenerator:
    """The generator for what :func:`load_or_connect` gave: remote for an Engine."""
    return (RemoteGenerator if isinstance(model, Engine) else Generator)(model, *args, **kwargs)
