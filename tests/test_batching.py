"""Continuous batching gives every request the tokens it gets alone (CPU, float32, tiny model)."""

from __future__ import annotations

import threading

import pytest
import torch

from ragtune.batching import BatchingError, StepBatcher
from ragtune.fastdecode import FastDecodeError, FastDecoder

PROMPTS = [
    "### Instruction:\nWho built the lighthouse?\n\n### Context:\nThe harbour of Kessa",
    "Hello",
    "The quick brown fox jumps over the lazy dog. " * 6,
    "Ida Varnholm designed the breakwater and the tide gauge.",
    "1871",
]


@pytest.fixture(scope="module")
def decoder(tiny_lm_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_path)
    config = AutoConfig.from_pretrained(tiny_lm_path)
    config.update({"tie_word_embeddings": False, "initializer_range": 0.2})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return FastDecoder(model, tok, max_seq_len=160, compile=False), tok


def test_concurrent_requests_get_their_one_at_a_time_answers(decoder):
    fd, tok = decoder
    prompts = [tok(t)["input_ids"] for t in PROMPTS]
    budgets = [24, 9, 17, 30, 5]
    want = [fd.generate(p, n, eos_ids=[]) for p, n in zip(prompts, budgets, strict=True)]
    # 5 requests, 4 rows: one waits for a free row; warmed up (every step size) first
    batcher = StepBatcher(fd, max_batch=4, buckets=(1, 2), warmup=True)
    assert batcher.buckets == [1, 2, 4]
    try:
        got: list[list[int] | None] = [None] * len(prompts)

        def client(i: int) -> None:
            got[i] = list(batcher.stream(prompts[i], budgets[i], eos_ids=[]))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert got == want
        # rows were shared: fewer decode steps than one-at-a-time decoding would take
        assert batcher.steps < sum(budgets) - len(budgets)
    finally:
        batcher.close()


def test_a_request_joins_while_another_decodes_and_stops_are_kept(decoder):
    fd, tok = decoder
    first, second = tok(PROMPTS[0])["input_ids"], tok(PROMPTS[2])["input_ids"]
    free = fd.generate(second, 20, eos_ids=[])
    stop_id = free[6]  # pretend this id is EOS: kept, and decoding stops there
    want_first = fd.generate(first, 40, eos_ids=[])
    want_second = fd.generate(second, 20, eos_ids=[stop_id])
    text = tok.decode(want_first[10:14])
    stop = text.strip()[:3] or text
    want_stopped = fd.generate(first, 40, eos_ids=[], stop_strings=[stop])
    batcher = StepBatcher(fd, max_batch=4)
    try:
        stream = iter(batcher.stream(first, 40, eos_ids=[]))
        head = [next(stream) for _ in range(5)]  # the first request is decoding now
        joined = batcher.submit(second, 20, eos_ids=[stop_id])
        stopped = batcher.submit(first, 40, eos_ids=[], stop_strings=[stop])
        assert head + list(stream) == want_first
        assert joined.result(timeout=60) == want_second and want_second[-1] == stop_id
        assert stopped.result(timeout=60) == want_stopped
    finally:
        batcher.close()


def test_cancel_frees_the_row_and_limits(decoder):
    fd, tok = decoder
    batcher = StepBatcher(fd, max_batch=1)
    try:
        ids = tok(PROMPTS[1])["input_ids"]
        stream = batcher.stream(ids, 100, eos_ids=[])
        next(stream)
        stream.close()  # a client that went away: its row must come free
        assert batcher.generate(ids, 3, eos_ids=[]) == fd.generate(ids, 3, eos_ids=[])
        with pytest.raises(FastDecodeError, match="max_seq_len=160"):
            batcher.submit(list(range(5, 200)), 4)
        assert batcher.generate(ids, 0) == []
    finally:
        batcher.close()
    with pytest.raises(BatchingError, match="closed"):
        batcher.submit(ids, 3)
