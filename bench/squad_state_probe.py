"""Answer-or-abstain study: does a probe on the fine-tuned model's hidden states separate
"the context holds the answer" from "it does not" better than the shipped mix?

    python bench/squad_state_probe.py ROWS.jsonl...    # each beside its ROWS.states.npz

Reads bench/squad_abstain_gpu.py's rows and the hidden states it saved with ``--states``
(the prompt's last token and the candidate answer's last token, two layers). Per run, fitted on
the validation article(s) only and scored on the test articles (as the shipped decision is):
a logistic probe per (position, layer) (standardised, L2 chosen by 5-fold CV AUROC), the shipped mix
(ragtune.answerability.fit_logistic on its six features), and the mix plus the probe's
out-of-fold score as a seventh feature; test AUROC, and overall/F1/abstention with the
shipped expected-score cut (ragtune.answerability.expected_score_threshold).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ragtune.answerability import (  # noqa: E402
    FEATURES,
    combine,
    expected_score_threshold,
    fit_logistic,
)
from ragtune.metrics import aggregate, f1_score, max_over_gold, score_answer  # noqa: E402
from ragtune.roc import auroc  # noqa: E402
from ragtune.schema import get_schema  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from squad_abstain_report import feats  # noqa: E402

POSITIONS = ("prompt", "answer")


def probe(x_fit: np.ndarray, y_fit: np.ndarray):  # noqa: ANN201
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(
        StandardScaler(),
        LogisticRegressionCV(
            Cs=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 1e-1],
            cv=5,
            scoring="roc_auc",  # the L2 strength that separates best, not the most accurate
            l1_ratios=(0.0,),
            use_legacy_attributes=False,
            max_iter=3000,
        ),
    ).fit(x_fit, y_fit)


def decide(test: list[dict], scores: list[float], cut: float, schema) -> dict:  # noqa: ANN001
    answers = [
        r["candidate"] if s >= cut else schema.abstain for r, s in zip(test, scores, strict=True)
    ]
    return aggregate(
        [
            score_answer(a, r["gold"], schema.is_abstention)
            for r, a in zip(test, answers, strict=True)
        ]
    ).to_dict()


def main() -> int:
    from sklearn.model_selection import cross_val_predict

    ap = argparse.ArgumentParser()
    ap.add_argument("rows", nargs="+", type=Path)
    args = ap.parse_args()
    schema = get_schema("alpaca_rag_short")
    print(
        "| run | score | val AUROC (out of fold) | test AUROC | overall | F1 | abst. % (unans.) |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for path in args.rows:
        rows = [json.loads(x) for x in path.open()]
        rows = [r for r in rows if r.get("mode") == "raft_rag"]
        z = np.load(path.with_suffix(".states.npz"))
        sp = {}
        for split in ("val", "test"):
            by_id = {r["id"]: r for r in rows if r["split"] == split}
            sp[split] = [by_id[i] for i in z[f"{split}_ids"]]
        val, test = sp["val"], sp["test"]
        y_val = np.array([int(r["answerable"]) for r in val])
        y_test = np.array([int(r["answerable"]) for r in test])
        f1_val = [max_over_gold(f1_score, r["candidate"], r["gold"]) for r in val]
        cut = expected_score_threshold(y_val.tolist(), f1_val)
        fv, ft = [feats(r) for r in val], [feats(r) for r in test]
        w, b = fit_logistic(fv, y_val.tolist(), FEATURES)
        mix_v, mix_t = combine(fv, w, b), combine(ft, w, b)
        m = decide(test, mix_t, cut, schema)
        print(
            f"| {path.stem} | shipped mix | {auroc(mix_v, y_val):.3f} (in sample) | "
            f"{auroc(mix_t, y_test):.3f} | {m['overall']:.1f} | {m['f1']:.1f} | "
            f"{m['unanswerable_abstention_rate']:.1f} |"
        )
        x_mix_v = np.array([f.vector() for f in fv])
        x_mix_t = np.array([f.vector() for f in ft])
        for p, pos in enumerate(POSITIONS):
            for k, layer in enumerate(z["layers"]):
                hv = z["val"][p, k].astype(np.float32)
                ht = z["test"][p, k].astype(np.float32)
                clf = probe(hv, y_val)
                oof = cross_val_predict(
                    probe(hv, y_val), hv, y_val, cv=5, method="decision_function"
                )
                st = clf.decision_function(ht)
                # the probe as a seventh feature of the mix: out-of-fold on validation
                both = probe(np.c_[x_mix_v, oof], y_val)
                bv = cross_val_predict(
                    probe(np.c_[x_mix_v, oof], y_val),
                    np.c_[x_mix_v, oof],
                    y_val,
                    cv=5,
                    method="decision_function",
                )
                bt = both.decision_function(np.c_[x_mix_t, st])
                for label, sv, s_t in (
                    (f"probe {pos} layer {layer}", oof, st),
                    (f"mix + probe {pos} layer {layer}", bv, bt),
                ):
                    m = decide(test, list(s_t), cut, schema)
                    print(
                        f"| {path.stem} | {label} | {auroc(list(sv), y_val):.3f} | "
                        f"{auroc(list(s_t), y_test):.3f} | {m['overall']:.1f} | {m['f1']:.1f} | "
                        f"{m['unanswerable_abstention_rate']:.1f} |"
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
