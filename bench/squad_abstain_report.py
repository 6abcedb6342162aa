"""Answer-or-abstain study, report: score bench/squad_abstain_gpu.py's rows.

    python bench/squad_abstain_report.py ROWS.jsonl... [--md OUT.md] [--plot OUT.png]

Per variant and mode: the greedy answers scored as train/eval.py scores them, the AUROC of
every answerability feature on the test split, and for each candidate score the threshold
fitted on the validation split (ragtune.answerability.fit_threshold, the best cut there)
applied to the test split: answer the candidate when its score >= the threshold, else
abstain; ``lr_all@expected`` is the shipped decision (the logistic mix cut where answering is
worth abstaining in expectation, ragtune.answerability.expected_score_threshold).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ragtune.answerability import (  # noqa: E402
    FEATURES,
    AnswerFeatures,
    combine,
    expected_score_threshold,
    fit_logistic,
    fit_threshold,
)
from ragtune.metrics import aggregate, f1_score, max_over_gold, score_answer  # noqa: E402
from ragtune.roc import auroc  # noqa: E402
from ragtune.schema import get_schema  # noqa: E402

SIGN = {"lp_abstain": -1.0, "p_abstain_first": -1.0}  # higher = answer
SINGLE = ("margin", "mean_lp", "lp_abstain", "p_abstain_first")


def feats(r: dict) -> AnswerFeatures:
    return AnswerFeatures(
        r["lp_answer"],
        r["n_answer"],
        r["lp_abstain"],
        r["p_abstain_first"],
        r["grounded"],
        r["retrieval"],
    )


def metrics(rows: list[dict], answers: list[str], is_abst) -> dict:  # noqa: ANN001
    return aggregate(
        [score_answer(a, r["gold"], is_abst) for r, a in zip(rows, answers, strict=True)]
    ).to_dict()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("rows", nargs="+", type=Path)
    ap.add_argument("--md", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    schema = get_schema("alpaca_rag_short")
    groups: dict[tuple, dict[str, list]] = defaultdict(lambda: {"val": [], "test": []})
    infos = {}
    for path in args.rows:
        tag = path.stem
        for line in path.open():
            r = json.loads(line)
            if "info" in r:
                infos[tag] = r["info"]
                continue
            groups[(tag, r["mode"])][r["split"]].append(r)
    results, lines, curves = [], [], {}
    head = (
        "| run | mode | decision | overall | F1 | EM | false abst. % | abst. % (unans.) | AUROC |"
    )
    lines += [head, "| --- | --- | --- |" + " ---: |" * 6]
    for (tag, mode), sp in sorted(groups.items()):
        val, test = sp["val"], sp["test"]
        y_val = [r["answerable"] for r in val]
        y_test = [r["answerable"] for r in test]
        g = metrics(test, [r["greedy"] for r in test], schema.is_abstention)
        g_abst = [schema.is_abstention(r["greedy"]) or not r["greedy"].strip() for r in test]
        rows = [("greedy", g, auroc([0.0 if a else 1.0 for a in g_abst], y_test))]
        f1_val = [max_over_gold(f1_score, r["candidate"], r["gold"]) for r in val]
        scores = {}
        for name in SINGLE:
            s = SIGN.get(name, 1.0)
            scores[name] = (
                [s * r[name] for r in val],
                [s * r[name] for r in test],
            )
        fv, ft = [feats(r) for r in val], [feats(r) for r in test]
        for label, names in (
            ("lr_model", ("margin", "mean_lp", "lp_abstain", "p_abstain_first")),
            ("lr_all", FEATURES),
        ):
            w, b = fit_logistic(fv, y_val, names)
            scores[label] = (combine(fv, w, b), combine(ft, w, b))
        abst_val = [schema.is_abstention(r["greedy"]) for r in val]
        abst_test = [schema.is_abstention(r["greedy"]) for r in test]
        for name, (sv, st) in scores.items():
            cut = fit_threshold(sv, y_val, f1_val)
            ans = [
                r["candidate"] if s >= cut else schema.abstain
                for r, s in zip(test, st, strict=True)
            ]
            m = metrics(test, ans, schema.is_abstention)
            a = auroc(st, y_test)
            m["threshold"] = cut
            rows.append((f"{name}@val", m, a))
            curves[(tag, mode, name)] = (st, y_test)
            if name == "lr_all":  # the shipped cut: where answering is worth abstaining
                cut = expected_score_threshold(y_val, f1_val)
                ans = [
                    r["candidate"] if s >= cut else schema.abstain
                    for r, s in zip(test, st, strict=True)
                ]
                m = metrics(test, ans, schema.is_abstention)
                m["threshold"] = cut
                rows.append(("lr_all@expected", m, a))
            if name not in ("margin", "lr_all"):
                continue
            # gate: the greedy answer stands unless the score says abstain (no re-decoding)
            gv = [-1e9 if ab else x for x, ab in zip(sv, abst_val, strict=True)]
            gt = [-1e9 if ab else x for x, ab in zip(st, abst_test, strict=True)]
            cut = fit_threshold(gv, y_val, f1_val)
            ans = [
                r["greedy"] if x >= cut else schema.abstain for r, x in zip(test, gt, strict=True)
            ]
            m = metrics(test, ans, schema.is_abstention)
            m["threshold"] = cut
            rows.append((f"gate_{name}@val", m, auroc(gt, y_test)))
        for label, m, a in rows:
            lines.append(
                f"| {tag} | {mode} | {label} | {m['overall']:.1f} | {m['f1']:.1f} | "
                f"{m['exact_match']:.1f} | {m['false_abstention_rate']:.1f} | "
                f"{m['unanswerable_abstention_rate']:.1f} | {a:.3f} |"
            )
            results.append({"run": tag, "mode": mode, "decision": label, "auroc": a, **m})
        hit_vs_unans = auroc(
            [r["p_abstain_first"] * -1 for r in test if not r["answerable"] or r["hit"]],
            [r["answerable"] for r in test if not r["answerable"] or r["hit"]],
        )
        hit_vs_miss = auroc(
            [r["p_abstain_first"] * -1 for r in test if r["answerable"]],
            [bool(r["hit"]) for r in test if r["answerable"]],
        )
        lines.append(
            f"|  | {mode} | -p_abstain_first AUROC (test): answerable with the oracle retrieved vs "
            f"unanswerable {hit_vs_unans:.3f}; answerable with vs without the oracle retrieved "
            f"{hit_vs_miss:.3f} | | | | | | |"
        )
        aucs = {
            n: round(auroc([SIGN.get(n, 1.0) * r[n] for r in test], y_test), 3)
            for n in (*SINGLE, "grounded", "retrieval")
        }
        hits = [r for r in test if r["answerable"] and r["hit"]]
        # the answers without the decision: candidate F1 over the answerable test questions,
        # and the overall a perfect answer-or-abstain decision would reach with them
        cand = [max_over_gold(f1_score, r["candidate"], r["gold"]) for r in test if r["answerable"]]
        ceiling = (sum(cand) + sum(1 for r in test if not r["answerable"])) / max(1, len(test))
        lines.append(
            f"|  | {mode} | feature AUROC (test) {aucs}; n_val={len(val)} "
            f"n_test={len(test)} answerable-with-hit={len(hits)}; candidate F1 (answerable) "
            f"{100 * sum(cand) / max(1, len(cand)):.1f}, perfect-decision overall "
            f"{100 * ceiling:.1f} | | | | | | |"
        )
    text = "\n".join(lines)
    text += "\n\n" + "\n".join(f"- {k}: {json.dumps(v)}" for k, v in sorted(infos.items()))
    print(text)
    if args.md:
        args.md.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.plot and curves:
        from ragtune.roc import plot_roc

        plot_roc(
            {f"{t} {m} {n}": c for (t, m, n), c in curves.items() if n in ("margin", "lr_all")},
            args.plot,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
