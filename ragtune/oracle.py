"""Which chunk supports a QA record's answer: the oracle, found beyond verbatim matches.

Three steps, the surest first; the first that finds support wins:

- ``exact``: the normalised answer is a token run of the normalised chunk. Normalisation is
  SQuAD's (case, punctuation, articles) plus collapsed whitespace and line breaks, joined
  line-break hyphenation, thousands separators and number words as digits ("seven" -> 7).
- ``fuzzy``: the best token-level partial alignment of the answer inside the chunk
  (rapidfuzz ``partial_ratio`` over token lists), for answers of a few tokens or more.
- ``semantic``: the answer's sentences against the chunk's sentences in the retriever's
  embedding model (mean over answer sentences of the best cosine): long-form answers.

A record's ``source`` restricts the search to that document's chunks; a record without one
is searched among the chunks the retriever ranks top for its instruction. The thresholds are
measured (docs/benchmarks.md, "Oracle detection"): they keep false supports low, since a
false oracle teaches the model to answer from a context that lacks the answer.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
from rapidfuzz import fuzz

from ragtune.store import content_hash
from ragtune.types import Chunk, QARecord

HOW = ("exact", "fuzzy", "semantic", "none")

FUZZY_MIN = 0.8  # token partial-alignment ratio; see docs/benchmarks.md "Oracle detection"
FUZZY_MIN_TOKENS = 3  # shorter answers: one changed token is a different answer ("7 years")
SEMANTIC_MIN = 0.8  # mean best cosine of answer sentences (all-MiniLM-L6-v2)
SEMANTIC_MIN_TOKENS = 6  # shorter answers carry too little meaning to embed on their own
SOURCE_LIMIT = 100_000  # "every chunk of the source" for retriever.find

Embed = Callable[[Sequence[str]], np.ndarray]


class ChunkSource(Protocol):
    """The part of the retriever the oracle search needs."""

    def find(
        self, contains: str | None = None, source: str | None = None, limit: int = 50
    ) -> list[Chunk]: ...


@dataclass(frozen=True)
class OracleMatch:
    """The chunk that supports an answer (``None`` when none does), how, and the score."""

    chunk: Chunk | None
    how: str  # one of HOW
    score: float

    @property
    def found(self) -> bool:
        return self.chunk is not None


NONE = OracleMatch(None, "none", 0.0)

# --------------------------------------------------------------------------- normalisation
UNIT_WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_NUMBER_WORDS = {w: i for i, w in enumerate(UNIT_WORDS)} | {
    w: 20 + 10 * i for i, w in enumerate(_TENS)
}
_SCALES = {"hundred": 100, "thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000}
_ARTICLES = {"a", "an", "the"}
_CJK = "\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff\uac00-\ud7af"
_TOKEN = re.compile(rf"\d+\.\d+|[{_CJK}]|[^\W{_CJK}]+")
_NUMBER = re.compile(r"\d+(\.\d+)?")
_PUNCT = re.compile(
    f"[{re.escape(string.punctuation)}\u2010-\u2015\u2018-\u201f\u2026\u3001\u3002]"
)
_SENTENCE_END = re.compile(r"(?<=[.!?\u3002])\s+|\n+|(?<=\u3002)")


def tokens(text: str) -> list[str]:
    """Normalised tokens: SQuAD normalisation, whitespace collapsed, numbers as digits.

    CJK characters are single tokens, so matching works for text without spaces.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    text = re.sub(r"(\w)-[ \t]*\n\s*(\w)", r"\1\2", text)  # hyphenated across a line break
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,000 -> 1000
    text = re.sub(r"(?<=\d)\.(?=\d)", "\x00", text)  # keep decimals whole: 2.5
    text = _PUNCT.sub(" ", text).replace("\x00", ".")
    toks = [t for t in _TOKEN.findall(text) if t not in _ARTICLES]
    return _numbers_as_digits(toks)


