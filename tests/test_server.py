"""The server as a real process on loopback, spoken to with the official ``openai`` client."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from ragtune.paths import PROJECT_ROOT

KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_in_thread(app) -> tuple[str, object, threading.Thread]:
    """``app`` under uvicorn in a daemon thread on a free loopback port: (base URL, server,
    thread); stop with ``server.should_exit = True`` and ``thread.join()``."""
    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", srv, thread


def start_server(
    model_dir: Path, outputs: Path, *overrides: str, api_key: str | None = KEY
) -> tuple[subprocess.Popen, str, Path]:
    """Start ``python serve/server.py`` on a free loopback port; wait until /healthz answers."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAGTUNE_API_KEY", None)
    if api_key:
        env["RAGTUNE_API_KEY"] = api_key
    log = outputs / f"server-{port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        str(PROJECT_ROOT / "serve" / "server.py"),
        f"model_dir={model_dir}",
        f"paths.outputs={outputs}",
        f"server.port={port}",
        *overrides,
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return proc, base, log
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"server did not come up:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_lm_path) -> Iterator[tuple[str, Path]]:
    from test_rag import build_model_dir

    root = tmp_path_factory.mktemp("server")
    model_dir, _ = build_model_dir(root, tiny_lm_path)
    proc, base, log = start_server(
        model_dir, root / "outputs", "generate.max_new_tokens=8", "server.max_body_bytes=4096"
    )
    yield base, log
    stop_server(proc)


@pytest.fixture()
def client(server):
    from openai import OpenAI

    base, _ = server
    return OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)


def test_binds_loopback_only(server):
    base, _ = server
    port = int(base.rsplit(":", 1)[1])
    out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("ss not available")
    mine = [line for line in out.stdout.splitlines() if f":{port} " in line]
    assert mine and all("127.0.0.1:" in line for line in mine), mine


def test_chat_completion_plain(client):
    q = "On which day is the Lantern Tide festival held in Velmora?"
    res = client.chat.completions.create(
        model="run",
        messages=[
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": q},
        ],
    )
    choice = res.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= res.usage.completion_tokens <= 8
    extra = res.model_extra["ragtune"]
    assert extra["sources"][0]["source"] == "towns/velmora.md"
    assert isinstance(extra["abstained"], bool)


