"""Build and inspect the retrieval-augmented SFT set without training:
python train/build_data.py [any train/sft.py overrides]

Writes <run>/dataset/{train.jsonl, stats.json, preview.md}: the exact prompts the model
would be trained on, rendered by the one schema with contexts from the shared retriever.
Same as ``ragtune build-data``.
"""

from ragtune.cli import run_command

if __name__ == "__main__":
    run_command("build-data")
