"""Corpus ingest: python train/index.py [data.corpus=DIR] [retriever=...] [conf=nemo_rag]

Brings the persistent Chroma index up to date with the corpus folder (incremental: unchanged
files embed nothing). Prints a summary; exit status 1 when files were skipped, 2 on a user
error (bad config, index locked by another writer, mismatching index settings).
Same as ``ragtune index``.
"""

from ragtune.cli import run_command

if __name__ == "__main__":
    run_command("index")
