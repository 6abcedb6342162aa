"""One answer path: ask, the server, LangChain and evaluation give the same answer, sources,
answer-or-abstain decision and score.

The trained folder is the tiny random LM with a small ``max_seq_length``, so the context
budget binds: a caller that budgeted, rendered or decoded differently would retrieve other
sources or generate other text, and this test would go red. Its manifest carries an
``answerability`` calibration whose threshold lies between the questions' scores, so it turns
at least one answer into the abstain answer: a path that skipped the decision would differ.
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

QUESTIONS = [
    "On which day is the Lantern Tide festival held in Velmora?",
    "Who developed Corvanite?",
    "What is the Ember Tide?",
]
MAX_SEQ_LENGTH = 260  # ~130 prompt tokens + 64 reserved: room for one or two chunks


# the retriever's top k, and the context the model itself picks (retriever.reader_rerank, read
# from the manifest by every path): a path that retrieved without the model would differ
@pytest.fixture(scope="module", params=[0, 4], ids=["top_k", "reader_rerank"])
def trained(request, tmp_path_factory, tiny_lm_path):
    from ragtune.answerability import MANIFEST_KEY, Calibration
    from ragtune.rag import open_pipeline

    root = tmp_path_factory.mktemp("one_path")
    model_dir, rcfg = build_model_dir(root, _untied(root / "lm", tiny_lm_path))
    manifest = read_manifest(model_dir)
    manifest["model"]["max_seq_length"] = MAX_SEQ_LENGTH
    manifest["retriever"]["reader_rerank"] = request.param
    write_manifest(model_dir, manifest)
    # a threshold between the lowest and the next score: one answer flips to abstain
    cfg = ask_cfg(root, f"model_dir={model_dir}", "generate.max_new_tokens=8")
    plain = open_pipeline(cfg, explicit=[])
    plain.scoring = True
    scores = sorted(a.score for a in plain.answer_batch(QUESTIONS))
    assert scores[1] - scores[0] > 1e-3, "precondition: the scores differ"
    cal = Calibration(threshold=(scores[0] + scores[1]) / 2, weights={"margin": 1.0})
    manifest[MANIFEST_KEY] = cal.to_dict()
    write_manifest(model_dir, manifest)
    return root, model_dir, rcfg


@pytest.fixture(scope="module")
def pipeline(trained):
    """What ``serve/ask.py`` serves: ``open_pipeline`` on the ask config."""
    from ragtune.rag import open_pipeline

    root, model_dir, _ = trained
    cfg = ask_cfg(root, f"model_dir={model_dir}", "generate.max_new_tokens=8")
    return open_pipeline(cfg, explicit=[])


def _untied(out, tiny_lm_path) -> str:
    """The tiny LM with its own output layer: its greedy answers are words, not the echoed
    newline a tied random model repeats (which would be the empty answer every time)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_lm_path)
    config.tie_word_embeddings = False
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_lm_path).save_pretrained(out)
    return str(out)


def _sources(items) -> list[tuple[str, int]]:
    return [(s["source"], s["start"]) for s in items]


def test_the_budget_binds(pipeline):
    """Precondition: with another budget, at least one question gets other sources."""
    assert pipeline.max_seq_length == MAX_SEQ_LENGTH
    assert any(
        len(pipeline.retriever.retrieve(q, budget_tokens=None)) > len(pipeline.retrieve(q))
        for q in QUESTIONS
    )


def test_the_model_picks_other_contexts_only_when_it_reranks(trained, pipeline):
    """Precondition: with reader_rerank the model picks other chunks than the retriever's top k
    for at least one question (so a path that skipped it would differ); without, none."""
    rerank = read_manifest(trained[1])["retriever"]["reader_rerank"]
    assert pipeline._rerank_n() == rerank
    budgeted = pipeline.retriever.retrieve
    assert any(
        [c.id for c in pipeline.retrieve(q)]
        != [c.id for c in budgeted(q, budget_tokens=pipeline.context_budget(q))]
        for q in QUESTIONS
    ) == bool(rerank)


def test_ask_server_langchain_and_eval_agree(trained, pipeline, tmp_path):
    from ragtune.evaluate import evaluate_modes, resolve_modes
    from ragtune.lc import RagtuneChatModel, langchain_parts
    from ragtune.qa import load_qa
    from ragtune.server import create_app

    root, model_dir, rcfg = trained
    abstain = pipeline.schema.abstain
    # ask.py: RagPipeline.answer
    want = {q: pipeline.answer(q) for q in QUESTIONS}
    expected = {q: (a.text, [(s, st) for s, st, _ in a.sources]) for q, a in want.items()}
    assert all(srcs for _, srcs in expected.values())
    # the calibration decided: one candidate answer became the abstain answer, not all did
    flipped = [q for q, a in want.items() if a.text == abstain and a.candidate != abstain]
    assert flipped and len(flipped) < len(QUESTIONS)
    assert all(a.score is not None for a in want.values())

    def same_decision(q, abstained, score):
        assert abstained == want[q].abstained, q
        assert score == pytest.approx(want[q].score, abs=1e-4), q

    # stream: buffered with a calibration, the same final text and decision
    for q in QUESTIONS:
        stream = pipeline.stream(q)
        assert "".join(stream) == expected[q][0], q
        same_decision(q, stream.answer.abstained, stream.answer.score)

    # the server: /ask and /v1/chat/completions (plain and streamed)
    client = TestClient(create_app(pipeline))
    for q in QUESTIONS:
        got = client.post("/ask", json={"question": q}).json()
        assert (got["answer"], _sources(got["sources"])) == expected[q], q
        same_decision(q, got["abstained"], got["score"])
        body = {"messages": [{"role": "user", "content": q}]}
        got = client.post("/v1/chat/completions", json=body).json()
        text = got["choices"][0]["message"]["content"]
        assert (text, _sources(got["ragtune"]["sources"])) == expected[q], q
        same_decision(q, got["ragtune"]["abstained"], got["ragtune"]["score"])
        events = client.post("/v1/chat/completions", json={**body, "stream": True}).text
        chunks = [json.loads(e[6:]) for e in events.split("\n\n") if e[6:] not in ("", "[DONE]")]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert text == expected[q][0], q
        same_decision(q, chunks[-1]["ragtune"]["abstained"], chunks[-1]["ragtune"]["score"])

    # LangChain: the chat model, and an LCEL chain retriever | prompt | llm
    chat = RagtuneChatModel(pipeline=pipeline)
    retriever, prompt, llm = langchain_parts(pipeline)
    chain = {"context": retriever, "question": RunnablePassthrough()} | prompt | llm
    for q in QUESTIONS:
        msg = chat.invoke([HumanMessage(q)])
        assert (msg.content, _sources(msg.response_metadata["sources"])) == expected[q], q
        same_decision(q, msg.response_metadata["abstained"], msg.response_metadata["score"])
        docs = retriever.invoke(q)
        assert [(d.metadata["source"], d.metadata["start"]) for d in docs] == expected[q][1]
        assert chain.invoke(q) == expected[q][0], q
        assert "".join(chain.stream(q)) == expected[q][0], q

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
        # scored with the pipeline's decision (an empty answer abstains, as SQuAD v2 scores it)
        same_decision(r["question"], r["abstained"], r["answerability"])
    metrics = json.loads((out / "metrics.json").read_text())["modes"]["raft_rag"]
    assert metrics["calibrated"] and metrics["abstention_rate"] > 0
