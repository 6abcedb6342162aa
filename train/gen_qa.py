"""QA generation: python train/gen_qa.py [data.corpus=DIR] [conf=nemo_rag] [gen_qa.KEY=VALUE ...]

A RAG-SFT QA set from the corpus alone: the configured local LM writes questions about sampled
chunks, filters keep the usable ones (answer supported by the chunk, round-trip retrieval, no
near-duplicates, length and language), and a share of verified unanswerable questions teaches
abstention. Prints one summary line; the QA file is usable as ``data.qa_train``.
"""

import os

# Sleeping OpenMP workers: spinning ones make CPU generation far slower on a shared machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import ragtune.config  # noqa: F401, E402  (registers the ${ragtune_root:} resolver)


@hydra.main(version_base="1.3", config_path="../conf", config_name="gen_qa")
def main(cfg: DictConfig) -> None:
    from ragtune.config import user_errors
    from ragtune.qa_gen_stage import run_gen_qa

    def run(cfg: DictConfig) -> None:
        result = run_gen_qa(cfg)
        print(result.summary)

    user_errors(run)(cfg)


if __name__ == "__main__":
    main()
