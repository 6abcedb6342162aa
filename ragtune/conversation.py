"""A chat conversation as one ragtune question: what happens to system messages and earlier
turns (the server's ``/v1/chat/completions`` and LangChain's :class:`RagtuneChatModel`).

A ragtune model was trained on one question with retrieved context, in its own prompt
schema, so a chat is mapped onto that:

- **the question** is the last user message;
- **retrieval** searches for the previous user message and the question together, so a
  follow-up ("and when was it built?") still finds the documents of its subject;
- **the system message(s) and earlier turns** go into the prompt's Input section as
  ``System: ...``, ``User: ...``, ``Assistant: ...`` lines, within ``history_tokens`` of
  the LM's tokenizer: the oldest turns are dropped first, then the system text is cut. The
  schema's own preamble stays the model's instruction (it is what the model was trained
  with); a single user message gives exactly the prompt ``ask`` gives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ragtune.budget import truncate_to
from ragtune.errors import RagtuneError

HISTORY_TOKENS = 128  # the default room for system text and earlier turns in the Input section
_LABELS = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}


class ConversationError(RagtuneError):
    """A conversation with no question to answer."""


@dataclass(frozen=True)
class Turn:
    """One conversation as the pipeline takes it."""

    question: str
    input: str
    query: str


def turn_from_messages(
    messages: Sequence[tuple[str, str]],
    count: Callable[[str], int],
    history_tokens: int = HISTORY_TOKENS,
) -> Turn:
    """``(role, text)`` messages, oldest first -> the question, its Input and retrieval query.

    Roles other than system/developer/user/assistant (tool results) are left out.
    """
    last_user = max((i for i, (role, _) in enumerate(messages) if role == "user"), default=-1)
    if last_user < 0:
        raise ConversationError("messages: no user message to answer")
    question = messages[last_user][1].strip()
    if not question:
        raise ConversationError("messages: the last user message is empty")
    before = [(r, t.strip()) for r, t in messages[:last_user] if r in _LABELS and t.strip()]
    earlier_users = [t for r, t in before if r == "user"]
    query = f"{earlier_users[-1]}\n{question}" if earlier_users else question
    system = "\n".join(t for r, t in before if _LABELS[r] == "System")
    turns = [f"{_LABELS[r]}: {t}" for r, t in before if _LABELS[r] != "System"]
    return Turn(question, _history(system, turns, count, history_tokens), query)


def _history(system: str, turns: list[str], count: Callable[[str], int], budget: int) -> str:
    """System text and the newest turns that fit ``budget`` tokens, oldest first."""
    if budget <= 0:
        return ""
    kept: list[str] = []
    used = count(f"System: {system}") if system else 0
    if used > budget:  # the system text alone is too long: keep its start
        system, used = truncate_to(system, budget - count("System: "), count), budget
    for line in reversed(turns):
        n = count(line) + 1  # the line break
        if used + n > budget:
            break
        kept.insert(0, line)
        used += n
    head = [f"System: {system}"] if system else []
    return "\n".join(head + kept)
