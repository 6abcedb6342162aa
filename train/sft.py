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

    return user_errors(_run)(cfg)


def _run(cfg: DictConfig) -> float:
    """status.json around the stage; in a sweep a failed run is recorded and scores NaN."""
    import logging
    import traceback
    from pathlib import Path

    from ragtune.sweep import is_multirun, write_status
    from ragtune.training import run_sft
    from ragtune.training.distributed import is_main_process

    main = is_main_process()
    if not main:
        logging.getLogger("ragtune").setLevel(logging.WARNING)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if main:
        write_status(out, "running")
    try:
        result = run_sft(cfg)
    except Exception as e:
        if main:
            trace = traceback.format_exc()
            write_status(out, "failed", error=f"{type(e).__name__}: {e}", trace=trace)
        if is_multirun():
            logging.getLogger("ragtune").error("run failed: %s: %s", type(e).__name__, e)
            return float("nan")
        raise
    if main:
        summary = {
            "model_dir": str(result.model_dir),
            "final_loss": result.final_loss,
            "metric": result.metric,
            "metrics": result.metrics or {},
            "dataset": result.dataset_stats,
        }
        write_status(out, "ok", **summary)
    return result.metric


if __name__ == "__main__":
    main()
