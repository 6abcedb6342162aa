"""SQuAD v2 scoring with abstention, retrieval recall and latency.

Definitions follow the official SQuAD v2.0 evaluation script (``evaluate-v2.0.py``):

- **normalisation**: lower case, drop ``string.punctuation``, drop the articles a/an/the as
  whole words, collapse whitespace;
- **exact match**: normalised prediction == a normalised gold answer (max over golds);
- **token F1**: bag-of-tokens overlap of the normalised strings, max over gold answers;
  when either side has no tokens, F1 is 1 if both have none, else 0.

The official script scores an unanswerable question with gold ``""``, so a question counts as
*abstained* when the model's answer is the prompt schema's abstain answer
(``PromptSchema.is_abstention``) or normalises to nothing (the official empty prediction).
An abstained answer is scored as the empty prediction. Hence:

- answerable question: its F1 / EM against the gold answers (0 when it abstains);
- unanswerable question: 1 when it abstains, else 0 (for both F1 and EM);
- **overall** = mean of those per-question scores over ALL questions = the official v2 "f1".

All rates and scores are reported in percent (0-100), latency in seconds.
**Retrieval recall@k** (answerable questions only): a question is a hit when one of the k
retrieved chunks contains a gold answer (case-insensitive, whitespace-collapsed) and, when
the record names a source document, comes from that document.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from statistics import mean
from typing import Any

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD's normalisation: lower, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _tokens(s: str) -> list[str]:
    return normalize_answer(s).split() if s else []


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal (official ``compute_exact``)."""
    return float(normalize_answer(gold) == normalize_answer(prediction))


