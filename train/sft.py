"""Retrieval-augmented SFT: python train/sft.py [conf=nemo_rag] [key=value ...]

Index the corpus, build RAFT-style examples with the shared retriever and prompt schema,
train the LoRA, merge, write the manifest. Returns the headline metric for sweepers.
Same as ``ragtune train``.
"""

from ragtune.cli import run_command

if __name__ == "__main__":
    run_command("train")
