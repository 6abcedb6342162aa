"""Evaluation: one QA set, one index, named modes, the same questions for every mode.

Modes:

- ``base_rag``: the base model asked with our retriever and our prompt schema;
- ``ft_closed``: a closed-book fine-tune (``train/sft.py raft.mode=closed``), asked without
  context;
- ``ft_then_rag``: that closed-book fine-tune asked with the RAG prompt and our retriever
  (fine-tune first, bolt RAG on after: the seed's setup);
- ``raft_rag``: ragtune's co-designed model with the retriever settings and prompt schema
  recorded in its own folder (manifest + ``prompt_schema.json``).

Every mode answers through :class:`ragtune.rag.RagPipeline` (closed book is a pipeline
without a retriever), exactly as ``ask.py``, the server and LangChain do, and evaluation scores
what :meth:`RagPipeline.answer_batch` returned: the same budget, prompt, decoding and final
decision (``Answer.abstained``); RAG modes' ``Answer.score`` (calibrated mix, else the margin)
gives the abstention AUROC and ``roc.png``. A trained folder's settings come from
:mod:`ragtune.modelcard`; scores from :mod:`ragtune.metrics`.

Latency is the per-question share of a batch: retrieval time plus the batch's generation time
divided by its size (``eval.batch_size=1`` measures one question at a time).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ragtune.budget import token_counter
from ragtune.config import EVAL_MODES, ConfigError, EvalConfig, RetrieverConfig, plain, validate
from ragtune.errors import RagtuneError
from ragtune.metrics import (
    DEFINITIONS,
    QuestionScore,
    aggregate,
    markdown_table,
    one_line_summary,
    retrieval_hit,
    score_answer,
)
from ragtune.modelcard import (
    model_folder,
    model_settings,
    read_json,
    read_manifest,
    retriever_settings,
    trained_mode,
    trained_schema,
)
from ragtune.paths import resolve_path
from ragtune.qa import gold_answers, load_qa, sample_records, sources_not_in
from ragtune.rag import Answer, RagPipeline
from ragtune.roc import auroc_interval, rows_auroc
from ragtune.schema import PromptSchema, get_schema
from ragtune.types import QARecord

log = logging.getLogger(__name__)

EVAL_TOP_LEVEL = {"seed": int, "output_dir": str}
METRICS_FILE = "metrics.json"
ANSWERS_FILE = "answers.jsonl"
TABLE_FILE = "results.md"
ROC_FILE = "roc.png"


class EvalError(RagtuneError):
    """An evaluation that cannot run as configured; the message names the key or folder."""


@dataclass
class ModeSpec:
    """What one mode asks with: model, prompt schema, retriever settings (None = closed book)."""

    name: str
    model: str
    schema: PromptSchema
    rcfg: RetrieverConfig | None
    max_seq_length: int
    dtype: str = "auto"
    notes: list[str] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)

    def describe(self) -> dict[str, Any]:
        keys = ("embedding_model", "chunk_size", "chunk_overlap", "k", "hybrid", "mmr")
        r = self.rcfg
        return {
            "model": self.model,
            "prompt": self.schema.name,
            "prompt_fingerprint": self.schema.fingerprint,
            "retriever": None
            if r is None
            else {k: getattr(r, k) for k in (*keys, "context_tokens")},
            "max_seq_length": self.max_seq_length,
            "notes": self.notes,
        }


# --------------------------------------------------------------------------- entry points
def run_eval(cfg: DictConfig) -> dict[str, Any]:
    """``python train/eval.py``: evaluate every configured mode into ``cfg.output_dir``.

    Returns the results (``modes``, ``table``, ``out_dir``) and ``headline``: the mode whose
    overall score a sweep ranks, ``raft_rag`` when it ran, else the first mode.
    """
    validate(cfg, EVAL_TOP_LEVEL)
    qa_path = cfg.data.qa_eval or cfg.data.qa_train
    if not qa_path:
        raise ConfigError("data.qa_eval: name the QA file to evaluate on (JSONL or SQuAD JSON)")
    specs = resolve_modes(cfg)
    records = _records(cfg, qa_path)
    results = evaluate_modes(cfg, specs, records, Path(cfg.output_dir), qa_path=str(qa_path))
    results["headline"] = "raft_rag" if "raft_rag" in results["modes"] else specs[0].name
    return results


def evaluate_model(
    cfg: DictConfig,
    model_dir: str | Path,
    out_dir: str | Path | None = None,
    manifest: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate a model just trained by ``run_sft`` (``train.eval_after=true``, sweeps).

    The model is asked the way it was trained: with the run's retriever and prompt
    (``raft_rag``), or without context when ``raft.mode=closed`` (``ft_closed``), on
    ``data.qa_eval``. Writes metrics, answers and a table to ``out_dir`` (default
    ``<output_dir>/eval``) and returns the mode's metrics (``overall``, ``f1``, ...) plus
    ``mode``. ``manifest``: fields training will add to the manifest (the calibration).
    """
    qa_path = cfg.data.qa_eval
    if not qa_path:
        raise ConfigError("data.qa_eval: train.eval_after=true needs an evaluation QA file")
    closed = "raft" in cfg and cfg.raft.mode == "closed"
    ecfg = _ecfg(cfg)
    folder = Path(model_dir)
    manifest = {**read_json(folder / "manifest.json"), **(manifest or {})}
    spec = ModeSpec(
        name="ft_closed" if closed else "raft_rag",
        model=str(model_dir),
        schema=trained_schema(folder, cfg.prompt.name),
        rcfg=None if closed else _rcfg(cfg.retriever, ecfg),
        max_seq_length=cfg.model.max_seq_length,
        dtype=cfg.model.dtype,
        manifest=manifest,
    )
    out = Path(out_dir) if out_dir else Path(cfg.output_dir) / "eval"
    records = _records(cfg, qa_path)
    results = evaluate_modes(cfg, [spec], records, out, qa_path=str(qa_path))
    return {"mode": spec.name, **results["modes"][spec.name]}


