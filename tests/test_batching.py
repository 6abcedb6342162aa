"""Continuous batching gives every request the tokens it gets alone (CPU, float32, tiny model)."""

from __future__ import annotations

import threading

import pytest

from ragtune.batching import BatchingError, StepBatcher
from ragtune.fastdecode import FastDecodeError, FastDecoder


@pytest.fixture(scope="module")
def decoder(tiny_lm_f32):
    model, tok = tiny_lm_f32
    return FastDecoder(model, tok, max_seq_len=160, compile=False), tok


def test_concurrent_requests_get_their_one_at_a_time_answers(batch_prompts, decoder):
    fd, tok = decoder
    prompts = [tok(t)["input_ids"] for t in batch_prompts]
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


def test_a_request_joins_while_another_decodes_and_stops_are_kept(batch_prompts, decoder):
    fd, tok = decoder
    first, second = tok(batch_prompts[0])["input_ids"], tok(batch_prompts[2])["input_ids"]
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


def test_cancel_frees_the_row_and_limits(batch_prompts, decoder):
    fd, tok = decoder
    batcher = StepBatcher(fd, max_batch=1)
    try:
        ids = tok(batch_prompts[1])["input_ids"]
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


def test_dense_copies_give_the_models_own_tokens(batch_prompts, decoder, tiny_lm_path):
    """quantize="dense" (the batcher's weights for a 4-bit model): fused 16-bit copies of the
    model's own weights, so the same greedy tokens as the model's modules."""
    from ragtune.fastweights import DenseLinear

    fd, tok = decoder
    dense = FastDecoder(fd.model, tok, max_seq_len=160, compile=False, quantize="dense")
    assert dense.quantize == "dense" and isinstance(dense._direct.fused[0].qkv, DenseLinear)
    for text in batch_prompts:
        ids = tok(text)["input_ids"]
        assert dense.generate(ids, 12, eos_ids=[]) == fd.generate(ids, 12, eos_ids=[])


def test_generator_sends_greedy_requests_through_one_batcher(decoder):
    """The server's wiring: plain, streamed and n=2 requests from threads share decode steps
    and get the answers the generator gives without batching; sampling keeps its own path."""
    from ragtune.config import GenerateConfig
    from ragtune.generate import Decoding, Generator
    from ragtune.schema import PromptFields, get_schema

    fd, tok = decoder
    schema = get_schema("alpaca_rag")
    qs = ["Who built the lighthouse?", "When?", "Where is the harbour of Kessa?", "Why " * 20]
    prompts = [schema.render_prompt(PromptFields(q, "", ["Ida built it."]), tok) for q in qs]
    gcfg = GenerateConfig(max_new_tokens=20)
    plain = Generator(fd.model, tok, schema, gcfg, max_seq_length=160)
    want = [plain.generate(p) for p in prompts]
    gen = Generator(fd.model, tok, schema, gcfg, max_seq_length=160)
    assert gen.start_batching("auto") is False  # CPU: auto leaves it off
    assert gen.start_batching("true", max_batch=4) and gen.concurrency == 4
    try:
        got: list = [None] * 6

        def ask(i: int) -> None:
            if i < 4 and i % 2:
                stream = gen.stream(prompts[i])
                text = "".join(stream)
                assert text == stream.result.text
                got[i] = stream.result
            elif i < 4:
                got[i] = gen.generate(prompts[i])
            else:  # n=2 (answers of one prompt decoded together), as the server asks for n
                got[i] = gen.generate_batch([prompts[i - 4]] * 2, batch_size=2)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        for g, w in zip(got[:4], want, strict=True):
            assert (g.text, g.token_ids, g.stop_reason) == (w.text, w.token_ids, w.stop_reason)
        assert [r.token_ids for r in got[4] + got[5]] == [want[0].token_ids] * 2 + [
            want[1].token_ids
        ] * 2
        stats = gen.batching_stats()
        assert stats["requests"] == 8 and stats["most_rows"] >= 2 and stats["busy"] == 0
        # sampling is not the batcher's: it runs under the lock, on the model's own generate
        sampled = gen.generate(prompts[0], Decoding(temperature=1.0, seed=3))
        assert gen.batching_stats()["requests"] == 8 and sampled.new_tokens >= 1
    finally:
        gen._batcher.close()


