"""OpenAI-compatible HTTP server over one :class:`ragtune.rag.RagPipeline`.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (plain and SSE
streaming; retrieval and the prompt template are applied here, as ``ask`` does),
``GET /v1/models`` and ``/v1/models/{id}``, ``POST /ask`` (answer, sources, abstained) and
``GET /healthz``. Which OpenAI fields are honoured is :mod:`ragtune.api_models`'s docstring;
how system messages and earlier turns are used is :mod:`ragtune.conversation`'s. Every answer
goes through the pipeline's one answer path; its sources are in the body's ``ragtune`` field
and in the ``x-ragtune-sources`` header (JSON), which LangChain's ``ChatOpenAI`` shows with
``include_response_headers=True``.

Safety and load: the model answers one request at a time (an asyncio lock in front of a
worker thread; waiting requests are cheap coroutines), or, with continuous batching
(``server.batching``), as many at once as the batcher has rows (they share decode steps, see
:meth:`ragtune.generate.Generator.start_batching`; a streamed answer's pieces then come to
the event loop once per step, :mod:`ragtune.batchstream`); more than ``max_queue`` waiting get
429, bodies over ``max_body_bytes`` get 413, a missing or wrong Bearer key gets 401, an
unknown model 404, and malformed JSON or fields (a lone UTF-16 surrogate too) 400: every
error in OpenAI's shape. A client that disconnects mid-stream stops its generation at the
next token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ragtune.api_models import (
    ApiError,
    AskRequest,
    ChatRequest,
    CompletionRequest,
    error_response,
)
from ragtune.budget import token_counter
from ragtune.conversation import HISTORY_TOKENS, Turn, turn_from_messages
from ragtune.decoding import Decoding
from ragtune.errors import RagtuneError

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MODEL_ALIAS = "ragtune"  # always accepted as the served model's name


# --------------------------------------------------------------------------- middleware
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
                await error_response(401, msg, "authentication_error")(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes gets a 413 in OpenAI's shape.

    The body is read here (declared length first, then the bytes as they come) and handed on
    whole; later ``receive`` calls (a client disconnecting mid-stream) pass through.
    """

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = error_response(
            413, f"request body over {self.limit} bytes (server.max_body_bytes)"
        )
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await too_big(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay(message, receive), send)
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                await too_big(scope, receive, send)
                return
        whole = {"type": "http.request", "body": body, "more_body": False}
        await self.app(scope, _replay(whole, receive), send)


def _replay(first: dict[str, Any], receive: Any) -> Any:
    sent = False

    async def replayed() -> Any:
        nonlocal sent
        if not sent:
            sent = True
            return first
        return await receive()

    return replayed


class _Gate:
    """``slots`` generations at a time (1 without batching); a bounded number waiting."""

    def __init__(self, max_queue: int, slots: int = 1):
        self.lock = asyncio.Semaphore(slots)  # a Lock's interface; slots=1 is one
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


