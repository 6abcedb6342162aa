"""torchrun / accelerate launches: ranks, the process group, FSDP settings and gathering.

The Trainer runs DDP (gloo on CPU, NCCL on CUDA) or FSDP2 with ``train.fsdp``; only rank 0
writes checkpoint markers, the model folder and the manifest.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ragtune.training import TrainError

log = logging.getLogger(__name__)

DDP_TIMEOUT_S = 1800  # transformers' TrainingArguments.ddp_timeout default


def is_main_process() -> bool:
    """True on rank 0 of a torchrun / accelerate launch (and in a plain run)."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    """Processes in this torchrun / accelerate launch (1 in a plain run)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def init_distributed() -> bool:
    """Start the torch.distributed process group now if launched with WORLD_SIZE > 1.

    Needed before training (rank 0 builds the dataset, the others wait). Started the way
    accelerate's ``PartialState`` would: gloo on CPU, NCCL on CUDA with gloo beside it for CPU
    tensors (FSDP's full state dict); the Trainer then uses the group as is. Returns whether a
    group is running.
    """
    if world_size() <= 1:
        return False
    import torch.distributed as dist

    if dist.is_initialized():
        return True
    from datetime import timedelta

    if cuda_available():
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cuda:nccl,cpu:gloo"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=DDP_TIMEOUT_S))
    log.debug("process group %s: rank %d of %d", backend, dist.get_rank(), dist.get_world_size())
    return True


def broadcast_path(path: Path | None, world: int) -> Path | None:
    """Rank 0 decides (e.g. which checkpoint to resume from); every rank uses the same one."""
    if world <= 1:
        return path
    import torch.distributed as dist

    box = [str(path) if path else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0]) if box[0] else None


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()


# --------------------------------------------------------------------------- FSDP
def fsdp_options(cfg: Any) -> list[str]:
    """``train.fsdp`` as a list of options; empty means DDP (the default)."""
    return str(cfg.train.get("fsdp") or "").split()


def fsdp_args(cfg: Any) -> dict[str, Any]:
    """``train.fsdp`` -> ``fsdp`` / ``fsdp_config`` for TrainingArguments (``{}`` for DDP).

    transformers 5.17 deprecates the option string in favour of ``fsdp=True`` plus
    ``fsdp_config``, so the options become FSDP2 settings (per-parameter sharding mixes frozen
    base and trainable LoRA weights in one module): full_shard -> reshard_after_forward,
    shard_grad_op -> weights stay gathered until backward, offload -> cpu_offload, auto_wrap ->
    one unit per decoder layer. Gradient checkpointing becomes FSDP's activation checkpointing
    (transformers' own would all-gather the weights again in backward). Full state dicts are
    gathered for saving, so the saved model loads without torch.distributed.
    """
    from ragtune.training.backends import unsloth_gc

    opts = fsdp_options(cfg)
    if not opts:
        return {}
    config: dict[str, Any] = {
        "version": 2,
        "reshard_after_forward": "shard_grad_op" not in opts,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP" if "auto_wrap" in opts else "NO_WRAP",
        "cpu_offload": "offload" in opts,
        "state_dict_type": "FULL_STATE_DICT",
        "activation_checkpointing": unsloth_gc(cfg.train.gradient_checkpointing) is not False,
    }
    return {"fsdp": True, "fsdp_config": config}


def check_fsdp(cfg: Any, backend: str, cuda: bool) -> None:
    """Refuse FSDP combinations that cannot work, before any model loads."""
    if not fsdp_options(cfg):
        return
    if backend != "hf":
        raise TrainError(
            f"train.fsdp={cfg.train.fsdp!r} needs train.backend=hf (Unsloth trains on one GPU)"
        )
    if cuda and cfg.model.load_in_4bit:
        raise TrainError(
            f"train.fsdp={cfg.train.fsdp!r} with model.load_in_4bit=true: FSDP shards the 16-bit "
            "weights, and 4-bit (QLoRA) loading places the whole model on each GPU; set "
            "model.load_in_4bit=false (or train.fsdp='' for DDP with QLoRA)"
        )
    if cfg.train.save_method == "merged_4bit":
        raise TrainError("train.fsdp: save_method=merged_4bit needs unsloth; use merged_16bit")


def gather_fsdp_model(trainer: Any, cfg: Any, model_path: str) -> Any:
    """FSDP: gather the sharded weights into a plain CPU PEFT model on rank 0 (None elsewhere).

    Every rank must call this (the gather is a collective). Rank 0 rebuilds the base model with
    the same LoRA on CPU and loads the full state dict into it, so saving and merging run as
    without FSDP; rank 0 needs host memory for about two model copies.
    """
    state = trainer.accelerator.get_state_dict(trainer.model)
    if not trainer.is_world_process_zero():
        return None
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from ragtune.training.backends import lora_config

    dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    base = AutoModelForCausalLM.from_pretrained(
        model_path,
        dtype=dtype,
        use_safetensors=True,
        trust_remote_code=bool(cfg.model.trust_remote_code),
        device_map={"": "cpu"},
    )
    model = get_peft_model(base, lora_config(cfg.train))
    missing, unexpected = model.load_state_dict(state, strict=False)
    lost = [k for k in missing if "lora_" in k]
    if lost or unexpected:
        raise TrainError(
            f"FSDP gather did not match the LoRA model: {len(lost)} LoRA weights missing "
            f"(e.g. {lost[:2]}), {len(unexpected)} unexpected (e.g. {list(unexpected)[:2]})"
        )
    log.info("gathered the FSDP-sharded weights (%d tensors) on rank 0", len(state))
    return model
