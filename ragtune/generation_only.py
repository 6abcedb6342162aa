"""Generation-only mode of ragtune's server (``server.generation_only=true``): an engine for
another ragtune's :mod:`ragtune.remote`, and the engine its tests speak to.

``POST /v1/completions`` takes ``prompt`` as a string (encoded as training encodes prompts,
with one BOS) or as a list of token ids (used as they are), and returns the model's
continuation: no retrieval, no template, and only the request's own stop strings (the client
sends the schema's). Honoured: ``max_tokens``, ``stop``, ``temperature``/``top_p``/``seed``,
``stream``, plus what the remote answer path needs for answer-or-abstain scoring: ``echo``
with ``logprobs`` (teacher-forced log-probabilities of every prompt token, first None) and
``logit_bias`` bans (-100) with ``max_tokens=1``. The text is the decoded continuation cut
at the stop string (not stripped, as an engine returns it; streamed pieces are held back and
trimmed as ragtune streams answers); ``stop_reason`` names the stop string that ended it (as
vLLM does). ``/healthz`` and ``/v1/models`` stay; the RAG endpoints
(``/ask``, chat) are not served, as there is no retriever.

Kept apart from :mod:`ragtune.server` (which mounts it with one call) so that the server's
own request path can change without touching this one.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Annotated, Any

import anyio
from fastapi import FastAPI
from pydantic import Field, model_validator

from ragtune.api_models import ApiError, DecodingFields, Text
from ragtune.decoding import GenerationResult
from ragtune.stopping import cut_stop

BAN = -100  # OpenAI's logit_bias value that excludes a token
_REFUSED = ("suffix", "best_of", "presence_penalty", "frequency_penalty", "repetition_penalty")


class EngineCompletionRequest(DecodingFields):
    """``/v1/completions`` in generation-only mode (see the module docstring)."""

    prompt: Text | list[Annotated[int, Field(ge=0)]]
    n: int = Field(default=1, ge=1, le=1)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _honourable(self) -> EngineCompletionRequest:
        extra = self.model_extra or {}
        for key in _REFUSED:
            if extra.get(key) not in (None, 0, 0.0, 1, 1.0, ""):
                raise ValueError(f"{key} is not supported in generation-only mode")
        bias = self.logit_bias or {}
        if any(not k.isdigit() for k in bias) or any(v > BAN for v in bias.values()):
            raise ValueError("logit_bias: only bans of token ids (-100) are supported")
        if bias and self.max_tokens != 1:
            raise ValueError("logit_bias: only with max_tokens=1 (a ban at the first token)")
        if self.stream and (bias or self.echo):
            raise ValueError("stream: not with echo or logit_bias")
        return self


def mount_generation_only(
    app: FastAPI, pipeline: Any, gate: Any, check_model: Callable[[str], None], model_id: str
) -> None:
    """Add generation-only ``/v1/completions`` to ``app``; ``gate`` gives the model's turns."""
    from ragtune.server import _GuardedStream, release_once

    generator = pipeline.generator
    # The same model, lock and fast path; only the request's stop strings, and ids as they come.
    raw = copy.copy(generator)
    raw.stop_strings = []
    raw.encode = lambda p: list(p) if isinstance(p, list) else generator.encode(p)
    config = getattr(generator.model, "config", None)
    vocab = int(getattr(config, "vocab_size", 0) or len(generator.tokenizer))

    def checked(req: EngineCompletionRequest) -> list[int]:
        check_model(req.model)
        ids = raw.encode(req.prompt)
        bad = [t for t in ids if t >= vocab]
        if not ids or bad:
            why = "empty" if not ids else f"token id {bad[0]} is outside the vocabulary ({vocab})"
            raise ApiError(400, f"prompt: {why}", param="prompt")
        if len(ids) >= generator.max_seq_length:
            msg = f"prompt: {len(ids)} tokens leave no room under {generator.max_seq_length}"
            raise ApiError(400, msg, param="prompt")
        return ids

    def head(rid: str) -> dict[str, Any]:
        return {"id": rid, "object": "text_completion", "created": int(time.time())}

    @app.post("/v1/completions", response_model=None)
    async def completions(req: EngineCompletionRequest) -> Any:
        ids = checked(req)
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        if req.stream:
            return await stream(ids, req, {**head(rid), "model": model_id})
        ban = [int(k) for k in req.logit_bias or {}]
        async with gate:

            def run() -> tuple[GenerationResult, Any]:
                got = raw.generate_batch([ids], 1, req.decoding(), block_first_tokens=ban)[0]
                lps = None
                if req.echo and req.logprobs is not None:
                    lps = _echo_logprobs(generator, [*ids, *got.token_ids])
                return got, lps

            got, lps = await anyio.to_thread.run_sync(run)
        # the continuation as decoded, cut at a stop string but not stripped: a raw engine's
        # text (the client trims; a leading space tells it which token came first)
        text = cut_stop(raw.decode(got.token_ids), req.stops())[0]
        text = (raw.decode(ids) if req.echo else "") + text
        choice = {**_ending(raw, got, req.stops()), "index": 0, "text": text, "logprobs": lps}
        usage = _usage(len(ids), got.new_tokens)
        return {**head(rid), "model": model_id, "choices": [choice], "usage": usage}

    async def stream(ids: list[int], req: EngineCompletionRequest, top: dict[str, Any]) -> Any:
        await gate.__aenter__()
        try:
            pieces = raw.stream(ids, req.decoding())
        except BaseException:
            await gate.__aexit__(None, None, None)
            raise

        def event(choice: dict[str, Any], **more: Any) -> str:
            body = {**top, "choices": [{"index": 0, "logprobs": None, **choice}], **more}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def events() -> AsyncIterator[str]:
            try:
                while (piece := await anyio.to_thread.run_sync(next, pieces, None)) is not None:
                    yield event({"text": piece, "finish_reason": None})
                got = pieces.result
                if got is not None:
                    end = _ending(raw, got, req.stops())
                    yield event({"text": "", **end}, usage=_usage(len(ids), got.new_tokens))
                yield "data: [DONE]\n\n"
            except Exception as e:  # headers are sent: report in-band, never a torn stream
                yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
            finally:
                await done()

        done = release_once(pieces.close, gate)

        return _GuardedStream(events(), on_close=done, media_type="text/event-stream")


def _ending(gen: Any, got: GenerationResult, stops: Sequence[str]) -> dict[str, Any]:
    """``finish_reason`` and vLLM's ``stop_reason`` (the stop string that ended the text)."""
    stop = None
    if got.stop_reason == "stop_string":
        text = gen.decode(got.token_ids)
        cut, _ = cut_stop(text, stops)
        stop = next((s for s in stops if text.startswith(s, len(cut))), None)
    finish = "length" if got.stop_reason == "length" else "stop"
    return {"finish_reason": finish, "stop_reason": stop}


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _echo_logprobs(generator: Any, ids: list[int]) -> dict[str, Any]:
    """OpenAI's ``logprobs`` for echoed tokens: each token's log-probability after the ones
    before it, from one teacher-forced forward pass (the first token has none)."""
    import torch

    with generator.exclusive(), torch.inference_mode():
        x = torch.tensor([ids], dtype=torch.long, device=generator.device)
        logits = generator.model(input_ids=x).logits[0, :-1].float()
        lp = torch.log_softmax(logits, dim=-1).gather(1, x[0, 1:, None])[:, 0].tolist()
    tokens = [generator.decode([t]) for t in ids]
    return {"tokens": tokens, "token_logprobs": [None, *lp], "top_logprobs": None}
