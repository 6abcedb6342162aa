"""Where an answer ends: the schema's stop strings, in the text and during generation.

An answer is over when the model starts a new section (any header of the schema, or a new
line opening with the headers' markup). :func:`finish_text` cuts the text at the first stop and,
while streaming, holds back a tail that might still become one, so what is streamed only ever
grows into exactly what is returned.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch
from transformers import StoppingCriteria

from ragtune.schema import PromptSchema


def cut_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Text before the first complete stop string, and whether one was found."""
    first = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:first], True) if first >= 0 else (text, False)


def _partial_stop_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def finish_text(raw: str, stops: Sequence[str], final: bool) -> tuple[str, bool]:
    """The visible answer of ``raw`` generated text, and whether a stop string ended it.

    While generating (``final=False``), a tail that could still become a stop string, an
    incomplete UTF-8 character and trailing whitespace are held back; at the end a dangling
    prefix of a stop string (``\\n\\n###`` when the token limit struck) is dropped as well.
    The result only grows as ``raw`` grows, which is what makes streaming exact.
    """
    text, hit = cut_stop(raw, stops)
    if not hit and final:
        # Headers start a line: only a dangling prefix on its own line is dropped ("C#" stays).
        # A token limit can cut a multi-byte character (Japanese): its half decodes to U+FFFD.
        text = body = text.rstrip().rstrip("\ufffd").rstrip()
        n = _partial_stop_len(body, stops)
        if n and (n == len(body) or body[-n - 1] == "\n" or body[-n] == "\n"):
            text = body[:-n]
    elif not hit:
        text = text.rstrip("\ufffd")
        n = _partial_stop_len(text, stops)
        if n:
            text = text[:-n]
    return text.strip(), hit


class StopOnText(StoppingCriteria):
    """Per-row stop when a stop string appears in the generated text, or on cancellation.

    Not transformers' ``StopStringCriteria``: it preprocesses the whole vocabulary for every
    Generator (~10 s for SmolLM2's on this 2-core machine, not cached across instances in
    transformers 5.17) and misses a stop string that lies inside one token; decoding the
    last few tokens costs microseconds and misses nothing.
    """

    def __init__(
        self,
        tokenizer: Any,
        stops: Sequence[str],
        prompt_len: int,
        cancel: threading.Event | None = None,
    ):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.prompt_len = prompt_len
        self.cancel = cancel
        # Every token decodes to at least one character except partial UTF-8 bytes, so the
        # last (longest stop + a few) tokens always hold a stop string that just completed.
        self.window = max((len(s) for s in self.stops), default=0) + 4

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        batch = input_ids.shape[0]
        if self.cancel is not None and self.cancel.is_set():
            return torch.ones(batch, dtype=torch.bool, device=input_ids.device)
        done = [False] * batch
        if self.stops:
            for i in range(batch):
                tail = input_ids[i, self.prompt_len :][-self.window :].tolist()
                text = self.tokenizer.decode(
                    tail,
                    skip_special_tokens=True,
                    clean_up_tokenization_spaces=cleans_up(self.tokenizer),  # no BPE warning
                )
                done[i] = any(s in text for s in self.stops)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def cleans_up(tokenizer: Any) -> bool:
    """Whether decoding cleans up spaces: WordPiece vocabularies only (what HF applies)."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = getattr(backend, "model", None)
    return type(model).__name__ == "WordPiece"


def header_stops(schema: PromptSchema) -> list[str]:
    """A new line opening with the headers' common markup (``\n###``): any new section.

    A base model asked for comparison often invents its own header (``### Output:``); the
    schema's exact headers would not stop it, the markup does.
    """
    heads = list(schema.headers.values())
    prefix = heads[0] if heads else ""
    for h in heads[1:]:
        while not h.startswith(prefix):
            prefix = prefix[:-1]
    prefix = prefix.strip()
    return [f"\n{prefix}"] if len(prefix) >= 2 and not prefix.isalnum() else []
