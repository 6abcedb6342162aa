"""``generate.engine_url``: generation on a remote OpenAI-compatible engine, everything else
ragtune's. The engine is ragtune's own server in generation-only mode (a real uvicorn server on
loopback, serving the same tiny calibrated model as tests/test_one_path.py), so the remote
pipeline's answers, sources, answer-or-abstain decisions and scores must equal the local
pipeline's: the calibration flips one answer, so a remote path that scored differently (or not
at all) would differ.
"""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi.testclient import TestClient
from test_one_path import QUESTIONS, trained  # noqa: F401  (the module fixture)
from test_rag import ask_cfg
from test_server import free_port, serve_in_thread

from ragtune.config import ConfigError, compose, validate
from ragtune.generate import Decoding
from ragtune.remote import Engine, EngineError, RemoteGenerator

KEY = "engine-key-1"


def _engine_app(trained, api_key=None):  # noqa: F811
    from ragtune.rag import open_pipeline
    from ragtune.server import create_app

    root, model_dir, _ = trained
    cfg = ask_cfg(root, f"model_dir={model_dir}", "generate.max_new_tokens=8")
    engine = open_pipeline(cfg, explicit=[], context="closed")
    assert engine.retriever is None  # generation only: no index is opened
    return create_app(engine, api_key, generation_only=True)


@pytest.fixture(scope="module")
def engine(trained):  # noqa: F811
    """ragtune's server in generation-only mode, on loopback: its base URL."""
    base, srv, thread = serve_in_thread(_engine_app(trained))
    yield base
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def local(trained):  # noqa: F811
    from ragtune.rag import open_pipeline

    root, model_dir, _ = trained
    return open_pipeline(ask_cfg(root, f"model_dir={model_dir}", "generate.max_new_tokens=8"), [])


def _remote_cfg(trained, url: str):  # noqa: F811
    root, model_dir, _ = trained
    overrides = [f"model_dir={model_dir}", "generate.max_new_tokens=8"]
    return ask_cfg(root, *overrides, f"generate.engine_url={url}")


@pytest.fixture(scope="module")
def remote(trained, engine):  # noqa: F811
    """The pipeline with generate.engine_url: the model's weights are never loaded."""
    from transformers import AutoModelForCausalLM

    from ragtune.rag import open_pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded although generate.engine_url is set")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
        pipe = open_pipeline(_remote_cfg(trained, f"{engine}/v1"), [])
    assert isinstance(pipe.generator, RemoteGenerator) and isinstance(pipe.model, Engine)
    return pipe


def _same(a, b) -> None:
    assert (b.text, b.sources, b.abstained) == (a.text, a.sources, a.abstained)
    assert b.candidate == a.candidate
    assert b.score == pytest.approx(a.score, abs=1e-4)


def test_remote_answers_equal_local(local, remote):
    want = [local.answer(q) for q in QUESTIONS]
    # precondition: the calibration decided (one candidate became the abstain answer)
    assert any(a.text == local.schema.abstain != a.candidate for a in want)
    assert any(not a.abstained for a in want)
    for q, a in zip(QUESTIONS, want, strict=True):
        _same(a, remote.answer(q))
        stream = remote.stream(q)  # buffered with a calibration: the decided text
        assert "".join(stream) == a.text, q
        _same(a, stream.answer)
    for a, b in zip(want, remote.answer_batch(QUESTIONS, batch_size=2), strict=True):
        _same(a, b)


