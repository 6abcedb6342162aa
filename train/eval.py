"""Evaluation: python train/eval.py [eval.models.raft_rag=DIR] [eval.models.ft_closed=DIR] ...

Answers one QA set (JSONL or SQuAD v2 JSON, ``data.qa_eval``) on one index under the modes
base_rag, ft_closed, ft_then_rag and raft_rag; writes metrics.json, answers.jsonl and
results.md into the run folder. Returns raft_rag's overall score for sweepers.
Same as ``ragtune eval``.
"""

from ragtune.cli import run_command

if __name__ == "__main__":
    run_command("eval")
