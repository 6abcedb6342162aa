"""The server's HTTP edges, in this process over a scripted pipeline (no model): who gets in,
how bodies are read, the gate's queue, and what a request hands the pipeline."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator

import httpx
import pytest

from ragtune.answer import Answer
from ragtune.errors import RagtuneError
from ragtune.types import Chunk
from tests.test_server import KEY, serve_in_thread

AUTH = {"Authorization": f"Bearer {KEY}"}
CHUNK = Chunk("c1", "Corvanite was developed by Ilse Varga.", "materials/corvanite.md", 7, "h", 0.5)


class _Stream:
    """An answer's pieces; ``gate`` (an Event) holds the first piece back until set."""

    def __init__(self, answer: Answer, gate: threading.Event | None = None) -> None:
        self.chunks, self.answer, self.closed = answer.chunks, None, False
        self._final, self._gate = answer, gate
        self._pieces = iter(["Ilse ", "Varga"])

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._gate is not None:
            self._gate.wait(30)
        try:
            return next(self._pieces)
        except StopIteration:
            self.answer = self._final
            raise

    def close(self) -> None:
        self.closed = True


class _Pipeline:
    """Answers every question alike and records what it was asked; ``refuse`` makes the next
    ``stream`` raise a user error (as a question over the prompt budget does)."""

    name = "scripted"

    def __init__(self) -> None:
        self.asked: list[dict] = []
        self.refuse = False
        self.hold: threading.Event | None = None
        self.chunk = CHUNK
        self.stop = "eos"  # the answers' stop_reason

    def _answer(self) -> Answer:
        c = self.chunk
        src = [(c.source, c.start, c.score)]
        return Answer("Ilse Varga", False, src, "PROMPT", 0.25, [c], self.stop, 2, 11, score=1.5)

    def answers(self, question, input="", decoding=None, n=1, *, query=None):
        self.asked.append({"question": question, "input": input, "query": query})
        return [self._answer() for _ in range(n)]

    def stream(self, question, input="", decoding=None, *, query=None):
        self.asked.append({"question": question, "input": input, "query": query})
        if self.refuse:
            self.refuse = False
            raise RagtuneError("question: too long for the model's context")
        return _Stream(self._answer(), self.hold)

    def describe(self) -> dict:
        return {}


@pytest.fixture()
def served():
    from ragtune.server import create_app

    pipe = _Pipeline()
    app = create_app(pipe, KEY, max_body_bytes=4096)
    base, srv, thread = serve_in_thread(app)
    yield pipe, app, base
    srv.should_exit = True
    thread.join(10)


def _chat(base: str, messages: list[dict], **more) -> httpx.Response:
    body = {"messages": messages, **more}
    return httpx.post(f"{base}/v1/chat/completions", json=body, headers=AUTH, timeout=20)


def test_only_a_bearer_key_opens_the_api_and_health_needs_none(served):
    _, _, base = served
    q = {"question": "Who developed Corvanite?"}
    assert httpx.post(f"{base}/ask", json=q, headers=AUTH).status_code == 200
    assert (
        httpx.post(f"{base}/ask", json=q, headers={"Authorization": f"bearer {KEY}"}).status_code
        == 200
    )
    for header in (f"Basic {KEY}", KEY, f"Bearer {KEY}x", "Bearer"):
        r = httpx.post(f"{base}/ask", json=q, headers={"Authorization": header})
        assert r.status_code == 401, header
    assert httpx.get(f"{base}/healthz").json()["status"] == "ok"