def test_remote_generation_equals_local_plain_streamed_and_blocked(local, remote):
    """Below the pipeline: plain, streamed (token by token over SSE) and with the abstain
    answer's first token banned at the first step (the scored candidate of an abstention)."""
    from ragtune.answerability import abstain_first_token

    prompts = [local.prepare(q).prompt for q in QUESTIONS]
    for p in prompts:
        want = local.generator.generate(p)
        got = remote.generator.generate(p)
        assert (got.text, got.stop_reason) == (want.text, want.stop_reason)
        stream = remote.generator.stream(p)
        pieces = list(stream)
        assert "".join(pieces) == want.text and stream.result.text == want.text
        assert len(pieces) > 1  # it did stream
        # a request's stop string: the engine is told, stops there (as many tokens as local)
        stop = Decoding(stop=(want.text.split()[1],))
        want, got = local.generator.generate(p, stop), remote.generator.generate(p, stop)
        assert want.stop_reason == "stop_string"
        assert (got.text, got.stop_reason, got.new_tokens) == (
            want.text,
            want.stop_reason,
            want.new_tokens,
        )
        assert "".join(remote.generator.stream(p, stop)) == want.text
    # ban each prompt's own greedy first token: every candidate changes
    for p in prompts:
        greedy = local.generator.generate(p)
        assert greedy.token_ids, "precondition: a non-empty answer"
        first = greedy.token_ids[:1]
        want = local.generator.generate_batch([p], block_first_tokens=first)[0]
        got = remote.generator.generate_batch([p], block_first_tokens=first)[0]
        assert got.text == want.text != greedy.text
    ban = [abstain_first_token(local.tokenizer, local.schema)]
    want = [r.text for r in local.generator.generate_batch(prompts, block_first_tokens=ban)]
    got = [r.text for r in remote.generator.generate_batch(prompts, block_first_tokens=ban)]
    assert got == want


def test_ragtunes_api_in_front_of_the_remote_engine(local, remote):
    """The OpenAI-compatible server in front stays ragtune's: same text and sources."""
    from ragtune.server import create_app

    # what `ragtune serve` does before it builds the app: the engine batches, ragtune admits
    assert remote.generator.start_batching("auto", 8) is False
    assert remote.generator.concurrency == 8
    client = TestClient(create_app(remote))
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["batching"] is None
    for q in QUESTIONS:
        a = local.answer(q)
        body = {"messages": [{"role": "user", "content": q}], "stream": True}
        events = client.post("/v1/chat/completions", json=body).text
        chunks = [json.loads(e[6:]) for e in events.split("\n\n") if e[6:] not in ("", "[DONE]")]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert text == a.text, q
        srcs = [(s["source"], s["start"]) for s in chunks[-1]["ragtune"]["sources"]]
        assert srcs == [(s, st) for s, st, _ in a.sources]
        assert chunks[-1]["ragtune"]["abstained"] == a.abstained


def test_generation_only_server_raw_completions(engine, local):
    """Token ids or text, stop strings honoured, one-line 400s, no RAG endpoints."""
    url = f"{engine}/v1/completions"
    prompt = local.prepare(QUESTIONS[0]).prompt
    ids = local.generator.encode(prompt)
    by_ids = httpx.post(url, json={"prompt": ids, "max_tokens": 8, "temperature": 0}).json()
    by_text = httpx.post(url, json={"prompt": prompt, "max_tokens": 8, "temperature": 0}).json()
    raw = by_ids["choices"][0]["text"]
    assert raw and raw == by_text["choices"][0]["text"]
    assert by_ids["usage"]["prompt_tokens"] == len(ids)
    # a stop string inside the continuation cuts it there and is named
    stop = raw.split()[-1]
    got = httpx.post(url, json={"prompt": ids, "max_tokens": 8, "stop": [stop]}).json()
    assert got["choices"][0]["text"] == raw[: raw.index(stop)]
    assert got["choices"][0]["stop_reason"] == stop
    bad = httpx.post(url, json={"prompt": ids, "max_tokens": 4, "logit_bias": {"5": -100}})
    assert bad.status_code == 400 and "max_tokens=1" in bad.json()["error"]["message"]
    bad = httpx.post(url, json={"prompt": [10**9]})
    assert bad.status_code == 400 and "vocabulary" in bad.json()["error"]["message"]
    assert httpx.post(f"{engine}/ask", json={"question": "q"}).status_code == 404


