"""How well a finished evaluation separates answerable from unanswerable questions, and what
that separation bounds. Reads ``train/eval.py``'s ``answers.jsonl`` (raft_rag rows); nothing is
re-run; CPU, seconds.

Columns: overall and F1 as evaluated; AUROC of the shipped score (``answerability``) with its
bootstrap 95% interval (answerable and unanswerable questions resampled apart, 2,000 times:
how far one split of 300 questions pins it down) and the AUROC of the ``margin`` feature
alone; AUROC over answerable questions whose retrieved context holds a gold answer only; the
candidates' F1 if every answerable question were answered; and the "best test cut": the
overall the same scores would reach with the threshold chosen on these test questions
themselves (a bound on what any threshold rule could add, not a result).

    python bench/squad_separation.py RUN/answers.jsonl [RUN/answers.jsonl ...]

With ``--squad FILE`` (the public SQuAD v2 JSON) a second table says where the decision went
wrong: the unanswerable questions it answered and how many of those answers are the
question's *plausible answer* (the span SQuAD v2's writers meant to tempt; F1 >= 0.5 counts),
and the answerable questions it abstained on, how many with a right candidate (F1 >= 0.5) and
how many with a gold answer in the retrieved context.

With ``--roc FILE`` each run's ROC curve (its ``answerability`` over answerable against
unanswerable questions, AUROC in the legend) goes into one picture.

Runs of the same split (the same test questions) are also summed up together, a row per split:
always-abstain's score there and the runs' overall and AUROC, mean and range. Reruns of one
split moved by up to 6.6 points overall (docs/benchmarks.md, "Session 26"), so a target a few
points away is judged on several runs, not one. Two more columns there say whether a split's
misses are one run's luck: the AUROC of each question's score averaged over the runs, and the
runs' mean pairwise correlation of scores (0.96 for two runs of seed 1, session 35: they miss
the same questions).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ragtune.metrics import score_answer  # noqa: E402
from ragtune.roc import auroc, auroc_interval, plot_roc  # noqa: E402


def _auroc(pos: list[float], neg: list[float]) -> float:
    return auroc([*pos, *neg], [1] * len(pos) + [0] * len(neg))


def _bracket(interval: tuple[float, float] | None) -> str:
    """The interval as printed; none when a class has fewer than two questions."""
    return "[n/a]" if interval is None else f"[{interval[0]:.3f}, {interval[1]:.3f}]"


def best_cut(rows: list[dict], candidate_f1: dict[str, float]) -> float:
    """The best overall over every threshold on ``answerability`` (answer at or above it)."""
    total = sum(not r["answerable"] for r in rows)  # abstain on everything
    best = total
    for r in sorted(rows, key=lambda r: -r["answerability"]):
        total += candidate_f1[r["id"]] if r["answerable"] else -1
        best = max(best, total)
    return best / len(rows)


def _rows(path: Path, mode: str) -> list[dict]:
    return [r for line in path.open() if (r := json.loads(line))["mode"] == mode]


def separation(path: Path, mode: str = "raft_rag") -> dict[str, float]:
    rows = _rows(path, mode)
    ans = [r for r in rows if r["answerable"]]
    unans = [r for r in rows if not r["answerable"]]
    cand = {r["id"]: score_answer(r["candidate"], r["gold"]).f1 for r in ans}
    hit = [r for r in ans if r["retrieval_hit"]]
    return {
        "overall": 100 * sum(r["score"] for r in rows) / len(rows),
        "f1": 100 * sum(r["f1"] for r in ans) / len(ans),
        "auroc": _auroc([r["answerability"] for r in ans], [r["answerability"] for r in unans]),
        "auroc_interval": auroc_interval(
            [r["answerability"] for r in rows], [r["answerable"] for r in rows]
        ),
        "auroc_margin": _auroc(
            [r["features"]["margin"] for r in ans], [r["features"]["margin"] for r in unans]
        ),
        "auroc_retrieved": _auroc(
            [r["answerability"] for r in hit], [r["answerability"] for r in unans]
        ),
        "candidate_f1": 100 * sum(cand.values()) / len(ans),
        "best_test_cut": 100 * best_cut(rows, cand),
    }


def plausible_answers(squad: Path) -> dict[str, list[str]]:
    """Question text -> its plausible answers, for the unanswerable questions of a SQuAD v2 file."""
    out = {}
    for article in json.loads(squad.read_text())["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                if qa.get("is_impossible"):
                    out[qa["question"].strip()] = [
                        a["text"] for a in qa.get("plausible_answers", [])
                    ]
    return out


def errors(path: Path, plausible: dict[str, list[str]], mode: str = "raft_rag") -> dict[str, int]:
    """Counts of the decision's two kinds of error, and what was behind them."""
    rows = _rows(path, mode)
    unans = [r for r in rows if not r["answerable"]]
    ans = [r for r in rows if r["answerable"]]

    def tempting(r: dict) -> bool:
        return score_answer(r["candidate"], plausible.get(r["question"].strip(), [])).f1 >= 0.5

    answered = [r for r in unans if not r["abstained"]]
    held = [r for r in ans if r["abstained"]]
    return {
        "unanswerable": len(unans),
        "answered": len(answered),
        "answered_plausible": sum(map(tempting, answered)),
        "candidates_plausible": sum(map(tempting, unans)),
        "answerable": len(ans),
        "abstained": len(held),
        "abstained_right": sum(score_answer(r["candidate"], r["gold"]).f1 >= 0.5 for r in held),
        "abstained_retrieved": sum(bool(r["retrieval_hit"]) for r in held),
    }


