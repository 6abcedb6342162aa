"""Fine-tune the retriever's embedder on the training QA, with negatives our retriever confuses.

The LM half of ragtune trains on the contexts our retriever returns; this is the other half:
the sentence-transformers embedder learns the user's questions and documents. Each answerable
question becomes a row (question, oracle chunk, hard negatives), where the oracle is found the
way the RAFT builder finds it and the hard negatives are the best-ranked retrieved chunks that
do not hold the answer (the RAFT builder's distractors). Training is sentence-transformers' own
``SentenceTransformerTrainer`` with ``MultipleNegativesRankingLoss`` (the hard negatives plus
every other passage of the batch; a no-duplicates sampler keeps a question's own oracle out of
its in-batch negatives). Validation is recall@k on questions of held-out *sources*, so a score
never comes from a document the model trained on; the best checkpoint by that recall is kept
and training stops early when it stops improving.

The result is a plain sentence-transformers folder plus ``manifest.json``. It is a different
embedding model: point ``retriever.embedding_model`` at the folder and the index is built into
its own collection (the name and metadata follow the model), never mixed with the old vectors.
A folder is written once and never overwritten, so one path always names one set of weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragtune.config import defaults_from
from ragtune.errors import RagtuneError
from ragtune.types import Chunk, QARecord

log = logging.getLogger(__name__)

MANIFEST_KIND = "ragtune-embedder"
# Prompt names a sentence-transformers model may define for each side of retrieval.
QUERY_PROMPTS = ("query",)
PASSAGE_PROMPTS = ("document", "passage", "corpus")


class EmbedTuneError(RagtuneError):
    """Training data or settings that cannot tune an embedder (names what to change)."""


@defaults_from("embed_ft:embed_ft")
class EmbedFtConfig:
    """The ``embed_ft`` config node; defaults and docs live in conf/embed_ft.yaml."""

    save_dir: str
    negatives: int
    val_fraction: float
    recall_k: int
    epochs: float
    batch_size: int
    learning_rate: float
    warmup_ratio: float
    weight_decay: float
    evals_per_epoch: int
    patience: int
    max_seq_length: int
    device: str


@dataclass(frozen=True)
class Triplet:
    """One training row: a question, the chunk holding its answer, chunks that do not."""

    query: str
    positive: Chunk
    negatives: tuple[Chunk, ...]
    source: str
    answer: str


@dataclass(frozen=True)
class TuneResult:
    """What :func:`tune_embedder` wrote and measured."""

    path: Path
    base_model: str
    recall_before: dict[str, float]
    recall_after: dict[str, float]
    n_train: int
    n_val: int
    seconds: float
    data_fingerprint: str


def as_embed_ft_config(node: Any) -> EmbedFtConfig:
    """A dict / DictConfig ``embed_ft`` node as a validated :class:`EmbedFtConfig`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(node, EmbedFtConfig):
        cfg = node
    else:
        try:
            merged = OmegaConf.merge(OmegaConf.structured(EmbedFtConfig), node or {})
        except OmegaConfBaseException as e:
            raise EmbedTuneError(f"embed_ft: {str(e).splitlines()[0]}") from None
        cfg = OmegaConf.to_object(merged)  # type: ignore[assignment]
    checks = [
        (cfg.negatives >= 0, "negatives", "must be >= 0"),
        (0.0 < cfg.val_fraction < 1.0, "val_fraction", "must be in (0, 1)"),
        (cfg.recall_k >= 1, "recall_k", "must be >= 1"),
        (cfg.epochs > 0, "epochs", "must be > 0"),
        (cfg.batch_size >= 2, "batch_size", "must be >= 2 (in-batch negatives)"),
        (cfg.learning_rate > 0, "learning_rate", "must be > 0"),
        (cfg.evals_per_epoch >= 1, "evals_per_epoch", "must be >= 1"),
        (cfg.patience >= 0, "patience", "must be >= 0 (0 = no early stopping)"),
    ]
    for ok, key, msg in checks:
        if not ok:
            raise EmbedTuneError(f"embed_ft.{key}: {msg}, got {getattr(cfg, key)!r}")
    return cfg


