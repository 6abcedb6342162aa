"""Counterfactual questions (``raft.swapped_twin``): changed so that the same context misses them."""

from __future__ import annotations

import random

import numpy as np
import pytest

from ragtune.counterfactual import NamePool, counterfactual, names

KEEPER = "The harbor keeper of Dunmore was Marlowe. In 1871 he lit the lamp."
QUESTIONS = [
    ("Who was the keeper of Dunmore?", "harbor.md"),
    ("What did Marlowe light?", "harbor.md"),
    ("Where is Kilrush?", "harbor.md"),
    ("Who built Glasgow?", "city.md"),
]


def test_names_are_the_capitalised_runs_and_numbers_not_the_question_word():
    assert names("What did the Treaty of Rome say in 1957?") == ["Treaty of Rome", "1957"]
    assert names("Thomas de Maiziere serves what role?") == ["Thomas de Maiziere"]
    assert names("Thomas de Maiziere serves what role?", initial=False) == []
    assert names("In what year did Savery's pump work?") == ["Savery"]
    # a request ends in a full stop, which is not part of the name; an abbreviation keeps its own
    assert names("Name the keeper of Kilrush.", initial=False) == ["Kilrush"]
    assert names("Which army did the U.S. send?") == ["U.S."]
    assert names("What did Michigan Inc. start?") == ["Michigan Inc."]


def test_a_name_the_context_mentions_is_swapped_for_an_on_topic_one_it_does_not():
    pool = NamePool(QUESTIONS)
    cf = counterfactual(
        "Who was the keeper of Dunmore?", [KEEPER], pool, "harbor.md", random.Random(0)
    )
    assert cf is not None and cf.how == "swap" and cf.old == "Dunmore"
    # Kilrush: a name of the same document that the context lacks (Marlowe is in it)
    assert cf.new == "Kilrush" and cf.question == "Who was the keeper of Kilrush?"


def test_a_number_becomes_a_nearby_one_the_context_lacks():
    pool = NamePool(QUESTIONS)
    for seed in range(5):
        cf = counterfactual(
            "What happened in 1871?", [KEEPER], pool, "harbor.md", random.Random(seed)
        )
        assert cf is not None and cf.how == "swap" and cf.old == "1871"
        assert cf.new != "1871" and abs(int(cf.new) - 1871) <= 20 and cf.new not in KEEPER


def test_without_a_name_to_swap_the_question_is_negated():
    pool = NamePool(QUESTIONS)
    rng = random.Random(0)
    cf = counterfactual("What did the keeper light?", [KEEPER], pool, "harbor.md", rng)
    assert cf is not None and cf.how == "negate"
    assert cf.question == "What didn't the keeper light?"
    # already negative, or a yes/no question: nothing to change
    assert counterfactual("What did the keeper not light?", [KEEPER], pool, None, rng) is None
    assert counterfactual("Was the lamp lit?", [KEEPER], pool, None, rng) is None


class _Embedder:
    """Names as fixed vectors: Leith close to Dunmore, Glasgow further, Dunmore Bay its twin."""

    VECS = {
        "Dunmore": [1.0, 0.0, 0.0],
        "Dunmore Harbour": [1.0, 0.01, 0.0],
        "Leith": [0.6, 0.8, 0.0],
        "Glasgow": [0.0, 0.6, 0.8],
        "Oban": [0.0, 0.0, 1.0],
    }

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, texts):
        self.calls += 1
        return np.array([self.VECS[t] for t in texts])


def test_with_an_embedder_the_swap_takes_a_close_name_but_not_the_same_thing():
    embed = _Embedder()
    pool = NamePool([], embed)
    pool.NEAREST = 1
    fresh = ["Oban", "Glasgow", "Leith"]
    assert {pool.pick("Dunmore", fresh, random.Random(s)) for s in range(5)} == {"Leith"}
    # a near-identical name is the same place by another name: passed over for the next
    same = {pool.pick("Dunmore", ["Dunmore Harbour", *fresh], random.Random(s)) for s in range(5)}
    assert same == {"Leith"} and embed.calls == 2  # vectors cached by name


@pytest.mark.parametrize("seed", range(3))
def test_the_changed_question_never_names_something_the_context_holds(seed):
    pool = NamePool(QUESTIONS + [("Where is Marlowe buried?", "harbor.md")])
    cf = counterfactual(
        "Who was the keeper of Dunmore?", [KEEPER], pool, "harbor.md", random.Random(seed)
    )
    assert cf is not None and cf.new not in KEEPER


def test_a_question_of_another_document_or_none_draws_the_swap_from_every_question():
    pool = NamePool(QUESTIONS)
    for source in (None, "elsewhere.md"):
        cf = counterfactual(
            "Who was the keeper of Dunmore?", [KEEPER], pool, source, random.Random(0)
        )
        # Kilrush and Glasgow: the names of all questions that the context lacks
        assert cf is not None and cf.how == "swap" and cf.new in {"Kilrush", "Glasgow"}


def test_a_capitalised_word_opening_a_question_is_never_swapped_in():
    # "Name" is capitalised only because it starts the question: not a name to trust
    pool = NamePool([("Name the keeper of Kilrush?", "harbor.md")])
    for seed in range(5):
        cf = counterfactual(
            "Who was the keeper of Dunmore?", [KEEPER], pool, "harbor.md", random.Random(seed)
        )
        assert cf is not None and cf.new == "Kilrush"