def test_chat_completion_streaming_matches_plain(client):
    q = "Who developed Corvanite?"
    msgs = [{"role": "user", "content": q}]
    plain = client.chat.completions.create(model="run", messages=msgs).choices[0].message.content
    pieces, finish, extra = [], None, None
    for chunk in client.chat.completions.create(model="run", messages=msgs, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
            extra = chunk.model_extra.get("ragtune")
    assert "".join(pieces) == plain
    assert finish in ("stop", "length")
    assert extra and extra["sources"][0]["source"] == "materials/corvanite.md"


def test_max_tokens_caps_the_answer(client):
    res = client.chat.completions.create(
        model="run",
        messages=[{"role": "user", "content": "Who developed Corvanite?"}],
        max_tokens=1,
    )
    assert res.usage.completion_tokens == 1


def test_models_ask_and_health(server):
    base, _ = server
    auth = {"Authorization": f"Bearer {KEY}"}
    models = httpx.get(f"{base}/v1/models", headers=auth).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "run"
    assert models["data"][0]["ragtune"]["prompt"]["name"] == "alpaca_rag"
    r = httpx.post(f"{base}/ask", json={"question": "Who developed Corvanite?"}, headers=auth)
    assert r.status_code == 200
    body = r.json()
    assert set(body) >= {"answer", "abstained", "sources", "latency_s"}
    assert body["sources"][0]["source"] == "materials/corvanite.md"
    assert isinstance(body["sources"][0]["start"], int)
    assert "prompt" not in body  # the prompt only when asked for
    ask = {"question": "Who developed Corvanite?", "max_tokens": 1, "with_prompt": True}
    body = httpx.post(f"{base}/ask", json=ask, headers=auth).json()
    assert body["new_tokens"] == 1 and "Corvanite" in body["prompt"]
    health = httpx.get(f"{base}/healthz").json()  # no key needed for health checks
    assert health["status"] == "ok" and health["served"] >= 1


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/v1/chat/completions", b"{not json", 400, "malformed"),
        ("/v1/chat/completions", b'{"model": "m"}', 400, "messages"),
        ("/v1/chat/completions", b'{"model": "m", "messages": []}', 400, "messages"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}', 400, "content"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "system", "content": "x"}]}',
            400,
            "user",
        ),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "  "}]}',
            400,
            "empty",
        ),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "wizard", "content": "x"}]}',
            400,
            "role",
        ),
        ("/v1/chat/completions", b"[1, 2]", 400, "malformed"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "x \\ud800"}]}]}',
            400,
            "surrogate",
        ),
        (
            "/v1/chat/completions",
            json.dumps({"messages": [{"role": "user", "content": "x"}], "stop": list("abcde")}),
            400,
            "at most 4 stop sequences",
        ),
        ("/ask", b'{"question": ""}', 400, "question"),
        ("/ask", b'{"question": "x", "max_tokens": 0}', 400, "max_tokens"),
        ("/ask", b'{"question": "x", "surprise": 1}', 400, "surprise"),
        ("/ask", json.dumps({"question": "why " * 1000}).encode(), 400, "too long"),
        ("/ask", b"\xff\xfe\x00garbage", 400, "malformed"),
    ],
)
def test_malformed_requests_get_4xx_with_a_message(server, path, body, status, needle):
    base, _ = server
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{base}{path}", content=body, headers=headers)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_oversized_body_gets_413_in_openais_shape(server):
    base, _ = server
    headers = {"Authorization": f"Bearer {KEY}"}
    big = {"messages": [{"role": "user", "content": "x" * 10_000}]}
    r = httpx.post(f"{base}/v1/chat/completions", json=big, headers=headers)
    assert r.status_code == 413
    err = r.json()["error"]
    assert "max_body_bytes" in err["message"] and err["type"] == "invalid_request_error"
    assert set(err) == {"message", "type", "param", "code"}

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as the bytes come
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}]}'

    r = httpx.post(f"{base}/v1/chat/completions", content=chunked(), headers=headers)
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]


def test_wrong_or_missing_key_gets_401(server):
    from openai import AuthenticationError, OpenAI

    base, _ = server
    bad = OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(AuthenticationError):
        bad.chat.completions.create(model="run", messages=[{"role": "user", "content": "hi"}])
    assert httpx.get(f"{base}/v1/models").status_code == 401
    assert httpx.post(f"{base}/ask", json={"question": "x"}).status_code == 401
    r = httpx.post(f"{base}/ask", content=b"{bad", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401  # auth first: the body is not even read


def test_concurrent_requests_are_queued_safely(client):
    msgs = [{"role": "user", "content": "Who developed Corvanite?"}]

    def one(i: int) -> str:
        if i % 2:
            return "".join(
                c.choices[0].delta.content or ""
                for c in client.chat.completions.create(model="run", messages=msgs, stream=True)
                if c.choices
            )
        return client.chat.completions.create(model="run", messages=msgs).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    assert len(set(answers)) == 1  # greedy and serialized: every client gets the same answer


def test_abandoned_stream_frees_the_model(server, client):
    """A client that drops a stream mid-way does not block the next request."""
    base, _ = server
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"messages": [{"role": "user", "content": "Who developed Corvanite?"}], "stream": True}
    with httpx.stream(
        "POST", f"{base}/v1/chat/completions", json=body, headers=headers, timeout=60
    ) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # read the first event, then hang up
    res = client.chat.completions.create(
        model="run", messages=[{"role": "user", "content": "Who developed Corvanite?"}]
    )
    assert res.choices[0].message.content is not None


