"""The RAG pipeline serving uses, rebuilt from a trained model's manifest.

A trained folder carries everything needed to ask it the way it was trained: the prompt
schema it was rendered with (``prompt_schema.json``), and in ``manifest.json`` the retriever
settings, the index location and the model settings. :meth:`RagPipeline.from_model_dir`
rebuilds exactly that, and refuses (or, with ``allow_mismatch``, warns) when the index, the
chunking or the prompt in use differ from what the model was trained with.

The context of each question is budgeted in tokens of the LM's tokenizer with the same
function training used (:meth:`PromptSchema.context_budget`), so a context that fitted in
training fits here and vice versa. ``ask.py``, the server and the LangChain model all go
through :meth:`RagPipeline.answer` / :meth:`RagPipeline.stream`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragtune.budget import ANSWER_RESERVE, token_counter
from ragtune.errors import RagtuneError
from ragtune.generate import GenerationResult, Generator, TextStream
from ragtune.manifest import RETRIEVER_KEYS, ManifestError, mismatches, read_manifest
from ragtune.paths import resolve_path
from ragtune.schema import PromptFields, PromptSchema, get_schema
from ragtune.types import Chunk

log = logging.getLogger(__name__)

# Where the index lives is not a property of the training: these follow the manifest only
# while the place it names still exists.
_LOCATION_KEYS = ("persist_dir", "collection", "server")


class PipelineError(RagtuneError):
    """A question the pipeline cannot take (too long for the model, empty)."""


class MismatchError(ManifestError):
    """The index or the prompt in use differ from what the model was trained with."""


@dataclass
class Answer:
    """One answer with what it was based on.

    ``sources`` are ``(source, start, score)`` of the chunks in the prompt's context, in
    context order; ``prompt`` is the exact text the model was asked with.
    """

    text: str
    abstained: bool
    sources: list[tuple[str, int, float | None]]
    prompt: str
    latency_s: float
    chunks: list[Chunk] = field(default_factory=list, repr=False)
    stop_reason: str = ""
    new_tokens: int = 0
    prompt_tokens: int = 0
    retrieval_s: float = 0.0

    def to_dict(self, with_prompt: bool = False) -> dict[str, Any]:
        """A JSON-ready dict (what ``ask.py json=true`` and the server's ``/ask`` return)."""
        out: dict[str, Any] = {
            "answer": self.text,
            "abstained": self.abstained,
            "sources": [{"source": s, "start": st, "score": sc} for s, st, sc in self.sources],
            "latency_s": round(self.latency_s, 4),
            "retrieval_s": round(self.retrieval_s, 4),
            "stop_reason": self.stop_reason,
            "new_tokens": self.new_tokens,
            "prompt_tokens": self.prompt_tokens,
        }
        if with_prompt:
            out["prompt"] = self.prompt
        return out


class AnswerStream:
    """The answer's text pieces as they are generated; ``.answer`` once exhausted.

    ``.chunks`` (the retrieved context) is known before the first piece. ``close()`` stops
    the generation early.
    """

    def __init__(
        self,
        pipeline: RagPipeline,
        prepared: _Prepared,
        t0: float,
        max_new_tokens: int | None = None,
    ):
        self.chunks = prepared.chunks
        self.prompt = prepared.prompt
        self._pipeline = pipeline
        self._prepared = prepared
        self._t0 = t0
        self._stream: TextStream = pipeline.generator.stream(prepared.prompt, max_new_tokens)
        self.answer: Answer | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        try:
            return next(self._stream)
        except StopIteration:
            if self.answer is None and self._stream.result is not None:
                self.answer = self._pipeline._answer(self._prepared, self._stream.result, self._t0)
            raise

    def close(self) -> None:
        self._stream.close()


@dataclass
class _Prepared:
    question: str
    input: str
    chunks: list[Chunk]
    prompt: str
    retrieval_s: float


class RagPipeline:
    """Retrieve -> render with the one schema -> generate, with the settings of one model."""

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
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.schema = schema
        self.retriever = retriever  # None: closed book (no context section)
        self.max_seq_length = int(max_seq_length)
        self.context_tokens = int(context_tokens)
        self.name = name
        self.manifest = manifest or {}
        self.generator = Generator(model, tokenizer, schema, gcfg, max_seq_length=max_seq_length)

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
        from transformers import AutoTokenizer

        from ragtune.loading import load_model

        folder = _model_folder(model_dir)
        manifest = read_manifest(folder)
        explicit = set(explicit)
        schema = (
            get_schema(cfg.prompt.name)
            if _is_explicit("prompt", explicit)
            else PromptSchema.load(folder)
        )
        mcfg = _model_settings(cfg, manifest, explicit)
        rcfg = _retriever_settings(cfg, manifest, explicit)
        in_use = {k: getattr(rcfg, k) for k in RETRIEVER_KEYS}
        _settle(folder, mismatches(manifest, in_use, schema.fingerprint), allow_mismatch)
        if context == "auto":
            context = "closed" if manifest.get("raft", {}).get("mode") == "closed" else "rag"
        if context not in ("rag", "closed"):
            raise PipelineError(f"context must be auto, rag or closed, got {context!r}")

        retriever = None
        if context == "rag":  # the index is checked before the (slower) model load
            tok = AutoTokenizer.from_pretrained(
                str(folder), trust_remote_code=mcfg["trust_remote_code"]
            )
            retriever = _open_retriever(folder, rcfg, tok, manifest, schema, allow_mismatch)
        model, tokenizer = load_model(
            str(folder),
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
        from ragtune.ingest import as_rcfg
        from ragtune.loading import load_model

        schema = get_schema(cfg.prompt.name)
        model, tokenizer = load_model(
            cfg.model.name_or_path,
            device=device,
            dtype=cfg.model.dtype,
            trust_remote_code=cfg.model.trust_remote_code,
            max_seq_length=cfg.model.max_seq_length,
        )
        rcfg = as_rcfg(_get(cfg, "retriever"))
        retriever = None
        if not closed_book:
            from ragtune.retriever import Retriever

            retriever = Retriever.from_config(rcfg, token_counter=token_counter(tokenizer))
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
    def context_budget(self, question: str, input: str = "") -> int:
        """Tokens the context block may use: exactly what training allowed this question.

        ``retriever.context_tokens`` when set, else the rest of ``max_seq_length`` once the
        prompt and the answer fit; the answer reserve is training's (64 tokens) or
        ``generate.max_new_tokens`` when that is larger, so prompt + answer always fit.
        """

        if self.context_tokens:
            return self.context_tokens
        reserve = max(ANSWER_RESERVE, self.generator.settings.max_new_tokens)
        fields = PromptFields(question, input, [])
        return self.schema.context_budget(self.tokenizer, fields, self.max_seq_length, reserve)

    def retrieve(self, question: str, input: str = "") -> list[Chunk]:
        """The context chunks for a question (none for a closed-book pipeline)."""
        if self.retriever is None:
            return []
        return self.retriever.retrieve(question, budget_tokens=self.context_budget(question, input))

    def render(self, question: str, input: str = "", chunks: Sequence[Chunk] | None = None) -> str:
        """The exact prompt text for a question and its context."""
        context = None if self.retriever is None else [c.text for c in chunks or []]
        return self.schema.render_prompt(PromptFields(question, input, context), self.tokenizer)

    def prepare(self, question: str, input: str = "") -> _Prepared:
        """Retrieve and render; checks that the prompt and the answer fit the model."""
        if not question or not question.strip():
            raise PipelineError("the question is empty")
        t0 = time.perf_counter()
        chunks = self.retrieve(question, input)
        retrieval_s = time.perf_counter() - t0
        prompt = self.render(question, input, chunks)
        n = len(self.generator.encode(prompt))
        limit = self.max_seq_length - self.generator.settings.max_new_tokens
        if n > limit:
            raise PipelineError(
                f"the question is too long: the prompt is {n} tokens, and model.max_seq_length"
                f"={self.max_seq_length} minus generate.max_new_tokens="
                f"{self.generator.settings.max_new_tokens} leaves {limit}"
            )
        return _Prepared(question, input, chunks, prompt, retrieval_s)

    def answer(self, question: str, input: str = "", max_new_tokens: int | None = None) -> Answer:
        """Retrieve, render, generate: one grounded answer with its sources.

        ``max_new_tokens`` may lower ``generate.max_new_tokens`` for this answer.
        """
        t0 = time.perf_counter()
        prepared = self.prepare(question, input)
        result = self.generator.generate(prepared.prompt, max_new_tokens)
        return self._answer(prepared, result, t0)

    def stream(
        self, question: str, input: str = "", max_new_tokens: int | None = None
    ) -> AnswerStream:
        """Like :meth:`answer`, streamed: iterate for text pieces, then read ``.answer``."""
        t0 = time.perf_counter()
        return AnswerStream(self, self.prepare(question, input), t0, max_new_tokens)

    def answer_batch(
        self, questions: Sequence[str], inputs: Sequence[str] | None = None, batch_size: int = 8
    ) -> list[Answer]:
        """Many answers at once (batched greedy decoding); same answers as one by one."""
        t0 = time.perf_counter()
        inputs = list(inputs) if inputs is not None else [""] * len(questions)
        prepared = [self.prepare(q, i) for q, i in zip(questions, inputs, strict=True)]
        results = self.generator.generate_batch([p.prompt for p in prepared], batch_size)
        return [self._answer(p, r, t0) for p, r in zip(prepared, results, strict=True)]

    def _answer(self, p: _Prepared, result: GenerationResult, t0: float) -> Answer:
        return Answer(
            text=result.text,
            abstained=self.schema.is_abstention(result.text),
            sources=[(c.source, c.start, c.score) for c in p.chunks],
            prompt=p.prompt,
            latency_s=time.perf_counter() - t0,
            chunks=p.chunks,
            stop_reason=result.stop_reason,
            new_tokens=result.new_tokens,
            prompt_tokens=result.prompt_tokens,
            retrieval_s=p.retrieval_s,
        )

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


# --------------------------------------------------------------------------- helpers
def _get(cfg: Any, key: str) -> Any:
    """A config group as plain values (interpolations such as ``${paths.outputs}`` resolved)."""
    from omegaconf import DictConfig, OmegaConf

    node = cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return dataclasses.asdict(node)
    return node


def _is_explicit(key: str, explicit: set[str]) -> bool:
    """Whether ``key`` (``prompt``, ``retriever.k``) or its whole group was set by the user."""
    group = key.split(".", 1)[0]
    return key in explicit or group in explicit


def _model_folder(model_dir: str | Path) -> Path:
    folder = resolve_path(str(model_dir))
    if not folder.exists():
        raise ManifestError(
            f"model_dir {folder} does not exist: train a model first (python train/sft.py, "
            "or make demo), or pass model_dir=null to ask the base model in model.name_or_path"
        )
    folder = folder.resolve()
    if not (folder / "manifest.json").exists() and (folder / "model" / "manifest.json").exists():
        folder = folder / "model"  # a run folder was given: its model is in model/
    return folder


def _model_settings(cfg: Any, manifest: dict[str, Any], explicit: set[str]) -> dict[str, Any]:
    """dtype and max_seq_length as trained (unless overridden); trust only from the user.

    ``trust_remote_code`` never comes from the manifest: a model folder is data, and a
    folder must not be able to switch on the execution of code it ships.
    """
    trained = manifest.get("model", {}) or {}
    mine = _get(cfg, "model") or {}
    out: dict[str, Any] = {"trust_remote_code": bool(mine.get("trust_remote_code", False))}
    for key, default in (("dtype", "auto"), ("max_seq_length", 1024)):
        if _is_explicit(f"model.{key}", explicit) or key not in trained:
            out[key] = mine.get(key) if mine.get(key) is not None else default
        else:
            out[key] = trained[key]
    return out


def _retriever_settings(cfg: Any, manifest: dict[str, Any], explicit: set[str]) -> Any:
    """The config's retriever with the manifest's settings over it, then the user's."""
    from ragtune.config import RetrieverConfig
    from ragtune.ingest import as_rcfg

    rcfg = as_rcfg(_get(cfg, "retriever") or {})
    trained = manifest.get("retriever", {}) or {}
    fields = {f.name for f in dataclasses.fields(RetrieverConfig)}
    updates = {}
    for key, value in trained.items():
        if key not in fields or _is_explicit(f"retriever.{key}", explicit):
            continue
        if key in _LOCATION_KEYS:
            continue
        updates[key] = value
    # The index location follows the manifest while it exists (a model copied to another
    # machine uses the configured index instead).
    # The collection the model was trained on, unless the user picked other chunk settings
    # (then the name derived from them finds, or fails to find, the matching index).
    if trained.get("collection") and not any(
        _is_explicit(f"retriever.{k}", explicit) for k in (*RETRIEVER_KEYS, "collection")
    ):
        updates["collection"] = trained["collection"]
    if not _is_explicit("retriever.persist_dir", explicit) and not _is_explicit(
        "retriever.server", explicit
    ):
        where = trained.get("persist_dir")
        if trained.get("server"):
            updates["server"] = trained["server"]
        elif where and Path(where).is_dir():
            updates["persist_dir"] = where
        elif where:
            log.warning(
                "the index the model was trained on (%s) is gone; using %s", where, rcfg.persist_dir
            )
    return dataclasses.replace(rcfg, **updates)


def _settle(folder: Path, problems: list[str], allow_mismatch: bool) -> None:
    if not problems:
        return
    msg = f"{folder} was trained with other settings than are in use: " + "; ".join(problems)
    if not allow_mismatch:
        raise MismatchError(msg + " (allow_mismatch=true serves anyway)")
    warnings.warn(msg + " (allow_mismatch=true: serving anyway)", stacklevel=3)
    log.warning("%s (allow_mismatch=true: serving anyway)", msg)


def _open_retriever(
    folder: Path,
    rcfg: Any,
    tokenizer: Any,
    manifest: dict[str, Any],
    schema: PromptSchema,
    allow_mismatch: bool,
) -> Any:
    """Open the index; an index built with other settings than the manifest's is refused."""
    from ragtune.ingest import IndexMismatchError
    from ragtune.retriever import Retriever

    counter = token_counter(tokenizer)
    trained_fp = manifest.get("prompt", {}).get("fingerprint", "")  # the prompt is settled
    try:
        retriever = Retriever.from_config(rcfg, token_counter=counter)
    except IndexMismatchError:
        index = _index_settings(rcfg)
        problems = mismatches(manifest, index, trained_fp) or [f"index collection settings {index}"]
        _settle(folder, problems, allow_mismatch)
        return Retriever.from_config(dataclasses.replace(rcfg, **index), token_counter=counter)
    _settle(folder, mismatches(manifest, retriever.settings(), trained_fp), allow_mismatch)
    return retriever


def _index_settings(rcfg: Any) -> dict[str, Any]:
    """The settings an existing collection records about its vectors and chunks."""
    from ragtune.ingest import collection_name, open_client

    meta = open_client(rcfg).get_collection(collection_name(rcfg)).metadata or {}
    return {k: meta[f"ragtune_{k}"] for k in RETRIEVER_KEYS if f"ragtune_{k}" in meta}


__all__ = ["Answer", "AnswerStream", "MismatchError", "PipelineError", "RagPipeline"]


# --------------------------------------------------------------------------- entry points
ASK_TOP_LEVEL = {"model_dir": str, "question": str, "json": bool, "allow_mismatch": bool}


def command_line_keys() -> list[str]:
    """Dotted keys the user set on the command line (Hydra's task overrides), if any.

    Those win over a model's manifest; ``conf=`` presets do not count (the manifest wins).
    """
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return []
        task = HydraConfig.get().overrides.task
    except Exception:
        return []
    keys = []
    for item in task:
        key = item.split("=", 1)[0].lstrip("+~")
        if key != "conf":
            keys.append(key)
    return keys


def open_pipeline(
    cfg: Any, explicit: Iterable[str] | None = None, *, device: str = "auto"
) -> RagPipeline:
    """The pipeline an entry point serves: ``model_dir`` (a trained folder) or, when it is
    null or a plain model folder without ragtune files, the base model of the config."""
    explicit = command_line_keys() if explicit is None else list(explicit)
    allow = bool(_get(cfg, "allow_mismatch"))
    model_dir = _get(cfg, "model_dir")
    if model_dir in (None, "", "null"):
        log.info("no model_dir: asking the base model %s", cfg.model.name_or_path)
        return RagPipeline.from_base(cfg, device=device)
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
        return RagPipeline.from_base(cfg, device=device)
    return RagPipeline.from_model_dir(folder, cfg, allow, explicit=explicit, device=device)
