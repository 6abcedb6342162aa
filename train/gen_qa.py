"""QA generation: python train/gen_qa.py [data.corpus=DIR] [conf=nemo_rag] [gen_qa.KEY=VALUE ...]

A RAG-SFT QA set from the corpus alone: the configured local LM writes questions about sampled
chunks, filters keep the usable ones (answer supported by the chunk, round-trip retrieval, no
near-duplicates, length and language), and a share of verified unanswerable questions teaches
abstention. Prints one summary line; the QA file is usable as ``data.qa_train``.
Same as ``ragtune gen-qa``.
"""

from ragtune.cli import run_command

if __name__ == "__main__":
    run_command("gen-qa")
