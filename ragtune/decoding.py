"""What one request asks of decoding, and what one generated answer is.

Plain values, apart from the code that generates: the request models (``api_models``), the
server, LangChain and the remote engine use them without importing torch or transformers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ragtune.config import GenerateConfig


@dataclass(frozen=True)
class Decoding:
    """Per-request decoding; ``None`` keeps the ``generate`` config's value.

    ``max_new_tokens`` may be larger than the config's default (it is cut to what
    ``max_seq_length`` leaves after the prompt); ``temperature`` 0 is greedy; ``seed`` makes
    sampling repeatable; ``stop`` adds stop strings to the schema's (trimmed like them).
    """

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


NO_CHANGE = Decoding()


@dataclass
class GenerationResult:
    """One generated answer.

    ``text`` is the answer (stop string trimmed, surrounding whitespace stripped),
    ``token_ids`` the generated ids before EOS, ``new_tokens`` every token generated (EOS
    included), ``stop_reason`` one of ``eos``, ``stop_string``, ``length``.
    """

    text: str
    token_ids: list[int]
    stop_reason: str
    new_tokens: int
    seconds: float
    prompt_tokens: int = 0
    batch_rows: int = 1  # answers decoded together in ``seconds``

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def generate_settings(gcfg: Any) -> GenerateConfig:
    """A GenerateConfig from a dataclass, a DictConfig/dict, or None (the defaults)."""
    if gcfg is None:
        return GenerateConfig()
    if isinstance(gcfg, GenerateConfig):
        return gcfg
    get = gcfg.get if hasattr(gcfg, "get") else lambda k, d: getattr(gcfg, k, d)
    defaults = GenerateConfig()
    return GenerateConfig(
        **{k: get(k, getattr(defaults, k)) for k in GenerateConfig.__dataclass_fields__}
    )


class PieceStream:
    """An answer as text pieces from the subclass's ``_run`` generator; ``result`` is the whole
    answer once they are exhausted (the pieces concatenate to ``result.text``)."""

    _it: Iterator[str]
    result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._it)

    def _stop_iterating(self) -> None:
        with contextlib.suppress(ValueError):  # iterated in another thread now: it sees a flag
            self._it.close()


def new_text(text: str, emitted: str) -> str:
    """What ``text`` adds to the already emitted prefix ('' when it adds nothing)."""
    return text[len(emitted) :] if text.startswith(emitted) and len(text) > len(emitted) else ""
