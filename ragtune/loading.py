"""Load a trained model folder (merged or LoRA adapter) or a base model, for serving.

What serving calls. Weights are read from safetensors only (``use_safetensors=True``) and
``trust_remote_code`` stays false unless the caller asks: a model folder is data, not code.
A LoRA folder names its base (``ragtune_train.json`` written by training, else the manifest's
``base_model``, else PEFT's ``base_model_name_or_path``), which is resolved offline through
``ragtune.models.resolve_model``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ragtune.errors import RagtuneError
from ragtune.modelcard import read_json, train_info

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"


class LoadError(RagtuneError):
    """A model folder or name that cannot be loaded; the message names it."""


def unsloth_importable() -> bool:
    """Whether Unsloth imports here (it raises without CUDA, or when its kernels cannot load)."""
    try:
        import unsloth  # noqa: F401
    except Exception as e:  # NotImplementedError/ImportError without CUDA
        log.debug("unsloth not usable: %s", e)
        return False
    return True


def _base_of_adapter(folder: Path, info: dict[str, Any]) -> str:
    from ragtune.models import ModelNotFoundError, resolve_model

    names = [info.get("base_path"), info.get("base_model")]
    names.append(read_json(folder / ADAPTER_CONFIG).get("base_model_name_or_path"))
    errors = []
    for name in (n for n in names if n):
        try:
            return resolve_model(str(name))
        except ModelNotFoundError as e:
            errors.append(str(e))
    raise LoadError(
        f"{folder} is a LoRA adapter but its base model cannot be found"
        + (
            f": {'; '.join(errors)}"
            if errors
            else " (no base named in ragtune_train.json, manifest.json or adapter_config.json)"
        )
    )


def _device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LoadError(f"device={device!r} was asked for but no CUDA GPU is visible")
    return device


def _dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise LoadError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return table[dtype]


def load_model(
    path_or_name: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    for_inference: bool = True,
    trust_remote_code: bool = False,
    max_seq_length: int = 2048,
) -> tuple[Any, Any]:
    """(model, tokenizer) from a merged folder, a LoRA adapter folder or a base model name.

    With ``for_inference`` the model is put in eval mode and a LoRA adapter is merged into
    its base (faster generation). On CUDA, a folder trained with the unsloth backend is loaded
    with Unsloth's ``FastLanguageModel`` and ``for_inference`` when Unsloth imports.
    """
    from ragtune.models import ModelNotFoundError, resolve_model

    dev = _device(device)
    folder = Path(path_or_name).expanduser()
    if not folder.is_dir():
        try:
            resolved = resolve_model(path_or_name)
        except ModelNotFoundError as e:
            raise LoadError(str(e)) from None
        folder = Path(resolved)
    info = train_info(folder) if folder.is_dir() else {}
    is_adapter = folder.is_dir() and (folder / ADAPTER_CONFIG).exists()

    if dev.startswith("cuda") and info.get("backend") == "unsloth":
        if unsloth_importable():
            return _load_unsloth(folder, dtype, for_inference, trust_remote_code, max_seq_length)
        log.warning(
            "%s was trained with unsloth, which does not import here; using transformers", folder
        )

    from transformers import AutoModelForCausalLM

    torch_dtype = _dtype(dtype, dev)
    kwargs: dict[str, Any] = {
        "use_safetensors": True,
        "trust_remote_code": trust_remote_code,
        "dtype": torch_dtype,
    }
    quant = (
        read_json(folder / "config.json").get("quantization_config") if folder.is_dir() else None
    )
    if quant and not dev.startswith("cuda"):
        raise LoadError(
            f"{folder} holds {quant.get('quant_method', 'quantized')} weights, which need a CUDA "
            "GPU; train with train.save_method=merged_16bit or lora for CPU serving"
        )
    if dev.startswith("cuda"):
        kwargs["device_map"] = {"": dev}
    try:
        if is_adapter:
            from peft import PeftModel

            base_path = _base_of_adapter(folder, info)
            if not (folder / "adapter_model.safetensors").is_file():  # .bin would be a pickle
                raise LoadError(
                    f"{folder} has no adapter_model.safetensors; adapter_model.bin (pickle) "
                    "is never loaded: save the adapter as safetensors"
                )
            log.info("loading base %s for the LoRA adapter in %s", base_path, folder)
            base = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
            model = PeftModel.from_pretrained(base, str(folder), is_trainable=not for_inference)
            if for_inference:
                model = model.merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
        tokenizer = load_tokenizer(str(folder), trust_remote_code=trust_remote_code)
    except RagtuneError:
        raise
    except Exception as e:  # a damaged folder: one line naming it, never a library traceback
        raise LoadError(f"cannot load a model from {folder}: {_first_line(e)}") from None
    if not dev.startswith("cuda"):
        model = model.to(dev)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if for_inference:
        model.eval()
    return model, tokenizer


def load_tokenizer(folder: str, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a folder; a damaged one is a :class:`LoadError` naming it."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise LoadError(f"cannot load the tokenizer from {folder}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def _load_unsloth(
    folder: Path, dtype: str, for_inference: bool, trust_remote_code: bool, max_seq_length: int
) -> tuple[Any, Any]:
    import unsloth  # noqa: F401  (patches transformers before use)
    from unsloth import FastLanguageModel

    quant = read_json(folder / "config.json").get("quantization_config") or {}
    adapter_base = read_json(folder / ADAPTER_CONFIG).get("base_model_name_or_path", "")
    in_4bit = bool(quant.get("load_in_4bit")) or "bnb-4bit" in str(adapter_base)
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(folder),
        max_seq_length=max_seq_length,
        dtype=None if dtype == "auto" else _dtype(dtype, "cuda"),
        load_in_4bit=in_4bit,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
    )
    if for_inference:
        FastLanguageModel.for_inference(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
