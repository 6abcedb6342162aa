"""The SFT stage end to end: what ``python train/sft.py`` runs.

Reads top to bottom like a recipe: validate the config, index the corpus, build the
retrieval-augmented examples with the retriever serving will use, train, save, and write
the manifest last. Returns the metric a sweep optimises.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ragtune.budget import token_counter
from ragtune.config import to_container, validate
from ragtune.errors import RagtuneError
from ragtune.paths import resolve_path
from ragtune.sweep import is_multirun, write_status

log = logging.getLogger(__name__)

SFT_TOP_LEVEL = {"seed": int, "output_dir": str}
DATASET_WAIT_S = 24 * 3600  # torchrun: how long other ranks wait for rank 0 to ingest and build


def load_tokenizer(cfg: DictConfig) -> Any:
    """The LM's tokenizer: prompts are rendered, budgeted and encoded with it."""
    from transformers import AutoTokenizer

    from ragtune.models import resolve_model

    return AutoTokenizer.from_pretrained(
        resolve_model(cfg.model.name_or_path), trust_remote_code=cfg.model.trust_remote_code
    )


def open_retriever(cfg: DictConfig, tokenizer: Any, ingest_corpus: bool = True) -> Any:
    """Index ``data.corpus`` (incrementally) and open the shared retriever on it."""
    from ragtune.ingest import ingest
    from ragtune.retriever import Retriever

    if ingest_corpus:
        report = ingest(
            resolve_path(cfg.data.corpus), cfg.retriever, jsonl_text_field=cfg.data.jsonl_text_field
        )
        log.info("index: %s", report)
    return Retriever.from_config(cfg.retriever, token_counter=token_counter(tokenizer))


def build_dataset(
    cfg: DictConfig, out_dir: Path
) -> tuple[list[dict[str, Any]], dict[str, Any], Any, Any]:
    """Load QA records, retrieve contexts, render examples; save them for a person to read.

    Returns (examples, stats, tokenizer, retriever-or-None).
    """
    from ragtune.qa import load_qa
    from ragtune.raft import BuildSettings, build_examples, describe, save_dataset
    from ragtune.schema import get_schema

    schema = get_schema(cfg.prompt.name)
    tokenizer = load_tokenizer(cfg)
    records = load_qa(_qa_train_path(cfg.data.qa_train))
    if cfg.data.max_records:
        records = records[: cfg.data.max_records]
    if not records:
        raise RagtuneError(f"{cfg.data.qa_train}: no QA records")
    retriever = open_retriever(cfg, tokenizer) if cfg.raft.mode == "rag" else None
    settings = BuildSettings.from_config(cfg)
    examples, stats = build_examples(records, retriever, schema, tokenizer, settings)
    save_dataset(examples, stats, out_dir / "dataset", cfg.raft.num_preview)
    log.info("dataset: %s -> %s", describe(stats), out_dir / "dataset")
    return examples, stats, tokenizer, retriever


def _qa_train_path(value: str | None) -> Path:
    """``data.qa_train`` as a file; without one, point at the generator instead of failing."""
    hint = "generate one from the corpus: python train/gen_qa.py (writes outputs/gen_qa/qa.jsonl)"
    if not value:
        raise RagtuneError(f"data.qa_train is not set: {hint}")
    path = resolve_path(value)
    if not path.is_file():
        raise RagtuneError(f"data.qa_train: {path} not found; {hint}")
    return path


