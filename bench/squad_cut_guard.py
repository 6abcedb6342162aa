"""Would a cross-validation guard make the answer-or-abstain cut transfer to unseen articles?

    python bench/squad_cut_guard.py ROWS.jsonl...      # bench/squad_abstain_gpu.py's rows

For each run's raft_rag rows: the shipped rule (logistic mix + the cut maximising overall on
the validation split) scored on the test split, against the same rule guarded by 5-fold
cross-validation on the validation split (5 shuffles): abstain on everything unless the
out-of-fold gain over abstaining is positive. Measured, not adopted (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from squad_abstain_report import feats  # noqa: E402

from ragtune.answerability import FEATURES, combine, fit_logistic, fit_threshold  # noqa: E402
from ragtune.metrics import f1_score, max_over_gold  # noqa: E402


def overall(scores: list, ys: list, vals: list, cut: float) -> float:
    """Questions scored: an answered answerable one earns its F1, an abstained unanswerable 1."""
    tot = 0.0
    for s, y, v in zip(scores, ys, vals, strict=True):
        tot += (v if y else 0.0) if s >= cut else (0.0 if y else 1.0)
    return tot


def cv_gain(fv: list, y: list, vals: list, k: int = 5, reps: int = 5) -> float:
    """Out-of-fold gain (questions) of 'fit mix + cut on the other folds' over abstaining."""
    n, g = len(y), 0.0
    for rep in range(reps):
        idx = list(range(n))
        random.Random(rep).shuffle(idx)
        for f in range(k):
            held = sorted(idx[f::k])
            rest = [i for i in range(n) if i not in set(held)]
            w, b = fit_logistic([fv[i] for i in rest], [y[i] for i in rest], FEATURES)
            cut = fit_threshold(
                combine([fv[i] for i in rest], w, b), [y[i] for i in rest], [vals[i] for i in rest]
            )
            s_held = combine([fv[i] for i in held], w, b)
            got = overall(s_held, [y[i] for i in held], [vals[i] for i in held], cut)
            g += got - sum(1 for i in held if not y[i])
    return g / reps


def main() -> int:
    for path in sys.argv[1:]:
        rows = [json.loads(x) for x in Path(path).read_text().splitlines()]
        rows = [r for r in rows if "info" not in r and r["mode"] == "raft_rag"]
        if not rows:
            continue
        val = [r for r in rows if r["split"] == "val"]
        test = [r for r in rows if r["split"] == "test"]
        for r in val + test:
            r["candidate"] = r["candidate"].split("<|im_end|>")[0].strip()
        fv = [feats(r) for r in val]
        ft = [feats(r) for r in test]
        yv = [r["answerable"] for r in val]
        yt = [r["answerable"] for r in test]
        vv = [max_over_gold(f1_score, r["candidate"], r["gold"]) for r in val]
        vt = [max_over_gold(f1_score, r["candidate"], r["gold"]) for r in test]
        w, b = fit_logistic(fv, yv, FEATURES)
        sv, st = combine(fv, w, b), combine(ft, w, b)
        cut = fit_threshold(sv, yv, vv)
        n = len(test)
        abst = sum(1 for y in yt if not y)
        cur = overall(st, yt, vt, cut) / n * 100
        g = cv_gain(fv, yv, vv)
        guarded = cur if g > 0 else abst / n * 100
        print(
            f"{Path(path).stem:22s} val n={len(val)} cv gain={g:+6.1f} q | test: abstain-all {abst / n * 100:5.1f}  current {cur:5.1f}  guarded {guarded:5.1f}"
        )

    return 0


if __name__ == "__main__":
    sys.exit(main())