# --------------------------------------------------------------------------- modes
def resolve_modes(cfg: DictConfig) -> list[ModeSpec]:
    """The modes to run, with their models, schemas and retrievers; checked before loading.

    ``eval.modes: null`` = ``base_rag`` plus every mode whose model folder is given.
    """
    ecfg = _ecfg(cfg)
    models = ecfg.models
    modes = list(ecfg.modes) if ecfg.modes else _default_modes(ecfg)
    unknown = [m for m in modes if m not in EVAL_MODES]
    if unknown:
        raise ConfigError(f"eval.modes: unknown mode(s) {unknown}; choose from {EVAL_MODES}")
    if not modes:
        raise ConfigError("eval.modes: no modes to run")
    specs = []
    for mode in dict.fromkeys(modes):
        if mode == "base_rag":
            base = models.base or cfg.model.name_or_path
            schema = get_schema(cfg.prompt.name)
            rcfg = _rcfg(cfg.retriever, ecfg)
            specs.append(
                ModeSpec(mode, base, schema, rcfg, cfg.model.max_seq_length, cfg.model.dtype)
            )
            continue
        key = "ft_closed" if mode in ("ft_closed", "ft_then_rag") else "raft_rag"
        folder = getattr(models, key)
        if not folder:
            raise ConfigError(f"eval.models.{key}: mode '{mode}' needs a trained model folder")
        path = resolve_path(folder)
        if not path.is_dir():
            raise ConfigError(f"eval.models.{key}: {path} is not a folder")
        path = model_folder(path)  # a run folder (outputs/latest) holds its model in model/
        manifest = read_manifest(path)
        mcfg = model_settings(plain(cfg.model), manifest)
        want = "closed" if key == "ft_closed" else "rag"
        notes = []
        if trained_mode(manifest) != want:
            notes.append(f"eval.models.{key} was trained with raft.mode={trained_mode(manifest)}")
        for n in notes:
            log.warning("%s: %s", mode, n)
        if mode == "ft_closed":
            rcfg = None
        elif mode == "ft_then_rag":
            rcfg = _rcfg(cfg.retriever, ecfg)
        else:  # the model's own retriever settings, on the evaluation's index
            rcfg = _rcfg(retriever_settings(plain(cfg.retriever), manifest, index="own"), ecfg)
        schema = trained_schema(path, cfg.prompt.name, manifest)
        specs.append(
            ModeSpec(
                mode,
                str(path),
                schema,
                rcfg,
                mcfg["max_seq_length"],
                mcfg["dtype"],
                notes,
                manifest,
            )
        )
    return specs


def _default_modes(ecfg: EvalConfig) -> list[str]:
    modes = ["base_rag"]
    if ecfg.models.ft_closed:
        modes += ["ft_closed", "ft_then_rag"]
    if ecfg.models.raft_rag:
        modes.append("raft_rag")
    return modes


def _ecfg(cfg: DictConfig) -> EvalConfig:
    node = cfg.get("eval") if hasattr(cfg, "get") else None
    if node is None:
        return EvalConfig()
    merged = OmegaConf.merge(OmegaConf.structured(EvalConfig), node)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def _rcfg(node: Any, ecfg: EvalConfig) -> RetrieverConfig:
    """Retriever settings on the evaluation's own index (``eval.persist_dir`` when set)."""
    from ragtune.store import as_rcfg

    rcfg = as_rcfg(plain(node) or {})
    if ecfg.persist_dir:
        rcfg = dataclasses.replace(rcfg, persist_dir=ecfg.persist_dir)
    return rcfg


