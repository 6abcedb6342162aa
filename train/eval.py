"""Evaluation: python train/eval.py [eval.models.raft_rag=DIR] [eval.models.ft_closed=DIR] ...

Answers one QA set (JSONL or SQuAD v2 JSON, ``data.qa_eval``) on one index under the modes
base_rag, ft_closed, ft_then_rag and raft_rag; writes metrics.json, answers.jsonl and
results.md into the run folder. Returns raft_rag's overall score for sweepers.
"""

import hydra
from omegaconf import DictConfig

import ragtune.config  # noqa: F401  (registers the ${ragtune_root:} resolver)


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    from ragtune.config import user_errors
    from ragtune.evaluate import run_eval

    return user_errors(run_eval)(cfg)


if __name__ == "__main__":
    main()