def _numbers_as_digits(toks: list[str]) -> list[str]:
    """Runs of number words ("twenty one", "two hundred") become one digit token."""
    out: list[str] = []
    i = 0
    while i < len(toks):
        after_number = bool(out) and _NUMBER.fullmatch(out[-1]) is not None
        if toks[i] not in _NUMBER_WORDS and not (toks[i] in _SCALES and after_number):
            out.append(toks[i])
            i += 1
            continue
        total, current, j = 0.0, 0.0, i
        if toks[i] in _SCALES:  # "3.5 million": digits followed by a scale word
            current = float(out.pop())
        while j < len(toks):
            t = toks[j]
            nxt = toks[j + 1] if j + 1 < len(toks) else ""
            if t == "and" and j > i and (nxt in _NUMBER_WORDS):  # "one hundred and five"
                pass
            elif t in _NUMBER_WORDS:
                current += _NUMBER_WORDS[t]
            elif t in _SCALES:
                current = max(current, 1) * _SCALES[t]
                if _SCALES[t] >= 1_000:
                    total, current = total + current, 0
            else:
                break
            j += 1
        value = total + current
        out.append(str(int(value)) if value == int(value) else str(value))
        i = j
    return out


def normalize(text: str) -> str:
    """The normalised text as one string (tokens joined by single spaces)."""
    return " ".join(tokens(text))


# --------------------------------------------------------------------------- the three scores
def exact_match(answer: Sequence[str], chunk: Sequence[str]) -> bool:
    """Whether the answer tokens occur as a contiguous run of the chunk tokens."""
    if not answer:
        return False
    return f" {' '.join(answer)} " in f" {' '.join(chunk)} "


def fuzzy_score(answer: Sequence[str], chunk: Sequence[str]) -> float:
    """Best token-level alignment of the answer inside the chunk, in [0, 1]."""
    if len(answer) < FUZZY_MIN_TOKENS or not chunk:
        return 0.0
    return float(fuzz.partial_ratio(list(answer), list(chunk))) / 100.0


