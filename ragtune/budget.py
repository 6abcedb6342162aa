"""Token budgets shared by training and serving: how text is counted inside a prompt, how
many tokens an answer keeps free, and how many the context block gets. Both stages import
these from here, so serving never imports the training stage to size a context."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

ANSWER_RESERVE = 64  # tokens kept free for the answer when budgeting a context (serving's default)


def token_counter(tokenizer: Any) -> Callable[[str], int]:
    """Count tokens of text the way it will be encoded inside a prompt."""
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def context_budget(
    schema: Any,
    tokenizer: Any,
    fields: Any,
    max_seq_length: int,
    *,
    context_tokens: int = 0,
    max_new_tokens: int = 0,
) -> int:
    """Tokens the context block of one prompt may use.

    ``context_tokens`` when set; else what is left of ``max_seq_length`` once the prompt
    without context and the answer fit. The answer keeps :data:`ANSWER_RESERVE` tokens, or
    ``max_new_tokens`` when that is larger, so training's budget holds whenever the answer
    fits in it and prompt + answer always fit when serving.
    """
    if context_tokens:
        return int(context_tokens)
    reserve = max(ANSWER_RESERVE, int(max_new_tokens))
    return schema.context_budget(tokenizer, fields, int(max_seq_length), reserve)


def tokenizer_key(tokenizer: Any) -> tuple:
    """Tells tokenizers apart that would count a context's tokens differently."""
    probe = tokenizer("ragtune probe: Tokyo 東京 1,234 naïve", add_special_tokens=False)
    return (type(tokenizer).__name__, len(tokenizer), tuple(probe["input_ids"]))


def fit_prompt(
    render: Callable[[list[Any]], str],
    count_prompt: Callable[[str], int],
    count_text: Callable[[str], int],
    chunks: list[Any],
    limit: int,
) -> tuple[list[Any], str, int]:
    """As much of ``chunks`` as lets the rendered prompt fit ``limit`` tokens: (chunks, prompt,
    its tokens).

    The budget counts each chunk alone; the joined, neutralised context block can take a few
    tokens more (separators, merges across a join: often in Japanese), so the context is cut
    again by the excess until the whole prompt fits.
    """
    from ragtune.retriever import fit_budget

    text = render(chunks)
    n = count_prompt(text)
    while chunks and n > limit:
        chunks = fit_budget(
            chunks, sum(count_text(c.text) for c in chunks) - (n - limit), count_text
        )
        text = render(chunks)
        n = count_prompt(text)
    return chunks, text, n


def truncate_to(text: str, budget: int, count: Callable[[str], int]) -> str:
    """The longest prefix of ``text`` that counts at most ``budget`` tokens (binary search)."""
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(text[:mid]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip()
