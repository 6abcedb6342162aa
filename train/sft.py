"""Retrieval-augmented SFT: python train/sft.py [conf=nemo_rag] [key=value ...]

Index the corpus, build RAFT-style examples with the shared retriever and prompt schema,
train the LoRA, merge, write the manifest. Returns the headline metric for sweepers.
"""

import os

# OpenMP threads sleep instead of spinning while they wait: spinning made CPU training steps
# several times slower whenever anything else ran on the machine (docs/benchmarks.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import ragtune.config  # noqa: F401, E402  (registers the ${ragtune_root:} resolver)


def _import_unsloth_first(backend: str) -> None:
    """Unsloth patches transformers when imported; importing it first halves 12B load time.

    Not with ``train.backend=hf``: that run must be plain transformers + PEFT + TRL, as on CPU.
    """
    import importlib.util

    if backend == "hf" or importlib.util.find_spec("unsloth") is None:
        return
    import torch

    if torch.cuda.is_available():
        import unsloth  # noqa: F401


@hydra.main(version_base="1.3", config_path="../conf", config_name="sft")
def main(cfg: DictConfig) -> float | None:
    _import_unsloth_first(str(cfg.train.get("backend", "auto")))
    from ragtune.config import user_errors
    from ragtune.sft import run_sft

    return user_errors(run_sft)(cfg)


if __name__ == "__main__":
    main()