def test_engine_down_or_refusing_is_one_line_naming_the_url(trained, remote):  # noqa: F811
    from ragtune.rag import open_pipeline

    dead = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(EngineError) as e:
        open_pipeline(_remote_cfg(trained, dead), [])
    msg = str(e.value)
    assert "\n" not in msg and dead in msg and "generate.engine_url" in msg
    # an engine that goes away after start: the answer fails with one line, not a traceback
    base, srv, thread = serve_in_thread(_engine_app(trained, api_key=KEY))
    try:
        with pytest.raises(EngineError, match="401") as e:  # no key: an HTTP error, named
            open_pipeline(_remote_cfg(trained, base), [])
        assert "\n" not in str(e.value) and f"{base}/v1/models" in str(e.value)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RAGTUNE_ENGINE_API_KEY", KEY)
            pipe = open_pipeline(_remote_cfg(trained, base), [])
    finally:
        srv.should_exit = True
        thread.join(10)
    for ask in (pipe.answer, lambda q: "".join(pipe.generator.stream(pipe.prepare(q).prompt))):
        with pytest.raises(EngineError, match="cannot reach the engine") as e:
            ask(QUESTIONS[0])
        assert "\n" not in str(e.value) and f"{base}/v1" in str(e.value)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["generate.engine_url=gpu-host:8000"], "generate.engine_url: must be an http(s) URL"),
        (
            ["generate.engine_url=http://h:1/v1", "server.generation_only=true"],
            "generate.engine_url: a server with server.generation_only=true",
        ),
    ],
)
def test_engine_settings_are_checked_early(tmp_path, overrides, needle):
    from ragtune.evaluate import EVAL_TOP_LEVEL
    from ragtune.server import SERVER_TOP_LEVEL

    cfg = compose("server", [f"paths.outputs={tmp_path}", *overrides])
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        validate(cfg, SERVER_TOP_LEVEL)
    cfg = compose(
        "eval",
        [
            f"output_dir={tmp_path}",
            f"paths.outputs={tmp_path}",
            "generate.engine_url=http://h:1/v1",
        ],
    )
    with pytest.raises(ConfigError, match="generate.engine_url: is for ask and serve only"):
        validate(cfg, EVAL_TOP_LEVEL)


# ---------------------------------------------------------------- requests, on a fake engine
class _FakeEngine:
    """An Engine's interface answering from memory; records what it was asked."""

    url = "http://fake-engine/v1"

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.scored: list[int] = []

    def complete(self, body: dict) -> dict:
        self.bodies.append(body)
        if "logit_bias" in body:  # the first token, blocked ids banned: a byte-level piece
            return {"choices": [{"text": "\ufffd", "finish_reason": "length"}]}
        return {"choices": [{"text": " rest", "finish_reason": "stop"}], "usage": {}}

    def completion_logprobs(self, prompts, completions, batch_size, first_token):
        # the likeliest continuation is the last one asked about
        self.scored = [c[0] for c in completions]
        sums = [float(i) for i in range(len(completions))]
        return sums, [0.0] * len(prompts)


def _fake_remote(tokenizer):
    from ragtune.schema import get_schema

    engine = _FakeEngine()
    return engine, RemoteGenerator(engine, tokenizer, get_schema("alpaca_rag_short"))


def test_sampled_requests_carry_a_seed_per_row_and_top_p_greedy_ones_neither(tokenizer):
    engine, gen = _fake_remote(tokenizer)
    gen.generate_batch(["a", "b", "c"], decoding=Decoding(temperature=0.7, top_p=0.9, seed=5))
    assert sorted(b["seed"] for b in engine.bodies) == [5, 6, 7]  # n samples must differ
    assert all(b["top_p"] == 0.9 and b["temperature"] == 0.7 for b in engine.bodies)
    engine.bodies.clear()
    gen.generate_batch(["a"], decoding=Decoding(temperature=0.7))
    assert "seed" not in engine.bodies[0]  # no seed asked: the engine samples freely
    engine.bodies.clear()
    gen.generate_batch(["a"], decoding=Decoding(temperature=0.0, seed=5))
    assert "seed" not in engine.bodies[0] and "top_p" not in engine.bodies[0]