# --------------------------------------------------------------------------- data
def mine_triplets(
    records: Sequence[QARecord], retriever: Any, negatives: int, fetch_k: int, progress: bool = True
) -> list[Triplet]:
    """A row per answerable record whose oracle chunk exists in the index.

    Negatives are the retriever's top-ranked candidates that do not support the answer (the
    oracle check of ``ragtune.oracle``), best first: the RAFT builder's distractors.
    """
    from tqdm.auto import tqdm

    from ragtune.oracle import OracleFinder

    finder = OracleFinder(retriever, getattr(retriever, "embed", None))
    rows: list[Triplet] = []
    for rec in tqdm(records, desc="mining hard negatives", disable=not progress):
        if not rec.answerable:
            continue
        answer = rec.output.strip()
        cands = retriever.candidates(rec.instruction, max(fetch_k, negatives + 1))
        oracle = finder.find(rec, cands).chunk
        if oracle is None:
            continue
        holds = finder.supporting(rec, cands)
        negs = tuple(c for c, h in zip(cands, holds, strict=True) if not h)[:negatives]
        rows.append(Triplet(rec.instruction, oracle, negs, rec.source or oracle.source, answer))
    return rows


def split_by_source(
    rows: Sequence[Triplet], val_fraction: float, seed: int
) -> tuple[list[Triplet], list[Triplet]]:
    """(train, validation): whole sources go to one side, chosen by the seed."""
    sources = sorted({r.source for r in rows})
    if len(sources) < 2:
        raise EmbedTuneError(
            f"the training QA has answerable questions from {len(sources)} source(s); holding "
            "out validation by source needs at least 2 (add records with other sources)"
        )
    random.Random(f"{seed}:embed-val").shuffle(sources)
    n_val = min(len(sources) - 1, max(1, round(len(sources) * val_fraction)))
    held = set(sources[:n_val])
    return [r for r in rows if r.source not in held], [r for r in rows if r.source in held]


def training_columns(rows: Sequence[Triplet], negatives: int) -> dict[str, list[str]]:
    """Columns for MultipleNegativesRankingLoss: anchor, positive, negative_1..n.

    Every row needs the same number of negatives: rows with fewer (a tiny corpus) are dropped
    when that keeps most rows, else the count is lowered to what every row has.
    """
    n = negatives
    if rows and sum(len(r.negatives) >= n for r in rows) < 0.9 * len(rows):
        n = min(len(r.negatives) for r in rows)
        log.warning("only %d hard negatives for every question (asked for %d)", n, negatives)
    kept = [r for r in rows if len(r.negatives) >= n]
    cols: dict[str, list[str]] = {
        "anchor": [r.query for r in kept],
        "positive": [r.positive.text for r in kept],
    }
    for i in range(n):
        cols[f"negative_{i + 1}"] = [r.negatives[i].text for r in kept]
    return cols


def data_fingerprint(cols: dict[str, list[str]], val: Sequence[Triplet]) -> str:
    """sha256 of the training rows and the validation questions (what the model learnt from)."""
    h = hashlib.sha256()
    h.update(json.dumps(cols, ensure_ascii=False, sort_keys=True).encode())
    h.update(json.dumps([(r.query, r.source) for r in val], ensure_ascii=False).encode())
    return h.hexdigest()


def model_prompts(model: Any) -> tuple[str | None, str | None]:
    """(query prompt name, passage prompt name) the model defines, or None for either."""
    have = getattr(model, "prompts", None) or {}
    query = next((p for p in QUERY_PROMPTS if have.get(p)), None)
    passage = next((p for p in PASSAGE_PROMPTS if have.get(p)), None)
    return query, passage


def training_prompts(model: Any, columns: Sequence[str]) -> dict[str, str]:
    """Each training column's prompt: the query prompt for the anchor, the passage prompt for
    the positive and the negatives ({} for a model without prompts, e.g. MiniLM)."""
    qp, pp = model_prompts(model)
    prompts = {}
    if qp:
        prompts["anchor"] = model.prompts[qp]
    if pp:
        prompts.update({c: model.prompts[pp] for c in columns if c != "anchor"})
    return prompts