@pytest.mark.parametrize("invariant", [True, False])
def test_invariant_batcher_runs_one_shape_whatever_else_runs(batch_prompts, decoder, invariant):
    """The server's default (server.batch_invariant): every decode step has all max_batch rows
    and every prompt is prefilled alone, so in bf16 a request meets the same kernels whether it
    runs alone or among others; without it, steps shrink and prompts are prefilled together."""
    from ragtune.batchstream import batcher_for

    fd, tok = decoder
    batcher = batcher_for(fd.model, tok, 160, max_batch=4, warmup=False, invariant=invariant)
    steps: list[int] = []
    waves: list[int] = []
    step, prefill = batcher._step, batcher._prefill
    batcher._step = lambda b, *a: steps.append(b) or step(b, *a)  # type: ignore[method-assign]
    batcher._prefill = lambda w: waves.append(len(w)) or prefill(w)  # type: ignore[method-assign]
    try:
        prompts = [tok(t)["input_ids"] for t in batch_prompts[:4]]
        wake, batcher._wake = batcher._wake, threading.Event()  # the engine sees all 4 at once
        reqs = [batcher.submit(p, 6, eos_ids=[]) for p in prompts]
        batcher._wake = wake
        got = [r.result(timeout=60) for r in reqs]
        alone = batcher.generate(prompts[0], 6, eos_ids=[])
    finally:
        batcher.close()
    assert got == [fd.generate(p, 6, eos_ids=[]) for p in prompts] and alone == got[0]
    if invariant:
        assert set(steps) == {4} and set(waves) == {1}
    else:
        assert 1 in steps and max(waves) > 1


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_steps_run_ahead_of_the_tokens_they_hand_out(batch_prompts, decoder, depth):
    """Step k + depth is launched (from step k's ids, on the device) before step k's tokens
    are handed out, so the host never makes the GPU wait for them; a row that finished keeps
    stepping until the host knows, and those extra tokens are dropped: the answers stay the
    one-at-a-time ones."""
    fd, tok = decoder
    prompts = [tok(t)["input_ids"] for t in batch_prompts]
    budgets = [12, 3, 9, 15, 1]
    want = [fd.generate(p, n, eos_ids=[]) for p, n in zip(prompts, budgets, strict=True)]
    batcher = StepBatcher(fd, max_batch=4, buckets=(1, 2), depth=depth)
    order: list[tuple[str, int]] = []
    launch, process = batcher._launch, batcher._process

    def logged_launch() -> bool:
        ok = launch()
        order.append(("launch" if ok else "idle", batcher.steps))
        return ok

    def logged_process(entry, touched) -> None:
        order.append(("hand out", entry.seq))
        process(entry, touched)

    batcher._launch = logged_launch  # type: ignore[method-assign]
    batcher._process = logged_process  # type: ignore[method-assign]
    try:
        reqs = [batcher.submit(p, n, eos_ids=[]) for p, n in zip(prompts, budgets, strict=True)]
        got = [r.result(timeout=60) for r in reqs]
    finally:
        batcher.close()
    assert got == want
    handed = 0
    for i, (what, seq) in enumerate(order):
        if what != "hand out" or not seq:  # (a prefill's first token)
            continue
        handed += 1
        last_call, launched = next(x for x in reversed(order[:i]) if x[0] != "hand out")
        if last_call == "launch":  # (with no busy row left, what is queued is flushed)
            assert launched >= seq + depth, order[: i + 1]
    assert batcher.steps - depth - 1 <= handed <= batcher.steps  # (the last may be in flight)


