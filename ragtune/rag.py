"""The RAG pipeline: the one answer path of ask, the server, LangChain and evaluation.

A trained folder carries everything needed to ask it the way it was trained (its prompt
schema, and in ``manifest.json`` the retriever and model settings; see
:mod:`ragtune.modelcard`). :meth:`RagPipeline.from_model_dir` rebuilds exactly that, and
refuses (or, with ``allow_mismatch``, warns) when the index, the chunking or the prompt in
use differ from what the model was trained with.

One question: :meth:`RagPipeline.prepare` (retrieve within the token budget training used,
render with the schema) -> :class:`ragtune.generate.Generator` -> :meth:`RagPipeline._finish`
(one answer) / :meth:`RagPipeline._finish_batch` (many), the single place generations become
:class:`Answer` objects. ``answer``, ``stream`` and ``answer_batch`` all end there, so whatever
is decided there is what every caller (and evaluation, which scores ``answer_batch``) gets.

The answer-or-abstain decision: when the manifest carries an ``answerability`` calibration
(fitted by training on held-out sources, :mod:`ragtune.answerability`), every answer is scored
(``Answer.score``; the candidate is the best non-abstaining answer) and the pipeline abstains
below the threshold. An empty answer always counts as abstained (the SQuAD v2 convention).
Streaming with a calibration is buffered: the decision needs the whole candidate, so the
final text comes as one piece.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ragtune.answer import Answer, AnswerStream, Prepared
from ragtune.answerability import (
    CHUNK,
    MANIFEST_KEY,
    ROTATED,
    Calibration,
    abstain_readings,
    assess,
    is_abstained,
    rotations,
)
from ragtune.budget import context_budget, fit_prompt, token_counter, tokenizer_key
from ragtune.decoding import NO_CHANGE, Decoding, GenerationResult
from ragtune.errors import RagtuneError
from ragtune.modelcard import (
    MismatchError,
    check_files,
    check_settings,
    command_line_keys,
    is_explicit,
    model_folder,
    model_settings,
    open_trained_retriever,
    read_manifest,
    retriever_settings,
    trained_mode,
    trained_schema,
)
from ragtune.paths import resolve_path
from ragtune.remote import generator_of, load_or_connect
from ragtune.schema import PromptFields, PromptSchema, get_schema
from ragtune.types import Chunk

log = logging.getLogger(__name__)


class PipelineError(RagtuneError):
    """A question the pipeline cannot take (too long for the model, empty)."""


class RagPipeline:
    """Retrieve -> render with the one schema -> generate, with the settings of one model.

    ``retriever`` None is closed book (no context section). ``context_cache``: a dict shared
    by pipelines that may ask the same question with the same retriever settings (evaluation
    modes), so each context is retrieved once. ``scoring``: compute ``Answer.score`` (None:
    when the manifest has a calibration, which also applies its decision; True without one
    scores with the uncalibrated margin and leaves the answers as generated).
    ``rotate_context``: also read the abstain log-odds with the context in its other orders
    (``abstain_logodds_rotated``; always on when the calibration weighs that feature).
    ``read_chunks``: also read it with each chunk of the context alone
    (``abstain_logodds_chunk``; always on when the calibration weighs that feature).
    With ``retriever.reader_rerank`` = n > k, the context is the k of the top n candidates
    that this model, reading each alone, is least sure to abstain on (in retrieval order).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        schema: PromptSchema,
        retriever: Any | None,
        gcfg: Any = None,
        *,
        max_seq_length: int = 1024,
        context_tokens: int = 0,
        name: str = "ragtune",
        manifest: dict[str, Any] | None = None,
        context_cache: dict[tuple, tuple[list[Chunk], float]] | None = None,
        scoring: bool | None = None,
        rotate_context: bool = False,
        read_chunks: bool = False,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.schema = schema
        self.retriever = retriever
        self.max_seq_length = int(max_seq_length)
        self.context_tokens = int(context_tokens)
        self.name = name
        self.manifest = manifest or {}
        self.context_cache = context_cache
        self._cache_key: tuple | None = None
        self.generator = generator_of(model, tokenizer, schema, gcfg, max_seq_length=max_seq_length)
        found = self.manifest.get(MANIFEST_KEY)
        self.calibration: Calibration | None = Calibration.from_dict(found) if found else None
        self.scoring = self.calibration is not None if scoring is None else bool(scoring)
        weighs = self.calibration.weights if self.calibration is not None else {}
        self.rotate_context = bool(rotate_context) or ROTATED in weighs
        self.read_chunks = bool(read_chunks) or CHUNK in weighs
        self._recent: dict[str, list[Chunk]] = {}  # question -> chunks (LangChain chains)
        self._recent_lock = threading.Lock()

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_model_dir(
        cls,
        model_dir: str | Path,
        cfg: Any,
        allow_mismatch: bool = False,
        *,
        explicit: Iterable[str] = (),
        device: str = "auto",
        context: str = "auto",
    ) -> RagPipeline:
        """The pipeline a trained folder was trained for: its schema, retriever and settings.

        ``cfg`` supplies ``retriever``, ``model``, ``prompt`` and ``generate`` defaults; the
        manifest's values win over them except for the dotted keys in ``explicit`` (what a
        user set on the command line, e.g. ``retriever.k`` or ``prompt``). Differences in the
        embedding model, normalisation, chunking or prompt fingerprint between the manifest
        and what is in use raise :class:`MismatchError` naming both values, or only warn
        with ``allow_mismatch``. ``context``: ``auto`` (as trained: none for a closed-book
        model), ``rag`` or ``closed``.
        """
        from ragtune.loading import load_tokenizer

        folder = model_folder(model_dir)
        manifest = read_manifest(folder)
        check_files(folder, manifest, allow_mismatch)
        explicit = set(explicit)
        schema = (
            get_schema(cfg.prompt.name)
            if is_explicit("prompt", explicit)
            else trained_schema(folder, cfg.prompt.name, manifest)
        )
        mcfg = model_settings(_get(cfg, "model"), manifest, explicit)
        rcfg = retriever_settings(_get(cfg, "retriever"), manifest, explicit)
        check_settings(folder, manifest, rcfg, schema, allow_mismatch)
        if context == "auto":
            context = "closed" if trained_mode(manifest) == "closed" else "rag"
        if context not in ("rag", "closed"):
            raise PipelineError(f"context must be auto, rag or closed, got {context!r}")

        retriever = None
        if context == "rag":  # the index is checked before the (slower) model load
            tok = load_tokenizer(str(folder), trust_remote_code=mcfg["trust_remote_code"])
            retriever = open_trained_retriever(
                folder, rcfg, manifest, allow_mismatch, token_counter(tok)
            )
        model, tokenizer = load_or_connect(  # an Engine, not weights, with generate.engine_url
            str(folder),
            _get(cfg, "generate"),
            device=device,
            dtype=mcfg["dtype"],
            trust_remote_code=mcfg["trust_remote_code"],
            max_seq_length=mcfg["max_seq_length"],
        )
        log.info(
            "pipeline: %s, prompt %s (%s), %s",
            folder,
            schema.name,
            schema.fingerprint,
            "closed book" if retriever is None else f"index {retriever.settings()['collection']}",
        )
        return cls(
            model,
            tokenizer,
            schema,
            retriever,
            _get(cfg, "generate"),
            max_seq_length=mcfg["max_seq_length"],
            context_tokens=rcfg.context_tokens,
            name=folder.parent.name if folder.name == "model" else folder.name,
            manifest=manifest,
        )

    @classmethod
    def from_base(cls, cfg: Any, *, device: str = "auto", closed_book: bool = False) -> RagPipeline:
        """A plain base model with the config's retriever and prompt (for comparison)."""
        from ragtune.store import as_rcfg

        schema = get_schema(cfg.prompt.name)
        model, tokenizer = load_or_connect(
            cfg.model.name_or_path,
            _get(cfg, "generate"),
            device=device,
            dtype=cfg.model.dtype,
            trust_remote_code=cfg.model.trust_remote_code,
            max_seq_length=cfg.model.max_seq_length,
        )
        rcfg = as_rcfg(_get(cfg, "retriever"))
        retriever = None
        if not closed_book:
            from ragtune.retriever import Retriever

            corpus = (_get(cfg, "data") or {}).get("corpus")
            retriever = Retriever.from_config(
                rcfg,
                corpus=resolve_path(corpus) if corpus else None,
                token_counter=token_counter(tokenizer),
            )
        return cls(
            model,
            tokenizer,
            schema,
            retriever,
            _get(cfg, "generate"),
            max_seq_length=cfg.model.max_seq_length,
            context_tokens=rcfg.context_tokens,
            name=str(cfg.model.name_or_path),
        )

    # ----------------------------------------------------------------- asking
    def context_budget(self, question: str, input: str = "", max_new_tokens: int = 0) -> int:
        """Tokens the context block may use: exactly what training allowed this question
        (see :func:`ragtune.budget.context_budget`); a longer answer asked for leaves less."""
        return context_budget(
            self.schema,
            self.tokenizer,
            PromptFields(question, input, []),
            self.max_seq_length,
            context_tokens=self.context_tokens,
            max_new_tokens=max_new_tokens or self.generator.settings.max_new_tokens,
        )

    def retrieve(self, question: str, input: str = "") -> list[Chunk]:
        """The context chunks for a question (none for a closed-book pipeline)."""
        chunks = self._retrieve(question, self.context_budget(question, input))[0]
        if self.calibration is not None:  # so that recall() can judge the rendered prompt
            with self._recent_lock:
                self._recent.pop(question, None)
                self._recent[question] = chunks
                while len(self._recent) > _RECENT:
                    self._recent.pop(next(iter(self._recent)))
        return chunks

    def recall(self, prompt: str) -> Prepared | None:
        """The question and chunks a rendered prompt was built from, when they came from this
        pipeline's :meth:`retrieve` (a LangChain chain of :func:`ragtune.lc.langchain_parts`)."""
        with self._recent_lock:
            recent = list(self._recent.items())
        for question, chunks in reversed(recent):
            if self.render(question, "", chunks) == prompt:
                return Prepared(question, "", chunks, prompt, 0.0)
        return None

    def _retrieve(self, query: str, budget: int) -> tuple[list[Chunk], float]:
        """Chunks and the seconds their retrieval took (when it ran, for a cached context)."""
        if self.retriever is None:
            return [], 0.0
        key = None
        if self.context_cache is not None:
            if self._cache_key is None:
                settings = json.dumps(self.retriever.settings(), sort_keys=True, default=str)
                # a reranked context is this model's reading too, not only the index's
                reader = self.name if self._rerank_n() else ""
                self._cache_key = (settings, tokenizer_key(self.tokenizer), reader)
            key = (*self._cache_key, query, budget)
            if key in self.context_cache:
                return self.context_cache[key]
        t0 = time.perf_counter()
        n = self._rerank_n()
        if n:
            chunks = self.retriever.fit(self._reranked(query, n), budget)
        else:
            chunks = self.retriever.retrieve(query, budget_tokens=budget)
        got = (chunks, time.perf_counter() - t0)
        if key is not None:
            self.context_cache[key] = got  # type: ignore[index]
        return got

    def _rerank_n(self) -> int:
        """How many candidates the model reads for each context (0: the retriever's top k)."""
        rcfg = getattr(self.retriever, "rcfg", None)
        n = int(getattr(rcfg, "reader_rerank", 0) or 0)
        return n if n > int(getattr(rcfg, "k", 0) or 0) else 0

    def _reranked(self, query: str, n: int) -> list[Chunk]:
        """The retriever's k of its top ``n`` candidates that this model, reading each chunk
        alone as the context, is least sure to abstain on; kept in retrieval order."""
        cands = self.retriever.candidates(query, n)
        prompts = [self.render(query, "", [c]) for c in cands]
        with self.generator.exclusive():  # a server's other threads wait, as for a generation
            readings = abstain_readings(self.model, self.tokenizer, self.schema, prompts)
        keep = sorted(range(len(cands)), key=lambda i: readings[i])[: self.retriever.rcfg.k]
        return [cands[i] for i in sorted(keep)]

    def render(self, question: str, input: str = "", chunks: Sequence[Chunk] | None = None) -> str:
        """The exact prompt text for a question and its context."""
        context = None if self.retriever is None else [c.text for c in chunks or []]
        return self.schema.render_prompt(PromptFields(question, input, context), self.tokenizer)

    def prepare(
        self,
        question: str,
        input: str = "",
        decoding: Decoding = NO_CHANGE,
        *,
        query: str | None = None,
    ) -> Prepared:
        """Retrieve (for ``query``, default the question) and render; checks that the prompt
        and the answer (``decoding.max_new_tokens`` or the config's) fit the model."""
        if not question or not question.strip():
            raise PipelineError("the question is empty")
        max_new = decoding.max_new_tokens or self.generator.settings.max_new_tokens
        # closed book: no context to budget (rendering and encoding it would be wasted)
        budget = 0 if self.retriever is None else self.context_budget(question, input, max_new)
        chunks, retrieval_s = self._retrieve(query or question, budget)
        limit = self.max_seq_length - max_new
        chunks, text, n = fit_prompt(
            lambda cs: self.render(question, input, cs),
            lambda t: len(self.generator.encode(t)),
            token_counter(self.tokenizer),
            chunks,
            limit,
        )
        if n > limit:
            raise PipelineError(
                f"the question is too long: the prompt is {n} tokens, and model.max_seq_length"
                f"={self.max_seq_length} minus the answer's {max_new} tokens (max_tokens, "
                f"default generate.max_new_tokens) leaves {limit}"
            )
        return Prepared(question, input, chunks, text, retrieval_s)

    def answer(
        self,
        question: str,
        input: str = "",
        decoding: Decoding = NO_CHANGE,
        *,
        query: str | None = None,
    ) -> Answer:
        """Retrieve, render, generate: one grounded answer with its sources.

        ``decoding`` changes this answer's decoding (:class:`ragtune.generate.Decoding`);
        ``query`` retrieves for other text than the question (a conversation's follow-up).
        """
        return self.answers(question, input, decoding, n=1, query=query)[0]

    def answers(
        self,
        question: str,
        input: str = "",
        decoding: Decoding = NO_CHANGE,
        *,
        n: int = 1,
        query: str | None = None,
    ) -> list[Answer]:
        """``n`` answers to one question from one retrieval (decoded together; they differ
        only when ``decoding`` samples)."""
        t0 = time.perf_counter()
        prepared = self.prepare(question, input, decoding, query=query)
        results = self.generator.generate_batch([prepared.prompt] * n, n, decoding)
        latency = time.perf_counter() - t0
        return [self._finish(prepared, r, latency) for r in results]

    def stream(
        self,
        question: str,
        input: str = "",
        decoding: Decoding = NO_CHANGE,
        *,
        query: str | None = None,
    ) -> AnswerStream:
        """Like :meth:`answer`, streamed: iterate for text pieces, then read ``.answer``."""
        t0 = time.perf_counter()
        prepared = self.prepare(question, input, decoding, query=query)
        return AnswerStream(self, prepared, t0, decoding)

    def answer_batch(
        self,
        questions: Sequence[str],
        inputs: Sequence[str] | None = None,
        batch_size: int = 8,
        *,
        progress: bool = False,
    ) -> list[Answer]:
        """Many answers at once (batched greedy decoding); same answers as one by one.

        An answer's ``latency_s`` is its retrieval time plus its share of its batch's
        generation time.
        """
        inputs = list(inputs) if inputs is not None else [""] * len(questions)
        pairs = list(zip(questions, inputs, strict=True))
        bar = tqdm(
            pairs, desc=f"{self.name}: retrieving", disable=not progress or not self.retriever
        )
        prepared = [self.prepare(q, i) for q, i in bar]
        prompts = [p.prompt for p in prepared]
        with tqdm(total=len(prompts), desc=f"{self.name}: answering", disable=not progress) as bar:
            extra = {"on_batch": bar.update} if progress else {}
            results = self.generator.generate_batch(prompts, batch_size, **extra)
        latencies = [
            p.retrieval_s + r.seconds / max(1, r.batch_rows)
            for p, r in zip(prepared, results, strict=True)
        ]
        return self._finish_batch(prepared, results, latencies, batch_size)

    def _finish(self, p: Prepared, result: GenerationResult, latency_s: float) -> Answer:
        """One generation made final (see :meth:`_finish_batch`)."""
        return self._finish_batch([p], [result], [latency_s])[0]

    def _finish_batch(
        self,
        prepared: Sequence[Prepared],
        results: Sequence[GenerationResult],
        latencies: Sequence[float],
        batch_size: int = 8,
    ) -> list[Answer]:
        """The one place generations become final answers (every path ends here): scored,
        and decided by the calibration when the manifest has one."""
        judged: list[Any] = [None] * len(prepared)
        extra = 0.0
        if self.scoring and prepared:
            t0 = time.perf_counter()
            judged = assess(
                self.generator,
                [p.prompt for p in prepared],
                [r.text for r in results],
                [[c.text for c in p.chunks] for p in prepared],
                [max((c.similarity for c in p.chunks), default=0.0) for p in prepared],
                self.calibration,
                batch_size,
                views=[
                    [self.render(p.question, p.input, order) for order in rotations(p.chunks)]
                    for p in prepared
                ]
                if self.rotate_context
                else None,
                chunk_views=[
                    [self.render(p.question, p.input, [c]) for c in p.chunks] for p in prepared
                ]
                if self.read_chunks
                else None,
            )
            extra = (time.perf_counter() - t0) / len(prepared)
        out = []
        for p, r, latency, j in zip(prepared, results, latencies, judged, strict=True):
            text = j.answer if j is not None else r.text
            out.append(
                Answer(
                    text=text,
                    abstained=is_abstained(self.schema, text),
                    sources=[(c.source, c.start, c.score) for c in p.chunks],
                    prompt=p.prompt,
                    latency_s=latency + extra,
                    chunks=p.chunks,
                    stop_reason=r.stop_reason,
                    new_tokens=r.new_tokens,
                    prompt_tokens=r.prompt_tokens,
                    retrieval_s=p.retrieval_s,
                    score=None if j is None else j.score,
                    candidate=None if j is None else j.candidate,
                    features=None if j is None else j.features,
                )
            )
        return out

    def finish_prompt(self, prompt: str, result: GenerationResult) -> Answer | None:
        """The final answer for a generation on a prompt built from this pipeline's
        :meth:`retrieve` (an LCEL chain of :func:`ragtune.lc.langchain_parts`); None for a
        prompt from elsewhere, whose context and retrieval scores are unknown."""
        prepared = self.recall(prompt)
        return None if prepared is None else self._finish(prepared, result, result.seconds)

    def describe(self) -> dict[str, Any]:
        """What this pipeline serves with (for /v1/models, logs and ``ask.py``)."""
        return {
            "name": self.name,
            "prompt": {"name": self.schema.name, "fingerprint": self.schema.fingerprint},
            "retriever": None if self.retriever is None else self.retriever.settings(),
            "max_seq_length": self.max_seq_length,
            "generate": dataclasses.asdict(self.generator.settings),
            "base_model": self.manifest.get("base_model"),
        }


