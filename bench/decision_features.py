"""The answer-or-abstain decision of a finished run, refitted on other feature sets, side by side.

Each feature set is fitted exactly as training fits ``raft.calibration_features``
(``ragtune.answerability.fit_calibration`` on the run's held-out answers,
``<run>/calibration/answers.jsonl``) and applied to the evaluation's raft_rag answers
(``<run>/answers.jsonl``): the SQuAD v2 overall, answerable F1, abstention on unanswerable
questions and AUROC with its bootstrap 95% interval, then AUROC per test article. Since the
features of both files are what the run's model computed, a set that training did not fit gives
the decision that training would have written with it: one training run compares two decisions
paired (session 34: the shipped pair against the rotated reading). Nothing is re-run; CPU, seconds.

    python bench/decision_features.py RUN [RUN ...] \
        --features abstain_logodds,retrieval abstain_logodds_rotated,retrieval
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ragtune.answerability import (  # noqa: E402
    AnswerFeatures,
    combine,
    fit_calibration,
    is_abstained,
)
from ragtune.metrics import aggregate, score_answer  # noqa: E402
from ragtune.roc import auroc, auroc_interval  # noqa: E402
from ragtune.schema import get_schema  # noqa: E402


def read_rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("mode", "raft_rag") == "raft_rag"]


def features(row: dict) -> AnswerFeatures:
    f = row["features"]
    return AnswerFeatures(**{k: f[k] for k in AnswerFeatures.__dataclass_fields__ if k in f})


def decide(cal: list[dict], test: list[dict], names: list[str], schema) -> dict:
    """The decision fitted on ``cal`` with ``names``, scored on ``test`` (as the pipeline
    decides: a candidate at or above the cut stands unless it is itself an abstention)."""
    y_cal = [bool(r["answerable"]) for r in cal]
    fitted = fit_calibration(
        [features(r) for r in cal], y_cal, [r["candidate_f1"] for r in cal], names=names
    )
    scores = combine([features(r) for r in test], fitted.weights, fitted.bias)
    finals = [
        r["candidate"] if s >= fitted.threshold and not is_abstained(schema, r["candidate"]) else ""
        for s, r in zip(scores, test, strict=True)
    ]
    agg = aggregate([score_answer(a, r["gold"]) for a, r in zip(finals, test, strict=True)])
    y = [bool(r["gold"]) for r in test]
    by_article = {}
    for source in sorted({r["source"] for r in test}):
        idx = [i for i, r in enumerate(test) if r["source"] == source]
        by_article[Path(source).stem] = auroc([scores[i] for i in idx], [y[i] for i in idx])
    return {
        "overall": agg.overall,
        "f1": agg.f1,
        "abstain_unans": agg.unanswerable_abstention_rate,
        "auroc": auroc(scores, y),
        "interval": auroc_interval(scores, y),
        "validation_auroc": fitted.auroc,
        "by_article": by_article,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "runs",
        type=Path,
        nargs="+",
        help="collected runs (bench/squad_product_gpu.sh): answers.jsonl, calibration/, "
        "raft_manifest.json",
    )
    ap.add_argument(
        "--features",
        nargs="+",
        default=["abstain_logodds,retrieval"],
        help="comma-separated feature sets (ragtune.answerability.CHOICES)",
    )
    args = ap.parse_args()
    print(
        "| run | features | overall | F1 | abst. % unans. | AUROC [95%] | validation AUROC "
        "| AUROC per test article |\n| --- | --- | ---: | ---: | ---: | --- | ---: | --- |"
    )
    for run in args.runs:
        cal = read_rows(run / "calibration" / "answers.jsonl")
        test = read_rows(run / "answers.jsonl")
        manifest = json.loads((run / "raft_manifest.json").read_text())
        schema = get_schema(manifest["prompt"]["name"])
        for spec in args.features:
            d = decide(cal, test, spec.split(","), schema)
            lo, hi = d["interval"] or (float("nan"), float("nan"))
            arts = ", ".join(f"{k} {v:.3f}" for k, v in d["by_article"].items())
            print(
                f"| {run.name} | {spec} | {d['overall']:.1f} | {d['f1']:.1f} "
                f"| {d['abstain_unans']:.1f} | {d['auroc']:.3f} [{lo:.3f}, {hi:.3f}] "
                f"| {d['validation_auroc']:.3f} | {arts} |"
            )


if __name__ == "__main__":
    main()
