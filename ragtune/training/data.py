"""Training examples: retrieval-augmented examples built once per launch, then tokenized with
the loss on the completion only."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ragtune.budget import token_counter
from ragtune.errors import RagtuneError
from ragtune.manifest import sha256_file
from ragtune.paths import resolve_path
from ragtune.training import TrainError
from ragtune.training.distributed import init_distributed, is_main_process

log = logging.getLogger(__name__)

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
    from ragtune.ingest import ingest_corpus as ingest_data
    from ragtune.retriever import Retriever

    if ingest_corpus:
        log.info("index: %s", ingest_data(cfg))
    return Retriever.from_config(
        cfg.retriever, corpus=resolve_path(cfg.data.corpus), token_counter=token_counter(tokenizer)
    )


def build_dataset(
    cfg: DictConfig, out_dir: Path
) -> tuple[list[dict[str, Any]], dict[str, Any], Any, Any]:
    """Load QA records, retrieve contexts, render examples; save them for a person to read.

    Returns (examples, stats, tokenizer, retriever-or-None).
    """
    from ragtune.qa import load_qa
    from ragtune.raft import BuildSettings, build_examples, describe, save_dataset
    from ragtune.schema import get_schema
    from ragtune.training.calibration import calibration_split, save_validation

    schema = get_schema(cfg.prompt.name)
    tokenizer = load_tokenizer(cfg)
    records = load_qa(_qa_train_path(cfg.data.qa_train))
    if cfg.data.max_records:
        records = records[: cfg.data.max_records]
    if not records:
        raise RagtuneError(f"{cfg.data.qa_train}: no QA records")
    records, held_out = calibration_split(cfg, records)  # fits the decision after training
    save_validation(held_out, out_dir / "dataset")
    retriever = open_retriever(cfg, tokenizer) if cfg.raft.mode == "rag" else None
    settings = BuildSettings.from_config(cfg)
    examples, stats = build_examples(records, retriever, schema, tokenizer, settings)
    save_dataset(examples, stats, out_dir / "dataset", cfg.raft.num_preview)
    log.info("dataset: %s -> %s", describe(stats), out_dir / "dataset")
    return examples, stats, tokenizer, retriever


def _qa_train_path(value: str | None) -> Path:
    """``data.qa_train`` as a file; without one, point at the generator instead of failing."""
    hint = "generate one from the corpus: ragtune gen-qa (writes outputs/gen_qa/qa.jsonl)"
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

    Under torchrun / accelerate rank 0 alone ingests and builds (no concurrent index writes,
    one set of retrieval results) and broadcasts its run folder and a checksum of
    ``dataset/train.jsonl``; the others read rank 0's saved examples. The wait has its own gloo
    group with a long timeout (accelerate's ``main_process_first`` waits on the training group,
    whose timeout a large ingest can outlast). Returns (examples, stats, retriever-or-None,
    the run folder every rank then uses).
    """
    from ragtune.raft import load_saved_dataset

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
            box[0] = {"out": str(out.resolve()), "sha256": sha256_file(out / "dataset/train.jsonl")}
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
            same = sha256_file(data / "train.jsonl") == info["sha256"]
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


def tokenize_examples(
    examples: list[dict], tokenizer: Any, schema: Any, max_seq_length: int
) -> tuple[Any, dict[str, Any]]:
    """Pre-tokenize prompt/completion examples for TRL's SFTTrainer; loss on completions only.

    ids = ``schema.encode_prompt(prompt)`` + the completion's ids, EOS last. ``completion_mask``
    is 1 on completion tokens; TRL folds it into ``labels`` with ``completion_only_loss=True``.
    Examples longer than ``max_seq_length`` are DROPPED (counted in ``stats["truncated"]``),
    not cut: a cut prompt teaches answering without the context, a cut completion loses EOS.
    """
    from datasets import Dataset

    rows: dict[str, list] = {"input_ids": [], "completion_mask": []}
    lengths: list[int] = []
    completion_tokens = 0
    dropped = 0
    for i, ex in enumerate(examples):
        if "prompt" not in ex or "completion" not in ex:
            raise TrainError(
                f"training example {i} lacks 'prompt' or 'completion' (keys: {sorted(ex)})"
            )
        p_ids = schema.encode_prompt(tokenizer, ex["prompt"])
        c_ids = encode_completion(tokenizer, ex["completion"])
        if len(p_ids) + len(c_ids) > max_seq_length:
            dropped += 1
            continue
        rows["input_ids"].append(p_ids + c_ids)
        rows["completion_mask"].append([0] * len(p_ids) + [1] * len(c_ids))
        lengths.append(len(p_ids) + len(c_ids))
        completion_tokens += len(c_ids)
    if not lengths:
        raise TrainError(
            f"no training example fits model.max_seq_length={max_seq_length} "
            f"({dropped} of {len(examples)} too long); raise it or lower retriever.context_tokens"
        )
    if dropped:
        log.warning(
            "dropped %d of %d examples longer than model.max_seq_length=%d",
            dropped,
            len(examples),
            max_seq_length,
        )
    log.info(
        "tokenized %d examples (%d dropped as too long), %d tokens, mean length %.0f",
        len(lengths),
        dropped,
        sum(lengths),
        sum(lengths) / len(lengths),
    )
    stats = {
        "examples": len(lengths),
        "truncated": dropped,
        "tokens": int(sum(lengths)),
        "completion_tokens": int(completion_tokens),
        "max_tokens": int(max(lengths)),
        "mean_tokens": float(sum(lengths) / len(lengths)),
    }
    return Dataset.from_dict(rows), stats


def encode_completion(tokenizer: Any, completion: str) -> list[int]:
    """A completion's token ids, EOS last (added when the text did not end with it)."""
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise TrainError("the tokenizer has no EOS token id; cannot end training sequences")
    ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if not ids or ids[-1] != eos_id:
        ids.append(eos_id)
    return ids
