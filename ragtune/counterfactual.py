"""Counterfactual questions: an answerable question changed so that its context no longer answers it.

SQuAD v2's unanswerable questions were written this way (Rajpurkar, Jia and Liang 2018): a
crowdworker took a paragraph and asked something on topic that it does not answer, often by
swapping a name or number of an answerable question or adding a negation, so that the paragraph
still holds a *plausible* answer. A reader that matches the question's type to a span takes that
bait; on unseen articles ragtune's 1.5B reader did so for most of the unanswerable questions it
answered (docs/benchmarks.md, "A yes/no judge"). Training on a minimal pair, the same context
with the question as asked (target: its answer) and with one detail changed (target: abstain),
shows the model that the question's details, not only its type, must be found in the context.

Two changes, the first that applies wins:

- ``swap``: a name or number of the question that the context mentions is replaced by one the
  context does not mention: a name by a name from other questions about the same document when
  there is one (on topic, so the context is still the one a retriever would return), else from
  any question, the closest in meaning when an embedder is at hand (a country by a country); a
  number by a nearby number (a year stays a plausible year).
- ``negate``: the question's first auxiliary verb negated ("Who was the keeper?" -> "Who
  wasn't the keeper?"); the context names who was, not who was not.

Names are found by capitalisation (runs of capitalised words and numbers): no tagger model has
to be downloaded, and the swap only needs "a name the context mentions", not its type.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ragtune.oracle import normalize

# a run of capitalised words or numbers, lower-case joiners allowed inside ("Treaty of Rome")
_NAME = re.compile(
    r"(?:[A-Z][\w'’.-]*|\d[\d,.]*\d|\d)"
    r"(?:\s+(?:(?:of|the|de|du|von|van|la|le)\s+)*(?:[A-Z][\w'’.-]*|\d[\d,.]*\d|\d))*"
)
_POSSESSIVE = re.compile(r"['’]s?$")
_FULL_STOP = re.compile(r"(?<=[^\W\d_]{2})\.$")
_NUMBER = re.compile(r"\d[\d,.]*")
# capitalised only because a sentence starts with them
_OPENERS = frozenset(
    re.findall(
        r"\w+",
        "what who whom whose when where which why how in on at by for from to during after before "
        "since until under over with without along though although while if as of the a an is "
        "are was were did do does has have had can could would will should according besides "
        "other apart unlike like",
    )
)
# the contraction keeps do-support questions English: "What did X lead to?" -> "What didn't X ..."
_NEGATIONS = {
    "is": "isn't", "are": "aren't", "was": "wasn't", "were": "weren't", "did": "didn't",
    "does": "doesn't", "do": "don't", "has": "hasn't", "have": "haven't", "had": "hadn't",
    "can": "can't", "could": "couldn't", "will": "won't", "would": "wouldn't",
    "should": "shouldn't",
}  # fmt: skip
_AUX = re.compile(rf"\b({'|'.join(_NEGATIONS)})\b(?=\s+\w)")
_NEGATED = re.compile(r"\bnot\b|n't\b|\bnever\b|\bno\b", re.IGNORECASE)


@dataclass(frozen=True)
class Counterfactual:
    """A changed question and what changed (``swap``: ``old`` -> ``new``; ``negate``)."""

    question: str
    how: str
    old: str = ""
    new: str = ""


def names(question: str, initial: bool = True) -> list[str]:
    """The names and numbers of a question; ``initial=False`` leaves out one opening it.

    A sentence-initial word is capitalised by position ("What", "In"), so it is dropped when it
    is a question or function word; a name opening the question is kept unless ``initial`` is
    False (the pool of replacements wants only names it can trust).
    """
    found = []
    for m in _NAME.finditer(question):
        text = _POSSESSIVE.sub("", m.group(0).strip())
        # a request's closing full stop ("... of Kilrush.") is not the name's; an abbreviation
        # keeps its own ("U.S.", "Michigan Inc. started")
        if m.end() == len(question.rstrip()):
            text = _FULL_STOP.sub("", text)
        if m.start() == 0:
            first, _, rest = text.partition(" ")
            if first.lower() in _OPENERS:
                text = re.sub(r"^(?:(?:of|the|de|du|von|van|la|le)\s+)+", "", rest.strip())
            elif not initial:
                continue
        mixed = text[:1].isdigit() and not is_number(text)  # "2005 Harvard": two things
        if text and (len(text) > 1 or text.isdigit()) and not mixed:
            found.append(text)
    return found


def is_number(name: str) -> bool:
    return _NUMBER.fullmatch(name) is not None


class NamePool:
    """The names of a question set, by source document, to draw swaps from.

    With ``embed`` (the retriever's embedding function) a swap takes one of the names closest
    in meaning to the one it replaces, so a country stays a country and a person a person;
    without it any name of the document.
    """

    NEAREST = 5  # the swap draws among this many closest names ...
    SAME = 0.7  # ... below this cosine: above it a name is often the same thing ("US", "United States")

    def __init__(
        self,
        questions: Iterable[tuple[str, str | None]],
        embed: Callable[[Sequence[str]], np.ndarray] | None = None,
    ) -> None:
        self.by_source: dict[str | None, list[str]] = {}
        everywhere: dict[str, None] = {}
        for question, source in questions:
            own = self.by_source.setdefault(source, [])
            for name in names(question, initial=False):
                if not is_number(name):
                    if name not in own:
                        own.append(name)
                    everywhere[name] = None
        self.everywhere = list(everywhere)
        self.embed = embed
        self._vecs: dict[str, np.ndarray] = {}

    def options(self, source: str | None) -> list[list[str]]:
        """Names to swap in: the source's own first, then every source's."""
        own = self.by_source.get(source, [])
        return [own, self.everywhere] if source is not None and own else [self.everywhere]

    def pick(self, old: str, fresh: list[str], rng: random.Random) -> str:
        """One of ``fresh``: among the closest in meaning to ``old`` when there is an embedder."""
        if self.embed is None or len(fresh) <= self.NEAREST:
            return rng.choice(fresh)
        missing = [n for n in [old, *fresh] if n not in self._vecs]
        if missing:
            rows = self.embed(missing)
            rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
            self._vecs.update(zip(missing, rows, strict=True))
        sims = np.stack([self._vecs[n] for n in fresh]) @ self._vecs[old]
        order = [int(i) for i in np.argsort(-sims, kind="stable") if sims[i] < self.SAME]
        return fresh[rng.choice(order[: self.NEAREST])] if order else rng.choice(fresh)


def counterfactual(
    question: str, context: Sequence[str], pool: NamePool, source: str | None, rng: random.Random
) -> Counterfactual | None:
    """The question changed so that ``context`` does not answer it, or None when nothing applies.

    A swap when the question has a name or number the context mentions, else a negation.
    """
    text = f" {normalize(' '.join(context))} "
    return _swap(question, text, pool, source, rng) or _negate(question)


def _mentioned(name: str, normalized_context: str) -> bool:
    n = normalize(name)
    return bool(n) and f" {n} " in normalized_context


def _swap(
    question: str, context: str, pool: NamePool, source: str | None, rng: random.Random
) -> Counterfactual | None:
    anchored = [n for n in names(question) if _mentioned(n, context)]
    rng.shuffle(anchored)
    for old in anchored:
        if is_number(old):
            choices = [_nearby_numbers(old, context)]
        else:
            choices = [
                [n for n in group if not _mentioned(n, context) and _unrelated(n, old)]
                for group in pool.options(source)
            ]
        for fresh in choices:
            if fresh:
                new = pool.pick(old, fresh, rng) if not is_number(old) else rng.choice(fresh)
                return Counterfactual(question.replace(old, new, 1), "swap", old, new)
    return None


def _unrelated(name: str, old: str) -> bool:
    """No word in common ("Harvard" and "Harvard College" may be one thing)."""
    return not set(normalize(name).split()) & set(normalize(old).split())


def _nearby_numbers(old: str, context: str) -> list[str]:
    """Numbers close to ``old`` that the context lacks."""
    digits = old.replace(",", "")
    if not digits.isdigit():
        return []
    value = int(digits)
    steps = (1, 2, 3, 5, 10, 20) if len(digits) == 4 else (1, 2, 3, 10)
    near = [value + s for s in steps] + [value - s for s in steps if value - s > 0]
    return [str(v) for v in near if not _mentioned(str(v), context)]


def _negate(question: str) -> Counterfactual | None:
    if _NEGATED.search(question):
        return None
    m = _AUX.search(question)
    if m is None or m.start() == 0:  # a yes/no question: "Wasn't X ...?" asks the same thing
        return None
    negated = _NEGATIONS[m.group(1)]
    return Counterfactual(question[: m.start()] + negated + question[m.end() :], "negate")