def test_a_first_token_several_vocabulary_entries_decode_to_is_the_engines_likeliest(tokenizer):
    """The engine answers the blocked first step with text, not an id; where several entries
    decode to that text (byte pieces all decode to U+FFFD), the rest of the answer continues
    from the one the engine scores likeliest, never a blocked one."""
    engine, gen = _fake_remote(tokenizer)
    byte_piece = next(
        i for i in range(len(tokenizer)) if tokenizer.decode([i]) == "\ufffd"
    )  # precondition: a vocabulary entry the engine's text could be
    got = gen.generate_batch(["a question"], block_first_tokens=[byte_piece])[0]
    first, rest = engine.bodies
    assert first["logit_bias"] == {str(byte_piece): -100}
    assert len(engine.scored) > 1 and byte_piece not in engine.scored
    assert all(tokenizer.decode([i]) == "\ufffd" for i in engine.scored)
    assert rest["prompt"] == [*gen.encode("a question"), engine.scored[-1]]
    assert got.text == "\ufffd rest"


@pytest.mark.parametrize(
    "body, shown",
    [
        ({"error": {"message": "The model 'm' does not exist.", "type": "NotFound"}}, "The model"),
        ({"error": "overloaded"}, "overloaded"),
        ({"detail": "Not Found"}, "Not Found"),
    ],
)
def test_an_engines_refusal_shows_its_own_message(monkeypatch, body, shown):
    """OpenAI's error object, a bare error string or FastAPI's detail: the line a user reads
    carries the engine's words, not the JSON around them."""

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        return httpx.Response(404, json=body)

    client = httpx.Client
    monkeypatch.setattr(
        httpx, "Client", lambda **kw: client(transport=httpx.MockTransport(answer), **kw)
    )
    engine = Engine("http://engine:8000")
    with pytest.raises(EngineError) as e:
        engine.complete({"prompt": [1], "max_tokens": 1})
    assert str(e.value) == f"engine http://engine:8000/v1/completions answered 404: {_words(body)}"
    assert shown in str(e.value) and "{" not in str(e.value)


def _words(body: dict) -> str:
    err = body.get("error")
    return err["message"] if isinstance(err, dict) else err or body["detail"]


def test_a_generation_only_stream_ends_as_a_whole_answer_does_then_done(engine, local):
    """The streamed continuation's last event carries what the whole answer's choice does
    (finish_reason, the stop string that ended it) and its usage; then ``[DONE]``."""
    url = f"{engine}/v1/completions"
    ids = local.generator.encode(local.prepare(QUESTIONS[0]).prompt)
    plain = {"prompt": ids, "max_tokens": 8, "temperature": 0}
    stop = httpx.post(url, json=plain).json()["choices"][0]["text"].split()[-1]
    for body in (plain, {**plain, "stop": [stop]}):
        want = httpx.post(url, json=body).json()
        with httpx.stream("POST", url, json={**body, "stream": True}) as r:
            data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        events = [json.loads(d) for d in data[:-1]]
        assert len(events) > 2  # it did stream
        last = events[-1]["choices"][0]
        ending = {k: want["choices"][0][k] for k in ("finish_reason", "stop_reason")}
        assert {k: last[k] for k in ending} == ending
        assert events[-1]["usage"] == want["usage"]
        assert want["usage"]["prompt_tokens"] == len(ids)
    assert ending["stop_reason"] == stop  # the second body's: a stop string ended it


def test_a_stream_that_cannot_start_is_answered_as_an_error_and_frees_the_model(
    engine, local, monkeypatch
):
    """An error starting a streamed continuation is the request's answer (a ragtune error:
    400 naming it), and the model's turn is given back for the next request."""
    from ragtune.batching import BatchingError
    from ragtune.generate import Generator

    def refuse(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        raise BatchingError("the batcher has stopped")

    url = f"{engine}/v1/completions"
    ids = local.generator.encode(local.prepare(QUESTIONS[0]).prompt)
    body = {"prompt": ids, "max_tokens": 2, "stream": True}
    with monkeypatch.context() as mp:
        mp.setattr(Generator, "stream", refuse)
        r = httpx.post(url, json=body)
    assert r.status_code == 400 and "the batcher has stopped" in r.json()["error"]["message"]
    r = httpx.post(url, json=body, timeout=60)
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
