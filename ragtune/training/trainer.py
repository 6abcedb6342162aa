"""The Trainer: ``SFTConfig`` from ``cfg.train`` and TRL's ``SFTTrainer`` with ragtune's two
loss-side changes.

``cfg.train`` keys named after SFTConfig arguments pass through unchanged (:data:`SFT_ARGS`);
only the fields computed from the run (precision, devices, padding, FSDP) are set here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ragtune.config import plain
from ragtune.training import TrainError
from ragtune.training.backends import trainer_checkpointing
from ragtune.training.distributed import fsdp_args
from ragtune.training.padding import completion_only_head, drop_redundant_mask

# cfg.train keys that are SFTConfig / TrainingArguments arguments of the same name
SFT_ARGS = (
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "warmup_steps",
    "lr_scheduler_type",
    "weight_decay",
    "optim",
    "max_grad_norm",
    "adam_beta2",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "packing",
    "train_sampling_strategy",
    "report_to",
)


def check_optim(optim: str, cuda: bool) -> None:
    """train.optim is handed to the Trainer; say what is wrong before the model loads."""
    from transformers.training_args import OptimizerNames

    if optim not in {o.value for o in OptimizerNames}:
        raise TrainError(
            f"train.optim={optim!r} is not an optimizer transformers knows (its OptimizerNames: "
            "adamw_torch_fused, adamw_torch, adamw_8bit, paged_adamw_8bit, adafactor, ...)"
        )
    if not cuda and ("bnb" in optim or "8bit" in optim or optim.startswith("paged_")):
        raise TrainError(
            f"train.optim={optim} keeps 8-bit / paged state (bitsandbytes or torchao) and needs "
            "a CUDA GPU; use adamw_torch_fused here"
        )


def sft_config(
    cfg: Any,
    checkpoints: Path,
    precision: dict[str, bool],
    cuda: bool,
    backend: str = "hf",
    padding_free: bool = False,
) -> Any:
    from trl import SFTConfig

    t = cfg.train
    passed = {k: plain(t[k]) for k in SFT_ARGS}
    fsdp = fsdp_args(cfg)
    gc = trainer_checkpointing(t, backend, fsdp=bool(fsdp))
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return SFTConfig(
        **passed,
        output_dir=str(checkpoints),
        seed=int(cfg.seed),
        data_seed=int(cfg.seed),
        save_strategy="steps",
        save_only_model=False,
        gradient_checkpointing=gc,
        bf16=bool(precision["bf16"]),
        fp16=bool(precision["fp16"]),
        use_cpu=not cuda,
        # padding-free rows are not cut by TRL; tokenize_examples already dropped longer ones
        max_length=None if padding_free and not t.packing else int(cfg.model.max_seq_length),
        packing_strategy="bfd",
        padding_free=padding_free,  # explicit: Unsloth's auto-choice applies only when unset
        completion_only_loss=True,
        include_num_input_tokens_seen="non_padding",
        # a NaN loss is logged as NaN (not replaced by the window's mean), so the divergence
        # guard (ragtune.training.divergence) and the user see a run that has broken
        logging_nan_inf_filter=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        # only when launched: naming a backend makes accelerate start a process group
        ddp_backend="gloo" if not cuda and launched else None,
        **fsdp,
    )


def trainer_class() -> type:
    """TRL's SFTTrainer, with a completion-only LM head where TRL's fused loss cannot run.

    TRL 1.15's SFT loss is a Triton kernel that needs a GPU; elsewhere the model's own loss is
    used with the LM head applied only where the next token is a completion token
    (:func:`completion_only_head`): the same cross-entropy without building logits over the
    long RAG prompt (~95% of the tokens).
    """
    from transformers import Trainer
    from trl import SFTTrainer
    from trl.trainer import utils as trl_utils

    class RagtuneSFTTrainer(SFTTrainer):
        # on for Unsloth only: TRL's fused loss (hf backend on a GPU) counts tokens from the mask
        drop_padding_mask = False

        def training_step(self, model, inputs, *args, **kwargs):  # noqa: ANN001
            if self.drop_padding_mask:
                inputs = drop_redundant_mask(inputs)
            return super().training_step(model, inputs, *args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
            device = inputs["input_ids"].device
            if trl_utils._ChunkedLogProbFunction is not None and device.type in ("cuda", "xpu"):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return Trainer.compute_loss(
                self, model, completion_only_head(inputs), return_outputs, num_items_in_batch
            )

    return RagtuneSFTTrainer


def log_tensorboard_into(trainer: Any, log_dir: Path) -> None:
    """``train.report_to=tensorboard`` logs into ``<run>/tensorboard`` rather than under the
    checkpoints (transformers' default); the TENSORBOARD_LOGGING_DIR variable still wins."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(log_dir)