def _generators(decoder, max_new: int = 20):
    from ragtune.config import GenerateConfig
    from ragtune.generate import Generator
    from ragtune.schema import PromptFields, get_schema

    fd, tok = decoder
    schema = get_schema("alpaca_rag")
    qs = ["Who built the lighthouse?", "When?", "Where is the harbour of Kessa?", "Why " * 20]
    prompts = [schema.render_prompt(PromptFields(q, "", ["Ida built it."]), tok) for q in qs]
    gcfg = GenerateConfig(max_new_tokens=max_new)
    plain = Generator(fd.model, tok, schema, gcfg, max_seq_length=160)
    gen = Generator(fd.model, tok, schema, gcfg, max_seq_length=160)
    assert gen.start_batching("true", max_batch=4)
    return plain, gen, prompts


def test_an_event_loop_is_woken_once_per_step_and_decodes_the_text(decoder):
    """Streamed on an event loop (the server's way): the batcher wakes the loop with one
    call_soon_threadsafe per step for all its requests, not one per token, and the pieces,
    decoded there, concatenate to exactly the unbatched answer."""
    import asyncio

    plain, gen, prompts = _generators(decoder)
    want = [plain.generate(p) for p in prompts]

    async def main():
        loop = asyncio.get_running_loop()
        calls = 0
        original = loop.call_soon_threadsafe

        def counted(*args, **kwargs):
            nonlocal calls
            calls += 1
            return original(*args, **kwargs)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]

        async def one(prompt):
            stream = gen.stream(prompt)
            return [piece async for piece in stream], stream.result

        got = await asyncio.gather(*(one(p) for p in prompts))
        return got, calls

    try:
        got, calls = asyncio.run(main())
        stats = gen.batching_stats()
    finally:
        gen._batcher.close()
    for (pieces, result), w in zip(got, want, strict=True):
        assert "".join(pieces) == result.text == w.text and result.token_ids == w.token_ids
    assert max(len(pieces) for pieces, _ in got) > 3  # streamed, not one piece at the end
    tokens = sum(result.new_tokens for _, result in got)
    assert stats["most_rows"] >= 2
    assert calls <= stats["steps"] + stats["prefills"] + gen._batcher.depth + 1
    assert calls < tokens / 2, (calls, tokens)


def test_a_cancelled_async_stream_frees_its_row(decoder):
    """A client gone mid-stream cancels its coroutine: the request stops, its row comes free."""
    import asyncio
    import time

    from ragtune.generate import Decoding

    _, gen, prompts = _generators(decoder, max_new=100)

    async def main():
        stream = gen.stream(prompts[3], Decoding(max_new_tokens=100, stop=("never",)))
        pieces = stream.__aiter__()
        await pieces.__anext__()
        task = asyncio.ensure_future(pieces.__anext__())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return stream

    try:
        stream = asyncio.run(main())
        deadline = time.time() + 30
        while gen._batcher.busy_rows and time.time() < deadline:
            time.sleep(0.05)
        assert gen._batcher.busy_rows == 0 and stream._req.cancelled
        assert len(stream._req.tokens) < 100
    finally:
        gen._batcher.close()


def test_tokens_are_handed_out_before_waiting_for_more_gpu_work(
    batch_prompts, decoder, monkeypatch
):
    """When the next queued entry is not done yet (a burst of prefills on a GPU), the tokens
    already read go out first: a prompt's first token does not wait for the prompts after it."""
    import ragtune.batching as batching

    fd, tok = decoder
    monkeypatch.setattr(batching.HostIds, "ready", lambda self: False)  # the GPU is always busy
    log: list[tuple[str, bool]] = []
    real_wake = batching.wake

    def logged_wake(requests):
        requests = list(requests)
        if requests:
            log.append(("wake", True))
        return real_wake(requests)

    monkeypatch.setattr(batching, "wake", logged_wake)
    batcher = StepBatcher(fd, max_batch=4, depth=2, prefill_tokens=1)  # a prefill per prompt
    process = batcher._process

    def logged_process(entry, touched) -> None:
        log.append(("hand out", any(not req.done for _, _, req in entry.items)))
        process(entry, touched)

    batcher._process = logged_process  # type: ignore[method-assign]
    try:
        prompts = [tok(t)["input_ids"] for t in batch_prompts[:4]]
        wake_event, batcher._wake = batcher._wake, threading.Event()  # all 4 admitted at once
        reqs = [batcher.submit(p, 6, eos_ids=[]) for p in prompts]
        batcher._wake = wake_event
        got = [r.result(timeout=60) for r in reqs]
    finally:
        batcher.close()
    assert got == [fd.generate(p, 6, eos_ids=[]) for p in prompts]
    assert batcher.prefills == 4
    for before, now in zip(log, log[1:], strict=False):
        assert not (before == ("hand out", True) and now[0] == "hand out"), log


