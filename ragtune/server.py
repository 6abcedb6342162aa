"""OpenAI-compatible HTTP server over one :class:`ragtune.rag.RagPipeline`.

Endpoints: ``POST /v1/chat/completions`` (plain and SSE streaming; the last user message is
the question, and retrieval and the prompt template are applied here, as ``ask.py`` does),
``GET /v1/models``, ``POST /ask`` (answer, sources, abstained) and ``GET /healthz``.

Safety and load: the model answers one request at a time (an asyncio lock in front of a
worker thread; waiting requests are cheap coroutines), more than ``max_queue`` waiting get
429, bodies over ``max_body_bytes`` get 413, a missing or wrong Bearer key gets 401, and
malformed JSON or fields get 400 with a message in OpenAI's error shape. A client that
disconnects mid-stream stops its generation at the next token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ragtune.errors import RagtuneError

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


# --------------------------------------------------------------------------- request bodies
class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = "text"
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer", "function"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class ChatRequest(BaseModel):
    """The OpenAI fields ragtune uses; others (temperature, ...) are accepted and ignored:
    decoding follows the server's ``generate`` config, as training and evaluation do."""

    model_config = ConfigDict(extra="allow")
    model: str = ""
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=1)


class AskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1)
    input: str = ""
    max_tokens: int | None = Field(default=None, ge=1)
    with_prompt: bool = False


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    body = {"error": {"message": message, "type": kind, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


# --------------------------------------------------------------------------- the app
class _BearerAuth:
    """ASGI middleware: every path but /healthz needs ``Authorization: Bearer KEY``.

    Checked before the body is read, so an unauthenticated client learns nothing else.
    """

    def __init__(self, app: Any, key: str):
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") != "/healthz":
            header = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.key):
                msg = "missing or wrong API key (send Authorization: Bearer KEY)"
                await _error(401, msg, "authentication_error")(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Gate:
    """One generation at a time; a bounded number of requests waiting for their turn."""

    def __init__(self, max_queue: int):
        self.lock = asyncio.Lock()
        self.max_queue = max_queue
        self.waiting = 0
        self.served = 0

    async def __aenter__(self) -> None:
        if self.waiting >= self.max_queue:
            raise ApiError(429, f"server busy: {self.waiting} requests waiting", "rate_limit")
        self.waiting += 1
        try:
            await self.lock.acquire()
        finally:
            self.waiting -= 1

    async def __aexit__(self, *exc: object) -> None:
        self.served += 1
        self.lock.release()


def create_app(
    pipeline: Any,
    api_key: str | None = None,
    *,
    max_body_bytes: int = 65536,
    max_queue: int = 256,
    model_id: str | None = None,
) -> FastAPI:
    """The FastAPI app serving ``pipeline`` (see the module docstring for the endpoints)."""
    model_id = model_id or getattr(pipeline, "name", None) or "ragtune"
    created = int(time.time())
    gate = _Gate(max_queue)
    app = FastAPI(
        title="ragtune",
        summary="RAG answers from a ragtune model: one schema, one retriever",
        max_body_size=max_body_bytes,
    )
    app.state.gate = gate
    app.state.pipeline = pipeline

    # ------------------------------------------------------------- errors and auth
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.message, e.kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        parts = []
        for err in e.errors()[:5]:
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return _error(400, "malformed request: " + "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail))

    @app.exception_handler(RagtuneError)
    async def _user(_: Request, e: RagtuneError) -> JSONResponse:
        return _error(400, str(e))

    if api_key:
        app.add_middleware(_BearerAuth, key=api_key)

    # ------------------------------------------------------------- endpoints
    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": model_id,
            "busy": gate.lock.locked(),
            "waiting": gate.waiting,
            "served": gate.served,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        info = pipeline.describe() if hasattr(pipeline, "describe") else {}
        entry = {"id": model_id, "object": "model", "created": created, "owned_by": "ragtune"}
        return {"object": "list", "data": [{**entry, "ragtune": _jsonable(info)}]}

    @app.post("/ask")
    async def ask(req: AskRequest) -> dict[str, Any]:
        async with gate:
            ans = await anyio.to_thread.run_sync(
                lambda: pipeline.answer(req.question, req.input, req.max_tokens)
            )
        return ans.to_dict(with_prompt=req.with_prompt)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(req: ChatRequest) -> Any:
        question, extra = _question(req)
        cap = req.max_completion_tokens or req.max_tokens
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if req.stream:
            return await _stream_chat(question, extra, cap, rid)
        async with gate:
            ans = await anyio.to_thread.run_sync(lambda: pipeline.answer(question, extra, cap))
        return {
            "id": rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": ans.text},
                    "finish_reason": _finish(ans.stop_reason),
                    "logprobs": None,
                }
            ],
            "usage": _usage(ans),
            "ragtune": _ragtune_fields(ans),
        }

    async def _stream_chat(
        question: str, extra: str, cap: int | None, rid: str
    ) -> StreamingResponse:
        # Take the turn and start (retrieve + render) before answering 200, so queue-full
        # and bad-question errors are still proper status codes, not a broken stream.
        await gate.__aenter__()
        try:
            stream = await anyio.to_thread.run_sync(lambda: pipeline.stream(question, extra, cap))
        except BaseException:
            await gate.__aexit__(None, None, None)
            raise

        def chunk(delta: dict[str, Any], finish: str | None = None, **more: Any) -> str:
            body = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **more,
            }
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def events() -> AsyncIterator[str]:
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    piece = await anyio.to_thread.run_sync(next, stream, None)
                    if piece is None:
                        break
                    yield chunk({"content": piece})
                ans = stream.answer
                finish = _finish(ans.stop_reason) if ans is not None else "stop"
                more = {"usage": _usage(ans), "ragtune": _ragtune_fields(ans)} if ans else {}
                yield chunk({}, finish, **more)
                yield "data: [DONE]\n\n"
            except Exception as e:  # headers are sent: report in-band, never a torn stream
                log.exception("stream failed")
                yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
            finally:
                await done()

        released = False

        async def done() -> None:
            """Stop the generation and give the turn back, exactly once."""
            nonlocal released
            if not released:
                released = True
                stream.close()
                await gate.__aexit__(None, None, None)

        return _GuardedStream(
            events(),
            on_close=done,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app


# --------------------------------------------------------------------------- helpers
class _GuardedStream(StreamingResponse):
    """A streaming response that runs ``on_close`` however it ends.

    A client that is gone before the first byte means the body iterator never starts, so its
    ``finally`` never runs; this guard still frees the model for the next request.
    """

    def __init__(self, content: Any, *, on_close: Any, **kwargs: Any):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


def _question(req: ChatRequest) -> tuple[str, str]:
    """The last user message is the question; the template and context are the server's."""
    users = [m for m in req.messages if m.role == "user"]
    if not users:
        raise ApiError(400, "messages: no user message to answer")
    question = users[-1].text().strip()
    if not question:
        raise ApiError(400, "messages: the last user message is empty")
    return question, ""


def _finish(stop_reason: str) -> str:
    return "length" if stop_reason == "length" else "stop"


def _usage(ans: Any) -> dict[str, int]:
    return {
        "prompt_tokens": ans.prompt_tokens,
        "completion_tokens": ans.new_tokens,
        "total_tokens": ans.prompt_tokens + ans.new_tokens,
    }


def _ragtune_fields(ans: Any) -> dict[str, Any]:
    d = ans.to_dict()
    return {
        "abstained": d["abstained"],
        "score": ans.score,
        "sources": d["sources"],
        "latency_s": d["latency_s"],
    }


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


# --------------------------------------------------------------------------- entry point
SERVER_TOP_LEVEL = {"model_dir": str, "allow_mismatch": bool}