def _records(cfg: DictConfig, qa_path: str) -> list[QARecord]:
    records = load_qa(resolve_path(qa_path))
    n = _ecfg(cfg).max_questions
    if n:
        records = sample_records(records, n, int(cfg.get("seed", 0)))
    return records


# --------------------------------------------------------------------------- running
def evaluate_modes(
    cfg: DictConfig,
    specs: list[ModeSpec],
    records: list[QARecord],
    out_dir: Path,
    qa_path: str = "",
) -> dict[str, Any]:
    """Answer ``records`` under every mode; write metrics.json, answers.jsonl, results.md."""
    ecfg = _ecfg(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_ans = sum(r.answerable for r in records)
    log.info(
        "evaluating %d questions (%d answerable, %d unanswerable) from %s under %s -> %s",
        len(records),
        n_ans,
        len(records) - n_ans,
        qa_path,
        ", ".join(s.name for s in specs),
        out_dir,
    )
    retrievers: dict[str, Any] = {}
    for spec in specs:  # before any model loads: a QA set for another corpus stops here
        if spec.rcfg is not None:
            _check_sources(records, _retriever(cfg, ecfg, spec.rcfg, retrievers), qa_path)
    # Modes with the same retriever settings and budget get the same contexts: retrieve once.
    context_cache: dict[tuple, Any] = {}
    all_rows: list[dict[str, Any]] = []
    modes: dict[str, dict[str, Any]] = {}
    curves: dict[str, tuple[list[float], list[bool]]] = {}
    # Modes sharing a model run back to back, so each model is loaded once.
    order = sorted(range(len(specs)), key=lambda i: [s.model for s in specs].index(specs[i].model))
    loaded: tuple[str, Any, Any] | None = None
    for i in order:
        spec = specs[i]
        if loaded is None or loaded[0] != spec.model:
            loaded = model = tokenizer = pipeline = None  # free the previous model first
            _free_memory()
            loaded = (spec.model, *_load(spec, ecfg))
        _, model, tokenizer = loaded
        pipeline = _pipeline(cfg, ecfg, spec, model, tokenizer, retrievers, context_cache)
        t0 = time.perf_counter()
        answers = pipeline.answer_batch(
            [r.instruction for r in records],
            [r.input for r in records],
            ecfg.batch_size,
            progress=True,
        )
        closed = spec.rcfg is None
        rows = [_row(spec.name, r, a, closed) for r, a in zip(records, answers, strict=True)]
        agg = aggregate([r.pop("_score") for r in rows])
        auc = rows_auroc(rows, curves, spec.name)
        modes[spec.name] = {
            **agg.to_dict(),
            "abstention_auroc": auc,
            "abstention_auroc_95": None if auc is None else auroc_interval(*curves[spec.name]),
            "calibrated": pipeline.calibration is not None,
            "seconds": round(time.perf_counter() - t0, 2),
            **spec.describe(),
        }
        all_rows.extend(rows)
        log.info("%s: %s", spec.name, one_line_summary(modes[spec.name]))
    loaded = model = tokenizer = pipeline = None
    _free_memory()

    modes = {s.name: modes[s.name] for s in specs}  # in the order asked
    if curves:
        from ragtune.roc import plot_roc

        plot_roc({n: curves[n] for n in modes if n in curves}, out_dir / ROC_FILE)
    table = markdown_table(modes)
    payload = {
        "qa_file": qa_path,
        "n_questions": len(records),
        "n_answerable": n_ans,
        "n_unanswerable": len(records) - n_ans,
        "modes": modes,
        "definitions": DEFINITIONS,
    }
    (out_dir / METRICS_FILE).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    with (out_dir / ANSWERS_FILE).open("w", encoding="utf-8") as f:
        for row in all_rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out_dir / TABLE_FILE).write_text(
        f"# Evaluation: {len(records)} questions ({n_ans} answerable) from {qa_path}\n\n"
        f"{table}\n\n{DEFINITIONS}\n",
        encoding="utf-8",
    )
    log.info("wrote %s, %s, %s in %s", METRICS_FILE, ANSWERS_FILE, TABLE_FILE, out_dir)
    return {"modes": modes, "table": table, "out_dir": str(out_dir)}


