"""Embedder fine-tuning: python train/embed_ft.py [data=...] [retriever=...] [embed_ft.KEY=...]

Tunes retriever.embedding_model on data.qa_train (hard negatives mined by our retriever over
data.corpus), keeps the checkpoint with the best validation recall on held-out sources, and
writes a sentence-transformers folder with manifest.json. Prints validation recall before and
after and the commands that use the folder. Exit status 2 on a user error.
Same as ``ragtune embed-ft``.
"""

from ragtune.cli import run_command

if __name__ == "__main__":
    run_command("embed-ft")
