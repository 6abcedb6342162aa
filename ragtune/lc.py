"""LangChain integration: a ragtune model, prompt and retriever as langchain-core parts.

The seed's fine-tune would not plug into ``HuggingFacePipeline``: the chain rendered its own
prompt, not the one the model was trained on. Here every part renders through the one
schema the model was trained with:

- :class:`RagtunePrompt`: a prompt template (``question``, ``context``, optional ``input``)
  that renders with :meth:`PromptSchema.render_prompt`; ``context`` takes the retriever's
  Documents as they come.
- :class:`RagtuneLLM`: an ``LLM`` over a ragtune model (merged, LoRA adapter or Unsloth, via
  :func:`ragtune.loading.load_model`); it encodes with the schema, stops at the schema's
  stop strings and streams. Text that is not a rendered prompt is taken as a bare question
  and rendered closed book, so the model never sees a template it was not trained on.
- :class:`RagtuneRetriever`: a ``BaseRetriever`` over a pipeline, with the per-question
  token budget training used (``Retriever.as_langchain()`` gives the plain retriever).
- :class:`RagtuneChatModel`: a chat model doing retrieval and templating itself, like the
  server: the last human message is the question, system messages and earlier turns are
  used as :mod:`ragtune.conversation` says.

Decoding keywords (``max_new_tokens`` or ``max_tokens``, ``temperature``, ``top_p``,
``seed``) and ``stop`` go through :class:`ragtune.generate.Decoding` to the one answer path.

A chain::

    retriever, prompt, llm = langchain_parts(RagPipeline.from_model_dir(path, cfg))
    chain = {"context": retriever, "question": RunnablePassthrough()} | prompt | llm
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.llms import LLM
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, GenerationChunk
from langchain_core.prompts import StringPromptTemplate
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict

from ragtune.budget import token_counter
from ragtune.conversation import HISTORY_TOKENS, Turn, turn_from_messages
from ragtune.decoding import Decoding
from ragtune.schema import PromptFields, PromptSchema


def _context_texts(context: Any) -> list[str] | None:
    """Documents, chunks, strings or None (closed book) -> the context block's texts."""
    if context is None:
        return None
    if isinstance(context, (str, Document)):
        context = [context]
    out = []
    for c in context:
        if isinstance(c, Document):
            out.append(c.page_content)
        elif isinstance(c, str):
            out.append(c)
        else:  # a ragtune Chunk
            out.append(str(getattr(c, "text", c)))
    return out


