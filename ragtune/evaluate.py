"""Evaluation: one QA set, one index, named modes, the same questions for every mode.

Modes (issue 6):

- ``base_rag``: the base model asked with our retriever and our prompt schema;
- ``ft_closed``: a closed-book fine-tune (``train/sft.py raft.mode=closed``), asked without
  context;
- ``ft_then_rag``: that closed-book fine-tune asked with the RAG prompt and our retriever
  (fine-tune first, bolt RAG on after: the seed's setup);
- ``raft_rag``: ragtune's co-designed model with the retriever settings and prompt schema
  recorded in its own folder (manifest + ``prompt_schema.json``).

Everything is shared with training and serving, nothing re-implemented: prompts come from
:class:`ragtune.schema.PromptSchema`, contexts from :class:`ragtune.retriever.Retriever` with
the token budget of :meth:`PromptSchema.context_budget` (serving's answer reserve),
models from :func:`ragtune.loading.load_model`, answers from
:meth:`ragtune.generate.Generator.generate_batch` (greedy), scores from :mod:`ragtune.metrics`.

The index location (``retriever.persist_dir`` / ``collection`` / ``server``) is always the
evaluation's own, so a model trained on an index of the training articles only is evaluated on
an index of the whole corpus, chunked with the settings it was trained with.

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
from tqdm.auto import tqdm

from ragtune.budget import ANSWER_RESERVE, token_counter
from ragtune.config import EVAL_MODES, ConfigError, EvalConfig, RetrieverConfig, validate
from ragtune.errors import RagtuneError
from ragtune.metrics import QuestionScore, aggregate, retrieval_hit, score_answer
from ragtune.paths import resolve_path
from ragtune.qa import gold_answers, load_qa, sample_records
from ragtune.schema import PromptFields, PromptSchema, get_schema
from ragtune.types import QARecord

log = logging.getLogger(__name__)

EVAL_TOP_LEVEL = {"seed": int, "output_dir": str}
METRICS_FILE = "metrics.json"
ANSWERS_FILE = "answers.jsonl"
TABLE_FILE = "results.md"
ROC_FILE = "roc.png"  # answerability score ROC per RAG mode
# Settings that say where an index lives, not what a query returns: taken from the
# evaluation's config even for raft_rag, whose other retriever settings come from its folder.
_LOCATION_KEYS = ("persist_dir", "collection", "server", "batch_size", "device")


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

    def describe(self) -> dict[str, Any]:
        r = self.rcfg
        return {
            "model": self.model,
            "prompt": self.schema.name,
            "prompt_fingerprint": self.schema.fingerprint,
            "retriever": None
            if r is None
            else {
                "embedding_model": r.embedding_model,
                "chunk_size": r.chunk_size,
                "chunk_overlap": r.chunk_overlap,
                "k": r.k,
                "hybrid": r.hybrid,
                "mmr": r.mmr,
                "context_tokens": r.context_tokens,
            },
            "max_seq_length": self.max_seq_length,
            "notes": self.notes,
        }


# --------------------------------------------------------------------------- entry points
def run_eval(cfg: DictConfig) -> float:
    """``python train/eval.py``: evaluate every configured mode; returns the headline overall.

    The headline is ``raft_rag``'s overall score when it ran, else the first mode's. The run
    folder gets ``status.json``; in a multirun a failure is recorded there and the sweep goes
    on (NaN is returned).
    """
    from ragtune.sweep import is_multirun, write_status

    out = Path(cfg.output_dir)
    try:
        validate(cfg, EVAL_TOP_LEVEL)
        write_status(out, "running")
        qa_path = cfg.data.qa_eval or cfg.data.qa_train
        if not qa_path:
            raise ConfigError("data.qa_eval: name the QA file to evaluate on (JSONL or SQuAD JSON)")
        specs = resolve_modes(cfg)
        records = _records(cfg, qa_path)
        results = evaluate_modes(cfg, specs, records, out, qa_path=str(qa_path))
    except Exception as e:
        write_status(out, "failed", error=f"{type(e).__name__}: {e}")
        if is_multirun():
            log.error("run failed: %s: %s", type(e).__name__, e)
            return float("nan")
        raise
    print(results["table"])
    head = "raft_rag" if "raft_rag" in results["modes"] else specs[0].name
    metrics = results["modes"][head]
    write_status(out, "ok", metric=metrics["overall"], mode=head, metrics=metrics)
    return float(metrics["overall"])


def evaluate_model(
    cfg: DictConfig, model_dir: str | Path, out_dir: str | Path | None = None
) -> dict[str, Any]:
    """Evaluate a model just trained by ``run_sft`` (``train.eval_after=true``, sweeps).

    The model is asked the way it was trained: with the run's retriever and prompt
    (``raft_rag``), or without context when ``raft.mode=closed`` (``ft_closed``), on
    ``data.qa_eval``. Writes metrics, answers and a table to ``out_dir`` (default
    ``<output_dir>/eval``) and returns the mode's metrics (``overall``, ``f1``, ...) plus
    ``mode``.
    """
    qa_path = cfg.data.qa_eval
    if not qa_path:
        raise ConfigError("data.qa_eval: train.eval_after=true needs an evaluation QA file")
    closed = "raft" in cfg and cfg.raft.mode == "closed"
    ecfg = _ecfg(cfg)
    schema = _model_schema(Path(model_dir), cfg.prompt.name)
    spec = ModeSpec(
        name="ft_closed" if closed else "raft_rag",
        model=str(model_dir),
        schema=schema,
        rcfg=None if closed else _rcfg(cfg.retriever, ecfg=ecfg),
        max_seq_length=cfg.model.max_seq_length,
        dtype=cfg.model.dtype,
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
            specs.append(
                ModeSpec(
                    mode,
                    base,
                    get_schema(cfg.prompt.name),
                    _rcfg(cfg.retriever, ecfg=ecfg),
                    cfg.model.max_seq_length,
                    cfg.model.dtype,
                )
            )
            continue
        key = "ft_closed" if mode in ("ft_closed", "ft_then_rag") else "raft_rag"
        folder = getattr(models, key)
        if not folder:
            raise ConfigError(f"eval.models.{key}: mode '{mode}' needs a trained model folder")
        path = resolve_path(folder)
        manifest = _manifest(path, f"eval.models.{key}")
        schema = _model_schema(path, cfg.prompt.name)
        msl = int(manifest.get("model", {}).get("max_seq_length") or cfg.model.max_seq_length)
        dtype = str(manifest.get("model", {}).get("dtype") or cfg.model.dtype)
        trained_mode = manifest.get("raft", {}).get("mode", "rag")
        notes = []
        if key == "ft_closed" and trained_mode != "closed":
            notes.append(f"eval.models.ft_closed was trained with raft.mode={trained_mode}")
        if key == "raft_rag" and trained_mode != "rag":
            notes.append(f"eval.models.raft_rag was trained with raft.mode={trained_mode}")
        for n in notes:
            log.warning("%s: %s", mode, n)
        if mode == "ft_closed":
            rcfg = None
        elif mode == "ft_then_rag":
            rcfg = _rcfg(cfg.retriever, ecfg=ecfg)
        else:
            rcfg = _rcfg(cfg.retriever, manifest.get("retriever") or {}, ecfg=ecfg)
        specs.append(ModeSpec(mode, str(path), schema, rcfg, msl, dtype, notes))
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


def _rcfg(
    node: Any, trained: dict[str, Any] | None = None, ecfg: EvalConfig | None = None
) -> RetrieverConfig:
    """The retriever settings: the config's, with a trained model's settings over them
    (except the index location, which is always the evaluation's own: ``eval.persist_dir``
    when set, else ``retriever.persist_dir``)."""
    from ragtune.ingest import as_rcfg

    base = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    data = dict(base or {})
    fields = set(RetrieverConfig.__dataclass_fields__)
    for k, v in (trained or {}).items():
        if k in fields and k not in _LOCATION_KEYS:
            data[k] = v
    if ecfg is not None and ecfg.persist_dir:
        data["persist_dir"] = ecfg.persist_dir
    return as_rcfg(data)


def _manifest(path: Path, key: str) -> dict[str, Any]:
    from ragtune.manifest import read_manifest

    if not path.is_dir():
        raise ConfigError(f"{key}: {path} is not a folder")
    return read_manifest(path)


def _model_schema(path: Path, fallback: str) -> PromptSchema:
    """The schema a model folder was trained with, else the configured variant."""
    from ragtune.schema import SCHEMA_FILE

    if (path / SCHEMA_FILE).exists():
        return PromptSchema.load(path)
    return get_schema(fallback)


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
    # Modes with the same retriever settings and budget get the same contexts: retrieve once.
    contexts_cache: dict[tuple, tuple[list[Any], float]] = {}
    all_rows: list[dict[str, Any]] = []
    modes: dict[str, dict[str, Any]] = {}
    roc_curves: dict[str, tuple[list[float], list[bool]]] = {}
    # Modes sharing a model run back to back, so each model is loaded once.
    order = sorted(range(len(specs)), key=lambda i: [s.model for s in specs].index(specs[i].model))
    loaded: tuple[str, Any, Any] | None = None
    for i in order:
        spec = specs[i]
        if loaded is None or loaded[0] != spec.model:
            loaded = model = tokenizer = None  # free the previous model before loading
            _free_memory()
            loaded = (spec.model, *_load(spec, ecfg))
        _, model, tokenizer = loaded
        retriever = None
        if spec.rcfg is not None:
            retriever = _retriever(cfg, ecfg, spec.rcfg, tokenizer, retrievers)
            retriever.token_counter = token_counter(tokenizer)  # budgets in this model's tokens
        t0 = time.perf_counter()
        rows = _answer(cfg, ecfg, spec, model, tokenizer, retriever, records, contexts_cache)
        agg = aggregate([r.pop("_score") for r in rows])
        modes[spec.name] = {
            **agg.to_dict(),
            "abstention_auroc": _auroc(rows, roc_curves, spec.name),
            "seconds": round(time.perf_counter() - t0, 2),
            **spec.describe(),
        }
        all_rows.extend(rows)
        log.info("%s: %s", spec.name, _one_line(modes[spec.name]))
    loaded = model = tokenizer = None
    _free_memory()

    modes = {s.name: modes[s.name] for s in specs}  # in the order asked
    if roc_curves:
        from ragtune.answerability import plot_roc

        plot_roc(roc_curves, out_dir / ROC_FILE)
    table = markdown_table(modes)
    payload = {
        "qa_file": qa_path,
        "n_questions": len(records),
        "n_answerable": n_ans,
        "n_unanswerable": len(records) - n_ans,
        "modes": modes,
        "definitions": _DEFINITIONS,
    }
    (out_dir / METRICS_FILE).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    with (out_dir / ANSWERS_FILE).open("w", encoding="utf-8") as f:
        for row in all_rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out_dir / TABLE_FILE).write_text(
        f"# Evaluation: {len(records)} questions ({n_ans} answerable) from {qa_path}\n\n"
        f"{table}\n\n{_DEFINITIONS}\n",
        encoding="utf-8",
    )
    log.info("wrote %s, %s, %s in %s", METRICS_FILE, ANSWERS_FILE, TABLE_FILE, out_dir)
    return {"modes": modes, "table": table, "out_dir": str(out_dir)}


def _auroc(rows: list[dict[str, Any]], curves: dict, name: str) -> float | None:
    """AUROC of the answerability score for answerable vs unanswerable (None: closed book)."""
    from ragtune.answerability import auroc

    got = [(r["answerability"], r["answerable"]) for r in rows if r["answerability"] is not None]
    if not got:
        return None
    curves[name] = ([g[0] for g in got], [g[1] for g in got])
    value = auroc(*curves[name])
    return None if value != value else round(value, 4)  # NaN: one class only


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


def _retriever(
    cfg: DictConfig, ecfg: EvalConfig, rcfg: RetrieverConfig, tokenizer: Any, cache: dict
) -> Any:
    """One retriever per distinct setting (the index brought up to date with data.corpus)."""
    from ragtune.ingest import collection_name, persist_path
    from ragtune.retriever import Retriever

    key = json.dumps(dataclasses.asdict(rcfg), sort_keys=True, default=str)
    if key in cache:
        return cache[key]
    if ecfg.ingest:
        from ragtune.ingest import ingest

        corpus = ecfg.corpus or cfg.data.corpus
        if not corpus:
            raise ConfigError("data.corpus: name the corpus folder to index (or eval.ingest=false)")
        report = ingest(
            resolve_path(corpus), rcfg, jsonl_text_field=cfg.data.get("jsonl_text_field", "text")
        )
        log.info("index: %s", report.summary() if hasattr(report, "summary") else report)
    log.info("retriever: %s in %s", collection_name(rcfg), persist_path(rcfg))
    retriever = Retriever.from_config(rcfg, token_counter=token_counter(tokenizer))
    cache[key] = retriever
    return retriever


def _tokenizer_key(tokenizer: Any) -> tuple:
    """Tells tokenizers apart that would count a context's tokens differently."""
    probe = tokenizer("ragtune probe: Tokyo 東京 1,234 naïve", add_special_tokens=False)
    return (type(tokenizer).__name__, len(tokenizer), tuple(probe["input_ids"]))


