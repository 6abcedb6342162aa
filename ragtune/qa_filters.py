"""Checks that keep only usable generated QA records (used by :mod:`ragtune.qa_gen`).

Each check is a small pure function of the record, its chunk and the shared retriever, so the
generator can count what each one removed. Answer support is the oracle detection of
``ragtune.oracle`` (exact, fuzzy, semantic), the same check the RAFT builder uses.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from ragtune.types import Chunk

_CJK = "\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff\uac00-\ud7af"
_WORD = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")
# Answers that state no fact: an unanswerable candidate with one of them cannot be verified.
_NON_ANSWERS = re.compile(
    r"^(i (do not|don ?t) know|i dont know|unknown|not (stated|mentioned|given|known|specified)"
    r"|none|n/?a|no answer|the passage does not (say|answer|mention)\b.*)[.!]?$"
)


_META = re.compile(
    r"(?i)\b(?:the|this|that|given) (?:passage|text|context|paragraph|excerpt|article)\b"
)


class SearchableRetriever(Protocol):
    """The part of :class:`ragtune.retriever.Retriever` the checks use."""

    def candidates(self, query: str, n: int) -> list[Chunk]: ...

    def find(
        self, contains: str | None = None, source: str | None = None, limit: int = 50
    ) -> list[Chunk]: ...


# --------------------------------------------------------------------------- text
def words(text: str) -> list[str]:
    """Case-folded word tokens; CJK characters are one token each (no spaces there)."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def normalized(text: str) -> str:
    return " ".join(words(text))


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def script(text: str) -> str:
    """The dominant writing system of the letters in ``text`` (latin, cjk, cyrillic, ...).

    Japanese kana and Han characters count as one script, so a Japanese question about a
    Japanese chunk matches whatever mix of the two each uses.
    """
    counts: dict[str, int] = {}
    for ch in text:
        if not ch.isalpha():
            continue
        name = unicodedata.name(ch, "").split(" ")[0].lower()
        if name in ("cjk", "hiragana", "katakana", "hangul", "halfwidth", "fullwidth"):
            name = "cjk"
        counts[name] = counts.get(name, 0) + 1
    return max(counts, key=lambda k: (counts[k], k)) if counts else ""


def is_non_answer(answer: str) -> bool:
    """Whether an answer states nothing ("unknown", "not stated", "I don't know")."""
    return bool(_NON_ANSWERS.match(normalized(answer).replace("'", "")))


# --------------------------------------------------------------------------- answer support
class Support:
    """Whether chunks support an answer, by ``ragtune.oracle``'s checks.

    ``embed`` (texts -> rows, the retriever's embedding) lets the oracle's semantic step judge
    long answers where a caller asks for it; ``how`` names the method in reports.
    """

    def __init__(self, chunks: Any, embed: Callable[[Sequence[str]], np.ndarray] | None = None):
        from ragtune.oracle import OracleFinder

        self._strict = OracleFinder(chunks)
        self._semantic = OracleFinder(chunks, embed) if embed is not None else self._strict
        self.how = "ragtune.oracle"

    def supporting(
        self, answer: str, chunks: Sequence[Chunk], question: str = "", semantic: bool = False
    ) -> Chunk | None:
        """The first chunk of ``chunks`` that supports ``answer``, or ``None``.

        ``semantic`` adds the oracle's embedding step: right for "could the corpus hold this?",
        too lenient for "is this generated answer true?" (a small LM's wrong sentence reuses
        the chunk's words; docs/benchmarks.md, "QA generation").
        """
        if not chunks or not answer.strip():
            return None
        finder = self._semantic if semantic else self._strict
        return finder.best(answer, list(chunks), question).chunk


# --------------------------------------------------------------------------- the checks
def length_ok(question: str, answer: str, limits: Any, *, answerable: bool) -> bool:
    """Question and answer lengths in words (a CJK character is one) inside the limits."""
    q, a = len(words(question)), len(words(answer))
    if not limits.min_question_words <= q <= limits.max_question_words:
        return False
    return a <= limits.max_answer_words and (a > 0 or not answerable)


def language_ok(question: str, chunk: Chunk, scripts: Sequence[str]) -> bool:
    """The question is written in an allowed script: ``scripts``, or else the chunk's own."""
    got = script(question)
    return got in scripts if scripts else got == script(chunk.text)


def standalone(question: str) -> bool:
    """The question stands on its own: it does not ask about "the passage" it came from.

    A user asks the corpus, not a passage; small LMs often write "What does the passage say
    about X?". English phrasing only.
    """
    return _META.search(question) is None


def leaks_answer(question: str, answer: str) -> bool:
    """The question already contains its answer (nothing left to find in the context)."""
    a = normalized(answer)
    return bool(a) and f" {a} " in f" {normalized(question)} "


def round_trip(
    question: str,
    answer: str,
    chunk: Chunk,
    retriever: SearchableRetriever,
    support: Support,
    k: int,
) -> bool:
    """The question retrieves its own chunk in the top-``k`` of the shared retriever.

    A top-k chunk of the same document that also supports the answer counts too: chunks
    overlap, and de-duplication may have kept the neighbour instead.
    """
    top = retriever.candidates(question, k)
    if any(c.id == chunk.id for c in top):
        return True
    same_doc = [c for c in top if c.source == chunk.source]
    return support.supporting(answer, same_doc, question) is not None


def on_topic(question: str, chunk: Chunk, retriever: SearchableRetriever, k: int) -> bool:
    """The question is about the chunk's subject: its document is in the top-``k``."""
    return any(c.source == chunk.source for c in retriever.candidates(question, k))


def answered_by_corpus(
    question: str,
    answer: str,
    chunk: Chunk,
    retriever: SearchableRetriever,
    support: Support,
    fetch_k: int,
) -> bool:
    """Some chunk of the corpus supports ``answer``: retrieved ones, the chunk's document, or
    any chunk that contains the answer verbatim (case-insensitive)."""
    near = retriever.candidates(question, fetch_k)
    seen = {c.id for c in near}
    own = [c for c in retriever.find(source=chunk.source, limit=0) if c.id not in seen]
    if support.supporting(answer, [*near, *own], question, semantic=True) is not None:
        return True
    return bool(retriever.find(contains=answer.strip(), limit=1))


class NearDuplicates:
    """Questions seen so far; :meth:`add` refuses one too like an earlier one (token Jaccard)."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self._seen: list[set[str]] = []

    def add(self, question: str) -> bool:
        toks = set(words(question))
        if any(jaccard(toks, s) >= self.threshold for s in self._seen):
            return False
        self._seen.append(toks)
        return True