def test_a_declared_oversized_body_is_refused_before_it_is_sent(served):
    """The Content-Length alone gets the 413: the client need not send (nor the server wait
    for) 100 MB."""
    _, _, base = served
    host, port = base.removeprefix("http://").split(":")
    head = (
        f"POST /ask HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head.encode())
        reply = s.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 413") and "max_body_bytes" in reply


def test_a_body_sent_in_pieces_is_read_whole(served):
    pipe, _, base = served
    body = json.dumps({"question": "Who developed Corvanite?", "input": "in full"}).encode()

    def pieces() -> Iterator[bytes]:  # no Content-Length: chunked, several receive() calls
        for i in range(0, len(body), 10):
            yield body[i : i + 10]

    r = httpx.post(
        f"{base}/ask", content=pieces(), headers=AUTH | {"Content-Type": "application/json"}
    )
    assert r.status_code == 200, r.text
    assert pipe.asked[-1]["question"] == "Who developed Corvanite?"
    assert pipe.asked[-1]["input"] == "in full"


def test_the_first_bad_field_is_named_and_the_message_is_plain(served):
    _, _, base = served
    r = httpx.post(f"{base}/ask", json={"question": "", "surprise": 1}, headers=AUTH)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "question"
    assert "question" in err["message"] and "surprise" in err["message"]
    assert "Value error" not in err["message"]
    # a validator's own words, without pydantic's "Value error, " before them
    streamed = _chat(served[2], [{"role": "user", "content": "q"}], n=2, stream=True)
    message = streamed.json()["error"]["message"]
    assert streamed.status_code == 400 and message.endswith(
        ": n > 1 cannot be streamed; ask without stream"
    )
    assert "Value error" not in message


def test_a_follow_up_retrieves_with_the_question_before_it(served):
    pipe, _, base = served
    messages = [
        {"role": "user", "content": "Who developed Corvanite?"},
        {"role": "assistant", "content": "Ilse Varga."},
        {"role": "user", "content": "In which year?"},
    ]
    assert _chat(base, messages).status_code == 200
    asked = pipe.asked[-1]
    assert asked["question"] == "In which year?"
    assert asked["query"] == "Who developed Corvanite?\nIn which year?"
    assert "Assistant: Ilse Varga." in asked["input"]


def _events(r: httpx.Response) -> list[dict]:
    lines = [
        line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")
    ]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_a_stream_names_its_sources_up_front_and_ends_with_an_empty_delta(served):
    _, _, base = served
    r = _chat(base, [{"role": "user", "content": "Who developed Corvanite?"}], stream=True)
    assert r.status_code == 200
    assert json.loads(r.headers["x-ragtune-sources"]) == [
        {"source": "materials/corvanite.md", "start": 7, "score": 0.5}
    ]
    events = _events(r)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == "Ilse Varga"
    last = events[-1]
    assert last["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert last["usage"] == {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}
    assert last["ragtune"]["score"] == 1.5 and last["ragtune"]["abstained"] is False
    assert last["ragtune"]["latency_s"] == 0.25


def test_a_stream_refused_before_it_starts_gives_its_turn_back(served):
    pipe, _, base = served
    pipe.refuse = True
    r = _chat(base, [{"role": "user", "content": "q"}], stream=True)
    assert r.status_code == 400 and "too long" in r.json()["error"]["message"]
    assert _chat(base, [{"role": "user", "content": "q"}], stream=True).status_code == 200


def test_health_says_busy_while_an_answer_holds_the_model(served):
    pipe, _, base = served
    pipe.hold = threading.Event()
    done: list[int] = []
    t = threading.Thread(
        target=lambda: done.append(
            _chat(base, [{"role": "user", "content": "q"}], stream=True).status_code
        )
    )
    t.start()
    try:
        for _ in range(200):
            health = httpx.get(f"{base}/healthz").json()
            if health["busy"]:
                break
            threading.Event().wait(0.05)
        assert health["busy"] is True and health["waiting"] == 0
    finally:
        pipe.hold.set()
        t.join(30)
    assert done == [200] and httpx.get(f"{base}/healthz").json()["busy"] is False


def test_the_queue_holds_max_queue_waiting_and_refuses_the_next():
    from ragtune.api_models import ApiError
    from ragtune.server import _Gate

    async def run() -> None:
        gate = _Gate(max_queue=2)
        await gate.__aenter__()  # the answer in progress
        waiters = [asyncio.create_task(gate.__aenter__()) for _ in range(2)]
        await asyncio.sleep(0)
        assert gate.waiting == 2
        with pytest.raises(ApiError) as e:  # refused at once, not queued (hence the bound)
            await asyncio.wait_for(gate.__aenter__(), 5)
        assert e.value.status == 429
        await gate.__aexit__(None, None, None)  # the first waiter's turn
        await waiters[0]
        assert gate.waiting == 1
        late = asyncio.create_task(gate.__aenter__())  # room in the queue again
        await asyncio.sleep(0)
        assert gate.waiting == 2
        for task in (waiters[1], late):
            await gate.__aexit__(None, None, None)
            await task
        assert gate.waiting == 0 and gate.served == 3

    asyncio.run(asyncio.wait_for(run(), 20))  # a broken gate fails, never hangs


def test_a_reply_carries_each_answers_abstention_and_non_ascii_sources_in_its_headers(served):
    """Headers are Latin-1: a Japanese file name travels JSON-escaped and reads back whole."""
    pipe, _, base = served
    pipe.chunk = Chunk("c2", "本文", "資料/コルバナイト.md", 0, "h2", 0.25)
    r = _chat(base, [{"role": "user", "content": "q"}], n=2)
    assert r.status_code == 200
    assert json.loads(r.headers["x-ragtune-abstained"]) == [False, False]
    assert json.loads(r.headers["x-ragtune-sources"])[0]["source"] == "資料/コルバナイト.md"
    r = _chat(base, [{"role": "user", "content": "q"}], stream=True)
    assert json.loads(r.headers["x-ragtune-sources"])[0]["source"] == "資料/コルバナイト.md"


def test_n_answers_count_their_one_prompt_once_and_a_cut_answer_says_length(served):
    pipe, _, base = served
    pipe.stop = "length"
    body = _chat(base, [{"role": "user", "content": "q"}], n=2).json()
    assert body["usage"] == {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "length"]
    done = httpx.post(f"{base}/v1/completions", json={"prompt": "q"}, headers=AUTH).json()
    assert done["choices"][0]["finish_reason"] == "length"


def test_completions_take_one_prompt_and_name_the_field_otherwise(served):
    _, _, base = served
    ok = httpx.post(f"{base}/v1/completions", json={"prompt": ["q"]}, headers=AUTH)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "Ilse Varga"
    r = httpx.post(f"{base}/v1/completions", json={"prompt": ["q1", "q2"]}, headers=AUTH)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "prompt" and "one prompt" in r.json()["error"]["message"]


def test_the_body_limit_hands_the_app_every_piece_of_the_body():
    """However many messages the body comes in, the app receives it whole, once."""
    from ragtune.server import _BodyLimit

    pieces = [b'{"question": ', b'"Who developed ', b'Corvanite?"}']
    messages = [
        {"type": "http.request", "body": p, "more_body": i < len(pieces) - 1}
        for i, p in enumerate(pieces)
    ]
    got: list[dict] = []

    async def app(scope, receive, send) -> None:
        got.append(await receive())

    async def receive() -> dict:
        return messages.pop(0)

    async def send(message) -> None:
        raise AssertionError(f"nothing is answered here: {message}")

    asyncio.run(_BodyLimit(app, limit=100)({"type": "http", "headers": []}, receive, send))
    assert got == [{"type": "http.request", "body": b"".join(pieces), "more_body": False}]
