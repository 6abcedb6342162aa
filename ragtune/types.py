"""Small value types shared by the ingest, retrieval, training and serving code."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Chunk:
    """One piece of a corpus document, as stored in the index and returned by retrieval.

    ``source`` is the document's path relative to the corpus root (POSIX separators),
    ``start`` the character offset of the chunk in the decoded document, ``content_hash``
    a hash of ``text``; ``score`` is the retrieval score (higher is better; cosine
    similarity for dense retrieval, the reciprocal-rank fusion score for hybrid retrieval),
    ``None`` when the chunk was not retrieved by a query.
    """

    id: str
    text: str
    source: str
    start: int
    content_hash: str
    score: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def similarity(self) -> float:
        """Cosine similarity of query and chunk, whichever ranking retrieved it (0 when unknown).

        Hybrid retrieval's ``score`` is a rank fusion, near-constant at the top; the
        answerability decision needs how close the context is to the question."""
        s = self.metadata.get("dense_score", self.score)
        return float(s) if s is not None else 0.0


@dataclass(frozen=True)
class QARecord:
    """A question with its answer; ``output == ""`` means unanswerable from the corpus.

    ``source`` optionally names the corpus document (relative path) holding the answer,
    which helps find the oracle chunk when the answer string is short or repeated.
    ``answers`` holds every acceptable answer when there are several (SQuAD); evaluation
    scores against the best of them (``ragtune.qa.gold_answers``). ``plausible`` is, for an
    unanswerable question, the wrong answer a careless reader would give (SQuAD v2's plausible
    answer; JSONL key ``plausible_answer``): the preference step trains abstaining over it.
    """

    instruction: str
    output: str = ""
    input: str = ""
    source: str | None = None
    id: str | None = None
    answers: tuple[str, ...] = ()
    plausible: str = ""

    @property
    def answerable(self) -> bool:
        return bool(self.output.strip())
