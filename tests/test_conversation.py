"""How a chat maps onto one ragtune question: question, Input section, retrieval query."""

from __future__ import annotations

import pytest

from ragtune.conversation import ConversationError, turn_from_messages


def words(text: str) -> int:
    return len(text.split())


def test_one_user_message_is_exactly_an_ask():
    t = turn_from_messages([("user", " Who developed Corvanite? ")], words)
    assert (t.question, t.input, t.query) == ("Who developed Corvanite?", "", t.question)


def test_system_and_earlier_turns_go_to_the_input_and_the_query_keeps_the_subject():
    msgs = [
        ("system", "Answer briefly."),
        ("user", "Tell me about Corvanite."),
        ("assistant", "It is a copper-nickel alloy."),
        ("tool", "ignored tool output"),
        ("user", "Who developed it?"),
    ]
    t = turn_from_messages(msgs, words, history_tokens=100)
    assert t.question == "Who developed it?"
    assert t.query == "Tell me about Corvanite.\nWho developed it?"
    assert t.input == (
        "System: Answer briefly.\nUser: Tell me about Corvanite.\n"
        "Assistant: It is a copper-nickel alloy."
    )
    assert "tool" not in t.input


def test_history_keeps_the_newest_turns_within_budget():
    msgs = [("user", f"question number {i} " + "x " * 5) for i in range(6)]
    msgs.append(("user", "last?"))
    t = turn_from_messages([("system", "be brief"), *msgs], words, history_tokens=30)
    assert words(t.input) <= 30 + t.input.count("\n")
    assert t.input.startswith("System: be brief")
    assert "question number 5" in t.input and "question number 0" not in t.input
    long_system = turn_from_messages([("system", "w " * 100), ("user", "q?")], words, 10)
    assert long_system.input.startswith("System: w") and words(long_system.input) <= 10
    assert turn_from_messages([("system", "s"), ("user", "q?")], words, 0).input == ""


@pytest.mark.parametrize(
    ("msgs", "needle"),
    [([("system", "x")], "no user message"), ([("user", "  ")], "empty")],
)
def test_nothing_to_answer_is_a_clear_error(msgs, needle):
    with pytest.raises(ConversationError, match=needle):
        turn_from_messages(msgs, words)


def test_the_history_budget_counts_each_line_with_its_label_and_line_break():
    """``history_tokens`` is spent on the lines as written ("System: ...", "User: ...") plus a
    line break per turn: a budget of exactly that keeps everything, one less drops the turn."""
    msgs = [("system", "be brief"), ("user", "hi there"), ("user", "why?")]
    need = words("System: be brief") + words("User: hi there") + 1
    assert turn_from_messages(msgs, words, need).input == "System: be brief\nUser: hi there"
    assert turn_from_messages(msgs, words, need - 1).input == "System: be brief"
    assert turn_from_messages(msgs, words, 0).input == ""  # no history at all


def test_developer_messages_are_system_text_and_blank_or_unknown_ones_are_left_out():
    msgs = [
        ("developer", "Cite the page."),
        ("user", "   "),
        ("function", "a result"),
        ("assistant", "Earlier answer."),
        ("user", "Next?"),
    ]
    t = turn_from_messages(msgs, words, history_tokens=100)
    assert t.input == "System: Cite the page.\nAssistant: Earlier answer."
    assert t.query == "Next?"  # a blank earlier user message is no subject to search for