def recall_evaluator(val: Sequence[Triplet], retriever: Any, model: Any, name: str = "val") -> Any:
    """sentence-transformers' IR evaluator over every chunk of the index.

    A validation question's relevant chunks are those of its source that contain the answer,
    so the evaluator's ``accuracy@k`` is our recall@k (a hit in the top k).
    """
    from sentence_transformers.evaluation import InformationRetrievalEvaluator

    corpus = {c.id: c.text for c in retriever.find(limit=0)}
    queries, relevant = {}, {}
    for i, r in enumerate(val):
        holding = {c.id for c in retriever.find(contains=r.answer, source=r.source, limit=0)}
        holding.add(r.positive.id)
        queries[f"q{i}"] = r.query
        relevant[f"q{i}"] = holding & set(corpus)
    qp, pp = model_prompts(model)
    return InformationRetrievalEvaluator(
        queries,
        corpus,
        relevant,
        accuracy_at_k=[1, 3, 5, 10],
        precision_recall_at_k=[1],
        mrr_at_k=[10],
        ndcg_at_k=[10],
        map_at_k=[10],
        name=name,
        write_csv=False,
        query_prompt_name=qp,
        corpus_prompt_name=pp,
    )


def recall_summary(metrics: dict[str, float], prefix: str = "") -> dict[str, float]:
    """``recall@1/3/5/10`` and ``mrr@10`` from an IR evaluator's metrics (any score function)."""
    out = {}
    for key, value in metrics.items():
        stem = key[len(prefix) :] if key.startswith(prefix) else key
        for ours, theirs in (("recall@", "accuracy@"), ("mrr@", "mrr@")):
            if f"_{theirs}" in stem:
                k = stem.rsplit("@", 1)[1]
                out[f"{ours}{k}"] = round(float(value), 4)
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------- training
def _metric_key(evaluator: Any, model: Any, k: int) -> str:
    return f"{evaluator.name}_{model.similarity_fn_name}_accuracy@{k}"


def _best_evaluation(history: list[dict[str, Any]], metric: str) -> dict[str, float] | None:
    """The recall summary of the evaluation the trainer kept (the first best), if any."""
    evals = [h for h in history if metric in h]
    if not evals:
        return None
    best = max(evals, key=lambda h: h[metric])  # max keeps the first of equals, as the trainer
    return recall_summary({k: v for k, v in best.items() if k.startswith("eval_")}, "eval_val_")


def _save_target(save_dir: Path) -> Path:
    if save_dir.exists() and any(save_dir.iterdir()):
        raise EmbedTuneError(
            f"embed_ft.save_dir={save_dir} already holds files; a tuned embedder folder is "
            "written once (its path names its index): choose a new folder"
        )
    save_dir.parent.mkdir(parents=True, exist_ok=True)
    return save_dir


