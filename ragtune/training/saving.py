"""The trained model folder: LoRA adapter or merged weights, tokenizer, schema, train info.

The folder is written beside ``<run>/model`` (``.new-model``); the recipe evaluates it if asked,
writes ``manifest.json`` into it last and only then swaps it in, so neither a crashed save nor a
crash before the manifest ever leaves ``<run>/model`` incomplete or loses a finished model.
Weights are always safetensors.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from ragtune.manifest import MANIFEST
from ragtune.modelcard import TRAIN_INFO
from ragtune.training import TrainError

log = logging.getLogger(__name__)

MODEL_DIR = "model"


def staging_dir(model_dir: Path) -> Path:
    """Where a new model is written beside ``model_dir`` until its manifest is in it."""
    return Path(model_dir).with_name(f".new-{Path(model_dir).name}")


def _old_dir(model_dir: Path) -> Path:
    return Path(model_dir).with_name(f".old-{Path(model_dir).name}")


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
    """Write the adapter or merged weights, tokenizer and schema beside ``model_dir``.

    Returns the staging folder (:func:`staging_dir`); the caller writes ``manifest.json``
    into it and then :func:`publish_model` swaps it in. A complete model already in
    ``model_dir`` (resuming into a finished run) stays untouched until then, so a crash in
    between (saving, ``train.eval_after``) never loses it.
    """
    model_dir = Path(model_dir)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    recover_model(model_dir)
    tmp = staging_dir(model_dir)
    if tmp.exists():  # a crashed earlier save: never complete (no manifest reached model_dir)
        shutil.rmtree(tmp)
    tmp.mkdir()
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved %s model to %s", save_method, tmp)
    return tmp


def publish_model(staged: Path, model_dir: Path) -> Path:
    """Swap a staged model folder (manifest written) into ``model_dir``; the old one goes.

    Two renames: a crash between them leaves both complete folders beside ``model_dir``, and
    :func:`recover_model` (run by the next save or resume) puts the newest one back.
    """
    staged, model_dir = Path(staged), Path(model_dir)
    if staged == model_dir:
        return model_dir
    if not (staged / MANIFEST).exists():
        raise TrainError(f"{staged} has no {MANIFEST}: write it before publishing the model")
    old = _old_dir(model_dir)
    if old.exists():
        shutil.rmtree(old)
    if model_dir.exists():
        os.replace(model_dir, old)
    os.replace(staged, model_dir)
    _fsync_dir(model_dir.parent)
    shutil.rmtree(old, ignore_errors=True)
    log.info("model folder %s is complete", model_dir)
    return model_dir


def recover_model(model_dir: Path) -> None:
    """After a crash: put a complete model back into a missing ``model_dir`` (the staged one
    when its manifest was written, else the previous one), and remove empty leftovers."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        for cand in (staging_dir(model_dir), _old_dir(model_dir)):
            if (cand / MANIFEST).exists():
                os.replace(cand, model_dir)
                log.warning("recovered the complete model folder %s from %s", model_dir, cand)
                break
    if model_dir.parent.is_dir():  # hidden temp folders of earlier versions and crashes
        for p in model_dir.parent.glob(f".tmp-{model_dir.name}-*"):
            shutil.rmtree(p, ignore_errors=True)


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