def _answer(
    cfg: DictConfig,
    ecfg: EvalConfig,
    spec: ModeSpec,
    model: Any,
    tokenizer: Any,
    retriever: Any,
    records: list[QARecord],
    cache: dict[tuple, tuple[list[Any], float]] | None = None,
) -> list[dict[str, Any]]:
    """Retrieve, render, generate and score every record under one mode."""
    from ragtune.generate import Generator

    gcfg = cfg.get("generate") if hasattr(cfg, "get") else None
    gen = Generator(model, tokenizer, spec.schema, gcfg)
    prompts: list[str] = []
    contexts: list[list[Any] | None] = []
    retrieval_s: list[float] = []
    tok_key = _tokenizer_key(tokenizer)
    # Serving's answer reserve (RagPipeline.context_budget): training's, or the answer length.
    reserve = max(ANSWER_RESERVE, gen.settings.max_new_tokens)
    for rec in tqdm(records, desc=f"{spec.name}: retrieving", disable=retriever is None):
        t0 = time.perf_counter()
        chunks = None
        if retriever is not None:
            assert spec.rcfg is not None
            budget = spec.rcfg.context_tokens or spec.schema.context_budget(
                tokenizer,
                PromptFields(rec.instruction, rec.input, []),
                spec.max_seq_length,
                reserve,
            )
            key = (id(retriever), tok_key, rec.instruction, spec.rcfg.k, budget)
            if cache is not None and key in cache:
                chunks, seconds = cache[key]
                t0 -= seconds  # report the time the retrieval took when it ran
            else:
                chunks = retriever.retrieve(rec.instruction, k=spec.rcfg.k, budget_tokens=budget)
                if cache is not None:
                    cache[key] = (chunks, time.perf_counter() - t0)
        fields = PromptFields(
            rec.instruction, rec.input, None if chunks is None else [c.text for c in chunks]
        )
        prompts.append(spec.schema.render_prompt(fields, tokenizer))
        contexts.append(chunks)
        retrieval_s.append(time.perf_counter() - t0)

    # Similar lengths decode together (less padding); results go back to question order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Any] = [None] * len(prompts)
    latency: list[float] = [0.0] * len(prompts)
    bs = ecfg.batch_size
    with tqdm(total=len(prompts), desc=f"{spec.name}: answering") as bar:
        for b in range(0, len(order), bs):
            idx = order[b : b + bs]
            t0 = time.perf_counter()
            got = gen.generate_batch([prompts[i] for i in idx], batch_size=len(idx))
            share = (time.perf_counter() - t0) / len(idx)
            for i, res in zip(idx, got, strict=True):
                results[i] = res
                latency[i] = retrieval_s[i] + share
            bar.update(len(idx))

    judged = _assess(spec, gen, prompts, results, contexts, ecfg.batch_size)
    rows = []
    for i, (rec, chunks, res, lat) in enumerate(
        zip(records, contexts, results, latency, strict=True)
    ):
        golds = gold_answers(rec)
        hit = None if chunks is None else retrieval_hit(golds, chunks, rec.source)
        text = judged[i].answer if judged else res.text
        s: QuestionScore = score_answer(
            text, golds, spec.schema.is_abstention, retrieval_hit=hit, latency_s=lat
        )
        rows.append(
            {
                "mode": spec.name,
                "id": rec.id,
                "question": rec.instruction,
                "gold": list(golds),
                "answerable": rec.answerable,
                "source": rec.source,
                "retrieved": None
                if chunks is None
                else [
                    {"source": c.source, "start": c.start, "score": _round(c.score)} for c in chunks
                ],
                "answer": text,
                "generated": res.text,
                "candidate": None if not judged else judged[i].candidate,
                "answerability": None if not judged else round(judged[i].score, 4),
                "features": None if not judged else judged[i].features.to_dict(),
                "abstained": s.abstained,
                "exact": s.exact,
                "f1": round(s.f1, 4),
                "score": round(s.score, 4),
                "retrieval_hit": hit,
                "latency_s": round(lat, 4),
                "stop_reason": res.stop_reason,
                "prompt_tokens": res.prompt_tokens,
                "_score": s,
            }
        )
    return rows


