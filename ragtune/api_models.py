"""The OpenAI request bodies the server takes, and OpenAI's error shape.

What is honoured: ``max_tokens``/``max_completion_tokens`` (default ``generate.max_new_tokens``;
up to what ``model.max_seq_length`` leaves after the prompt, the context shrinking to make
room), ``temperature``/``top_p`` (greedy unless a temperature above 0 is asked for or
configured), ``seed``, ``stop`` (up to 4 strings), ``n`` (up to 8), ``stream``. Fields that
would change the answer and that ragtune cannot honour (tools, functions, a JSON
``response_format``, logprobs, logit bias, presence/frequency penalties) are refused with a
400 naming them rather than silently ignored; the rest (``user``, ``metadata``, ...) are
accepted and have no effect.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from ragtune.decoding import Decoding


def _unicode(text: str) -> str:
    """Text that can be encoded: JSON's ``\\ud800`` escapes can carry lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"invalid Unicode at character {e.start} (a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]

# Fields OpenAI clients may send that ragtune cannot honour, with the value that is harmless.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "function_call": (None, "none"),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
}
_WHY = {
    "tools": "ragtune answers in text from retrieved context; it has no tool calling",
    "functions": "ragtune answers in text from retrieved context; it has no tool calling",
    "response_format": "ragtune answers in text (structured output is not supported; see the "
    "README, Serving)",
}


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = "text"
    text: Text | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer", "function"]
    content: Text | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class DecodingFields(BaseModel):
    """The OpenAI decoding fields every completion request has (also generation-only mode's)."""

    model_config = ConfigDict(extra="allow")
    model: str = ""
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: Text | list[Text] | None = None

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)

    def decoding(self) -> Decoding:
        return Decoding(self._max_tokens(), self.temperature, self.top_p, self.seed, self.stops())

    def _max_tokens(self) -> int | None:
        return self.max_tokens


class _Generation(DecodingFields):
    """Chat and text completions: several answers (``n``) and OpenAI's other fields checked."""

    n: int = Field(default=1, ge=1, le=8)

    @model_validator(mode="after")
    def _honourable(self) -> _Generation:
        extra = self.model_extra or {}
        for key, harmless in _UNSUPPORTED.items():
            if key in extra and extra[key] not in harmless:
                raise ValueError(f"{key} is not supported ({_WHY.get(key, 'ragtune ignores it')})")
        fmt = extra.get("response_format")
        if fmt not in (None, {"type": "text"}):
            raise ValueError(f"response_format is not supported ({_WHY['response_format']})")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ValueError("stop: at most 4 stop sequences")
        if self.n > 1 and self.stream:
            raise ValueError("n > 1 cannot be streamed; ask without stream")
        return self


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Generation):
    """``/v1/completions``: the prompt is the question (retrieval and the template apply)."""

    prompt: Text | list[Text]

    def question(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise ValueError("prompt: send one prompt per request")
            return self.prompt[0]
        return self.prompt


class AskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: Text = Field(min_length=1)
    input: Text = ""
    max_tokens: int | None = Field(default=None, ge=1)
    with_prompt: bool = False


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        *,
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.code, self.param = code, param


_CODES = {401: "invalid_api_key", 404: "not_found", 413: "request_too_large", 429: "rate_limit"}


def error_response(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    *,
    code: str | None = None,
    param: str | None = None,
) -> JSONResponse:
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    body = {
        "error": {
            "message": message,
            "type": kind,
            "param": param,
            "code": code or _CODES.get(status),
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)
