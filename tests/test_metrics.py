"""Metrics against hand-checked cases of the official SQuAD v2.0 evaluation script's definitions.

Each expected number below was worked out by hand from ``evaluate-v2.0.py``:
normalize_answer = white_space_fix(remove_articles(remove_punc(lower(s)))),
compute_f1 = token-bag F1 (1 if both token lists are empty, 0 if only one is),
per-question score = max over gold answers, gold "" for unanswerable questions.
"""

from __future__ import annotations

import pytest

from ragtune.metrics import (
    aggregate,
    exact_match,
    f1_score,
    max_over_gold,
    normalize_answer,
    retrieval_hit,
    score_answer,
)
from ragtune.types import Chunk


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("The  Quick, brown fox!", "quick brown fox"),
        ("An apple a day", "apple day"),
        ("theory of the THEATRE", "theory of theatre"),  # articles only as whole words
        ("1,000 well-known (U.S.) men", "1000 wellknown us men"),  # punctuation just vanishes
        ("  \tA\n", ""),
        ("Denmark, Iceland and Norway", "denmark iceland and norway"),
    ],
)
def test_normalize_answer(raw: str, norm: str) -> None:
    assert normalize_answer(raw) == norm


def test_exact_match_and_f1_single_gold() -> None:
    assert exact_match("the Normans.", "Normans") == 1.0
    assert exact_match("Normans people", "Normans") == 0.0
    # pred [cat, sat] vs gold [cat, sat, on, mat]: p = 1, r = 1/2 -> 2/3
    assert f1_score("the cat sat", "a cat sat on the mat") == pytest.approx(2 / 3)
    # repeated tokens count once per gold occurrence: [cat]x3 vs [cat]: p = 1/3, r = 1 -> 1/2
    assert f1_score("cat cat cat", "cat") == pytest.approx(0.5)
    # [cat, cat, dog] vs [cat, cat]: both cats shared, p = 2/3, r = 1 -> 4/5
    assert f1_score("cat cat dog", "cat cat") == pytest.approx(0.8)
    assert f1_score("dog", "cat") == 0.0
    # empty on either side: 1 only when both are empty
    assert f1_score("", "") == 1.0
    assert f1_score("the", "") == 1.0  # "the" normalises to nothing
    assert f1_score("France", "") == 0.0
    assert f1_score("", "France") == 0.0


def test_max_over_gold_answers() -> None:
    golds = ["10th and 11th centuries", "in the 10th and 11th centuries"]
    # [10th, century] vs [10th, and, 11th, centuries]: 1 shared, p=1/2 r=1/4 -> 1/3
    # vs [in, 10th, and, 11th, centuries]: p=1/2 r=1/5 -> 2/7; max = 1/3
    assert max_over_gold(f1_score, "10th century", golds) == pytest.approx(1 / 3)
    assert max_over_gold(exact_match, "in the 10th and 11th centuries", golds) == 1.0
    # golds that normalise to nothing are dropped; none left -> the unanswerable gold ""
    assert max_over_gold(f1_score, "", ["the", "  "]) == 1.0
    # ... and beside a real gold, a blank one earns an empty prediction nothing
    assert max_over_gold(exact_match, "", ["Paris", ""]) == 0.0


def _abstains(answer: str) -> bool:
    return answer.lower().startswith("not in the documents")


def test_score_answer_answerable_and_unanswerable() -> None:
    s = score_answer("in the 10th century", ["10th and 11th centuries"], _abstains)
    # [in, 10th, century] vs [10th, and, 11th, centuries]: p=1/3 r=1/4 -> 2/7
    assert s.answerable and not s.abstained and s.exact == 0.0
    assert s.f1 == pytest.approx(2 / 7) and s.score == s.f1
    s = score_answer("Not in the documents.", ["Rollo"], _abstains)
    assert s.answerable and s.abstained and s.f1 == 0.0 and s.score == 0.0
    # an abstention is the empty prediction, even when it shares words with the gold
    s = score_answer("Not in the documents, they say", ["they say"], _abstains)
    assert s.abstained and s.f1 == 0.0
    s = score_answer("Not in the documents.", [], _abstains)
    assert not s.answerable and s.abstained and s.score == 1.0 and s.exact == 1.0
    s = score_answer("Rollo", [], _abstains)
    assert not s.abstained and s.score == 0.0
    # the official empty prediction: an answer that normalises to nothing abstains
    assert score_answer(" the. ", [""], _abstains).score == 1.0
    # without a schema detector, only the empty prediction abstains
    assert score_answer("", ["France"]).abstained
    assert not score_answer("Not in the documents", ["France"]).abstained