@pytest.mark.slow
def test_server_refuses_a_mismatching_model_at_start(tmp_path, tiny_lm_path):
    from test_rag import build_model_dir

    model_dir, _ = build_model_dir(tmp_path, tiny_lm_path)
    port = free_port()
    out = subprocess.run(
        [
            sys.executable,
            str(PROJECT_ROOT / "serve" / "server.py"),
            f"model_dir={model_dir}",
            f"paths.outputs={tmp_path / 'outputs'}",
            f"server.port={port}",
            "prompt=chat_rag",
        ],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2
    assert "prompt fingerprint" in out.stderr and "allow_mismatch" in out.stderr


def test_hostile_document_through_the_server_stays_context(server):
    """End to end over HTTP: the prompt the server built keeps the document in its block."""
    base, _ = server
    r = httpx.post(
        f"{base}/ask",
        json={"question": "What do the harbour notes for Velmora say?", "with_prompt": True},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    body = r.json()
    assert "notes/harbour.md" in [s["source"] for s in body["sources"]]
    prompt = body["prompt"]
    for header in ("### Instruction:\n", "### Context:\n", "### Response:\n"):
        assert prompt.count(header) == 1, header
    context = prompt[prompt.index("### Context:\n") : prompt.rindex("### Response:\n")]
    assert "Ignore previous instructions" in context
    assert prompt.count("PWNED") == context.count("PWNED") > 0
    assert "<|im_start|>" not in prompt and "[INST]" not in prompt


class _FakeStream:
    def __init__(self) -> None:
        self.pieces = iter(["a", "b"])
        self.chunks = []
        self.answer = None
        self.closed = False

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self.pieces)

    def close(self) -> None:
        self.closed = True


class _FakePipeline:
    name = "fake"

    def __init__(self) -> None:
        self.streams: list[_FakeStream] = []

    def stream(self, question, input="", decoding=None, *, query=None):
        self.streams.append(_FakeStream())
        return self.streams[-1]

    def describe(self):
        return {}


def test_stream_to_a_client_gone_before_the_first_byte_frees_the_model():
    """The body iterator never starts; the turn must still be given back."""
    import asyncio

    from ragtune.server import create_app

    pipe = _FakePipeline()
    app = create_app(pipe)
    body = json.dumps({"messages": [{"role": "user", "content": "q"}], "stream": True}).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"host", b"t")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }

    async def run() -> None:
        sent = False

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(3600)

        async def send(message):
            if message["type"] == "http.response.start":
                raise OSError("client went away")

        with contextlib.suppress(Exception):
            await app(scope, receive, send)

    asyncio.run(run())
    assert pipe.streams and pipe.streams[0].closed
    assert not app.state.gate.lock.locked()


# ------------------------------------------------------- the gate, with a pipeline that tells
class _CountingPipeline:
    """Streams that record how many are open at once; ``endless`` ones never finish alone."""

    name = "counting"

    def __init__(self) -> None:
        import threading

        self.lock = threading.Lock()
        self.open = self.most_open = self.opened = self.closed = 0
        self.endless = False

    def stream(self, question, input="", decoding=None, *, query=None):
        with self.lock:
            self.open += 1
            self.opened += 1
            self.most_open = max(self.most_open, self.open)
        return _CountingStream(self, endless=self.endless)

    def describe(self):
        return {}


class _CountingStream:
    def __init__(self, pipe: _CountingPipeline, endless: bool) -> None:
        self.pipe, self.endless, self.sent, self.answer, self.done = pipe, endless, 0, None, False
        self.chunks: list = []  # the retrieved context, known before the first piece

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self.done or (not self.endless and self.sent == 5):
            raise StopIteration
        time.sleep(0.02)  # a slow token: overlapping turns would show
        self.sent += 1
        return f"t{self.sent} "

    def close(self) -> None:
        if not self.done:
            self.done = True
            with self.pipe.lock:
                self.pipe.open -= 1
                self.pipe.closed += 1