def _together_then_alone(batcher: StepBatcher, prompts: list, timeout: float) -> tuple:
    """Every prompt admitted at once (6 new tokens each), then prompts[1] alone (beside one
    dummy row); closes the batcher. Returns (the concurrent answers, the lone one)."""
    try:
        wake_event, batcher._wake = batcher._wake, threading.Event()  # all admitted at once
        reqs = [batcher.submit(p, 6, eos_ids=[]) for p in prompts]
        batcher._wake = wake_event
        got = [r.result(timeout=timeout) for r in reqs]
        return got, batcher.generate(prompts[1], 6, eos_ids=[])
    finally:
        batcher.close()


def test_prompts_of_one_padded_length_are_prefilled_in_fixed_groups(batch_prompts, decoder):
    """prefill_group: up to that many prompts of one padded length share one forward of a
    fixed shape (missing rows are dummies into the spare row); answers stay the lone ones."""
    fd, tok = decoder
    texts = [
        batch_prompts[0],
        batch_prompts[2] * 2,
        batch_prompts[3],
        batch_prompts[2] + batch_prompts[0],
    ]  # 64/128 padded
    prompts = [tok(t)["input_ids"] for t in texts]
    want = [fd.generate(p, 6, eos_ids=[]) for p in prompts]
    batcher = StepBatcher(fd, max_batch=4, prefill_tokens=1, prefill_group=2)
    shapes: list[tuple[int, ...]] = []
    forward = batcher.prefiller.forward

    def logged(ids, *args):
        shapes.append(tuple(ids.shape))
        return forward(ids, *args)

    batcher.prefiller.forward = logged  # type: ignore[method-assign]
    got, alone = _together_then_alone(batcher, prompts, timeout=60)
    assert got == want and alone == want[1]
    assert sorted(shapes) == [(2, 64), (2, 128), (2, 128)]


@pytest.mark.parametrize("first", [False, True])
def test_prefill_first_queues_arriving_prompts_before_the_next_step(batch_prompts, decoder, first):
    """``prefill_first``: a cycle that finds requests waiting queues their prompts and launches
    no step, so prompts that arrive while others decode all start before the next 32-row step
    (fewer steps carry idle rows); the answers stay the one-at-a-time ones either way."""
    fd, tok = decoder
    prompts = [tok(t)["input_ids"] for t in batch_prompts]
    budgets = [30, 8, 12, 5, 9]
    want = [fd.generate(p, n, eos_ids=[]) for p, n in zip(prompts, budgets, strict=True)]
    batcher = StepBatcher(fd, max_batch=4, buckets=(4,), prefill_first=first)
    order: list[str] = []
    cycle, launch, prefill = batcher._cycle, batcher._launch, batcher._prefill_wave

    def logged_launch() -> bool:
        ok = launch()
        order.append("step" if ok else "idle")
        return ok

    batcher._cycle = lambda: order.append("cycle") or cycle()  # type: ignore[method-assign]
    batcher._launch = logged_launch  # type: ignore[method-assign]
    batcher._prefill_wave = lambda w, t: order.append("prompt") or prefill(w, t)  # type: ignore[method-assign]
    try:
        head = batcher.submit(prompts[0], budgets[0], eos_ids=[])
        head.wait_for(3, timeout=60)  # decoding now
        wake, batcher._wake = batcher._wake, threading.Event()
        reqs = [
            batcher.submit(p, n, eos_ids=[]) for p, n in zip(prompts[1:], budgets[1:], strict=True)
        ]
        batcher._wake = wake
        got = [head.result(timeout=60)] + [r.result(timeout=60) for r in reqs]
    finally:
        batcher.close()
    assert got == want
    cycles = "|".join(order).split("cycle")
    # a prompt queued before the cycle's step: with prefill_first, no step in that cycle
    mixed = [c for c in cycles if "prompt|step" in c and c.index("prompt") < c.index("step")]
    assert (not mixed) if first else True, mixed
    if first:
        assert any(c.strip("|").startswith("prompt") and "step" not in c for c in cycles)


