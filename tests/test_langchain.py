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