def by_split(stats: dict[Path, dict[str, float]], mode: str = "raft_rag") -> list[dict]:
    """The runs grouped by split (their set of test question ids), in the order first seen:
    the test articles, always-abstain's overall there, and each run's overall and AUROC.

    With reruns, two more figures say whether their misses are one training run's luck or the
    reader's: ``auroc_of_mean``, the AUROC of each question's score averaged over the runs (an
    ensemble of the trained models), and ``correlation``, the mean Pearson correlation of two
    runs' scores over the same questions. Runs that rank the questions alike (correlation near
    1) gain nothing from averaging: what they get wrong, every training run gets wrong."""
    groups: dict[frozenset[str], dict] = {}
    for path, s in stats.items():
        rows = _rows(path, mode)
        g = groups.setdefault(
            frozenset(r["id"] for r in rows),
            {
                "articles": sorted({Path(r["source"]).stem for r in rows}),
                "always_abstain": 100 * sum(not r["answerable"] for r in rows) / len(rows),
                "overall": [],
                "auroc": [],
                "labels": {r["id"]: r["answerable"] for r in rows},
                "scores": [],
            },
        )
        g["overall"].append(s["overall"])
        g["auroc"].append(s["auroc"])
        g["scores"].append({r["id"]: r["answerability"] for r in rows})
    for g in groups.values():
        ids = sorted(g.pop("labels").items())
        runs = [[scores[i] for i, _ in ids] for scores in g.pop("scores")]
        mean = [sum(col) / len(runs) for col in zip(*runs, strict=True)]
        g["auroc_of_mean"] = auroc(mean, [ans for _, ans in ids])
        # the mean Pearson correlation over pairs of runs (NaN for a single run)
        pairs = np.corrcoef(runs)[np.triu_indices(len(runs), k=1)] if len(runs) > 1 else []
        g["correlation"] = float(np.mean(pairs)) if len(pairs) else float("nan")
    return list(groups.values())


def _spread(values: list[float], fmt: str) -> str:
    mean = sum(values) / len(values)
    return f"{mean:{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("answers", nargs="+", type=Path)
    ap.add_argument("--mode", default="raft_rag")
    ap.add_argument("--squad", type=Path, help="the SQuAD v2 JSON: where the decision went wrong")
    ap.add_argument("--roc", type=Path, help="an image of every run's ROC curve")
    args = ap.parse_args(argv)
    print(
        "| run | overall | F1 | AUROC [95% bootstrap] | AUROC margin | AUROC retrieved "
        "| candidate F1 | best cut |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    stats = {path: separation(path, args.mode) for path in args.answers}
    for path, s in stats.items():
        print(
            f"| {path.parent.name} | {s['overall']:.1f} | {s['f1']:.1f} | {s['auroc']:.3f} "
            f"{_bracket(s['auroc_interval'])} | "
            f"{s['auroc_margin']:.3f} | {s['auroc_retrieved']:.3f} | {s['candidate_f1']:.1f} | "
            f"{s['best_test_cut']:.1f} |"
        )
    splits = by_split(stats, args.mode)
    if len(splits) < len(stats):  # some split has reruns
        print(
            "\n| test articles | runs | always-abstain | overall: mean (range) "
            "| AUROC: mean (range) | AUROC of the mean score | score correlation |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for g in splits:
            print(
                f"| {', '.join(g['articles'])} | {len(g['overall'])} | {g['always_abstain']:.1f} | "
                f"{_spread(g['overall'], '.1f')} | {_spread(g['auroc'], '.3f')} | "
                f"{g['auroc_of_mean']:.3f} | {g['correlation']:.2f} |"
            )
    if args.squad:
        plausible = plausible_answers(args.squad)
        print(
            "\n| run | unans. answered | of them the plausible answer | unans. candidates = plausible "
            "| ans. abstained | of them a right candidate | of them answer retrieved |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for path in args.answers:
            e = errors(path, plausible, args.mode)
            print(
                f"| {path.parent.name} | {e['answered']} of {e['unanswerable']} | "
                f"{e['answered_plausible']} | {e['candidates_plausible']} | {e['abstained']} of "
                f"{e['answerable']} | {e['abstained_right']} | {e['abstained_retrieved']} |"
            )
    if args.roc:
        curves = {}
        for path in args.answers:
            rows = _rows(path, args.mode)
            curves[path.parent.name] = (
                [r["answerability"] for r in rows],
                [r["answerable"] for r in rows],
            )
        plot_roc(curves, args.roc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