class RagtunePrompt(StringPromptTemplate):
    """The model's own prompt schema as a LangChain prompt template."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    schema_: Any
    tokenizer: Any = None
    input_variables: list[str] = ["question", "context"]
    optional_variables: list[str] = ["input"]

    def format(self, **kwargs: Any) -> str:
        fields = PromptFields(
            str(kwargs["question"]),
            str(kwargs.get("input") or ""),
            _context_texts(kwargs["context"]),
        )
        return self.schema_.render_prompt(fields, self.tokenizer)

    @property
    def _prompt_type(self) -> str:
        return "ragtune"


class RagtuneLLM(LLM):
    """A ragtune model as a LangChain LLM that only ever sees prompts of its own schema."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    generator: Any
    model_name: str = "ragtune"
    pipeline: Any = None  # from_pipeline: its answer-or-abstain decision applies

    @classmethod
    def from_model_dir(
        cls,
        model_dir: str | Path,
        gcfg: Any = None,
        device: str = "auto",
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> RagtuneLLM:
        """Load a ragtune folder (merged, LoRA adapter or Unsloth) with its saved schema.

        ``trust_remote_code`` is the caller's decision, never the folder's.
        """
        from ragtune.modelcard import model_settings, read_json, trained_schema
        from ragtune.remote import generator_of, load_or_connect

        folder = Path(model_dir)
        manifest = read_json(folder / "manifest.json")
        mcfg = model_settings({"trust_remote_code": trust_remote_code}, manifest)
        schema = trained_schema(folder, "alpaca_rag", manifest)
        model, tok = load_or_connect(  # generate.engine_url: a remote engine, no weights
            str(folder),
            gcfg,
            device=device,
            dtype=mcfg["dtype"],
            trust_remote_code=trust_remote_code,
            max_seq_length=mcfg["max_seq_length"],
        )
        gen = generator_of(model, tok, schema, gcfg, max_seq_length=mcfg["max_seq_length"])
        return cls(generator=gen, model_name=folder.resolve().name, **kwargs)

    @classmethod
    def from_pipeline(cls, pipeline: Any, **kwargs: Any) -> RagtuneLLM:
        return cls(
            generator=pipeline.generator, model_name=pipeline.name, pipeline=pipeline, **kwargs
        )

    def _decides(self) -> bool:
        return self.pipeline is not None and self.pipeline.calibration is not None

    def _final_text(self, prompt: str, result: Any) -> str:
        """The pipeline's decision on a prompt its retriever built; else the text as decoded."""
        ans = self.pipeline.finish_prompt(prompt, result) if self._decides() else None
        return result.text if ans is None else ans.text

    @property
    def schema(self) -> PromptSchema:
        return self.generator.schema

    def prompt(self) -> RagtunePrompt:
        """The matching prompt template (the same schema and tokenizer)."""
        return RagtunePrompt(schema_=self.schema, tokenizer=self.generator.tokenizer)

    def as_prompt(self, text: str) -> str:
        """A rendered prompt passes through; anything else is a bare question (closed book)."""
        if text.startswith(_rendered_prefix(self.schema, self.generator.tokenizer)):
            return text
        return self.schema.render_prompt(PromptFields(text), self.generator.tokenizer)

    @property
    def _llm_type(self) -> str:
        return "ragtune"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "prompt": self.schema.name,
            "fingerprint": self.schema.fingerprint,
            "max_new_tokens": self.generator.settings.max_new_tokens,
        }

    def _call(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        prompt = self.as_prompt(prompt)
        return self._final_text(prompt, self.generator.generate(prompt, _decoding(stop, kwargs)))

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        if self._decides():  # the decision needs the whole candidate: one piece, even an
            # empty one (LangChain's stream() raises on a generation without any chunk)
            yield self._chunk(self._call(prompt, stop, run_manager, **kwargs), run_manager)
            return
        stream = self.generator.stream(self.as_prompt(prompt), _decoding(stop, kwargs))
        try:
            for piece in stream:
                yield self._chunk(piece, run_manager)
        finally:
            stream.close()

    def _chunk(self, piece: str, run_manager: CallbackManagerForLLMRun | None) -> GenerationChunk:
        if run_manager:
            run_manager.on_llm_new_token(piece)
        return GenerationChunk(text=piece)


class RagtuneRetriever(BaseRetriever):
    """A pipeline's retriever, with the per-question token budget training used."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    pipeline: Any

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        return [
            Document(
                page_content=c.text,
                metadata={**c.metadata, "source": c.source, "start": c.start, "score": c.score},
            )
            for c in self.pipeline.retrieve(query)
        ]


class RagtuneChatModel(BaseChatModel):
    """Retrieval + the schema + the model behind a chat interface (as the server does it).

    The last human message is the question; answers carry ``sources`` and ``abstained`` in
    ``response_metadata``.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)
    pipeline: Any
    history_tokens: int = HISTORY_TOKENS

    @property
    def _llm_type(self) -> str:
        return "ragtune-chat"

    def _turn(self, messages: Sequence[BaseMessage]) -> Turn:
        pairs = [(_ROLES.get(m.type, m.type), _text(m.content)) for m in messages]
        count = token_counter(self.pipeline.tokenizer)
        return turn_from_messages(pairs, count, self.history_tokens)

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.pipeline.name, "prompt": self.pipeline.schema.name}

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        t = self._turn(messages)
        ans = self.pipeline.answer(t.question, t.input, _decoding(stop, kwargs), query=t.query)
        meta = _metadata(ans)
        return ChatResult(
            generations=[
                ChatGeneration(message=AIMessage(content=ans.text, response_metadata=meta))
            ]
        )

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        t = self._turn(messages)
        stream = self.pipeline.stream(t.question, t.input, _decoding(stop, kwargs), query=t.query)
        try:
            for piece in stream:
                if run_manager:
                    run_manager.on_llm_new_token(piece)
                yield ChatGenerationChunk(message=AIMessageChunk(content=piece))
        finally:
            stream.close()
        if stream.answer is not None:
            meta = _metadata(stream.answer)
            yield ChatGenerationChunk(message=AIMessageChunk(content="", response_metadata=meta))


def langchain_parts(pipeline: Any) -> tuple[RagtuneRetriever, RagtunePrompt, RagtuneLLM]:
    """(retriever, prompt, llm) of one pipeline, for ``{"context": r, "question": ...} | p | l``."""
    llm = RagtuneLLM.from_pipeline(pipeline)
    return RagtuneRetriever(pipeline=pipeline), llm.prompt(), llm


_ROLES = {"human": "user", "ai": "assistant", "system": "system"}


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(
            p if isinstance(p, str) else str(p.get("text", ""))
            for p in content
            if isinstance(p, str) or p.get("type") == "text"
        )
    return str(content)


def _decoding(stop: list[str] | None, kwargs: dict[str, Any]) -> Decoding:
    """LangChain's ``stop`` and decoding keywords as one request's :class:`Decoding`."""
    return Decoding(
        max_new_tokens=kwargs.get("max_new_tokens") or kwargs.get("max_tokens"),
        temperature=kwargs.get("temperature"),
        top_p=kwargs.get("top_p"),
        seed=kwargs.get("seed"),
        stop=tuple(stop or ()),
    )


def _metadata(ans: Any) -> dict[str, Any]:
    d = ans.to_dict()
    return {
        "sources": d["sources"],
        "abstained": d["abstained"],
        "score": ans.score,
        "finish_reason": "length" if ans.stop_reason == "length" else "stop",
        "token_usage": {"prompt_tokens": ans.prompt_tokens, "completion_tokens": ans.new_tokens},
    }


_PREFIXES: dict[tuple[str, int], str] = {}


def _rendered_prefix(schema: PromptSchema, tokenizer: Any) -> str:
    """What every prompt of this schema starts with (the text before the instruction)."""
    key = (schema.fingerprint, id(tokenizer))
    if key not in _PREFIXES:
        a = schema.render_prompt(PromptFields("A?", "", []), tokenizer)
        b = schema.render_prompt(PromptFields("Z!", "", []), tokenizer)
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        _PREFIXES[key] = a[:n]
    return _PREFIXES[key]
