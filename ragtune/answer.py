"""What the pipeline hands back: one :class:`Answer`, or an :class:`AnswerStream` of its text."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ragtune.decoding import NO_CHANGE, Decoding, PieceStream
from ragtune.types import Chunk

if TYPE_CHECKING:
    from ragtune.rag import RagPipeline


@dataclass
class Answer:
    """One answer with what it was based on.

    ``sources`` are ``(source, start, score)`` of the chunks in the prompt's context, in
    context order; ``prompt`` is the exact text the model was asked with. ``score``: how well
    the context supports answering (:mod:`ragtune.answerability`; None: not scored), computed
    on ``candidate``, the best non-abstaining answer, whose ``features`` it mixes.
    ``abstained``: the abstain answer, or an empty one.
    """

    text: str
    abstained: bool
    sources: list[tuple[str, int, float | None]]
    prompt: str
    latency_s: float
    chunks: list[Chunk] = field(default_factory=list, repr=False)
    stop_reason: str = ""
    new_tokens: int = 0
    prompt_tokens: int = 0
    retrieval_s: float = 0.0
    score: float | None = None
    candidate: str | None = field(default=None, repr=False)
    features: Any = field(default=None, repr=False)  # AnswerFeatures of the candidate

    def to_dict(self, with_prompt: bool = False) -> dict[str, Any]:
        """A JSON-ready dict (what ``ask.py json=true`` and the server's ``/ask`` return)."""
        out: dict[str, Any] = {
            "answer": self.text,
            "abstained": self.abstained,
            "sources": [{"source": s, "start": st, "score": sc} for s, st, sc in self.sources],
            "latency_s": round(self.latency_s, 4),
            "retrieval_s": round(self.retrieval_s, 4),
            "stop_reason": self.stop_reason,
            "new_tokens": self.new_tokens,
            "prompt_tokens": self.prompt_tokens,
        }
        if self.score is not None:
            out["score"] = self.score
        if with_prompt:
            out["prompt"] = self.prompt
        return out


@dataclass
class Prepared:
    """A question ready for the model: its context and the exact prompt."""

    question: str
    input: str
    chunks: list[Chunk]
    prompt: str
    retrieval_s: float


class AnswerStream:
    """The answer's text pieces as they are generated; ``.answer`` once exhausted.

    ``.chunks`` (the retrieved context) is known before the first piece. ``close()`` stops
    the generation early. With a calibration the pipeline decides on the whole candidate, so
    the stream is buffered: one piece, the final text (what ``.answer.text`` holds).
    Where :attr:`asynchronous` (a batched greedy answer, neither buffered nor scored),
    ``async for`` gives the same pieces on the caller's event loop, no thread per piece.
    """

    def __init__(
        self,
        pipeline: RagPipeline,
        prepared: Prepared,
        t0: float,
        decoding: Decoding = NO_CHANGE,
    ):
        self.chunks = prepared.chunks
        self.prompt = prepared.prompt
        self._pipeline = pipeline
        self._prepared = prepared
        self._t0 = t0
        self._stream: PieceStream = pipeline.generator.stream(prepared.prompt, decoding)
        self._buffered = pipeline.calibration is not None
        self.answer: Answer | None = None
        # scoring runs the model: never on an event loop
        self.asynchronous = (
            hasattr(self._stream, "__anext__") and not self._buffered and not pipeline.scoring
        )

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._buffered:
            if self.answer is None:
                for _ in self._stream:  # generate the whole candidate first
                    pass
                self._make_answer()
                if self.answer is not None and self.answer.text:
                    return self.answer.text
            raise StopIteration
        try:
            return next(self._stream)
        except StopIteration:
            self._make_answer()
            raise

    def __aiter__(self) -> AsyncIterator[str]:
        if not self.asynchronous:
            raise TypeError("this answer streams in a thread only (see .asynchronous)")
        return self._apieces()

    async def _apieces(self) -> AsyncIterator[str]:
        async for piece in self._stream:  # type: ignore[attr-defined]
            yield piece
        self._make_answer()

    def _make_answer(self) -> None:
        if self.answer is None and self._stream.result is not None:
            latency = time.perf_counter() - self._t0
            self.answer = self._pipeline._finish(self._prepared, self._stream.result, latency)

    def close(self) -> None:
        self._stream.close()
