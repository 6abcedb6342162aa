"""Model loading per backend: ``hf`` (transformers + PEFT, bitsandbytes 4-bit on CUDA) runs
everywhere; ``unsloth`` (``FastLanguageModel``) is the fast path on CUDA; ``auto`` picks.

Weights are read from safetensors only; the model is resolved offline by the caller.
"""

from __future__ import annotations

import logging
from typing import Any

from ragtune.loading import unsloth_importable
from ragtune.training import TrainError
from ragtune.training.distributed import cuda_available

log = logging.getLogger(__name__)

# Unsloth's kernels patch these names; "all-linear" is expanded to them for the unsloth backend.
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def select_backend(requested: str) -> str:
    """``auto`` -> ``unsloth`` when CUDA is present and Unsloth imports, else ``hf``."""
    if requested == "hf":
        return "hf"
    if requested == "unsloth":
        if not cuda_available():
            raise TrainError(
                "train.backend=unsloth needs a CUDA GPU (Unsloth's kernels are CUDA-only) and "
                "none is visible; use train.backend=hf (or auto) on this machine"
            )
        if not unsloth_importable():
            raise TrainError(
                "train.backend=unsloth: the unsloth package does not import; install it with "
                "`pip install -e .[gpu]` or use train.backend=hf"
            )
        return "unsloth"
    if requested == "auto":
        return "unsloth" if cuda_available() and unsloth_importable() else "hf"
    raise TrainError(f"train.backend: must be auto, hf or unsloth, got {requested!r}")


def is_prequantized(model_path: str) -> bool:
    """A checkpoint saved in 4 bits (no 16-bit weights to merge a LoRA into)."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError):
        return False  # the model load itself will report it
    return bool(getattr(config, "quantization_config", None))


def unsloth_gc(value: Any) -> Any:
    """train.gradient_checkpointing -> Unsloth's flag: "unsloth" (offloaded), True or False."""
    if value == "unsloth":
        return "unsloth"
    return bool(value) and str(value).lower() not in ("false", "0")


def trainer_checkpointing(t: Any, backend: str, fsdp: bool = False) -> bool:
    """The Trainer's own ``gradient_checkpointing`` flag for SFT and the preference step alike.
    Unsloth applied its own checkpointing in get_peft_model, and under FSDP it is FSDP's
    activation checkpointing; on hf ``train.gradient_checkpointing`` ("unsloth" = on)."""
    return not (backend == "unsloth" or fsdp) and unsloth_gc(t.gradient_checkpointing) is not False


def lora_config(t: Any) -> Any:
    """``train.lora`` holds LoraConfig's own argument names; passed through as they are."""
    from omegaconf import OmegaConf
    from peft import LoraConfig

    lora = OmegaConf.to_container(t.lora, resolve=True) if not isinstance(t.lora, dict) else t.lora
    return LoraConfig(**lora, bias="none", task_type="CAUSAL_LM")


def load(cfg: Any, backend: str, model_path: str) -> tuple[Any, Any, dict[str, bool]]:
    """(LoRA model, tokenizer, {"bf16": ..., "fp16": ...}) for ``backend``."""
    if backend == "unsloth":
        model, tokenizer, precision = _load_unsloth(cfg, model_path)
    else:
        model, tokenizer, precision = _load_hf(cfg, model_path, cuda_available())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, precision


def _torch_dtype(name: str, cuda: bool) -> Any:
    import torch

    if name == "auto":
        if cuda:
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _cpu_has_bf16() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _quantization(compute: Any) -> Any:
    """QLoRA's NF4 with double quantization, through TRL's own helper."""
    import os

    from trl import ModelConfig, get_quantization_config

    args = ModelConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        use_bnb_nested_quant=True,
        dtype=str(compute).removeprefix("torch."),
    )
    # one whole model per process; TRL 1.15 has no get_kbit_device_map any more
    return get_quantization_config(args), {"": int(os.environ.get("LOCAL_RANK", 0))}


def _load_hf(cfg: Any, model_path: str, cuda: bool) -> tuple[Any, Any, dict[str, bool]]:
    """transformers + PEFT; bitsandbytes 4-bit on CUDA when model.load_in_4bit."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m, t = cfg.model, cfg.train
    trust = bool(m.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust)
    compute = _torch_dtype(str(m.dtype), cuda)
    kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": trust}
    quantized = bool(m.load_in_4bit) and cuda
    if quantized:
        kwargs["quantization_config"], kwargs["device_map"] = _quantization(compute)
        kwargs["dtype"] = compute
    else:
        if m.load_in_4bit:
            log.warning("model.load_in_4bit needs CUDA (bitsandbytes); loading unquantized on CPU")
        # CPU + bfloat16: fp32 master weights under bf16 autocast; pure bf16 weights would lose
        # small updates (docs/benchmarks.md, "SFT training on CPU")
        kwargs["dtype"] = compute if cuda else torch.float32
    precision = {"bf16": False, "fp16": False}
    if cuda and compute != torch.float32:
        precision["bf16" if compute == torch.bfloat16 else "fp16"] = True
    elif not cuda and compute == torch.bfloat16:
        precision["bf16"] = True
        if not _cpu_has_bf16():
            log.warning(
                "model.dtype=bfloat16 on a CPU without native bf16 (AVX-512 BF16 / AMX): bf16 "
                "matmuls are emulated and measured ~8x slower than float32 here; "
                "use model.dtype=float32"
            )
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=unsloth_gc(t.gradient_checkpointing) is not False
        )
    return get_peft_model(model, lora_config(t)), tokenizer, precision


def _load_unsloth(cfg: Any, model_path: str) -> tuple[Any, Any, dict[str, bool]]:
    """Unsloth's FastLanguageModel: 4-bit base, fused LoRA, its offloaded checkpointing."""
    import torch
    import unsloth  # noqa: F401  (must patch transformers/trl before they are used)
    from unsloth import FastLanguageModel

    m, t = cfg.model, cfg.train
    dtype = None if m.dtype == "auto" else _torch_dtype(str(m.dtype), True)
    gc = unsloth_gc(t.gradient_checkpointing)
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=model_path,
        max_seq_length=int(m.max_seq_length),
        dtype=dtype,
        load_in_4bit=bool(m.load_in_4bit),
        trust_remote_code=bool(m.trust_remote_code),
        use_gradient_checkpointing=gc,
        random_state=int(cfg.seed),
        use_safetensors=True,
    )
    lora = lora_config(t)
    targets = lora.target_modules
    if targets == "all-linear":
        targets = list(LLAMA_LINEAR)
    model = FastLanguageModel.get_peft_model(
        model,
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=sorted(targets) if isinstance(targets, set) else targets,
        bias="none",
        use_gradient_checkpointing=gc,
        random_state=int(cfg.seed),
        max_seq_length=int(m.max_seq_length),
    )
    compute = model.get_input_embeddings().weight.dtype
    bf16 = compute == torch.bfloat16 or (
        compute == torch.float32 and dtype is None and torch.cuda.is_bf16_supported()
    )
    fp16 = not bf16 and compute == torch.float16
    return model, tokenizer, {"bf16": bf16, "fp16": fp16}