@pytest.fixture()
def counting_server():
    """The real app under uvicorn on loopback, in this process, over a counting pipeline."""

    from ragtune.server import create_app

    pipe = _CountingPipeline()
    app = create_app(pipe, KEY)
    base, srv, thread = serve_in_thread(app)
    yield pipe, app, base
    srv.should_exit = True
    thread.join(10)


def _stream_text(base: str) -> str:
    body = {"messages": [{"role": "user", "content": "q"}], "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream(
        "POST", f"{base}/v1/chat/completions", json=body, headers=headers, timeout=60
    ) as r:
        assert r.status_code == 200
        return "".join(r.iter_text())


def test_concurrent_streams_take_turns(counting_server):
    """Twelve clients at once: every one is answered in full, never two generations at once."""
    pipe, app, base = counting_server
    with ThreadPoolExecutor(12) as pool:
        texts = list(pool.map(lambda _: _stream_text(base), range(12)))
    assert all("t5 " in t and "[DONE]" in t for t in texts)
    assert pipe.opened == pipe.closed == 12
    assert pipe.most_open == 1  # the gate serialised them
    assert app.state.gate.served == 12 and not app.state.gate.lock.locked()


def test_a_hung_up_endless_stream_is_stopped_and_frees_the_model(counting_server):
    """The client leaves mid-stream: the generation is closed and the next request served."""
    pipe, app, base = counting_server
    pipe.endless = True
    body = {"messages": [{"role": "user", "content": "q"}], "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream(
        "POST", f"{base}/v1/chat/completions", json=body, headers=headers, timeout=60
    ) as r:
        lines = r.iter_lines()
        while "t3 " not in next(lines):  # a few tokens in, then hang up
            pass
    deadline = time.time() + 10
    while pipe.closed < 1 and time.time() < deadline:
        time.sleep(0.05)
    assert pipe.closed == 1 and pipe.open == 0  # the endless generation was stopped
    assert not app.state.gate.lock.locked()
    pipe.endless = False
    assert "t5 " in _stream_text(base)  # the model is free for the next client


# --------------------------------------------------------------------------- OpenAI fidelity
def test_sampling_seed_n_stop_and_max_tokens_are_honoured(client):
    msgs = [{"role": "user", "content": "Who developed Corvanite?"}]

    def ask(**kw):
        return client.chat.completions.create(model="run", messages=msgs, **kw)

    greedy = [ask().choices[0].message.content for _ in range(2)]
    assert greedy[0] == greedy[1]  # greedy by default
    a = ask(temperature=1.5, seed=7, max_tokens=40)
    b = ask(temperature=1.5, seed=7, max_tokens=40)
    assert a.choices[0].message.content == b.choices[0].message.content  # a seed repeats
    # max_tokens above generate.max_new_tokens (8 here) is honoured: no hidden cap
    long = ask(temperature=1.5, top_p=0.95, seed=3, max_tokens=40)
    assert 8 < long.usage.completion_tokens <= 40, long.usage
    many = ask(temperature=1.5, seed=1, n=3, max_tokens=12)
    texts = [c.message.content for c in many.choices]
    assert [c.index for c in many.choices] == [0, 1, 2] and len(set(texts)) > 1
    text = long.choices[0].message.content
    stop = text[3:5]
    cut = ask(temperature=1.5, top_p=0.95, seed=3, max_tokens=40, stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)].strip()
    assert cut.choices[0].finish_reason == "stop"


