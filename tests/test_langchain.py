"""LangChain: a real LCEL chain retriever | prompt | llm on the embedded SmolLM2, rendering
through the model's own schema; the chat model; a LoRA adapter folder behind the LLM."""

from __future__ import annotations

from pathlib import Path

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import HumanMessage
from langchain_core.runnables import RunnablePassthrough

from ragtune.schema import PromptFields

CORPUS = {
    "towns/velmora.md": "# Velmora\n\nVelmora is a lake town in the province of Ardent. "
    "Its Lantern Tide festival is held on the second Saturday of October, when the "
    "Keeper of the Wick lights the first lantern on the water.",
    "materials/corvanite.md": "Corvanite is a heavy copper-nickel alloy developed by "
    "Ismay Trelawn for ship fittings that resist salt water.",
}
QUESTION = "On which day is the Lantern Tide festival held in Velmora?"


class Prompts(BaseCallbackHandler):
    """Records the exact prompt text each LLM call receives."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_llm_start(self, serialized, prompts, **kwargs) -> None:
        self.seen.extend(prompts)


@pytest.fixture(scope="module")
def smol_pipeline(tmp_path_factory, lm_path):
    from test_rag import ask_cfg, build_model_dir

    from ragtune.rag import RagPipeline

    root = tmp_path_factory.mktemp("lc")
    # chat_rag: the base SmolLM2 reads a context best through its own chat template
    model_dir, _ = build_model_dir(root, lm_path, prompt="chat_rag", corpus=CORPUS)
    cfg = ask_cfg(root, "generate.max_new_tokens=16")
    return RagPipeline.from_model_dir(model_dir, cfg)


def test_lcel_chain_renders_through_the_schema(smol_pipeline):
    from ragtune.lc import langchain_parts

    retriever, prompt, llm = langchain_parts(smol_pipeline)
    chain = {"context": retriever, "question": RunnablePassthrough()} | prompt | llm
    spy = Prompts()
    out = chain.invoke(QUESTION, config={"callbacks": [spy]})

    docs = retriever.invoke(QUESTION)
    assert docs[0].metadata["source"] == "towns/velmora.md"
    assert isinstance(docs[0].metadata["start"], int)
    want = smol_pipeline.schema.render_prompt(
        PromptFields(QUESTION, "", [d.page_content for d in docs]), smol_pipeline.tokenizer
    )
    assert spy.seen == [want]  # the chain's prompt is the schema's, byte for byte
    ans = smol_pipeline.answer(QUESTION)
    assert spy.seen[0] == ans.prompt  # ... and the very prompt ask.py and the server send
    assert out == ans.text
    assert "October" in out  # the embedded model reads the retrieved context
    assert "###" not in out


def test_lcel_chain_streams(smol_pipeline):
    from ragtune.lc import langchain_parts

    retriever, prompt, llm = langchain_parts(smol_pipeline)
    chain = {"context": retriever, "question": RunnablePassthrough()} | prompt | llm
    pieces = list(chain.stream(QUESTION))
    assert len(pieces) > 1
    assert "".join(pieces) == smol_pipeline.answer(QUESTION).text


def test_retriever_as_langchain_in_a_chain(smol_pipeline):
    """The retriever engineer's Retriever.as_langchain() plugs into the same prompt and LLM."""
    from ragtune.lc import RagtuneLLM

    llm = RagtuneLLM.from_pipeline(smol_pipeline)
    plain = smol_pipeline.retriever.as_langchain(k=1)
    chain = {"context": plain, "question": RunnablePassthrough()} | llm.prompt() | llm
    spy = Prompts()
    chain.invoke("Who developed Corvanite?", config={"callbacks": [spy]})
    assert "Ismay Trelawn" in spy.seen[0]
    assert spy.seen[0].count("### Context:\n") == 1
    assert spy.seen[0].count("<|im_start|>") == 3  # system, user, assistant: the chat template


def test_bare_question_is_rendered_not_sent_raw(smol_pipeline):
    from ragtune.lc import RagtuneLLM

    llm = RagtuneLLM.from_pipeline(smol_pipeline)
    assert llm.as_prompt("Who?") == smol_pipeline.schema.render_prompt(
        PromptFields("Who?"), smol_pipeline.tokenizer
    )
    rendered = smol_pipeline.render("Who?", "", [])
    assert llm.as_prompt(rendered) == rendered
    assert llm.invoke("Say hello", stop=["hello"]).count("hello") == 0


def test_chat_model_retrieves_itself(smol_pipeline):
    from ragtune.lc import RagtuneChatModel

    chat = RagtuneChatModel(pipeline=smol_pipeline)
    msg = chat.invoke([HumanMessage(QUESTION)])
    assert msg.content == smol_pipeline.answer(QUESTION).text
    assert msg.response_metadata["sources"][0]["source"] == "towns/velmora.md"
    chunks = list(chat.stream([HumanMessage(QUESTION)]))
    assert "".join(c.content for c in chunks) == msg.content
    assert any(c.response_metadata.get("sources") for c in chunks)


