"""The SFT recipe, top to bottom: what ``python train/sft.py`` runs.

:func:`run_sft`: validate the config -> build the retrieval-augmented examples with the
retriever serving will use (whole source documents held out for calibration) -> :func:`train`
(resolve the backend -> load the model with LoRA -> tokenize -> Trainer -> resume -> fit ->
the preference step if asked -> save) -> fit the answer-or-abstain decision on the held-out questions
(:mod:`ragtune.training.calibration`) -> evaluate (``train.eval_after``) -> write the manifest
last, whose presence marks the model folder complete.

Library code: no printing, no exit, no status file; user errors raise RagtuneError subclasses.
Under torchrun / accelerate every rank runs this; rank 0 alone builds the dataset, saves the
model and writes the manifest.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ragtune.training import TrainError
from ragtune.training.checkpoints import CHECKPOINTS_DIR

log = logging.getLogger(__name__)

SFT_TOP_LEVEL = {"seed": int, "output_dir": str}
TENSORBOARD_DIR = "tensorboard"


@dataclass
class TrainResult:
    """What the training half produced, for the manifest and for people."""

    model_dir: Path
    final_loss: float | None
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    backend: str = "hf"
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    peak_memory_gb: float | None = None
    resumed_from: str | None = None
    dataset_stats: dict[str, Any] = field(default_factory=dict)
    eval_loss: float | None = None
    divergence: list[dict[str, Any]] | None = None  # each loss blow-up: where, and the checkpoint
    # training resumed from (restarted_from) or that was saved in the end (restored_step)
    preference: dict[str, Any] | None = None  # the preference step's PreferenceResult


@dataclass
class SftResult:
    """What one SFT stage run produced; ``metric`` is what a sweep optimises."""

    run_dir: Path
    model_dir: Path
    final_loss: float | None
    metrics: dict[str, Any] | None
    metric: float
    dataset_stats: dict[str, Any] = field(default_factory=dict)
    divergence: list[dict[str, Any]] | None = None  # TrainResult.divergence


# --------------------------------------------------------------------------- the stage
def run_sft(cfg: DictConfig) -> SftResult:
    """Validate, build the examples, train, save, evaluate if asked, write the manifest."""
    from ragtune.config import validate
    from ragtune.schema import get_schema
    from ragtune.sweep import is_multirun
    from ragtune.training.checkpoints import find_resumable_run
    from ragtune.training.data import shared_dataset
    from ragtune.training.distributed import is_main_process
    from ragtune.training.saving import MODEL_DIR, point_latest, publish_model, recover_model

    validate(cfg, SFT_TOP_LEVEL)
    out = Path(cfg.output_dir)
    if cfg.train.resume and not is_multirun():
        out = find_resumable_run(out)
        if out != Path(cfg.output_dir):
            log.info("train.resume=true: continuing the interrupted run in %s", out)
    out.mkdir(parents=True, exist_ok=True)
    recover_model(out / MODEL_DIR)
    t0 = time.perf_counter()
    schema = get_schema(cfg.prompt.name)
    r = cfg.retriever
    log.info(
        "prompt %s (fingerprint %s), model %s, retriever %s k=%d chunk %d/%d",
        schema.name,
        schema.fingerprint,
        cfg.model.name_or_path,
        r.embedding_model,
        r.k,
        r.chunk_size,
        r.chunk_overlap,
    )
    examples, stats, retriever, out = shared_dataset(cfg, out)
    data_seconds = time.perf_counter() - t0

    result = train(cfg, examples, schema, out)  # the new model is staged beside model/
    loss_metric = -result.final_loss if result.final_loss is not None else float("nan")
    final = out / MODEL_DIR
    sft = SftResult(out, final, result.final_loss, None, loss_metric, stats, result.divergence)
    if not is_main_process():  # rank 0 evaluates and writes the manifest
        return sft

    from ragtune.answerability import MANIFEST_KEY
    from ragtune.training.calibration import calibrate

    cal = calibrate(cfg, schema, result.model_dir, retriever, out)
    extra = {MANIFEST_KEY: cal.to_dict()} if cal is not None else {}
    if cfg.train.eval_after:
        from ragtune.evaluate import evaluate_model

        sft.metrics = evaluate_model(cfg, result.model_dir, manifest=extra)
        sft.metric = float(sft.metrics.get("overall", loss_metric))
    _write_manifest(cfg, schema, result, retriever, data_seconds, sft.metrics, extra)
    publish_model(result.model_dir, final)  # a finished model is replaced only now
    if not is_multirun():
        point_latest(final, Path(cfg.paths.outputs))
    return sft


def _write_manifest(
    cfg: DictConfig,
    schema: Any,
    result: TrainResult,
    retriever: Any,
    data_seconds: float,
    metrics: dict[str, Any] | None,
    extra: dict[str, Any] | None = None,
) -> None:
    from ragtune.config import to_container
    from ragtune.manifest import write_manifest

    config = to_container(cfg)
    manifest = {
        "base_model": cfg.model.name_or_path,
        "backend": result.backend,
        "save_method": str(cfg.train.save_method),
        "prompt": {
            "name": schema.name,
            "fingerprint": schema.fingerprint,
            "skeleton": schema.skeleton(),
        },
        # closed-book runs have no retriever; the configured settings are recorded anyway
        "retriever": retriever.settings() if retriever is not None else config["retriever"],
        "model": config["model"],
        "train": config["train"],
        "raft": config["raft"],
        "data": config["data"],
        "seed": cfg.seed,
        "dataset_stats": result.dataset_stats,
        "final_loss": result.final_loss,
        "train_steps": result.steps,
        "train_seconds": result.seconds,
        "data_seconds": round(data_seconds, 2),
        "divergence": result.divergence,
        "preference": result.preference,
    }
    if metrics is not None:
        manifest["eval"] = metrics
    manifest.update(extra or {})
    write_manifest(result.model_dir, manifest)  # last: its presence marks the folder complete
    log.info("manifest written: %s", Path(result.model_dir) / "manifest.json")


# --------------------------------------------------------------------------- the training half
def train(
    cfg: Any,
    examples: list[dict],
    schema: Any,
    output_dir: Path,
    *,
    eval_examples: list[dict] | None = None,
) -> TrainResult:
    """Train a LoRA on ``examples`` and save it into ``output_dir/model`` per train.save_method.

    ``cfg`` is the composed, validated config. Does not write ``manifest.json``.
    """
    from transformers import set_seed

    from ragtune.models import resolve_model
    from ragtune.training import (
        backends,
        checkpoints,
        data,
        distributed,
        divergence,
        padding,
        trainer,
    )

    output_dir = Path(output_dir)
    # 1. backend and the checks that need no model
    cuda = distributed.cuda_available()
    backend = _choose_backend(cfg, cuda)
    model_path = resolve_model(str(cfg.model.name_or_path))
    _check_save_method(cfg, backend, model_path)
    log.info("training %s with the %s backend", model_path, backend)

    # 2. model + LoRA
    set_seed(int(cfg.seed))
    model, tokenizer, precision = backends.load(cfg, backend, model_path)

    # 3. data: token ids with the loss on the completion; padded or padding-free batches
    max_len = int(cfg.model.max_seq_length)
    dataset, stats = data.tokenize_examples(examples, tokenizer, schema, max_len)
    eval_dataset = None
    if eval_examples:
        eval_dataset, _ = data.tokenize_examples(eval_examples, tokenizer, schema, max_len)
    lengths = [len(ids) for ids in dataset["input_ids"]]
    padding_free, why = padding.choose_padding_free(cfg.train, backend, lengths)
    log.info("batches: %s; sampling: %s", why, cfg.train.train_sampling_strategy)

    # 4. trainer, and where it resumes from
    ckpt_dir = output_dir / CHECKPOINTS_DIR
    args = trainer.sft_config(cfg, ckpt_dir, precision, cuda, backend, padding_free)
    resume_from = _resume_point(cfg, ckpt_dir, args.process_index == 0, args.world_size)
    guard = divergence.callback(cfg.train.divergence_factor)
    sft = trainer.trainer_class()(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=[*checkpoints.callbacks(ckpt_dir), *([guard] if guard else [])],
    )
    trainer.log_tensorboard_into(sft, output_dir / TENSORBOARD_DIR)
    # the right-padding mask is dropped for Unsloth only: 6,048 -> 6,667 tok/s at 12B
    # (docs/benchmarks.md, "The attention mask"); TRL's fused loss on the hf backend needs it
    sft.drop_padding_mask = backend == "unsloth"

    # 5. train, then (train.preference) the answer-vs-abstain margin, evaluate, save
    seconds, peak, breaks = _fit_guarded(sft, guard, resume_from, ckpt_dir, cfg, cuda)
    preferred = None
    if cfg.train.preference.num_train_epochs > 0:
        from ragtune.training.preference import fit_preference

        preferred = fit_preference(
            cfg,
            sft.model,
            tokenizer,
            schema,
            examples,
            ckpt_dir / "preference",
            precision,
            cuda,
            backend,
        )
    eval_loss = None
    if eval_dataset is not None:
        eval_loss = float(sft.evaluate()["eval_loss"])
        log.info("eval loss %.4f on %d held-out examples", eval_loss, len(eval_dataset))
    model_dir = _save(sft, cfg, tokenizer, schema, output_dir, backend, model_path)
    result = _result(sft, model_dir, backend, seconds, peak, resume_from, stats, eval_loss)
    result.preference = preferred.to_dict() if preferred is not None else None
    if breaks:
        result.divergence = [b.to_dict() for b in breaks]
        restored = breaks[-1].restored_step
        if restored is not None:  # the loss logged at the restored step, not the broken one
            kept = [loss for step, loss in guard.watch.logged if step <= restored]
            result.final_loss = kept[-1] if kept else None
    return result


def _fit_guarded(
    sft: Any, guard: Any, resume_from: Path | None, ckpt_dir: Path, cfg: Any, cuda: bool
) -> tuple[float, float | None, list[Any]]:
    """:func:`_fit`, and when the loss blows up, resume from the checkpoint before the spike
    (``train.divergence_restarts`` times) at ``train.divergence_lr_scale`` times its learning
    rate; breaking again, or when the resume itself fails, the model is rewound to that
    checkpoint. (seconds, peak GiB, the breaks)."""
    from ragtune.training import checkpoints, divergence

    seconds, peak = _fit(sft, resume_from, cuda)
    breaks: list[divergence.Divergence] = []
    while guard is not None and guard.watch.divergence is not None:
        broke = guard.watch.divergence
        breaks.append(broke)
        sharded = bool(getattr(sft, "is_fsdp_enabled", False))
        ckpt = divergence.checkpoint_before(ckpt_dir, broke, cfg, sharded=sharded)
        if len(breaks) > int(cfg.train.divergence_restarts):
            divergence.rewind(sft.model, ckpt, broke, cfg)
            break
        broke.lr_scale = float(cfg.train.divergence_lr_scale)
        log.warning(
            "training diverged at step %d; resuming from %s at %gx its learning rate",
            broke.step,
            ckpt.name,
            broke.lr_scale,
        )
        broke.restarted_from = checkpoints.checkpoint_step(ckpt)
        guard.lr_scale = broke.lr_scale
        guard.watch.restart(broke.restarted_from)
        try:
            more_seconds, more_peak = _fit(sft, ckpt, cuda)
        except Exception as e:  # the checkpoint is a good model: a failed resume must not lose it
            broke.restart_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning("resuming from %s failed (%s); saving it", ckpt.name, broke.restart_error)
            divergence.rewind(sft.model, ckpt, broke, cfg)
            break
        seconds += more_seconds
        peak = max(peak or 0.0, more_peak) if more_peak is not None else peak
    return seconds, peak, breaks


def _fit(sft: Any, resume_from: Path | None, cuda: bool) -> tuple[float, float | None]:
    """Run the Trainer; (seconds, peak GPU memory in GiB or None)."""
    import torch

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    sft.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - start
    return seconds, torch.cuda.max_memory_allocated() / 2**30 if cuda else None


def _result(
    sft: Any,
    model_dir: Path,
    backend: str,
    seconds: float,
    peak: float | None,
    resume_from: Path | None,
    stats: dict[str, Any],
    eval_loss: float | None,
) -> TrainResult:
    from ragtune.training.checkpoints import tokens_seen_at

    losses = [float(h["loss"]) for h in sft.state.log_history if "loss" in h]
    tokens = float(sft.state.num_input_tokens_seen or 0)
    if resume_from is not None:  # tokens/s of this session only
        tokens -= float(tokens_seen_at(resume_from))
    result = TrainResult(
        model_dir=model_dir,
        final_loss=losses[-1] if losses else None,
        losses=losses,
        steps=int(sft.state.global_step),
        backend=backend,
        seconds=seconds,
        tokens_per_second=tokens / seconds if seconds > 0 else 0.0,
        peak_memory_gb=peak,
        resumed_from=str(resume_from) if resume_from else None,
        dataset_stats=stats,
        eval_loss=eval_loss,
    )
    log.info(
        "trained %d steps in %.1f s (%.0f tokens/s), final loss %s",
        result.steps,
        seconds,
        result.tokens_per_second,
        f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a",
    )
    return result


def _choose_backend(cfg: Any, cuda: bool) -> str:
    """The backend for this machine; everything checkable without the model is checked here."""
    from ragtune.training.backends import select_backend
    from ragtune.training.distributed import check_fsdp, fsdp_options
    from ragtune.training.trainer import check_optim

    requested = str(cfg.train.backend)
    # FSDP is an hf-backend feature: auto picks hf then instead of single-GPU Unsloth
    backend = "hf" if fsdp_options(cfg) and requested == "auto" else select_backend(requested)
    check_fsdp(cfg, backend, cuda)
    check_optim(str(cfg.train.optim), cuda)
    if cfg.train.save_method == "merged_4bit" and backend != "unsloth":
        raise TrainError(
            "train.save_method=merged_4bit needs the unsloth backend on a CUDA GPU; "
            "use merged_16bit or lora here"
        )
    return backend


def _check_save_method(cfg: Any, backend: str, model_path: str) -> None:
    from ragtune.training.backends import is_prequantized

    if backend == "hf" and cfg.train.save_method == "merged_16bit" and is_prequantized(model_path):
        raise TrainError(
            f"model.name_or_path={cfg.model.name_or_path} is a pre-quantized (4-bit) checkpoint: "
            "the hf backend has no 16-bit weights to merge the LoRA into. Use "
            "train.backend=unsloth, train.save_method=lora, or the 16-bit base model"
        )


def _resume_point(cfg: Any, ckpt_dir: Path, is_main: bool, world: int) -> Path | None:
    """The checkpoint to continue from (rank 0 decides), or None to start fresh."""
    from ragtune.training.checkpoints import find_resume_checkpoint, has_checkpoints
    from ragtune.training.distributed import broadcast_path

    if not cfg.train.resume:
        if is_main and has_checkpoints(ckpt_dir):
            log.warning(
                "%s holds checkpoints from an earlier run; starting fresh "
                "(train.resume=true continues)",
                ckpt_dir,
            )
        return None
    found = broadcast_path(find_resume_checkpoint(ckpt_dir) if is_main else None, world)
    if found is None:
        log.info("train.resume=true but no complete checkpoint in %s: starting fresh", ckpt_dir)
    else:
        log.info("resuming from %s", found)
    return found


def _save(
    sft: Any,
    cfg: Any,
    tokenizer: Any,
    schema: Any,
    output_dir: Path,
    backend: str,
    model_path: str,
) -> Path:
    """Rank 0 writes the new model folder beside ``model/`` (FSDP weights gathered first);
    every rank waits. Returns the staged folder: :func:`run_sft` swaps it in after the
    manifest."""
    from ragtune.training.distributed import barrier, gather_fsdp_model
    from ragtune.training.saving import MODEL_DIR, save_model, staging_dir

    model_dir = output_dir / MODEL_DIR
    trained = sft.model
    if getattr(sft, "is_fsdp_enabled", False):
        trained = gather_fsdp_model(sft, cfg, model_path)  # every rank takes part
    if sft.is_world_process_zero():
        save_model(
            trained,
            tokenizer,
            schema,
            model_dir,
            save_method=str(cfg.train.save_method),
            backend=backend,
            base_model=str(cfg.model.name_or_path),
            base_path=model_path,
        )
    barrier(sft.args.world_size)
    return staging_dir(model_dir)
