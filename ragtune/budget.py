"""Token budgets shared by training and serving: how text is counted inside a prompt and
how many tokens an answer keeps free. Both stages import these from here, so serving never
imports the training stage to size a context."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

ANSWER_RESERVE = 64  # tokens kept free for the answer when budgeting a context (serving's default)


def token_counter(tokenizer: Any) -> Callable[[str], int]:
    """Count tokens of text the way it will be encoded inside a prompt."""
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