def test_lora_adapter_folder_behind_the_llm(tmp_path, tiny_lm_path):
    """A PEFT adapter folder (what save_method=lora writes) loads and renders its schema."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragtune.lc import RagtuneLLM
    from ragtune.manifest import write_manifest
    from ragtune.schema import get_schema

    base = AutoModelForCausalLM.from_pretrained(tiny_lm_path, use_safetensors=True)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)  # a non-trivial adapter
    folder = Path(tmp_path / "model")
    peft_model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_lm_path).save_pretrained(folder)
    schema = get_schema("alpaca_rag_short")
    schema.save(folder)
    write_manifest(
        folder,
        {
            "base_model": tiny_lm_path,
            "backend": "hf",
            "save_method": "lora",
            "prompt": {"name": schema.name, "fingerprint": schema.fingerprint},
            "model": {"dtype": "float32", "max_seq_length": 512},
        },
    )
    assert (folder / "adapter_config.json").exists()
    llm = RagtuneLLM.from_model_dir(folder, {"max_new_tokens": 4})
    assert llm.schema.fingerprint == schema.fingerprint
    spy = Prompts()
    prompt = llm.prompt().format(question="Who?", context=["Ann did."])
    out = llm.invoke(prompt, config={"callbacks": [spy]})
    assert spy.seen == [prompt] and prompt.startswith("Answer the instruction from the context.")
    assert isinstance(out, str)


# --------------------------------------------------------------------------- the parts' rules
class _Generator:
    """A stand-in generator with the schema's rendering: records what it is asked."""

    def __init__(self, pieces: list[str]):
        from ragtune.schema import get_schema

        self.schema, self.tokenizer, self.pieces = get_schema("alpaca_rag"), None, pieces
        self.settings = type("S", (), {"max_new_tokens": 8})()
        self.asked: list[tuple[str, object]] = []
        self.closed = 0

    def _result(self):
        from ragtune.decoding import GenerationResult

        return GenerationResult("".join(self.pieces), [1], "eos", len(self.pieces), 0.1)

    def generate(self, prompt, decoding):
        self.asked.append((prompt, decoding))
        return self._result()

    def stream(self, prompt, decoding):
        self.asked.append((prompt, decoding))
        gen = self

        class _S:
            def __iter__(self):
                return iter(gen.pieces)

            def close(self):
                gen.closed += 1

        return _S()


def test_the_prompt_template_takes_none_a_string_documents_or_chunks():
    from langchain_core.documents import Document

    from ragtune.lc import RagtunePrompt
    from ragtune.schema import get_schema
    from ragtune.types import Chunk

    schema = get_schema("alpaca_rag")
    template = RagtunePrompt(schema_=schema)

    def render(context):
        return schema.render_prompt(PromptFields(QUESTION, "", context), None)

    assert template.format(question=QUESTION, context=None) == render(None)
    assert "\n### Context:\n" not in render(None)  # closed book: no context section
    text = "Velmora is a lake town."
    assert template.format(question=QUESTION, context=text) == render([text])
    chunk = Chunk("id", text, "towns/velmora.md", 0, "h")
    for context in ([Document(page_content=text)], [chunk]):
        assert template.format(question=QUESTION, context=context) == render([text])


def test_the_llm_renders_a_bare_question_and_passes_decoding_keywords_on():
    from ragtune.decoding import Decoding
    from ragtune.lc import RagtuneLLM

    gen = _Generator(["Ismay"])
    llm = RagtuneLLM(generator=gen)
    assert llm.invoke(QUESTION, stop=["\n\n"], max_tokens=5, temperature=0.3, top_p=0.9) == "Ismay"
    prompt, decoding = gen.asked[-1]
    assert prompt == gen.schema.render_prompt(PromptFields(QUESTION), None)
    assert decoding == Decoding(max_new_tokens=5, temperature=0.3, top_p=0.9, stop=("\n\n",))


def test_the_llm_stream_closes_its_generation_and_streams_a_decided_empty_answer():
    """An empty decided answer still comes as one (empty) piece: LangChain's stream() raises
    "No generation chunks were returned" on none."""
    from types import SimpleNamespace

    from ragtune.answer import Answer
    from ragtune.lc import RagtuneLLM

    gen = _Generator(["Ismay", " Trelawn"])
    assert list(RagtuneLLM(generator=gen).stream(QUESTION)) == ["Ismay", " Trelawn"]
    assert gen.closed == 1
    empty = Answer("", True, [], "p", 0.1)
    pipe = SimpleNamespace(calibration=object(), finish_prompt=lambda prompt, result: empty)
    decided = RagtuneLLM(generator=_Generator(["Ismay"]), pipeline=pipe)
    assert list(decided.stream(QUESTION)) == [""] and decided.invoke(QUESTION) == ""


