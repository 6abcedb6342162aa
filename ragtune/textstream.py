"""One streamed answer on the standard (Hugging Face ``generate``) path: :class:`TextStream`.

The batcher's streams are ``ragtune.batchstream.BatchedTextStream``; an engine's are
``ragtune.remote.RemoteTextStream``: all three yield the same pieces for the same tokens.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from transformers import TextIteratorStreamer

from ragtune.decoding import NO_CHANGE, Decoding, GenerationResult, PieceStream, new_text
from ragtune.stopping import cleans_up, finish_text

if TYPE_CHECKING:
    from ragtune.generate import Generator


class TextStream(PieceStream):
    """Iterator over the text pieces of one streamed answer; ``.result`` once exhausted.

    The pieces concatenate to exactly ``result.text``. The model runs in a worker thread
    (transformers' ``TextIteratorStreamer`` hands its text over) that holds the generator's
    lock only while it generates; ``close()`` (or leaving the loop and dropping the stream)
    stops it at the next token, so an abandoned stream never keeps the model busy.
    """

    def __init__(self, generator: Generator, prompt_text: str, decoding: Decoding = NO_CHANGE):
        self._gen = generator
        self._prompt = prompt_text
        self._decoding = decoding
        self._stops = generator.stops_for(decoding)
        self._cancel = threading.Event()
        self._streamer = TextIteratorStreamer(
            generator.tokenizer,
            skip_prompt=True,
            skip_special_tokens=True,
            clean_up_tokenization_spaces=cleans_up(generator.tokenizer),
        )
        self._out: dict = {"row": [], "error": None}  # what the worker thread hands back
        self._thread: threading.Thread | None = None
        self._it = self._run()
        self.result: GenerationResult | None = None

    def close(self) -> None:
        """Stop generating; safe from any thread, also while another thread is iterating."""
        self._cancel.set()
        self._stop_iterating()

    def __del__(self) -> None:
        self._cancel.set()

    def _run(self) -> Iterator[str]:
        gen = self._gen
        ids = gen.encode(self._prompt)
        t0 = time.perf_counter()
        # The worker holds no reference to this stream: a dropped stream is collected, and its
        # finaliser (or its generator's) cancels the generation at the next token.
        self._thread = threading.Thread(
            target=_generate_into,
            args=(gen, ids, self._decoding, self._streamer, self._cancel, self._out),
            daemon=True,
        )
        self._thread.start()
        raw = emitted = ""
        hit = False
        try:
            for piece in self._streamer:
                if hit:
                    continue  # drain until the generation thread ends
                raw += piece
                visible, hit = finish_text(raw, self._stops, final=False)
                if piece := new_text(visible, emitted):
                    yield piece
                    emitted = visible
                if hit:
                    self._cancel.set()
        finally:
            self._cancel.set()  # no-op when generation already ended
        # The worker ends right after the streamer's end; joining it means no thread is left
        # inside torch when the caller moves on (or the interpreter exits).
        self._thread.join(timeout=60)
        if self._out["error"] is not None:
            raise self._out["error"]
        # The answer is read from the ids, exactly as generate() reads them.
        row = self._out["row"]
        result = gen._result(row, time.perf_counter() - t0, len(ids), stops=self._stops)
        if tail := new_text(result.text, emitted):
            yield tail
        self.result = result


def _generate_into(
    gen: Generator,
    ids: list[int],
    decoding: Decoding,
    streamer: TextIteratorStreamer,
    cancel: threading.Event,
    out: dict,
) -> None:
    """The worker: one row generated into ``streamer``; the row or the error goes to ``out``."""
    ended = False
    try:
        with gen._turn(decoding):
            if cancel.is_set():
                return
            rows = gen._generate_ids([ids], decoding, streamer=streamer, cancel=cancel)
            out["row"], ended = rows[0], True
    except BaseException as e:  # re-raised in the consumer
        out["error"] = e
    finally:
        if not ended:  # generate() ends the streamer itself when it returns
            streamer.end()