def _check_sources(records: list[QARecord], retriever: Any, qa_path: str) -> None:
    """Stop when no QA source is in the index (a QA set for another corpus would score
    recall 0 without a word); warn loudly when some are missing."""
    missing, named = sources_not_in(records, retriever.sources())
    if not missing:
        return
    where = f"the index {retriever.settings()['collection']} of data.corpus (or eval.corpus)"
    if len(missing) == named:
        raise ConfigError(
            f"data.qa_eval={qa_path}: none of its {named} source documents (e.g. "
            f"{missing[0]}) is in {where}: evaluate with a QA set written for this corpus"
        )
    log.warning(
        "data.qa_eval=%s: %d of %d source documents are not in %s (e.g. %s): their "
        "questions cannot be answered from it",
        qa_path,
        len(missing),
        named,
        where,
        ", ".join(missing[:3]),
    )


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _load(spec: ModeSpec, ecfg: EvalConfig) -> tuple[Any, Any]:
    from ragtune.loading import load_model

    log.info("loading %s for %s", spec.model, spec.name)
    return load_model(
        spec.model,
        device=ecfg.device,
        dtype=spec.dtype,
        for_inference=True,
        max_seq_length=spec.max_seq_length,
    )


def _pipeline(
    cfg: DictConfig,
    ecfg: EvalConfig,
    spec: ModeSpec,
    model: Any,
    tokenizer: Any,
    retrievers: dict[str, Any],
    context_cache: dict[tuple, Any],
) -> RagPipeline:
    """The pipeline one mode answers with (closed book: no retriever)."""
    retriever = None
    if spec.rcfg is not None:  # budgets are counted in this model's tokens
        retriever = _retriever(cfg, ecfg, spec.rcfg, retrievers)
        retriever = retriever.with_token_counter(token_counter(tokenizer))
    return RagPipeline(
        model,
        tokenizer,
        spec.schema,
        retriever,
        cfg.get("generate") if hasattr(cfg, "get") else None,
        max_seq_length=spec.max_seq_length,
        context_tokens=spec.rcfg.context_tokens if spec.rcfg is not None else 0,
        name=spec.name,
        manifest=spec.manifest,
        context_cache=context_cache,
        scoring=retriever is not None,
    )


def _retriever(cfg: DictConfig, ecfg: EvalConfig, rcfg: RetrieverConfig, cache: dict) -> Any:
    """One retriever per distinct setting (the index brought up to date with data.corpus)."""
    from ragtune.retriever import Retriever
    from ragtune.store import collection_name, persist_path

    key = json.dumps(dataclasses.asdict(rcfg), sort_keys=True, default=str)
    if key in cache:
        return cache[key]
    corpus = ecfg.corpus or cfg.data.get("corpus")
    if ecfg.ingest:
        from ragtune.ingest import ingest_corpus

        if not corpus:
            raise ConfigError("data.corpus: name the corpus folder to index (or eval.ingest=false)")
        report = ingest_corpus(cfg, rcfg, resolve_path(corpus))
        log.info("index: %s", report.summary())
    # eval.ingest=false: the existing index with these settings (an error names each corpus
    # when several are indexed); otherwise the collection of the corpus just ingested
    corpus = resolve_path(corpus) if corpus and ecfg.ingest else None
    log.info("retriever: %s in %s", collection_name(rcfg, corpus), persist_path(rcfg))
    cache[key] = Retriever.from_config(rcfg, corpus=corpus)
    return cache[key]


def _row(mode: str, rec: QARecord, ans: Answer, closed: bool) -> dict[str, Any]:
    """One answers.jsonl row: the pipeline's answer, scored with the pipeline's decision."""
    golds = gold_answers(rec)
    hit = None if closed else retrieval_hit(golds, ans.chunks, rec.source)
    s: QuestionScore = score_answer(
        ans.text, golds, lambda _: ans.abstained, retrieval_hit=hit, latency_s=ans.latency_s
    )
    feats = ans.features.to_dict() if ans.features is not None else None
    row = {
        "mode": mode,
        "id": rec.id,
        "question": rec.instruction,
        "gold": list(golds),
        "answerable": rec.answerable,
        "source": rec.source,
        "retrieved": None
        if closed
        else [{"source": src, "start": st, "score": _round(sc)} for src, st, sc in ans.sources],
        "answer": ans.text,
        "abstained": s.abstained,
        "exact": s.exact,
        "f1": round(s.f1, 4),
        "score": round(s.score, 4),
        "retrieval_hit": hit,
        "latency_s": round(ans.latency_s, 4),
        "stop_reason": ans.stop_reason,
        "prompt_tokens": ans.prompt_tokens,
        "answerability": _round(ans.score),
        "candidate": ans.candidate,
        "features": feats,
        "_score": s,
    }
    return row


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)
