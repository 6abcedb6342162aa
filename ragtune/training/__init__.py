"""The training stage: the SFT recipe and the modules it is built from.

``recipe`` reads top to bottom (validate -> data -> load -> LoRA -> trainer -> save -> manifest);
its helpers live beside it: ``backends`` (hf, unsloth), ``data`` (examples and tokenization),
``trainer`` (SFTConfig and the SFTTrainer subclass), ``padding``, ``checkpoints``,
``distributed`` and ``saving``. Heavy libraries are imported inside functions, so
``import ragtune.training.saving`` (what serving uses to read a model folder) stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ragtune.errors import RagtuneError

if TYPE_CHECKING:
    from ragtune.training.recipe import SftResult, run_sft


class TrainError(RagtuneError):
    """Training cannot run as configured (backend, save method, data); the message says why."""


def __getattr__(name: str) -> Any:
    if name in ("run_sft", "SftResult", "TrainResult", "train"):
        from ragtune.training import recipe

        return getattr(recipe, name)
    raise AttributeError(name)


__all__ = ["SftResult", "TrainError", "run_sft"]
