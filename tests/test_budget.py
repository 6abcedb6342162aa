"""Token budgets: text counted as it sits inside a prompt, and tokenizers told apart."""

from __future__ import annotations


def test_a_chunk_is_counted_without_special_tokens_of_its_own(lm_path):
    """A chunk inside a prompt gets no [CLS] / [SEP] (or BOS) of its own: counting them would
    shrink every context by a few tokens a chunk."""
    from transformers import AutoTokenizer

    from ragtune.budget import token_counter
    from ragtune.models import embedder_dir

    bert = AutoTokenizer.from_pretrained(embedder_dir())  # adds [CLS] and [SEP] when asked
    text = "Velmora is a lake town in the province of Ardent."
    assert token_counter(bert)(text) == len(bert.tokenize(text))
    assert len(bert(text)["input_ids"]) == len(bert.tokenize(text)) + 2


def test_the_context_cache_key_tells_tokenizers_apart(lm_path):
    """Pipelines sharing a context cache (evaluation's modes) reuse a context only when their
    tokenizers would count it the same: the same tokenizer loaded twice shares, another not."""
    from transformers import AutoTokenizer

    from ragtune.budget import tokenizer_key
    from ragtune.models import embedder_dir

    smol = AutoTokenizer.from_pretrained(lm_path)
    assert tokenizer_key(smol) == tokenizer_key(AutoTokenizer.from_pretrained(lm_path))
    assert tokenizer_key(smol) != tokenizer_key(AutoTokenizer.from_pretrained(embedder_dir()))
