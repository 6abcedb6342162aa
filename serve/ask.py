"""Ask a trained model: python serve/ask.py [question] [model_dir=DIR] [json=true]

Rebuilds the prompt schema and retriever recorded in the model's manifest, retrieves,
answers (streamed) and prints whether it abstained and the sources (file, offset, score).
The question is taken verbatim (positional words, ``question=...`` or one per line on stdin);
with none and a terminal it opens an interactive prompt. model_dir=null asks the base model.
Same as ``ragtune ask``.
"""

from ragtune.cli import run_command

if __name__ == "__main__":
    run_command("ask")
