"""The trained model folder: LoRA adapter or merged weights, tokenizer, schema, train info.

The folder is written into a hidden temporary folder and renamed into place, so a crashed merge
never leaves ``<run>/model`` looking complete; the recipe writes ``manifest.json`` into it last.
Weights are always safetensors.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ragtune.modelcard import TRAIN_INFO
from ragtune.training import TrainError

log = logging.getLogger(__name__)

MODEL_DIR = "model"


def save_model(
    model: Any,
    tokenizer: Any,
    schema: Any,
    model_dir: Path,
    *,
    save_method: str,
    backend: str,
    base_model: str,
    base_path: str,
) -> Path:
    """Write the adapter or merged weights, tokenizer and schema; temp folder, then rename.

    A crash at any point leaves either the previous ``model_dir`` untouched or a hidden
    ``.tmp-model-*`` folder, never a ``model_dir`` that looks complete.
    """
    model_dir = Path(model_dir)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{model_dir.name}-", dir=model_dir.parent))
    try:
        if backend == "unsloth":
            save_unsloth(model, tokenizer, tmp, save_method)
        else:
            save_hf(model, tokenizer, tmp, save_method, base_path=base_path)
        tokenizer.save_pretrained(tmp)
        schema.save(tmp)
        info = {
            "base_model": base_model,
            "base_path": base_path,
            "backend": backend,
            "save_method": save_method,
        }
        (tmp / TRAIN_INFO).write_text(json.dumps(info, indent=2) + "\n")
        _fsync_tree(tmp)
        if model_dir.exists():
            old = model_dir.with_name(f".old-{model_dir.name}-{os.getpid()}")
            os.replace(model_dir, old)
            os.replace(tmp, model_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, model_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("saved %s model to %s", save_method, model_dir)
    return model_dir


def save_hf(model: Any, tokenizer: Any, out: Path, save_method: str, *, base_path: str) -> None:
    if save_method == "lora":
        model.save_pretrained(out, safe_serialization=True)
        return
    if save_method == "merged_4bit":
        raise TrainError(
            "train.save_method=merged_4bit needs the unsloth backend on a CUDA GPU; "
            "use merged_16bit or lora"
        )
    base = model.get_base_model()
    dtype = sixteen_bit_dtype(base_path)
    if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
        merged = _merge_onto_16bit_base(model, base_path, out, dtype)
    else:
        # in place: training is over, and a copy would double memory on large models; float32
        # (CPU) training is cast down after the merge, so the delta is added at full precision
        merged = model.merge_and_unload().to(dtype)
    merged.save_pretrained(out, safe_serialization=True)


def sixteen_bit_dtype(base_path: str) -> Any:
    """What ``merged_16bit`` writes: the base checkpoint's own dtype when it is 16-bit, else
    bfloat16 (float32 bases included: half the disk, and the range float32 weights have)."""
    import torch
    from transformers import AutoConfig

    try:
        dtype = getattr(AutoConfig.from_pretrained(base_path), "dtype", None)
    except (OSError, ValueError):
        dtype = None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def _merge_onto_16bit_base(model: Any, base_path: str, out: Path, dtype: Any) -> Any:
    """QLoRA: merge the adapter into the base reloaded in 16 bits (on CPU), not the 4-bit one;
    merging into bitsandbytes weights would round the result back to 4 bits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = out.parent / f".adapter-{out.name}"
    model.save_pretrained(adapter, safe_serialization=True)
    try:
        log.info("merging the QLoRA adapter into a %s copy of %s on CPU", dtype, base_path)
        base16 = AutoModelForCausalLM.from_pretrained(
            base_path, dtype=dtype, use_safetensors=True, device_map={"": "cpu"}
        )
        return PeftModel.from_pretrained(base16, str(adapter)).merge_and_unload()
    finally:
        shutil.rmtree(adapter, ignore_errors=True)


def save_unsloth(model: Any, tokenizer: Any, out: Path, save_method: str) -> None:
    if save_method == "lora":
        model.save_pretrained(str(out), safe_serialization=True)
        return
    method = "merged_4bit_forced" if save_method == "merged_4bit" else "merged_16bit"
    model.save_pretrained_merged(str(out), tokenizer, save_method=method, safe_serialization=True)


def point_latest(model_dir: Path, outputs: Path) -> None:
    """``outputs/latest`` -> the newest trained model, so ``serve/ask.py`` finds it."""
    outputs.mkdir(parents=True, exist_ok=True)
    link = outputs / "latest"
    tmp = outputs / f".latest-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(Path(model_dir).resolve())
    os.replace(tmp, link)
    log.info("%s -> %s", link, model_dir)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
