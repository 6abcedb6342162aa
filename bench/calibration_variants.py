"""Other answer-or-abstain mixes, fitted where the shipped one is and scored on the test split.

For each finished run: the held-out answers the decision was fitted on
(``<run>/calibration/answers.jsonl``, written by training) and the test answers of the
evaluation (``train/eval.py``'s ``answers.jsonl``, raft_rag rows). Every variant is a logistic
regression (``ragtune.answerability.fit_logistic``'s recipe: standardised features, L2) fitted
on the held-out answers, cut at the shipped expected-score threshold, and scored on the test
answers: AUROC and the SQuAD v2 overall. "shipped" is ``fit_calibration`` on its six
``FEATURES``, what training fitted by default until session 25, so for such a run its row is
what the evaluation reported; ``raft.calibration_features``' default is now the row "logit
p_abstain_first + retrieval". Nothing is re-run; CPU, seconds.

    python bench/calibration_variants.py CAL_ANSWERS EVAL_ANSWERS [CAL_ANSWERS EVAL_ANSWERS ...]

``--judge JUDGE.jsonl`` (once per pair, in order; bench/squad_judge.py's output for that run)
adds its yes/no judge scores: the shipped mix plus each one, all of them, and each alone.

``--by-source`` compares the mixes without any test answers: each run's held-out answers are
split by article, each article in turn scored by a mix fitted on the others (a run whose
held-out answers come from one article is skipped). Choosing between mixes this way never
looks at the test split. Rows written by training before 2026-12-04 lack their gold answers;
``--gold TRAIN.jsonl`` (once per file, in order: the split's training QA) supplies them.

    python bench/calibration_variants.py --by-source RUN/calibration/answers.jsonl [...]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import PolynomialFeatures

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench scripts' own helpers

from decision_features import features as row_features  # noqa: E402
from decision_features import read_rows  # noqa: E402

from ragtune.answerability import (  # noqa: E402
    FEATURES,
    combine,
    expected_score_threshold,
    fit_calibration,
)
from ragtune.metrics import aggregate, score_answer  # noqa: E402
from ragtune.qa import gold_answers, load_qa  # noqa: E402
from ragtune.roc import auroc  # noqa: E402


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


# Alternatives to the shipped mix (fitted by ``fit_calibration``), each a feature vector.
VARIANTS: dict[str, Callable[[dict], list[float]]] = {
    "logit p_abstain_first": lambda f: [
        _logit(f[k]) if k == "p_abstain_first" else f[k] for k in FEATURES
    ],
    "logit p_abstain_first + retrieval": lambda f: [_logit(f["p_abstain_first"]), f["retrieval"]],
    "shipped + lp_answer, n_answer": lambda f: [
        *[f[k] for k in FEATURES],
        f["lp_answer"],
        f["n_answer"],
    ],
}

# Non-linear mixes of the shipped features (the rest are logistic regressions, as shipped).
NONLINEAR: dict[str, Callable[[], object]] = {
    "shipped features, pairwise products": lambda: make_pipeline(
        PolynomialFeatures(2, include_bias=False), LogisticRegression(C=0.1, max_iter=5000)
    ),
    "shipped features, gradient boosting": lambda: HistGradientBoostingClassifier(
        max_depth=3, max_iter=100, learning_rate=0.05, random_state=0
    ),
}
VARIANTS |= {name: lambda f: [f[k] for k in FEATURES] for name in NONLINEAR}


# bench/squad_judge.py's scores (log-odds of "yes" for a yes/no question about the context)
JUDGES = ("judge_tuned", "judge_q_tuned", "judge_base", "judge_q_base", "judge_chat_base")


def _judge_variants(names: list[str]) -> dict[str, Callable[[dict], list[float]]]:
    out: dict[str, Callable[[dict], list[float]]] = {}
    for n in names:
        out[f"shipped + {n}"] = lambda f, n=n: [*[f[k] for k in FEATURES], f[n]]
    if len(names) > 1:
        out["shipped + every judge"] = lambda f: [*[f[k] for k in FEATURES], *[f[n] for n in names]]
    for n in names:
        out[f"{n} alone"] = lambda f, n=n: [f[n]]
    return out


def _add_judge(rows: list[dict], judge: Path, split: str) -> list[str]:
    """Put the judge's scores for ``split`` into each row's features; the names every row got."""
    scores = {}
    for line in judge.read_text().splitlines():
        j = json.loads(line)
        if j["split"] == split:
            scores[j["id"]] = j
    names = [n for n in JUDGES if all(n in scores.get(r["id"], {}) for r in rows)]
    for r in rows:
        r["features"] |= {n: scores[r["id"]][n] for n in names}
    return names


def _log_odds(clf: object, x: np.ndarray) -> np.ndarray:
    """The classifier's log-odds of "answerable" (what the shipped cut is on)."""
    p = np.clip(clf.predict_proba(x)[:, 1], 1e-9, 1 - 1e-9)
    return np.log(p / (1 - p))


def _overall(scores: np.ndarray, rows: list[dict], cut: float) -> float:
    """SQuAD v2 overall (ragtune.metrics) when each row answers its candidate at ``score >= cut``
    and abstains (the empty answer) below it."""
    finals = [r["candidate"] if s >= cut else "" for s, r in zip(scores, rows, strict=True)]
    return aggregate(
        [score_answer(a, r["gold"]) for a, r in zip(finals, rows, strict=True)]
    ).overall