def f1_score(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalised strings (official ``compute_f1``)."""
    gold_toks, pred_toks = _tokens(gold), _tokens(prediction)
    if not gold_toks or not pred_toks:
        return float(gold_toks == pred_toks)
    same = sum((Counter(gold_toks) & Counter(pred_toks)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def gold_list(answers: Iterable[str]) -> list[str]:
    """Gold answers as the official script keeps them: those that normalise to something,
    else ``[""]`` (the unanswerable gold)."""
    kept = [a for a in answers if normalize_answer(a)]
    return kept or [""]


def max_over_gold(
    metric: Callable[[str, str], float], prediction: str, answers: Iterable[str]
) -> float:
    """The best score of a prediction over all gold answers."""
    return max(metric(prediction, g) for g in gold_list(answers))


@dataclass(frozen=True)
class QuestionScore:
    """How one answer scored; ``score`` is its contribution to ``overall`` (0-1)."""

    answerable: bool
    abstained: bool
    exact: float
    f1: float
    score: float
    retrieval_hit: bool | None = None  # None: no retrieval, or unanswerable
    latency_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def score_answer(
    prediction: str,
    answers: Sequence[str],
    is_abstention: Callable[[str], bool] | None = None,
    *,
    retrieval_hit: bool | None = None,
    latency_s: float | None = None,
) -> QuestionScore:
    """Score one prediction. ``answers`` empty (or all blank) = unanswerable question.

    ``is_abstention`` is the schema's detector; an answer that normalises to nothing also
    counts as abstaining, as in the official script.
    """
    golds = [a for a in answers if normalize_answer(a)]
    abstained = not normalize_answer(prediction) or bool(
        is_abstention and is_abstention(prediction)
    )
    pred = "" if abstained else prediction
    if golds:
        em = max_over_gold(exact_match, pred, golds)
        f1 = max_over_gold(f1_score, pred, golds)
        return QuestionScore(True, abstained, em, f1, f1, retrieval_hit, latency_s)
    ok = float(abstained)
    return QuestionScore(False, abstained, ok, ok, ok, None, latency_s)


def retrieval_hit(
    answers: Sequence[str],
    chunks: Iterable[Any],
    source: str | None = None,
) -> bool | None:
    """Whether retrieved chunks hold the oracle: a gold answer's text in a chunk of the
    record's source document (any document when the record names none).

    ``chunks`` are :class:`ragtune.types.Chunk` or dicts with ``text`` and ``source``.
    Returns None for unanswerable questions (no oracle to find).
    """
    golds = [_loose(a) for a in answers if _loose(a)]
    if not golds:
        return None
    for c in chunks:
        text = c["text"] if isinstance(c, dict) else c.text
        src = c.get("source") if isinstance(c, dict) else c.source
        if source and src != source:
            continue
        t = _loose(text)
        if any(g in t for g in golds):
            return True
    return False


def _loose(s: str) -> str:
    return " ".join(s.casefold().split())


@dataclass
class Aggregate:
    """Metrics of one mode over a question set (percentages 0-100, latency seconds)."""

    n: int
    n_answerable: int
    n_unanswerable: int
    exact_match: float  # over answerable questions
    f1: float  # over answerable questions
    false_abstention_rate: float  # answerable questions answered with an abstention
    unanswerable_abstention_rate: float  # unanswerable questions correctly abstained on
    overall: float  # mean per-question score over all questions (the official v2 F1)
    overall_exact: float  # the same with EM for answerable questions (official v2 "exact")
    abstention_rate: float  # all questions
    recall_at_k: float | None  # answerable questions whose oracle was retrieved; None: no retrieval
    latency_s: float | None  # mean seconds per question
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "extra"}
        return {**d, **self.extra}


def aggregate(scores: Sequence[QuestionScore]) -> Aggregate:
    """Combine per-question scores into the reported metrics (see the module docstring)."""

    def pct(xs: Sequence[float]) -> float:
        return round(100.0 * mean(xs), 2) if xs else 0.0

    ans = [s for s in scores if s.answerable]
    una = [s for s in scores if not s.answerable]
    hits = [float(s.retrieval_hit) for s in ans if s.retrieval_hit is not None]
    lat = [s.latency_s for s in scores if s.latency_s is not None]
    return Aggregate(
        n=len(scores),
        n_answerable=len(ans),
        n_unanswerable=len(una),
        exact_match=pct([s.exact for s in ans]),
        f1=pct([s.f1 for s in ans]),
        false_abstention_rate=pct([float(s.abstained) for s in ans]),
        unanswerable_abstention_rate=pct([float(s.abstained) for s in una]),
        overall=pct([s.score for s in scores]),
        overall_exact=pct([s.exact for s in scores]),
        abstention_rate=pct([float(s.abstained) for s in scores]),
        recall_at_k=pct(hits) if hits else None,
        latency_s=round(mean(lat), 4) if lat else None,
    )


# --------------------------------------------------------------------------- reporting
_COLUMNS = (
    ("overall", "overall"),
    ("f1", "F1 (ans.)"),
    ("exact_match", "EM (ans.)"),
    ("false_abstention_rate", "false abst. % (ans.)"),
    ("unanswerable_abstention_rate", "abst. % (unans.)"),
    ("recall_at_k", "recall@k"),
    ("abstention_auroc", "AUROC [95%]"),
    ("latency_s", "latency s"),
)

DEFINITIONS = (
    "Scores in percent. F1 / EM: SQuAD v2 normalisation (lower case, no punctuation, no "
    "articles), max over gold answers, over answerable questions. overall: mean over all "
    "questions of F1 (answerable) or 1/0 for abstaining or not (unanswerable), the official "
    "SQuAD v2 F1 with abstention as the empty answer. recall@k: answerable questions whose "
    "retrieved context holds a gold answer from the question's source document. AUROC: "
    "chance that an answerable question's answer score beats an unanswerable one's (the "
    "calibrated mix when the model has one, else the margin; n/a closed book), in brackets "
    "its bootstrap 95% interval (answerable and unanswerable questions resampled apart). latency: "
    "seconds per question (retrieval + its share of a batched greedy decode)."
)


def markdown_table(modes: dict[str, dict[str, Any]]) -> str:
    """One row per mode: overall, answerable F1/EM, abstention rates, recall@k, latency."""
    head = "| mode | " + " | ".join(label for _, label in _COLUMNS) + " |"
    sep = "| --- |" + " ---: |" * len(_COLUMNS)
    rows = [head, sep]
    for name, m in modes.items():
        cells = []
        for key, _ in _COLUMNS:
            v = m.get(key)
            fmt = ".3f" if key in ("latency_s", "abstention_auroc") else ".1f"
            cell = "n/a" if v is None else f"{v:{fmt}}"
            if key == "abstention_auroc" and v is not None and m.get("abstention_auroc_95"):
                lo, hi = m["abstention_auroc_95"]
                cell += f" [{lo:.3f}, {hi:.3f}]"  # how far this many questions pin it down
            cells.append(cell)
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def one_line_summary(m: dict[str, Any]) -> str:
    rec = m.get("recall_at_k")
    return (
        f"overall {m['overall']:.1f}, F1 {m['f1']:.1f}, EM {m['exact_match']:.1f}, "
        f"false abst. {m['false_abstention_rate']:.1f}%, "
        f"unans. abst. {m['unanswerable_abstention_rate']:.1f}%, "
        f"recall@k {'n/a' if rec is None else f'{rec:.1f}'}, {m['seconds']:.0f}s"
    )
