"""One answer path: ask, the server, LangChain and evaluation give the same answer and sources.

The trained folder is the tiny random LM with a small ``max_seq_length``, so the context
budget binds: a caller that budgeted, rendered or decoded differently would retrieve other
sources or generate other text, and this test would go red.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from langchain_core.messages import HumanMessage
from langchain_core.runnables import RunnablePassthrough
from test_rag import ask_cfg, build_model_dir

from ragtune.config import compose, validate
from ragtune.manifest import read_manifest, write_manifest
from ragtune.metrics import normalize_answer

QUESTIONS = [
    "On which day is the Lantern Tide festival held in Velmora?",
    "Who developed Corvanite?",
    "What is the Ember Tide?",
]
MAX_SEQ_LENGTH = 260  # ~130 prompt tokens + 64 reserved: room for one or two chunks


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_lm_path):
    root = tmp_path_factory.mktemp("one_path")
    model_dir, rcfg = build_model_dir(root, tiny_lm_path)
    manifest = read_manifest(model_dir)
    manifest["model"]["max_seq_length"] = MAX_SEQ_LENGTH
    write_manifest(model_dir, manifest)
    return root, model_dir, rcfg


@pytest.fixture(scope="module")
def pipeline(trained):
    """What ``serve/ask.py`` serves: ``open_pipeline`` on the ask config."""
    from ragtune.rag import open_pipeline

    root, model_dir, _ = trained
    cfg = ask_cfg(root, f"model_dir={model_dir}", "generate.max_new_tokens=8")
    return open_pipeline(cfg, explicit=[])


def _sources(items) -> list[tuple[str, int]]:
    return [(s["source"], s["start"]) for s in items]


def test_the_budget_binds(pipeline):
    """Precondition: with another budget, at least one question gets other sources."""
    assert pipeline.max_seq_length == MAX_SEQ_LENGTH
    assert any(
        len(pipeline.retriever.retrieve(q, budget_tokens=None)) > len(pipeline.retrieve(q))
        for q in QUESTIONS
    )


def test_ask_server_langchain_and_eval_agree(trained, pipeline, tmp_path):
    from ragtune.evaluate import evaluate_modes, resolve_modes
    from ragtune.lc import RagtuneChatModel, langchain_parts
    from ragtune.qa import load_qa
    from ragtune.server import create_app

    root, model_dir, rcfg = trained
    # ask.py: RagPipeline.answer
    want = {q: pipeline.answer(q) for q in QUESTIONS}
    expected = {q: (a.text, [(s, st) for s, st, _ in a.sources]) for q, a in want.items()}
    assert all(srcs for _, srcs in expected.values())

    # the server: /ask and /v1/chat/completions
    client = TestClient(create_app(pipeline))
    for q in QUESTIONS:
        got = client.post("/ask", json={"question": q}).json()
        assert (got["answer"], _sources(got["sources"])) == expected[q], q
        body = {"messages": [{"role": "user", "content": q}]}
        got = client.post("/v1/chat/completions", json=body).json()
        text = got["choices"][0]["message"]["content"]
        assert (text, _sources(got["ragtune"]["sources"])) == expected[q], q

    # LangChain: the chat model, and an LCEL chain retriever | prompt | llm
    chat = RagtuneChatModel(pipeline=pipeline)
    retriever, prompt, llm = langchain_parts(pipeline)
    chain = {"context": retriever, "question": RunnablePassthrough()} | prompt | llm
    for q in QUESTIONS:
        msg = chat.invoke([HumanMessage(q)])
        assert (msg.content, _sources(msg.response_metadata["sources"])) == expected[q], q
        docs = retriever.invoke(q)
        assert [(d.metadata["source"], d.metadata["start"]) for d in docs] == expected[q][1]
        assert chain.invoke(q) == expected[q][0], q

    # evaluation: the raft_rag mode on the same index, scoring what the pipeline returned
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"instruction": q, "output": "x"}) + "\n" for q in QUESTIONS))
    cfg = compose(
        "eval",
        [
            f"output_dir={tmp_path / 'eval'}",
            f"paths.outputs={tmp_path / 'outputs'}",
            f"retriever.persist_dir={rcfg.persist_dir}",
            f"data.qa_eval={qa}",
            f"eval.models.raft_rag={model_dir}",
            "eval.modes=[raft_rag]",
            "eval.ingest=false",
            "eval.batch_size=2",
            "generate.max_new_tokens=8",
        ],
    )
    cfg = validate(cfg, {"seed": int, "output_dir": str})
    out = tmp_path / "eval"
    evaluate_modes(cfg, resolve_modes(cfg), load_qa(qa), out)
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [r["question"] for r in rows] == QUESTIONS
    for r in rows:
        assert (r["answer"], _sources(r["retrieved"])) == expected[r["question"]], r["question"]
        ans = want[r["question"]]
        # scored with the pipeline's decision (an empty answer abstains, as SQuAD v2 scores it)
        assert r["abstained"] == (ans.abstained or not normalize_answer(ans.text))