def _assess(
    spec: ModeSpec, gen: Any, prompts: list, results: list, contexts: list, bs: int
) -> list:
    """Answerability of every answer of a RAG mode; raft_rag applies its fitted decision."""
    from ragtune.answerability import assess, read_calibration

    if spec.rcfg is None:
        return []
    cal = read_calibration(spec.model) if spec.name == "raft_rag" else None
    ctx = [[c.text for c in ch or []] for ch in contexts]
    top = [max((c.score or 0.0 for c in ch or []), default=0.0) for ch in contexts]
    return assess(gen, prompts, [r.text for r in results], ctx, top, cal, bs)


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)


# --------------------------------------------------------------------------- reporting
_COLUMNS = (
    ("overall", "overall"),
    ("f1", "F1 (ans.)"),
    ("exact_match", "EM (ans.)"),
    ("false_abstention_rate", "false abst. % (ans.)"),
    ("unanswerable_abstention_rate", "abst. % (unans.)"),
    ("recall_at_k", "recall@k"),
    ("abstention_auroc", "AUROC"),
    ("latency_s", "latency s"),
)

_DEFINITIONS = (
    "Scores in percent. F1 / EM: SQuAD v2 normalisation (lower case, no punctuation, no "
    "articles), max over gold answers, over answerable questions. overall: mean over all "
    "questions of F1 (answerable) or 1/0 for abstaining or not (unanswerable), the official "
    "SQuAD v2 F1 with abstention as the empty answer. recall@k: answerable questions whose "
    "retrieved context holds a gold answer from the question's source document. latency: "
    "seconds per question (retrieval + its share of a batched greedy decode)."
)


def markdown_table(modes: dict[str, dict[str, Any]]) -> str:
    """One row per mode: overall, answerable F1/EM, abstention rates, recall@k, latency."""
    head = "| mode | " + " | ".join(label for _, label in _COLUMNS) + " |"
    sep = "| --- |" + " ---: |" * len(_COLUMNS)
    rows = [head, sep]
    for name, m in modes.items():
        cells = []
        for key, _ in _COLUMNS:
            v = m.get(key)
            cells.append(
                "n/a"
                if v is None
                else f"{v:.3f}"
                if key in ("latency_s", "abstention_auroc")
                else f"{v:.1f}"
            )
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _one_line(m: dict[str, Any]) -> str:
    rec = m.get("recall_at_k")
    return (
        f"overall {m['overall']:.1f}, F1 {m['f1']:.1f}, EM {m['exact_match']:.1f}, "
        f"false abst. {m['false_abstention_rate']:.1f}%, "
        f"unans. abst. {m['unanswerable_abstention_rate']:.1f}%, "
        f"recall@k {'n/a' if rec is None else f'{rec:.1f}'}, {m['seconds']:.0f}s"
    )