def test_the_server_batcher_pairs_prompts_for_fp8_on_a_gpu(batch_prompts, decoder):
    """batcher_for: prompts in fixed pairs for FP8 weights on a GPU in the invariant mode (a
    lone prompt beside a dummy), one at a time otherwise; a pair keeps the lone answers."""
    import torch

    from ragtune.batchstream import batcher_for, prefill_group_for

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert prefill_group_for("fp8", cuda) == 2
    assert prefill_group_for("fp8", cuda, invariant=False) == 1
    assert prefill_group_for("fp8", cpu) == prefill_group_for("dense", cuda) == 1
    assert prefill_group_for(None, cuda) == 1
    fd, tok = decoder
    assert batcher_for(fd.model, tok, 160, max_batch=4, warmup=False).prefiller.group == 1
    batcher = batcher_for(fd.model, tok, 160, max_batch=4, warmup=False, prefill_group=2)
    runs: list[int] = []
    prefill = batcher.prefiller.run
    batcher.prefiller.run = lambda p, r: runs.append(len(p)) or prefill(p, r)  # type: ignore[method-assign]
    try:
        assert batcher.prefiller.group == 2
        prompts = [tok(t)["input_ids"] for t in batch_prompts[:4]]
        wake, batcher._wake = batcher._wake, threading.Event()  # the engine sees all 4 at once
        reqs = [batcher.submit(p, 6, eos_ids=[]) for p in prompts]
        batcher._wake = wake
        got = [r.result(timeout=60) for r in reqs]
    finally:
        batcher.close()
    assert got == [fd.generate(p, 6, eos_ids=[]) for p in prompts]
    assert max(runs) == 2  # some prompts shared a forward


def test_a_compiled_prefill_keeps_the_lone_answers_in_one_compilation(batch_prompts, decoder):
    """``prefill_compiled`` (the default with compiled steps; ``RAGTUNE_PREFILL_COMPILE=off``): the
    prompts' forward runs compiled by inductor, in fixed pairs (a lone prompt beside a dummy): answers
    equal the eager decoder's and a prompt's own alone, and one compilation (a symbolic
    length) serves both padded lengths (a length compiled apart would be 16 compiles at 12B)."""
    import torch

    from ragtune.batchprefill import COMPILE_ENV, compile_by_default

    fd, tok = decoder
    texts = [batch_prompts[0], batch_prompts[2] * 2, batch_prompts[3], batch_prompts[2]]
    prompts = [tok(t)["input_ids"] for t in texts]  # padded to 64 and 128
    want = [fd.generate(p, 6, eos_ids=[]) for p in prompts]
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    batcher = StepBatcher(fd, max_batch=4, prefill_tokens=1, prefill_group=2, prefill_compiled=True)
    got, alone = _together_then_alone(batcher, prompts, timeout=300)
    assert got == want and alone == want[1]
    assert batcher.prefiller.compiled and batcher.prefiller._compiled is not None
    assert sorted(batcher.prefiller.shapes) == [(2, 64), (2, 128)]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1
    eager = StepBatcher(fd, max_batch=2)
    eager.close()
    assert not eager.prefiller.compiled  # uncompiled steps: an eager prefill
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(COMPILE_ENV, raising=False)
        assert compile_by_default(True) and not compile_by_default(False)  # on with compiled steps
        mp.setenv(COMPILE_ENV, "off")
        assert not compile_by_default(True)


