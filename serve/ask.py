"""Ask a trained model: python serve/ask.py [model_dir=DIR] [question="..."] [json=true]

Rebuilds the prompt schema and retriever recorded in the model's manifest, retrieves,
answers (streamed) and prints whether it abstained and the sources (file, offset, score).
With no question it opens an interactive prompt; model_dir=null asks the base model.
"""

import os

# OpenMP threads that sleep instead of spinning while they wait: on a CPU shared with other
# work, spinning made decoding ~10x slower (docs/benchmarks.md). Set it to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import ragtune.config  # noqa: F401, E402  (registers the ${ragtune_root:} resolver)


@hydra.main(version_base="1.3", config_path="../conf", config_name="ask")
def main(cfg: DictConfig) -> None:
    from ragtune.config import user_errors
    from ragtune.rag import run_ask

    user_errors(run_ask)(cfg)


if __name__ == "__main__":
    main()