def shared_dataset(
    cfg: DictConfig, out: Path
) -> tuple[list[dict[str, Any]], dict[str, Any], Any, Path]:
    """:func:`build_dataset` once per launch: on rank 0, shared with the other ranks.

    In a plain run this is ``build_dataset``. Under torchrun / accelerate (``WORLD_SIZE > 1``)
    rank 0 alone ingests the corpus and builds + saves the examples (no concurrent writes to
    the index, one set of retrieval results), then broadcasts the run folder and a checksum of
    ``dataset/train.jsonl``; the other ranks wait for it and read rank 0's saved examples.
    The wait has its own gloo group with a long timeout, since ingesting a large corpus can
    outlast the training collectives' timeout. The folder must be on a file system all ranks
    see (on several nodes: a shared one). Returns (examples, stats, retriever-or-None, the
    run folder rank 0 uses, which every rank then uses).
    """
    from ragtune.raft import load_saved_dataset
    from ragtune.train import init_distributed, is_main_process

    if not init_distributed():
        examples, stats, _tok, retriever = build_dataset(cfg, out)
        return examples, stats, retriever, out
    from datetime import timedelta

    import torch.distributed as dist

    wait = dist.new_group(backend="gloo", timeout=timedelta(seconds=DATASET_WAIT_S))
    retriever = None
    box: list[Any] = [None]
    if is_main_process():
        try:
            examples, stats, _tok, retriever = build_dataset(cfg, out)
            box[0] = {"out": str(out.resolve()), "sha256": _sha256(out / "dataset/train.jsonl")}
        except Exception as e:
            box[0] = {"error": f"{type(e).__name__}: {e}"}
            dist.broadcast_object_list(box, src=0, group=wait)
            raise
    dist.broadcast_object_list(box, src=0, group=wait)
    info = box[0]
    if "error" in info:
        raise RagtuneError(f"rank 0 could not build the dataset: {info['error']}")
    out = Path(info["out"])
    if not is_main_process():
        data = out / "dataset"
        try:
            examples, stats = load_saved_dataset(data)
            same = _sha256(data / "train.jsonl") == info["sha256"]
        except (OSError, ValueError) as e:
            raise RagtuneError(f"{data}: cannot read rank 0's dataset ({e})") from e
        if not same:
            raise RagtuneError(
                f"{data}/train.jsonl differs from what rank 0 wrote: output_dir must be on a "
                "file system every rank sees (shared between nodes)"
            )
        log.info(
            "rank %d: loaded rank 0's %d examples from %s", dist.get_rank(), len(examples), data
        )
    return examples, stats, retriever, out


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_sft(cfg: DictConfig) -> float:
    """Index, build, train, save, stamp. Returns the sweep metric (eval score or -loss).

    Under torchrun / accelerate every rank runs this; rank 0 alone builds the dataset and
    writes status.json, the manifest and ``outputs/latest``, and the other ranks log warnings
    only.
    """
    from ragtune.train import is_main_process

    main = is_main_process()
    if not main:
        logging.getLogger("ragtune").setLevel(logging.WARNING)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    multirun = is_multirun()
    if main:
        write_status(out, "running")
    try:
        validate(cfg, SFT_TOP_LEVEL)  # inside the try: a bad combination fails alone in a sweep
        metric, summary = _run(cfg, out)
    except Exception as e:
        if main:
            write_status(
                out, "failed", error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()
            )
        if multirun:  # a failed run is recorded and the sweep goes on
            log.error("run failed: %s: %s", type(e).__name__, e)
            return float("nan")
        raise
    if main:
        write_status(out, "ok", **summary)
        if not multirun:
            _point_latest(Path(summary["model_dir"]), Path(cfg.paths.outputs))
    return metric


def _run(cfg: DictConfig, out: Path) -> tuple[float, dict[str, Any]]:
    from ragtune.manifest import write_manifest
    from ragtune.schema import get_schema
    from ragtune.train import is_main_process, train

    t0 = time.perf_counter()
    schema = get_schema(cfg.prompt.name)
    log.info(
        "prompt %s (fingerprint %s), model %s, retriever %s k=%d chunk %d/%d",
        schema.name,
        schema.fingerprint,
        cfg.model.name_or_path,
        cfg.retriever.embedding_model,
        cfg.retriever.k,
        cfg.retriever.chunk_size,
        cfg.retriever.chunk_overlap,
    )
    examples, stats, retriever, out = shared_dataset(cfg, out)
    t_data = time.perf_counter() - t0

    result = train(cfg, examples, schema, out)
    log.info(
        "trained: final loss %.4f in %.0fs (%s backend) -> %s",
        result.final_loss,
        result.seconds,
        result.backend,
        result.model_dir,
    )
    if not is_main_process():  # rank 0 evaluates and writes the manifest
        metric = -result.final_loss if result.final_loss is not None else float("nan")
        return metric, {"model_dir": str(result.model_dir), "final_loss": result.final_loss}

    settings = retriever.settings() if retriever is not None else _retriever_settings(cfg)
    config = to_container(cfg)
    manifest = {
        "base_model": cfg.model.name_or_path,
        "backend": result.backend,
        "save_method": cfg.train.save_method,
        "prompt": {
            "name": schema.name,
            "fingerprint": schema.fingerprint,
            "skeleton": schema.skeleton(),
        },
        "retriever": settings,
        "model": config["model"],
        "train": config["train"],
        "raft": config["raft"],
        "data": config["data"],
        "seed": cfg.seed,
        "dataset_stats": stats,
        "final_loss": result.final_loss,
        "train_steps": result.steps,
        "train_seconds": result.seconds,
        "data_seconds": round(t_data, 2),
    }
    metrics: dict[str, Any] = {}
    if cfg.train.eval_after:
        from ragtune.evaluate import evaluate_model

        metrics = evaluate_model(cfg, result.model_dir)
        manifest["eval"] = metrics
    write_manifest(result.model_dir, manifest)  # last: its presence marks the folder complete
    log.info("manifest written: %s", Path(result.model_dir) / "manifest.json")
    metric = float(metrics.get("overall", -result.final_loss)) if metrics else -result.final_loss
    summary = {
        "model_dir": str(result.model_dir),
        "final_loss": result.final_loss,
        "metric": metric,
        "metrics": metrics,
        "dataset": stats,
    }
    return metric, summary


def _retriever_settings(cfg: DictConfig) -> dict[str, Any]:
    """Closed-book runs have no retriever; record the configured settings anyway."""
    return dict(to_container(cfg)["retriever"])


def _point_latest(model_dir: Path, outputs: Path) -> None:
    """``outputs/latest`` -> the newest trained model, so ``serve/ask.py`` finds it."""
    outputs.mkdir(parents=True, exist_ok=True)
    link = outputs / "latest"
    tmp = outputs / f".latest-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(model_dir.resolve())
    os.replace(tmp, link)
    log.info("%s -> %s", link, model_dir)