def compare(
    cal_path: Path, eval_path: Path, l2: float = 1.0, judge: Path | None = None
) -> list[tuple[str, float, float]]:
    """(variant, test AUROC, test overall) for one run."""
    cal, test = read_rows(cal_path), read_rows(eval_path)
    variants = dict(VARIANTS)
    if judge is not None:
        names = sorted(
            set(_add_judge(cal, judge, "validation")) & set(_add_judge(test, judge, "test"))
        )
        variants |= _judge_variants([n for n in JUDGES if n in names])
    return compare_rows(cal, test, variants, l2)


def by_source(
    cal_path: Path, gold_path: Path | None = None, l2: float = 1.0
) -> list[tuple[str, str, float, float]]:
    """(held-out article, variant, AUROC, overall) for each article of one run's held-out
    answers, every mix fitted on the run's other articles."""
    rows = read_rows(cal_path)
    if gold_path is not None:
        gold = {q.id: list(gold_answers(q)) for q in load_qa(gold_path)}
        for r in rows:
            r["gold"] = gold[r["id"]] if r["answerable"] else []
    missing = [r["id"] for r in rows if "gold" not in r]
    if missing:
        raise SystemExit(f"{cal_path}: rows without 'gold' (e.g. {missing[0]}): pass --gold")
    sources = sorted({r["source"] for r in rows})
    out = []
    for held in sources if len(sources) > 1 else []:
        fit = [r for r in rows if r["source"] != held]
        test = [r for r in rows if r["source"] == held]
        for name, area, overall in compare_rows(fit, test, dict(VARIANTS), l2):
            out.append((held, name, area, overall))
    return out


def compare_rows(
    cal: list[dict], test: list[dict], variants: dict[str, Callable[[dict], list[float]]], l2: float
) -> list[tuple[str, float, float]]:
    """(variant, AUROC, overall) on ``test`` of each mix fitted on ``cal``."""
    y_cal = [bool(r["answerable"]) for r in cal]
    y_test = [bool(r["answerable"]) for r in test]
    cut = expected_score_threshold(y_cal, [r["candidate_f1"] for r in cal])
    shipped = fit_calibration(
        [row_features(r) for r in cal], y_cal, [r["candidate_f1"] for r in cal]
    )
    scores = np.array(combine([row_features(r) for r in test], shipped.weights, shipped.bias))
    out = [("shipped", auroc(list(scores), y_test), _overall(scores, test, cut))]
    for name, features in variants.items():
        x_cal = np.array([features(r["features"]) for r in cal], dtype=np.float64)
        x_test = np.array([features(r["features"]) for r in test], dtype=np.float64)
        mu, sd = x_cal.mean(axis=0), x_cal.std(axis=0)
        sd[sd == 0] = 1.0
        make = NONLINEAR.get(name, lambda: LogisticRegression(C=1.0 / l2, max_iter=2000))
        clf = make().fit((x_cal - mu) / sd, y_cal)
        scores = _log_odds(clf, (x_test - mu) / sd)
        out.append((name, auroc(list(scores), y_test), _overall(scores, test, cut)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", type=Path, nargs="+", help="CAL_ANSWERS EVAL_ANSWERS pairs")
    ap.add_argument("--judge", type=Path, action="append", help="one per pair, in order")
    ap.add_argument("--by-source", action="store_true", help="CAL_ANSWERS only, by article")
    ap.add_argument("--gold", type=Path, action="append", help="with --by-source: one per file")
    args = ap.parse_args()
    if args.by_source:
        if args.gold and len(args.gold) != len(args.paths):
            ap.error(f"--gold: give one per file ({len(args.paths)}), got {len(args.gold)}")
        _print_by_source(args.paths, args.gold or [None] * len(args.paths))
        return
    if len(args.paths) % 2:
        ap.error("give the paths in pairs: CAL_ANSWERS EVAL_ANSWERS")
    pairs = list(zip(args.paths[::2], args.paths[1::2], strict=True))
    if args.judge and len(args.judge) != len(pairs):
        ap.error(f"--judge: give one per pair ({len(pairs)}), got {len(args.judge)}")
    judges = args.judge or [None] * len(pairs)
    print("| run | variant | test AUROC | test overall |\n| --- | --- | ---: | ---: |")
    for (cal, ev), judge in zip(pairs, judges, strict=True):
        for name, area, overall in compare(cal, ev, judge=judge):
            print(f"| {ev.parent.name} | {name} | {area:.3f} | {overall:.1f} |")


def _print_by_source(paths: list[Path], golds: list[Path | None]) -> None:
    """Every fold's row, then each mix against the shipped one over all folds."""
    print(
        "| run | held-out article | variant | AUROC | overall |\n| --- | --- | --- | ---: | ---: |"
    )
    folds: dict[tuple[str, str], dict[str, tuple[float, float]]] = {}
    for path, gold in zip(paths, golds, strict=True):
        run = path.parent.parent.name if path.parent.name == "calibration" else path.parent.name
        for held, name, area, overall in by_source(path, gold):
            folds.setdefault((run, held), {})[name] = (area, overall)
            print(f"| {run} | {Path(held).stem} | {name} | {area:.3f} | {overall:.1f} |")
    if not folds:
        return
    print(
        f"\n| mean of {len(folds)} folds | variant | mean AUROC | vs shipped | better in | mean overall | vs shipped |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name in next(iter(folds.values())):
        d_auc = [f[name][0] - f["shipped"][0] for f in folds.values()]
        d_all = [f[name][1] - f["shipped"][1] for f in folds.values()]
        mean_auc = np.mean([f[name][0] for f in folds.values()])
        mean_all = np.mean([f[name][1] for f in folds.values()])
        print(
            f"| | {name} | {mean_auc:.3f} | {np.mean(d_auc):+.3f} | {sum(d > 0 for d in d_auc)} "
            f"| {mean_all:.1f} | {np.mean(d_all):+.2f} |"
        )


if __name__ == "__main__":
    main()
