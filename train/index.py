"""Corpus ingest: python train/index.py [data.corpus=DIR] [retriever=...] [conf=nemo_rag]

Brings the persistent Chroma index up to date with the corpus folder (incremental: unchanged
files embed nothing). Prints a summary; exit status 1 when files were skipped, 2 on a user
error (bad config, index locked by another writer, mismatching index settings).
"""

import hydra
from omegaconf import DictConfig

import ragtune.config  # noqa: F401  (registers the ${ragtune_root:} resolver)


@hydra.main(version_base="1.3", config_path="../conf", config_name="index")
def main(cfg: DictConfig) -> None:
    from ragtune.config import user_errors
    from ragtune.ingest import run_index

    user_errors(run_index)(cfg)


if __name__ == "__main__":
    main()
