"""Checkpoints and resume: a checkpoint counts only once it is complete and loads.

The Trainer writes ``<run>/checkpoints/checkpoint-N`` every ``train.save_steps``; its saving
is not atomic, so each finished folder gets a marker listing its files, written *after* the
Trainer is done with it. ``train.resume=true`` continues from the newest checkpoint
(``transformers.trainer_utils.get_last_checkpoint``) that passes :func:`checkpoint_problem`;
newer damaged ones are removed.

Trust boundary: resuming reads the Trainer's own ``optimizer.pt`` / ``scheduler.pt`` /
``rng_state.pth`` with ``torch.load(weights_only=True)``; only resume from checkpoint folders
this run (or you) wrote.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from ragtune.training import TrainError

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "ragtune-complete.json"
CKPT_PREFIX = "checkpoint-"


def checkpoint_step(path: Path) -> int:
    """N of a `checkpoint-N` folder; -1 for any other name."""
    try:
        return int(path.name[len(CKPT_PREFIX) :])
    except ValueError:
        return -1


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint folder is not complete and loadable, or None when it is.

    Checks the completion marker, that the files it lists are there with the recorded sizes,
    that ``trainer_state.json`` parses, that the safetensors load, and that the Trainer's
    zip-format ``.pt`` files pass their CRC check (without unpickling anything).
    """
    marker = path / COMPLETE_MARKER
    if not marker.exists():
        return "no completion marker (the save was cut off)"
    try:
        info = json.loads(marker.read_text())
        for name, size in info["files"].items():
            f = path / name
            if not f.exists():
                return f"{name} is missing"
            if f.stat().st_size != size:
                return f"{name} has {f.stat().st_size} bytes, expected {size}"
        state = json.loads((path / "trainer_state.json").read_text())
        if int(state["global_step"]) != checkpoint_step(path):
            return "trainer_state.json global_step does not match the folder name"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable state ({e})"
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        return "no safetensors weights"
    from safetensors import safe_open

    for w in weights:
        try:
            with safe_open(str(w), framework="pt") as sf:
                for key in sf.keys():  # noqa: SIM118 - safe_open has no __iter__
                    sf.get_tensor(key)
        except Exception as e:
            return f"{w.name} does not load ({e})"
    for pt in [*path.glob("*.pt"), *path.glob("*.pth")]:
        try:
            with zipfile.ZipFile(pt) as z:
                bad = z.testzip()
            if bad is not None:
                return f"{pt.name}: corrupt member {bad}"
        except (zipfile.BadZipFile, OSError) as e:
            return f"{pt.name} is corrupt ({e})"
    return None


def find_resume_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest complete checkpoint; newer damaged ones are logged and removed.

    Removing them keeps the Trainer's rotation (which counts ``checkpoint-*`` folders) and the
    next save of the same step from mixing with half-written files.
    """
    from transformers.trainer_utils import get_last_checkpoint

    if not Path(checkpoints_dir).is_dir():
        return None
    while (last := get_last_checkpoint(str(checkpoints_dir))) is not None:
        ckpt = Path(last)
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        log.warning("skipping checkpoint %s: %s", ckpt, problem)
        try:
            shutil.rmtree(ckpt)
        except OSError as e:
            raise TrainError(f"{ckpt}: damaged checkpoint cannot be removed ({e})") from e
    return None


def find_resumable_run(run_dir: Path) -> Path:
    """The run folder ``train.resume=true`` continues: ``run_dir`` when it holds checkpoints,
    else the newest unfinished sibling run (same output root) with a complete checkpoint, so
    resuming needs no ``hydra.run.dir=``. Finished runs (``model/manifest.json``) are skipped;
    nothing is removed here. Falls back to ``run_dir`` (a fresh start)."""
    run_dir = Path(run_dir)
    if has_checkpoints(run_dir / CHECKPOINTS_DIR) or not run_dir.parent.is_dir():
        return run_dir
    siblings = [
        p
        for p in run_dir.parent.iterdir()
        if p != run_dir and p.is_dir() and has_checkpoints(p / CHECKPOINTS_DIR)
    ]
    siblings.sort(key=lambda p: (p / CHECKPOINTS_DIR).stat().st_mtime, reverse=True)
    for run in siblings:
        if (run / "model" / "manifest.json").exists():
            continue
        ckpts = sorted(
            (p for p in (run / CHECKPOINTS_DIR).glob(f"{CKPT_PREFIX}*") if checkpoint_step(p) >= 0),
            key=checkpoint_step,
            reverse=True,
        )
        if any(checkpoint_problem(c) is None for c in ckpts):
            return run
    return run_dir


def has_checkpoints(checkpoints_dir: Path) -> bool:
    return checkpoints_dir.is_dir() and any(checkpoints_dir.glob(f"{CKPT_PREFIX}*"))


def tokens_seen_at(ckpt: Path) -> int:
    """Input tokens the run had seen when ``ckpt`` was saved (for this session's tokens/s)."""
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        return int(state.get("num_input_tokens_seen", 0))
    except (OSError, ValueError):
        return 0


def write_marker(ckpt: Path) -> None:
    files = {
        str(p.relative_to(ckpt)): p.stat().st_size
        for p in sorted(ckpt.rglob("*"))
        if p.is_file() and p.name != COMPLETE_MARKER
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{COMPLETE_MARKER}-", dir=ckpt)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"files": files}, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt / COMPLETE_MARKER)


def callbacks(checkpoints: Path) -> list[Any]:
    """The completion marker after each save, and a log line at the very last step."""
    from transformers import TrainerCallback

    class MarkComplete(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
            if state.is_world_process_zero:
                ckpt = checkpoints / f"{CKPT_PREFIX}{state.global_step}"
                if ckpt.is_dir():
                    write_marker(ckpt)
            return control

    class LogLastStep(TrainerCallback):
        """So final_loss is the loss at the end of training, not at the last logging step."""

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if state.global_step >= state.max_steps:
                control.should_log = True
            return control

    return [MarkComplete(), LogLastStep()]
