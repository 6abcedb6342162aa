"""Embedder fine-tuning: python train/embed_ft.py [data=...] [retriever=...] [embed_ft.KEY=...]

Tunes retriever.embedding_model on data.qa_train (hard negatives mined by our retriever over
data.corpus), keeps the checkpoint with the best validation recall on held-out sources, and
writes a sentence-transformers folder with manifest.json. Prints validation recall before and
after and the commands that use the folder. Exit status 2 on a user error.
"""

import hydra
from omegaconf import DictConfig

import ragtune.config  # noqa: F401  (registers the ${ragtune_root:} resolver)


@hydra.main(version_base="1.3", config_path="../conf", config_name="embed_ft")
def main(cfg: DictConfig) -> None:
    from ragtune.config import user_errors
    from ragtune.training.embedder import run_embed_ft

    result = user_errors(run_embed_ft)(cfg)
    print(f"validation before: {result.recall_before}")
    print(f"validation after:  {result.recall_after}")
    print(f"tuned embedder: {result.path}  ({result.n_train} rows, {result.seconds:.0f} s)")
    print("next: re-index, build the RAFT set and train the LM with it:")
    print(f"  python train/index.py retriever.embedding_model={result.path}")
    print(f"  python train/sft.py retriever.embedding_model={result.path}")


if __name__ == "__main__":
    main()