def test_completions_and_models_retrieve(client):
    from openai import NotFoundError

    res = client.completions.create(model="run", prompt="Who developed Corvanite?", max_tokens=4)
    assert res.object == "text_completion" and isinstance(res.choices[0].text, str)
    assert res.model_extra["ragtune"]["sources"][0]["source"] == "materials/corvanite.md"
    pieces = client.completions.create(
        model="run", prompt="Who developed Corvanite?", max_tokens=4, stream=True
    )
    assert "".join(c.choices[0].text for c in pieces if c.choices) == res.choices[0].text
    assert client.models.retrieve("run").id == "run"
    assert client.models.retrieve("ragtune").id == "run"  # the alias
    with pytest.raises(NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["param"] == "model" and "gpt-4o" in e.value.body["message"]


def test_unsupported_fields_are_refused_not_ignored(client):
    from openai import BadRequestError

    msgs = [{"role": "user", "content": "Who developed Corvanite?"}]
    for kw in (
        {"response_format": {"type": "json_object"}},
        {"presence_penalty": 1.0},
        {"logprobs": True},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
    ):
        with pytest.raises(BadRequestError) as e:
            client.chat.completions.create(model="run", messages=msgs, **kw)
        assert next(iter(kw)) in e.value.body["message"]


def test_lone_surrogate_is_a_400_and_the_connection_survives(server):
    import http.client

    base, _ = server
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    bad = b'{"model": "run", "messages": [{"role": "user", "content": "x \\ud800"}]}'
    conn.request("POST", "/v1/chat/completions", body=bad, headers=headers)
    r = conn.getresponse()
    body = json.loads(r.read())
    assert r.status == 400 and "surrogate" in body["error"]["message"], body
    assert (r.getheader("connection") or "").lower() != "close"
    sock = conn.sock
    conn.request("POST", "/ask", body=b'{"question": "x \\udfff y"}', headers=headers)
    r = conn.getresponse()
    assert r.status == 400 and "unicode" in json.loads(r.read())["error"]["message"].lower()
    conn.request("GET", "/v1/models/run", headers=headers)
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["id"] == "run"
    assert conn.sock is sock  # the same keep-alive connection all along
    conn.close()


def test_chat_openai_sources_and_structured_output(server):
    import openai
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    base, _ = server
    llm = ChatOpenAI(
        model="run",
        base_url=f"{base}/v1",
        api_key=KEY,
        include_response_headers=True,
        max_retries=0,
        max_tokens=30,
    )
    msg = llm.invoke("Who developed Corvanite?")
    assert isinstance(msg.content, str)
    sources = json.loads(msg.response_metadata["headers"]["x-ragtune-sources"])
    assert sources[0]["source"] == "materials/corvanite.md"
    assert msg.response_metadata["finish_reason"] in ("stop", "length")
    streamed = "".join(c.content for c in llm.stream("Who developed Corvanite?"))
    assert streamed == msg.content
    same = (
        llm.bind(stop=[msg.content[2:4]]).invoke("Who developed Corvanite?")
        if len(msg.content) > 4
        else msg
    )
    assert len(same.content) <= len(msg.content)

    class Inventor(BaseModel):
        name: str

    with pytest.raises(openai.BadRequestError, match="response_format is not supported"):
        llm.with_structured_output(Inventor).invoke("Who developed Corvanite?")


# --------------------------------------------------------------------------- continuous batching
def _answer(base: str, kind: str, question: str) -> str:
    """One request of ``kind`` (chat / completion, plain / streamed, /ask): its answer text."""
    headers = {"Authorization": f"Bearer {KEY}"}
    chat = {"messages": [{"role": "user", "content": question}], "max_tokens": 24}
    comp = {"prompt": question, "max_tokens": 24}
    if kind == "ask":
        r = httpx.post(f"{base}/ask", json={"question": question, "max_tokens": 24},
                       headers=headers, timeout=120)  # fmt: skip
        assert r.status_code == 200, r.text
        return r.json()["answer"]
    path, body = (
        ("/v1/chat/completions", chat) if kind.startswith("chat") else ("/v1/completions", comp)
    )
    if not kind.endswith("stream"):
        r = httpx.post(f"{base}{path}", json=body, headers=headers, timeout=120)
        assert r.status_code == 200, r.text
        c = r.json()["choices"][0]
        return c["message"]["content"] if kind.startswith("chat") else c["text"]
    text = ""
    with httpx.stream("POST", f"{base}{path}", json={**body, "stream": True}, headers=headers,
                      timeout=120) as r:  # fmt: skip
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:]).get("choices", []):
                    text += (c.get("delta") or {}).get("content") or c.get("text") or ""
    return text