_RECENT = 64  # retrieved contexts remembered for recall()


def _get(cfg: Any, key: str) -> Any:
    """A config group as plain values (interpolations such as ``${paths.outputs}`` resolved)."""
    from omegaconf import DictConfig, OmegaConf

    node = cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return dataclasses.asdict(node)
    return node


__all__ = ["Answer", "AnswerStream", "MismatchError", "PipelineError", "RagPipeline"]


# --------------------------------------------------------------------------- entry points
ASK_TOP_LEVEL = {"model_dir": str, "question": str, "json": bool, "allow_mismatch": bool}


def open_pipeline(
    cfg: Any, explicit: Iterable[str] | None = None, *, device: str = "auto", context: str = "auto"
) -> RagPipeline:
    """The pipeline an entry point serves (``context``: as in ``from_model_dir``): ``model_dir``
    (a trained folder) or, when null or a plain model folder, the config's base model."""
    explicit = command_line_keys() if explicit is None else list(explicit)
    allow = bool(_get(cfg, "allow_mismatch"))
    model_dir = _get(cfg, "model_dir")
    if model_dir in (None, "", "null"):
        log.info("no model_dir: asking the base model %s", cfg.model.name_or_path)
        return RagPipeline.from_base(cfg, device=device, closed_book=context == "closed")
    folder = resolve_path(str(model_dir))
    plain = (
        folder.is_dir()
        and (folder / "config.json").exists()
        and not (folder / "manifest.json").exists()
        and not (folder / "prompt_schema.json").exists()
    )
    if plain:
        from omegaconf import OmegaConf

        log.warning("%s has no ragtune manifest: serving it as a plain base model", folder)
        cfg = OmegaConf.merge(cfg, {"model": {"name_or_path": str(folder)}})
        return RagPipeline.from_base(cfg, device=device, closed_book=context == "closed")
    return RagPipeline.from_model_dir(
        folder, cfg, allow, explicit=explicit, device=device, context=context
    )