def test_the_retriever_documents_carry_source_start_and_score(smol_pipeline):
    from ragtune.lc import RagtuneRetriever

    docs = RagtuneRetriever(pipeline=smol_pipeline).invoke(QUESTION)
    chunks = smol_pipeline.retrieve(QUESTION)
    assert [(d.metadata["source"], d.metadata["start"], d.metadata["score"]) for d in docs] == [
        (c.source, c.start, c.score) for c in chunks
    ]


def test_the_chat_model_retrieves_for_the_conversation_and_reports_usage(smol_pipeline):
    """A follow-up retrieves with the conversation's query (as the server does); the reply
    says why it stopped and how many tokens it used."""
    from types import SimpleNamespace

    from langchain_core.messages import AIMessage

    from ragtune.answer import Answer
    from ragtune.lc import RagtuneChatModel

    asked: list[dict] = []
    ans = Answer(
        "In October.", False, [], "p", 0.1, stop_reason="length", prompt_tokens=50, new_tokens=7
    )

    class _Stream:
        answer = ans

        def __iter__(self):
            return iter(["In October."])

        def close(self):
            pass

    def answer(question, input, decoding, query=None):
        asked.append({"question": question, "query": query})
        return ans

    def stream(question, input, decoding, query=None):
        answer(question, input, decoding, query)
        return _Stream()

    pipe = SimpleNamespace(
        tokenizer=smol_pipeline.tokenizer,
        name="m",
        schema=smol_pipeline.schema,
        answer=answer,
        stream=stream,
    )
    chat = RagtuneChatModel(pipeline=pipe)
    messages = [
        HumanMessage("Tell me about the Lantern Tide festival of Velmora."),
        AIMessage("It is a lake festival."),
        HumanMessage("When is it held?"),
    ]
    reply = chat.invoke(messages)
    chunks = list(chat.stream(messages))
    assert [a["question"] for a in asked] == ["When is it held?"] * 2
    assert all("Velmora" in a["query"] for a in asked)
    meta = reply.response_metadata
    assert meta["finish_reason"] == "length"
    assert meta["token_usage"] == {"prompt_tokens": 50, "completion_tokens": 7}
    assert any(c.response_metadata.get("finish_reason") == "length" for c in chunks)


class _Tokens(BaseCallbackHandler):
    """Records the streamed tokens and the model type LangChain reports to callbacks."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.types: list[str] = []

    def on_llm_start(self, serialized, prompts, **kwargs) -> None:
        self.types.append(kwargs["invocation_params"]["_type"])

    def on_chat_model_start(self, serialized, messages, **kwargs) -> None:
        self.types.append(kwargs["invocation_params"]["_type"])

    def on_llm_new_token(self, token, **kwargs) -> None:
        self.tokens.append(token)


def test_callbacks_see_every_streamed_token_and_the_model_type(smol_pipeline):
    """Streaming handlers (a UI, a tracer) get each piece as it is decoded, from the LLM and
    the chat model alike, and see which kind of model answered; the prompt names its type."""
    from types import SimpleNamespace

    from ragtune.answer import Answer
    from ragtune.lc import RagtuneChatModel, RagtuneLLM

    spy = _Tokens()
    llm = RagtuneLLM(generator=_Generator(["Ismay", " Trelawn"]))
    assert list(llm.stream(QUESTION, config={"callbacks": [spy]})) == ["Ismay", " Trelawn"]
    assert spy.tokens == ["Ismay", " Trelawn"] and spy.types == ["ragtune"]
    assert llm.prompt().dict()["_type"] == "ragtune"

    class _Stream:
        answer = Answer("In October.", False, [], "p", 0.1)

        def __iter__(self):
            return iter(["In", " October."])

        def close(self):
            pass

    pipe = SimpleNamespace(
        tokenizer=smol_pipeline.tokenizer,
        name="m",
        schema=smol_pipeline.schema,
        stream=lambda *a, **k: _Stream(),
    )
    # LangChain's v3 event stream hands the chat model's own stream the run manager: the
    # pieces reach callbacks only if that stream reports them (chat.stream() reports itself)
    spy = _Tokens()
    chat = RagtuneChatModel(pipeline=pipe)
    events = list(
        chat.stream_events(
            [HumanMessage("When is it held?")], config={"callbacks": [spy]}, version="v3"
        )
    )
    assert events and spy.tokens == ["In", " October."] and spy.types == ["ragtune-chat"]