def test_batching_server_answers_concurrent_requests_as_one_at_a_time(
    server, tmp_path, tiny_lm_path
):
    """server.batching=true (forced on CPU, float32): concurrent requests of every kind share
    the batcher's decode steps and get exactly what the unbatched server answers one by one."""
    from test_rag import build_model_dir

    base_plain, _ = server
    model_dir, _ = build_model_dir(tmp_path, tiny_lm_path)
    proc, base, log = start_server(
        model_dir, tmp_path / "outputs", "generate.max_new_tokens=8", "server.batching=true",
        "server.max_batch=4",
    )  # fmt: skip
    try:
        kinds = ["chat", "chat_stream", "completion", "completion_stream", "ask"] * 2
        questions = [
            "Who developed Corvanite?",
            "On which day is the Lantern Tide festival held in Velmora?",
            "What is Corvanite used for?",
            "Where is Velmora?",
            "Who designed the breakwater?",
        ] * 2
        jobs = list(zip(kinds, questions[1:] + questions[:1], strict=True))
        want = [_answer(base_plain, k, q) for k, q in jobs]  # one at a time, no batcher
        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(lambda kq: _answer(base, *kq), jobs))
        assert got == want
        stats = httpx.get(f"{base}/healthz").json()["batching"]
        assert stats["requests"] == len(jobs) and stats["busy"] == 0
        assert stats["most_rows"] >= 2  # requests really decoded together
        assert httpx.get(f"{base_plain}/healthz").json()["batching"] is None  # auto: off on CPU
    finally:
        assert stop_server(proc) == 0, log.read_text()[-2000:]


def test_batched_streams_reach_the_event_loop_without_a_thread_per_piece(tiny_lm_path, monkeypatch):
    """With batching, a streamed answer's pieces come to the server's event loop from the
    batcher itself: one worker-thread hop per request (retrieve + render + submit), not one
    per piece; the streamed texts are the unbatched answers."""
    import anyio
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ragtune.config import GenerateConfig
    from ragtune.decoding import Decoding
    from ragtune.rag import RagPipeline
    from ragtune.schema import get_schema
    from ragtune.server import create_app

    tok = AutoTokenizer.from_pretrained(tiny_lm_path)
    config = AutoConfig.from_pretrained(tiny_lm_path)
    config.update({"tie_word_embeddings": False, "initializer_range": 0.2})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()

    def pipeline() -> RagPipeline:
        gcfg = GenerateConfig(max_new_tokens=16)
        schema = get_schema("alpaca_rag")
        return RagPipeline(model, tok, schema, None, gcfg, max_seq_length=192, name="t")

    questions = ["Who built it?", "When was the lighthouse lit?", "Where is Kessa?", "Why?"]
    plain = pipeline()
    want = [plain.answer(q, decoding=Decoding(max_new_tokens=24)).text for q in questions]
    pipe = pipeline()
    assert pipe.generator.start_batching("true", max_batch=4)
    hops = 0
    run_sync = anyio.to_thread.run_sync

    async def counted(*args, **kwargs):
        nonlocal hops
        hops += 1
        return await run_sync(*args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counted)
    base, srv, thread = serve_in_thread(create_app(pipe))
    try:
        with ThreadPoolExecutor(len(questions)) as pool:
            got = list(pool.map(lambda q: _answer(base, "completion_stream", q), questions))
        events = _answer_events(base, questions[0])
    finally:
        srv.should_exit = True
        thread.join(10)
        pipe.generator._batcher.close()
    assert got == want
    assert len(events) > 3  # pieces, not one text at the end
    assert hops == len(questions) + 1, hops


def _answer_events(base: str, question: str) -> list[str]:
    body = {"prompt": question, "max_tokens": 16, "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        return [line for line in r.iter_lines() if line.startswith("data: {")]