def test_without_buckets_a_lone_request_steps_alone(batch_prompts, decoder):
    """The default step sizes: a lone request runs 1-row steps, a few share 8 rows, more all."""
    fd, tok = decoder
    wide = StepBatcher(fd, max_batch=32)
    wide.close()
    assert wide.buckets == [1, 8, 32]
    batcher = StepBatcher(fd, max_batch=4)
    steps: list[int] = []
    step = batcher._step
    batcher._step = lambda b, *a: steps.append(b) or step(b, *a)  # type: ignore[method-assign]
    try:
        ids = tok(batch_prompts[0])["input_ids"]
        assert batcher.generate(ids, 4, eos_ids=[]) == fd.generate(ids, 4, eos_ids=[])
    finally:
        batcher.close()
    assert batcher.buckets == [1, 4] and set(steps) == {1}


def test_compiled_steps_compile_the_prefill_by_default(decoder, monkeypatch):
    """With a compiled decoder the prompts' forward is compiled too, unless
    RAGTUNE_PREFILL_COMPILE=off (nothing is compiled here: no request runs)."""
    from ragtune.batchprefill import COMPILE_ENV

    fd, tok = decoder
    compiled = FastDecoder(fd.model, tok, max_seq_len=160, compile=True)
    monkeypatch.delenv(COMPILE_ENV, raising=False)
    batcher = StepBatcher(compiled, max_batch=2)
    batcher.close()
    assert batcher.prefiller.compiled
    monkeypatch.setenv(COMPILE_ENV, "off")
    batcher = StepBatcher(compiled, max_batch=2)
    batcher.close()
    assert not batcher.prefiller.compiled


def test_a_trace_lists_every_submitted_request(batch_prompts, decoder):
    """``trace`` (the benches' breakdown): every request submitted, one with no budget too."""
    fd, tok = decoder
    batcher = StepBatcher(fd, max_batch=2)
    try:
        ids = tok(batch_prompts[1])["input_ids"]
        batcher.submit(ids, 2, eos_ids=[]).result(timeout=60)  # not traced: no list yet
        batcher.trace = []
        reqs = [batcher.submit(ids, 2, eos_ids=[]), batcher.submit(ids, 0)]
        assert reqs[0].result(timeout=60) == fd.generate(ids, 2, eos_ids=[])
    finally:
        batcher.close()
    assert batcher.trace == reqs


def test_a_request_cancelled_while_waiting_never_takes_a_row(batch_prompts, decoder):
    """A client gone before its request got a row: the request ends, and the row it would have
    had stays free for the next one."""
    fd, tok = decoder
    ids = tok(batch_prompts[1])["input_ids"]
    batcher = StepBatcher(fd, max_batch=1)
    gate, cycle = threading.Event(), batcher._cycle
    gate.set()
    batcher._cycle = lambda: gate.wait(60) and cycle()  # type: ignore[method-assign]
    try:
        stream = batcher.stream(ids, 100, eos_ids=[])
        next(stream)  # the only row is busy
        gate.clear()  # (the engine stops at its next cycle, the row still busy)
        waiting = batcher.submit(ids, 5, eos_ids=[])
        waiting.cancel()
        stream.close()
        gate.set()
        assert waiting.result(timeout=60) == []
        assert batcher.submit(ids, 3, eos_ids=[]).result(timeout=20) == fd.generate(
            ids, 3, eos_ids=[]
        )
        assert batcher.requests == 2 and batcher.busy_rows == 0
    finally:
        gate.set()
        batcher.close()


def test_a_failed_warm_up_is_logged_and_requests_still_run(batch_prompts, decoder, monkeypatch):
    """A warm-up that fails is logged; the batcher still comes ready and answers (each request
    pays the compile instead)."""
    import logging

    fd, tok = decoder

    def broken(self) -> None:
        raise RuntimeError("no graphs today")

    monkeypatch.setattr(StepBatcher, "_warm", broken)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("ragtune.batching")
    logger.addHandler(handler)
    batcher = StepBatcher(fd, max_batch=2, warmup=True)
    try:
        assert batcher.ready.wait(timeout=30)
        ids = tok(batch_prompts[1])["input_ids"]
        assert batcher.generate(ids, 3, eos_ids=[]) == fd.generate(ids, 3, eos_ids=[])
    finally:
        batcher.close()
        logger.removeHandler(handler)
    failed = [r for r in records if "warm-up failed" in r.getMessage()]
    assert failed and failed[0].exc_info and "no graphs today" in str(failed[0].exc_info[1])


