"""Build and inspect the retrieval-augmented SFT set without training:
python train/build_data.py [any train/sft.py overrides]

Writes <run>/dataset/{train.jsonl, stats.json, preview.md}: the exact prompts the model
would be trained on, rendered by the one schema with contexts from the shared retriever.
"""

import hydra
from omegaconf import DictConfig

import ragtune.config  # noqa: F401  (registers the ${ragtune_root:} resolver)


@hydra.main(version_base="1.3", config_path="../conf", config_name="sft")
def main(cfg: DictConfig) -> None:
    from pathlib import Path

    from ragtune.config import user_errors, validate
    from ragtune.training.data import build_dataset
    from ragtune.training.recipe import SFT_TOP_LEVEL

    def run(cfg: DictConfig) -> None:
        validate(cfg, SFT_TOP_LEVEL)
        build_dataset(cfg, Path(cfg.output_dir))

    user_errors(run)(cfg)


if __name__ == "__main__":
    main()