# --------------------------------------------------------------------------- the app
def create_app(
    pipeline: Any,
    api_key: str | None = None,
    *,
    max_body_bytes: int = 65536,
    max_queue: int = 256,
    model_id: str | None = None,
    history_tokens: int = HISTORY_TOKENS,
    generation_only: bool = False,
) -> FastAPI:
    """The FastAPI app serving ``pipeline`` (see the module docstring for the endpoints);
    ``generation_only``: an engine for another ragtune (:mod:`ragtune.generation_only`)."""
    model_id = model_id or getattr(pipeline, "name", None) or MODEL_ALIAS
    created = int(time.time())
    generator = getattr(pipeline, "generator", None)
    gate = _Gate(max_queue, getattr(generator, "concurrency", 1))
    count = token_counter(pipeline.tokenizer) if hasattr(pipeline, "tokenizer") else len
    app = FastAPI(title="ragtune", summary="RAG answers from a ragtune model")
    app.state.gate = gate
    app.state.pipeline = pipeline

    # ------------------------------------------------------------- errors and auth
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.message, e.kind, code=e.code, param=e.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        parts, param = [], None
        for err in e.errors()[:5]:
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
            param = param or where
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            parts.append(f"{where}: {msg}")
        return error_response(400, "malformed request: " + "; ".join(parts), param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(RagtuneError)
    async def _user(_: Request, e: RagtuneError) -> JSONResponse:
        return error_response(400, str(e))

    @app.exception_handler(Exception)
    async def _bug(_: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return error_response(500, f"internal error: {type(e).__name__}", "server_error")

    app.add_middleware(_BodyLimit, limit=max_body_bytes)
    if api_key:
        app.add_middleware(_BearerAuth, key=api_key)

    def model_entry() -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "ragtune"}

    def check_model(name: str) -> None:
        if name and name not in (model_id, MODEL_ALIAS):
            raise ApiError(
                404,
                f"The model '{name}' does not exist (this server serves '{model_id}')",
                code="model_not_found",
                param="model",
            )

    # ------------------------------------------------------------- endpoints
    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": model_id,
            "busy": gate.lock.locked(),
            "waiting": gate.waiting,
            "served": gate.served,
            "batching": generator.batching_stats() if generator is not None else None,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        info = pipeline.describe() if hasattr(pipeline, "describe") else {}
        return {"object": "list", "data": [{**model_entry(), "ragtune": _jsonable(info)}]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        check_model(name)
        return model_entry()

    if generation_only:  # raw continuations of token ids; no retrieval, no template
        from ragtune.generation_only import mount_generation_only

        mount_generation_only(app, pipeline, gate, check_model, model_id)
        return app

    @app.post("/ask")
    async def ask(req: AskRequest) -> dict[str, Any]:
        decoding = Decoding(max_new_tokens=req.max_tokens)
        ans = (await answers(Turn(req.question, req.input, req.question), decoding, 1))[0]
        return ans.to_dict(with_prompt=req.with_prompt)

    async def answers(turn: Turn, decoding: Decoding, n: int) -> list[Any]:
        """The one way a request is answered: its turn at the model, then the pipeline."""
        async with gate:
            return await anyio.to_thread.run_sync(
                lambda: pipeline.answers(turn.question, turn.input, decoding, n=n, query=turn.query)
            )

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(req: ChatRequest) -> Any:
        check_model(req.model)
        turn = turn_from_messages([(m.role, m.text()) for m in req.messages], count, history_tokens)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"

        def chunk(piece: str | None, finish: str | None = None) -> dict[str, Any]:
            delta = {} if piece is None else {"content": piece}
            return {"index": 0, "delta": delta, "finish_reason": finish}

        if req.stream:
            first = {"index": 0, "delta": {"role": "assistant", "content": ""}}
            head = {"id": rid, "object": "chat.completion.chunk", "model": model_id}
            return await _stream(
                turn, req.decoding(), head, chunk, {**first, "finish_reason": None}
            )
        got = await answers(turn, req.decoding(), req.n)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": a.text},
                "finish_reason": _finish(a.stop_reason),
                "logprobs": None,
            }
            for i, a in enumerate(got)
        ]
        body = {"id": rid, "object": "chat.completion", "created": int(time.time())}
        return _reply({**body, "model": model_id, "choices": choices}, got)

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest) -> Any:
        check_model(req.model)
        try:
            question = req.question()
        except ValueError as e:
            raise ApiError(400, str(e), param="prompt") from None
        turn = Turn(question, "", question)
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"

        def chunk(piece: str | None, finish: str | None = None) -> dict[str, Any]:
            return {"index": 0, "text": piece or "", "finish_reason": finish, "logprobs": None}

        if req.stream:
            head = {"id": rid, "object": "text_completion", "model": model_id}
            return await _stream(turn, req.decoding(), head, chunk, None)
        got = await answers(turn, req.decoding(), req.n)
        choices = [
            {"index": i, "text": a.text, "finish_reason": _finish(a.stop_reason), "logprobs": None}
            for i, a in enumerate(got)
        ]
        body = {"id": rid, "object": "text_completion", "created": int(time.time())}
        return _reply({**body, "model": model_id, "choices": choices}, got)

    async def _stream(
        turn: Turn,
        decoding: Decoding,
        head: dict[str, Any],
        chunk: Callable[..., dict[str, Any]],
        first: dict[str, Any] | None,
    ) -> StreamingResponse:
        # Take the turn and start (retrieve + render) before answering 200, so queue-full
        # and bad-question errors are still proper status codes, not a broken stream.
        await gate.__aenter__()
        try:
            stream = await anyio.to_thread.run_sync(
                lambda: pipeline.stream(turn.question, turn.input, decoding, query=turn.query)
            )
        except BaseException:
            await gate.__aexit__(None, None, None)
            raise

        def event(choice: dict[str, Any], **more: Any) -> str:
            body = {**head, "created": int(time.time()), "choices": [choice], **more}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def events() -> AsyncIterator[str]:
            try:
                if first is not None:
                    yield event(first)
                if getattr(stream, "asynchronous", False):  # batched: on this loop, per step
                    async for piece in stream:
                        yield event(chunk(piece))
                else:  # a worker thread per piece (generation holds the model's lock)
                    while (piece := await anyio.to_thread.run_sync(next, stream, None)) is not None:
                        yield event(chunk(piece))
                ans = stream.answer
                finish = _finish(ans.stop_reason) if ans is not None else "stop"
                more = {"usage": _usage([ans]), "ragtune": _ragtune_fields(ans)} if ans else {}
                yield event(chunk(None, finish), **more)
                yield "data: [DONE]\n\n"
            except Exception as e:  # headers are sent: report in-band, never a torn stream
                log.exception("stream failed")
                err = {
                    "error": {
                        "message": str(e),
                        "type": "server_error",
                        "param": None,
                        "code": None,
                    }
                }
                yield f"data: {json.dumps(err)}\n\n"
            finally:
                await done()

        done = release_once(stream.close, gate)

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        headers["x-ragtune-sources"] = _sources_header(stream.chunks)
        return _GuardedStream(
            events(), on_close=done, media_type="text/event-stream", headers=headers
        )

    return app