def test_aggregate_definitions() -> None:
    scores = [
        score_answer("France", ["France"], _abstains, retrieval_hit=True, latency_s=1.0),  # 1
        score_answer("the cat sat", ["a cat sat on the mat"], _abstains, retrieval_hit=True),
        score_answer("Not in the documents", ["Rollo"], _abstains, retrieval_hit=False),  # 0
        score_answer("Rollo", ["Rollo"], _abstains, retrieval_hit=False, latency_s=3.0),  # 1
        score_answer("Not in the documents", [], _abstains),  # 1
        score_answer("Paris", [], _abstains),  # 0
    ]
    agg = aggregate(scores)
    assert (agg.n, agg.n_answerable, agg.n_unanswerable) == (6, 4, 2)
    assert agg.exact_match == 50.0  # 2 of 4 answerable exactly right
    assert agg.f1 == pytest.approx(100 * (1 + 2 / 3 + 0 + 1) / 4, abs=0.01)  # 66.67
    assert agg.false_abstention_rate == 25.0
    assert agg.unanswerable_abstention_rate == 50.0
    # overall = mean over all 6 questions: (1 + 2/3 + 0 + 1 + 1 + 0) / 6
    assert agg.overall == pytest.approx(100 * (11 / 3) / 6, abs=0.01)  # 61.11
    assert agg.overall_exact == pytest.approx(100 * 3 / 6)
    assert agg.abstention_rate == pytest.approx(100 * 2 / 6, abs=0.01)
    assert agg.recall_at_k == 50.0
    assert agg.latency_s == 2.0
    d = agg.to_dict()
    assert d["overall"] == agg.overall and "extra" not in d


def test_always_abstaining_scores_the_unanswerable_share() -> None:
    """The issue's sanity point: "I don't know" to everything -> overall = unanswerable share."""
    scores = [score_answer("Not in the documents", ["x"], _abstains) for _ in range(5)]
    scores += [score_answer("Not in the documents", [], _abstains) for _ in range(5)]
    agg = aggregate(scores)
    assert (agg.overall, agg.f1, agg.false_abstention_rate) == (50.0, 0.0, 100.0)
    assert agg.overall_exact == 50.0  # over all questions, as overall
    assert agg.recall_at_k is None and agg.latency_s is None


def test_retrieval_hit() -> None:
    chunks = [
        Chunk("1", "Rollo was the Norse leader.", "squad/Normans.txt", 0, "h1"),
        Chunk("2", "France  is a country", "squad/Other.txt", 0, "h2"),
    ]
    assert retrieval_hit(["rollo"], chunks) is True
    assert retrieval_hit(["France is"], chunks) is True  # whitespace-collapsed, case-free
    assert retrieval_hit(["France"], chunks, source="squad/Normans.txt") is False
    assert retrieval_hit(["Rollo"], chunks, source="squad/Normans.txt") is True
    assert retrieval_hit(["Paris"], chunks) is False
    assert retrieval_hit([], chunks) is None  # unanswerable: no oracle
    as_dicts = [{"text": c.text, "source": c.source} for c in chunks]
    assert retrieval_hit(["France"], as_dicts, source="squad/Other.txt") is True


def test_gold_answers_that_normalise_to_nothing_make_a_question_unanswerable():
    """A gold list of blanks or punctuation is SQuAD's unanswerable (gold ""): abstaining
    scores 1, answering 0."""
    q = score_answer("", [" ", "."])
    assert (q.answerable, q.abstained, q.score) == (False, True, 1.0)
    assert score_answer("Paris", ["", "the"]).score == 0.0


def test_an_unanswerable_question_never_counts_toward_retrieval_recall():
    """There is no oracle to retrieve for an unanswerable question: its hit is None, whatever
    the caller passed, so recall@k is over answerable questions only."""
    una = score_answer("", [], retrieval_hit=False)
    assert una.retrieval_hit is None
    ans = score_answer("Paris", ["Paris"], retrieval_hit=True)
    assert aggregate([una, ans]).recall_at_k == 100.0