def sentences(text: str) -> list[str]:
    """Sentences (and lines) of a text, stripped, the empty ones dropped."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def _unit(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float32)
    n = np.linalg.norm(m, axis=1, keepdims=True)
    return m / np.maximum(n, 1e-12)


# --------------------------------------------------------------------------- the search
class OracleFinder:
    """Finds the chunk that supports a record's answer, and says how (see the module doc).

    ``embed`` is the retriever's embedding function (texts -> rows); without it the
    semantic step is skipped. Chunk sentence embeddings are cached by chunk text.
    """

    def __init__(
        self,
        chunks: ChunkSource,
        embed: Embed | None = None,
        *,
        fuzzy_min: float = FUZZY_MIN,
        semantic_min: float = SEMANTIC_MIN,
    ) -> None:
        self.chunks = chunks
        self.embed = embed
        self.fuzzy_min = fuzzy_min
        self.semantic_min = semantic_min
        self._chunk_vecs: dict[str, np.ndarray] = {}
        self._source_chunks: dict[str, list[Chunk]] = {}

    def find(self, record: QARecord, candidates: Sequence[Chunk] = ()) -> OracleMatch:
        """The best-supported chunk for ``record``'s answer among its search space.

        ``candidates`` are the retriever's ranked chunks for the instruction: the search
        space of a record without ``source``, and the tie-break order within the source.
        """
        if not record.answerable:
            return NONE
        return self.best(record.output, self.search_space(record, candidates), record.instruction)

    def search_space(self, record: QARecord, candidates: Sequence[Chunk]) -> list[Chunk]:
        """The record's source's chunks (retrieved ones first), else the candidates."""
        if not record.source:
            return list(candidates)
        if record.source not in self._source_chunks:
            self._source_chunks[record.source] = self.chunks.find(
                source=record.source, limit=SOURCE_LIMIT
            )
        own = self._source_chunks[record.source]
        if not own:  # the source is not in the index: fall back to what retrieval found
            return list(candidates)
        ranked = [c for c in candidates if c.source == record.source]
        seen = {c.id for c in ranked}
        return ranked + [c for c in own if c.id not in seen]

    def best(self, answer: str, chunks: Sequence[Chunk], question: str = "") -> OracleMatch:
        """Exact, then fuzzy, then semantic: the first step with a supporting chunk wins."""
        chunks = list(chunks)
        if not chunks or not answer.strip():
            return NONE
        ans = tokens(answer)
        toks = [tokens(c.text) for c in chunks]
        for c, t in zip(chunks, toks, strict=True):
            if exact_match(ans, t):
                return OracleMatch(c, "exact", 1.0)
        fuzzy = [fuzzy_score(ans, t) for t in toks]
        i = int(np.argmax(fuzzy))
        if fuzzy[i] >= self.fuzzy_min:
            return OracleMatch(chunks[i], "fuzzy", fuzzy[i])
        claim = semantic_claim(answer, question)
        if self.embed is None or claim is None:
            return NONE
        sem = self.semantic_scores(claim, chunks)
        i = int(np.argmax(sem))
        if sem[i] >= self.semantic_min:
            return OracleMatch(chunks[i], "semantic", float(sem[i]))
        return NONE

    def supporting(self, record: QARecord, chunks: Sequence[Chunk]) -> list[bool]:
        """Per chunk: does it support the record's answer by any of the three steps?

        Distractors must not: a context said to lack the answer must really lack it.
        """
        ans = tokens(record.output)
        out = [self._holds_verbatim(ans, c.text) for c in chunks]
        claim = semantic_claim(record.output, record.instruction)
        if self.embed is not None and chunks and claim is not None:
            sem = self.semantic_scores(claim, chunks)
            out = [o or s >= self.semantic_min for o, s in zip(out, sem, strict=True)]
        return out

    def _holds_verbatim(self, answer: Sequence[str], text: str) -> bool:
        """The exact or fuzzy step: ``text`` holds the answer tokens (nearly) word for word."""
        t = tokens(text)
        return exact_match(answer, t) or fuzzy_score(answer, t) >= self.fuzzy_min

    def without_answer(self, record: QARecord, chunk: Chunk) -> Chunk | None:
        """``chunk`` with the sentences that hold the record's answer removed, or None when
        what is left still supports the answer (an answer spread over sentences, a long-form
        one) or nothing is left. The rest of the paragraph stays: the same on-topic text, one
        fact short, which is how a context that nearly answers looks."""
        ans = tokens(record.output)
        parts = sentences(chunk.text)
        kept = [s for s in parts if not self._holds_verbatim(ans, s)]
        if not kept or len(kept) == len(parts):
            return None
        text = " ".join(kept)
        ablated = replace(
            chunk, id=f"{chunk.id}-ablated", text=text, content_hash=content_hash(text)
        )
        return None if any(self.supporting(record, [ablated])) else ablated

    def semantic_scores(self, claim: str, chunks: Sequence[Chunk]) -> list[float]:
        """Per chunk: mean over the claim's sentences of the best cosine to a chunk sentence."""
        assert self.embed is not None
        claim_vecs = _unit(self.embed(sentences(claim) or [claim]))
        missing = list({c.text: c for c in chunks if c.text not in self._chunk_vecs}.values())
        if missing:
            parts = [sentences(c.text) or [c.text] for c in missing]
            flat = [s for p in parts for s in p] + [c.text for c in missing]
            vecs = _unit(self.embed(flat))
            at, first_whole = 0, len(flat) - len(missing)
            for n, (c, p) in enumerate(zip(missing, parts, strict=True)):
                whole = vecs[first_whole + n]
                self._chunk_vecs[c.text] = np.vstack([vecs[at : at + len(p)], whole])
                at += len(p)
        return [float((claim_vecs @ self._chunk_vecs[c.text].T).max(axis=1).mean()) for c in chunks]


def semantic_claim(answer: str, question: str) -> str | None:
    """What to embed: the answer, or for a bare yes/no the question it affirms; or None.

    "Yes" alone names nothing to look for; the question's statement does. Its polarity cannot
    be checked this way, so a "No" is supported by the same chunk as a "Yes". Other short
    answers carry too little meaning to embed (None).
    """
    bare = re.fullmatch(r"\s*(yes|no)\b[\s.,!;:-]*(.*)", answer, flags=re.I | re.S)
    claim = answer if bare is None else bare.group(2).strip()
    if len(tokens(claim)) >= SEMANTIC_MIN_TOKENS:
        return claim
    if bare is not None and question.strip():
        return f"{question.strip()} {claim}".strip()
    return None