def _reply(body: dict[str, Any], answers: list[Any]) -> JSONResponse:
    """A completion body with usage and ragtune's fields (the first answer's sources; one
    retrieval serves all ``n``), and the sources in a header for clients that drop fields."""
    body = {**body, "usage": _usage(answers), "ragtune": _ragtune_fields(answers[0])}
    headers = {
        "x-ragtune-sources": _sources_header(answers[0].chunks),
        "x-ragtune-abstained": json.dumps([a.abstained for a in answers]),
    }
    return JSONResponse(body, headers=headers)


def _sources_header(chunks: Any) -> str:
    """The context's sources as ASCII JSON (headers are Latin-1)."""
    items = [{"source": c.source, "start": c.start, "score": c.score} for c in chunks or []]
    return json.dumps(items, ensure_ascii=True)


# --------------------------------------------------------------------------- helpers
def release_once(stop: Callable[[], None], gate: Any) -> Callable[[], Awaitable[None]]:
    """What ends a stream however it ends (done, error, client gone): stop the generation and
    give the gate's turn back, exactly once."""
    released = False

    async def done() -> None:
        nonlocal released
        if not released:
            released = True
            stop()
            await gate.__aexit__(None, None, None)

    return done


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


def _finish(stop_reason: str) -> str:
    return "length" if stop_reason == "length" else "stop"


def _usage(answers: list[Any]) -> dict[str, int]:
    prompt = answers[0].prompt_tokens if answers else 0  # one prompt for all n answers
    completion = sum(a.new_tokens for a in answers)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
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