def test_a_failed_request_raises_to_a_consumer_iterating_its_ids():
    """The ids decoded before a failure come out first, then the failure (not a short answer)."""
    from ragtune.batchstream import Request

    req = Request([1, 2], 5, set(), [])
    req.tokens.extend([7, 8])
    req.finish(RuntimeError("the step broke"))
    got: list[int] = []
    with pytest.raises(RuntimeError, match="the step broke"):
        for token in req:
            got.append(token)
    assert got == [7, 8]


def test_a_batched_stream_comes_in_pieces_and_closing_it_unread_frees_its_row(decoder):
    """Iterated in a thread, a batched answer comes in pieces as its tokens are decoded; a
    stream closed before it was read cancels its request, so its row comes free at once."""
    import time

    from ragtune.generate import Decoding

    plain, gen, prompts = _generators(decoder)
    try:
        stream = gen.stream(prompts[0])
        pieces = list(stream)
        assert len(pieces) > 3 and all(pieces)  # pieces, not the whole text at the end
        assert "".join(pieces) == stream.result.text == plain.generate(prompts[0]).text
        unread = gen.stream(prompts[3], Decoding(max_new_tokens=100, stop=("never",)))
        unread.close()
        assert unread._req.cancelled
        deadline = time.time() + 30
        while gen._batcher.busy_rows and time.time() < deadline:
            time.sleep(0.05)
        assert gen._batcher.busy_rows == 0 and len(unread._req.tokens) < 100
    finally:
        gen._batcher.close()


def test_text_held_back_as_a_possible_stop_string_ends_the_stream(decoder):
    """An answer that ends with the start of a stop string: that text is held back while the
    answer may still complete the stop, and comes out as the stream's last piece."""
    from ragtune.generate import Decoding

    plain, gen, prompts = _generators(decoder)
    answer = plain.generate(prompts[1]).text
    held = answer[-2:]
    decoding = Decoding(stop=(held + "~never~",))
    try:
        stream = gen.stream(prompts[1], decoding)
        pieces = list(stream)
    finally:
        gen._batcher.close()
    assert stream.result.text == answer == plain.generate(prompts[1], decoding).text
    assert "".join(pieces) == answer and all(pieces) and pieces[-1].endswith(held)


def test_a_stream_decodes_new_tokens_only_and_none_after_its_stop():
    """The text is decoded where it is consumed (the server's event loop), so a wake-up that
    brought no token decodes nothing, nor do the tokens still in flight after a stop string."""
    from ragtune.batchstream import BatchedTextStream, Request

    words = {1: "one ", 2: "two ", 3: "ST", 4: "OP", 5: "three "}

    class FakeGenerator:
        eos_ids = {0}

        def __init__(self) -> None:
            self._batcher, self.decoded = self, []

        def stops_for(self, decoding):
            return ["STOP"]

        def encode(self, text):
            return [1]

        def max_new_for(self, prompt_tokens, decoding):
            return 10

        def submit(self, ids, max_new, eos, stops):
            self.req = Request(ids, max_new, set(eos), stops)
            return self.req

        def decode(self, ids):
            self.decoded.append(list(ids))
            return "".join(words[t] for t in ids)

    gen = FakeGenerator()
    stream = BatchedTextStream(gen, "q")
    gen.req.tokens.append(1)
    assert stream._advance() == "one" and stream._advance() == ""
    gen.req.tokens.extend([2, 3, 4])
    assert stream._advance() == " two" and gen.req.cancelled  # the stop string ended it
    gen.req.tokens.append(5)  # a step that was in flight
    assert stream._advance() == ""
    assert gen.decoded == [[1], [1, 2, 3, 4]]
