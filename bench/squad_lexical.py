"""Answer-or-abstain study, offline: do cheap lexical features (ragtune.lexical) improve the
shipped logistic mix? CPU only, no model: the GPU study's per-question features and the
contexts its retriever returned.

    nice -n 10 python bench/squad_lexical.py AB_DIR [--runs r1/s0_contrast r2/s1_contrast ...]

AB_DIR holds ``gpu/<round>/<run>.jsonl`` (bench/squad_abstain_gpu.py rows: split val/test,
id, answerable, gold, candidate, the model's features) and ``pack/<seed>/eval_{val,test}.jsonl``
(bench/squad_abstain_prep.py: question, the context chunks ragtune's retriever returned for it,
the very contexts the GPU rows were scored on) and
``<seed>/corpus`` (for the IDF variant). For each run: the mix over ragtune.answerability's
FEATURES (before) and over FEATURES + the lexical features below (after; rarity by word
length, and by corpus IDF), fitted on the validation split, threshold by fit_threshold on
validation, applied to the test split: test AUROC and SQuAD v2 overall, same rows, same rule.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS  # noqa: E402

from ragtune.answerability import FEATURES, fit_logistic, fit_threshold  # noqa: E402
from ragtune.metrics import aggregate, f1_score, max_over_gold, score_answer  # noqa: E402
from ragtune.roc import auroc  # noqa: E402
from ragtune.schema import get_schema  # noqa: E402

# --------------------------------------------------------------------------- the features
# SQuAD v2's unanswerable questions often name an entity or term their paragraph lacks:
# q_missing / q_missing_rare: (rarity-weighted) share of the question's content words absent
# from the context; q_cover_best / q_cover_cand: rarity-weighted share of them in the best
# covering sentence / the sentence holding the candidate; q_pairs_*: share of neighbouring
# question-word pairs that stay neighbours (within 3 words) there. Rarity: word length beyond
# 3 characters (needs nothing at serve time), or corpus IDF.

LEXICAL_FEATURES = (
    "q_missing",
    "q_missing_rare",
    "q_cover_best",
    "q_cover_cand",
    "q_pairs_best",
    "q_pairs_cand",
)
_WORD = re.compile(r"\w+", re.UNICODE)
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
_QUESTION_WORDS = frozenset(
    {"what", "which", "who", "whom", "whose", "when", "where", "why", "how"}
)


def words(text: str) -> list[str]:
    """Lower-cased content words, a plural ``s`` dropped (no stop words, no 1-letter words)."""
    out = []
    for w in _WORD.findall(text.lower()):
        if len(w) < 2 or w in ENGLISH_STOP_WORDS or w in _QUESTION_WORDS:
            continue
        out.append(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w)
    return out


def lexical_features(
    question: str,
    contexts: Sequence[str] | None,
    candidate: str = "",
    idf: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """The features above for one question, its context chunks and its candidate answer."""
    q = list(dict.fromkeys(words(question)))
    if not q:
        return dict.fromkeys(LEXICAL_FEATURES, 0.0)
    weight = {w: _rarity(w, idf) for w in q}
    total = sum(weight.values()) or 1.0
    text = "\n".join(contexts or [])
    present = set(words(text))
    missing = [w for w in q if w not in present]
    seqs = [words(s) for s in _SENTENCE.split(text) if s.strip()]
    sentences = [set(s) for s in seqs]
    q_pairs = set(zip(q, q[1:], strict=False))

    def pairs(seq: list[str]) -> float:  # question word pairs that stay neighbours (within 3)
        if not q_pairs:
            return 0.0
        near = {(a, b) for i, a in enumerate(seq) for b in seq[i + 1 : i + 4]}
        near |= {(b, a) for a, b in near}
        return len(q_pairs & near) / len(q_pairs)

    def cover(sentence: set[str]) -> float:
        return sum(weight[w] for w in q if w in sentence) / total

    best = max((cover(s) for s in sentences), default=0.0)
    cand = cand_pairs = 0.0
    cand_words = set(words(candidate))
    if cand_words:
        holding = [i for i, s in enumerate(sentences) if cand_words <= s]
        cand = max((cover(sentences[i] - cand_words) for i in holding), default=0.0)
        cand_pairs = max((pairs(seqs[i]) for i in holding), default=0.0)
    return {
        "q_missing": len(missing) / len(q),
        "q_missing_rare": sum(weight[w] for w in missing) / total,
        "q_cover_best": best,
        "q_cover_cand": cand,
        "q_pairs_best": max((pairs(s) for s in seqs), default=0.0),
        "q_pairs_cand": cand_pairs,
    }


def _rarity(word: str, idf: Mapping[str, float] | None) -> float:
    if idf is not None:
        return float(idf.get(word, max(idf.values(), default=1.0)))
    return float(max(1, len(word) - 3))


# --------------------------------------------------------------------------- the study
RUNS = ("r1/s0_contrast", "r2/s1_contrast", "r2/s0_plain", "r2/s1_plain", "r1/s0_answer_only",
        "r2/s1_answer_only")  # fmt: skip


def corpus_idf(corpus: Path) -> dict[str, float]:
    """Smoothed IDF over the corpus paragraphs (blank-line separated)."""
    df: Counter[str] = Counter()
    n = 0
    for f in sorted(corpus.rglob("*.txt")):
        for para in f.read_text(encoding="utf-8").split("\n\n"):
            if para.strip():
                n += 1
                df.update(set(words(para)))
    return {w: math.log((1 + n) / (1 + c)) + 1.0 for w, c in df.items()}


def study(ab: Path, run: str) -> list[dict]:
    seed = run.split("/")[1].split("_")[0]
    rows = [json.loads(x) for x in (ab / "gpu" / f"{run}.jsonl").open()]
    rows = [r for r in rows if "info" not in r and r.get("mode") == "raft_rag"]
    packs = {}
    for split in ("val", "test"):
        for x in (ab / "pack" / seed / f"eval_{split}.jsonl").open():
            p = json.loads(x)
            packs[(split, p["id"])] = p
    idf = corpus_idf(ab / seed / "corpus")
    for r in rows:
        p = packs[(r["split"], r["id"])]
        for tag, table in (("len", None), ("idf", idf)):
            lex = lexical_features(p["question"], p["context"], r["candidate"], table)
            for k, v in lex.items():
                r[f"{k}_{tag}"] = v
    val = [r for r in rows if r["split"] == "val"]
    test = [r for r in rows if r["split"] == "test"]
    schema = get_schema("alpaca_rag_short")
    f1_val = [max_over_gold(f1_score, r["candidate"], r["gold"]) for r in val]
    y_val = [r["answerable"] for r in val]
    y_test = [r["answerable"] for r in test]
    out = []
    sets = {
        "before: FEATURES": FEATURES,
        "after: + lexical (length rarity)": (*FEATURES, *(f"{k}_len" for k in LEXICAL_FEATURES)),
        "after: + lexical (corpus IDF)": (*FEATURES, *(f"{k}_idf" for k in LEXICAL_FEATURES)),
        "lexical (length) + retrieval only": (
            "retrieval",
            *(f"{k}_len" for k in LEXICAL_FEATURES),
        ),
    }
    for label, names in sets.items():
        fv = [SimpleNamespace(**r) for r in val]
        ft = [SimpleNamespace(**r) for r in test]
        w, b = fit_logistic(fv, y_val, names)
        sv = [b + sum(w[n] * getattr(f, n) for n in names) for f in fv]
        st = [b + sum(w[n] * getattr(f, n) for n in names) for f in ft]
        cut = fit_threshold(sv, y_val, f1_val)
        ans = [
            r["candidate"] if s >= cut else schema.abstain for r, s in zip(test, st, strict=True)
        ]
        m = aggregate(
            [
                score_answer(a, r["gold"], schema.is_abstention)
                for r, a in zip(test, ans, strict=True)
            ]
        ).to_dict()
        out.append(
            {
                "run": run,
                "features": label,
                "val_auroc": round(auroc(sv, y_val), 3),
                "test_auroc": round(auroc(st, y_test), 3),
                "overall": m["overall"],
                "f1": m["f1"],
                "unans_abst": m["unanswerable_abstention_rate"],
                "false_abst": m["false_abstention_rate"],
            }
        )
    single = {
        k: round(auroc([r[f"{k}_len"] * (-1 if "missing" in k else 1) for r in test], y_test), 3)
        for k in LEXICAL_FEATURES
    }
    out.append({"run": run, "features": "single lexical (length) test AUROC", **single})
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ab_dir", type=Path)
    ap.add_argument("--runs", nargs="+", default=list(RUNS))
    args = ap.parse_args()
    print("| run | features | val AUROC | test AUROC | overall | F1 | abst. % (unans.) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for run in args.runs:
        for row in study(args.ab_dir, run):
            if "test_auroc" not in row:
                print(f"| {run} | {row['features']}: " + json.dumps(row) + " | | | | | |")
                continue
            print(
                f"| {run} | {row['features']} | {row['val_auroc']:.3f} | {row['test_auroc']:.3f}"
                f" | {row['overall']:.1f} | {row['f1']:.1f} | {row['unans_abst']:.1f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