def tune_embedder(
    records: Sequence[QARecord],
    retriever: Any,
    ecfg: EmbedFtConfig,
    *,
    base_model: str,
    save_dir: Path,
    work_dir: Path,
    seed: int = 42,
    extra_manifest: dict[str, Any] | None = None,
    progress: bool = True,
) -> TuneResult:
    """Mine, split, train, keep the best checkpoint, save the folder with its manifest.

    ``retriever`` is our retriever over the training corpus with the *base* embedder (it mines
    the negatives and lists the chunks validation ranks); ``base_model`` is its
    ``retriever.embedding_model``. Checkpoints go under ``work_dir``.
    """
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from sentence_transformers.training_args import BatchSamplers
    from transformers import EarlyStoppingCallback

    from ragtune.embedding import resolve_device
    from ragtune.manifest import write_manifest
    from ragtune.models import resolve_embedder

    t0 = time.perf_counter()
    save_dir = _save_target(Path(save_dir))
    rcfg = retriever.rcfg
    rows = mine_triplets(records, retriever, ecfg.negatives, rcfg.fetch_k, progress)
    if not rows:
        raise EmbedTuneError(
            "no answerable QA record has its answer in an indexed chunk: nothing to train on "
            "(check data.qa_train against data.corpus)"
        )
    train_rows, val_rows = split_by_source(rows, ecfg.val_fraction, seed)
    cols = training_columns(train_rows, ecfg.negatives)
    if len(cols["anchor"]) < 2:
        raise EmbedTuneError(f"only {len(cols['anchor'])} training rows after the split")
    fingerprint = data_fingerprint(cols, val_rows)

    device = resolve_device(ecfg.device)
    # a private copy: the retriever's cached model keeps serving the base vectors meanwhile
    model = SentenceTransformer(resolve_embedder(base_model), device=device)
    if ecfg.max_seq_length:
        model.max_seq_length = ecfg.max_seq_length
    qp, pp = model_prompts(model)
    prompts = training_prompts(model, cols)

    evaluator = recall_evaluator(val_rows, retriever, model)
    key = _metric_key(evaluator, model, ecfg.recall_k)
    before = recall_summary(evaluator(model), "val_")
    log.info("validation before tuning (%d questions): %s", len(val_rows), before)

    n = len(cols["anchor"])
    steps_per_epoch = max(1, -(-n // ecfg.batch_size))
    eval_steps = max(1, steps_per_epoch // ecfg.evals_per_epoch)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(work_dir),
        num_train_epochs=ecfg.epochs,
        per_device_train_batch_size=ecfg.batch_size,
        learning_rate=ecfg.learning_rate,
        warmup_steps=round(ecfg.warmup_ratio * steps_per_epoch * ecfg.epochs),
        weight_decay=ecfg.weight_decay,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        prompts=prompts or None,
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model=f"eval_{key}",
        greater_is_better=True,
        logging_steps=max(1, eval_steps // 2),
        seed=seed,
        data_seed=seed,
        report_to="none",
        use_cpu=device == "cpu",
        fp16=device.startswith("cuda"),
        disable_tqdm=not progress,
        dataloader_drop_last=False,
    )
    callbacks = [EarlyStoppingCallback(ecfg.patience)] if ecfg.patience else []
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict(cols),
        loss=MultipleNegativesRankingLoss(model),
        evaluator=evaluator,
        callbacks=callbacks,
    )
    trainer.train()
    after = _best_evaluation(trainer.state.log_history, f"eval_{key}") or recall_summary(
        evaluator(model), "val_"
    )
    k = f"recall@{ecfg.recall_k}"
    log.info("validation after tuning: %s", after)
    if after.get(k, 0.0) < before.get(k, 0.0):
        log.warning(
            "the tuned embedder's validation %s (%.3f) is below the base model's (%.3f)",
            k,
            after[k],
            before[k],
        )

    extra = dict(extra_manifest or {})
    extra_data = extra.pop("data", {})
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{save_dir.name}-", dir=save_dir.parent))
    try:
        model.save(str(tmp))
        seconds = time.perf_counter() - t0
        write_manifest(
            tmp,
            {
                "kind": MANIFEST_KIND,
                "base_model": base_model,
                "base_path": resolve_embedder(base_model),
                "data_fingerprint": fingerprint,
                "data": {
                    "train_rows": n,
                    "negatives_per_row": len(cols) - 2,
                    "validation_questions": len(val_rows),
                    "validation_sources": sorted({r.source for r in val_rows}),
                    "skipped_records": len(records) - len(rows),
                    **extra_data,
                },
                "validation": {"metric": k, "before": before, "after": after},
                "embed_ft": dataclasses.asdict(ecfg),
                "mining_retriever": retriever.settings(),
                "prompts": {"query": qp, "passage": pp},
                "best_checkpoint": trainer.state.best_model_checkpoint,
                "train_seconds": round(seconds, 1),
                **extra,
            },
        )
        if save_dir.exists():
            save_dir.rmdir()  # empty (checked above)
        os.replace(tmp, save_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TuneResult(save_dir, base_model, before, after, n, len(val_rows), seconds, fingerprint)


def run_embed_ft(cfg: Any) -> TuneResult:
    """What ``python train/embed_ft.py`` does: index the corpus with the base embedder, tune.

    The tuned folder is ``embed_ft.save_dir`` or ``<run>/embedder``.
    """
    from ragtune.config import validate
    from ragtune.ingest import ingest_corpus
    from ragtune.paths import resolve_path
    from ragtune.qa import load_qa
    from ragtune.retriever import Retriever

    cfg = validate(cfg, top_level={"seed": int, "output_dir": str, "embed_ft": dict})
    ecfg = as_embed_ft_config(cfg.get("embed_ft"))
    out = resolve_path(cfg.output_dir)
    save_dir = resolve_path(ecfg.save_dir) if ecfg.save_dir else out / "embedder"
    _save_target(save_dir)  # refuse before the slow steps
    ingest_corpus(cfg)
    retriever = Retriever.from_config(cfg.retriever)
    records = load_qa(resolve_path(cfg.data.qa_train))
    if cfg.data.max_records:
        records = records[: cfg.data.max_records]
    return tune_embedder(
        records,
        retriever,
        ecfg,
        base_model=cfg.retriever.embedding_model,
        save_dir=save_dir,
        work_dir=out / "embed_checkpoints",
        seed=cfg.seed,
        extra_manifest={"data": {"qa_train": cfg.data.qa_train, "corpus": cfg.data.corpus}},
    )
