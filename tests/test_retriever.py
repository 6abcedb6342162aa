"""The one retriever: ranking, de-duplication, stable order, token budget, hybrid, MMR,
find, LangChain face."""

from __future__ import annotations

import pytest

from ragtune.config import RetrieverConfig
from ragtune.ingest import IndexNotFoundError, ingest
from ragtune.retriever import Retriever, bm25_tokens, fit_budget
from ragtune.types import Chunk

LOOM = (
    "The Tessaline loom weaves glass thread into cloth. It was invented by Odalys Ferrant "
    "in 1891 in the town of Harrowgate."
)
DOCS = {
    "a/loom.md": LOOM,
    "a/loom_copy.md": LOOM,  # exact duplicate content
    "a/loom_near.md": LOOM.replace("cloth", "fabric"),  # near duplicate (cosine ~0.99)
    "b/heron.md": "The glassback heron wades in shallow lakes and eats small fish. "
    "Its back feathers shine like glass in the evening light.",
    "b/code.md": "Maintenance code QX-7731 opens the signal cabinet of the old railway.",
    "c/ferry.md": "The Dunmore ferry crosses the bay four times a day in summer.",
    "c/bridge.md": "The Quellbridge spans the river Ost with nine stone arches.",
    "c/ja.txt": "月森焼は月森村で作られる陶器である。釉薬は青い。",
}


def words(text: str) -> int:
    return len(text.split())


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ret")
    for rel, text in DOCS.items():
        (tmp / "corpus" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / "corpus" / rel).write_text(text, encoding="utf-8")
    rcfg = RetrieverConfig(persist_dir=str(tmp / "index"), chunk_size=400, chunk_overlap=0)
    assert ingest(tmp / "corpus", rcfg, show_progress=False).ok
    return rcfg


def make(rcfg, **kw) -> Retriever:
    from dataclasses import replace

    return Retriever.from_config(replace(rcfg, **kw))


def test_exact_and_near_duplicates_are_dropped(index):
    ret = Retriever.from_config(index)
    got = ret.retrieve("Who invented the Tessaline loom?", k=3)
    assert got[0].source.startswith("a/loom")
    assert sum(c.source.startswith("a/loom") for c in got) == 1
    assert len({c.content_hash for c in got}) == len(got)
    # the exact copy ties with the original: the smaller id wins, every time
    loom_ids = sorted(c.id for c in ret.find(contains="cloth") if c.source.startswith("a/loom"))
    assert got[0].id == loom_ids[0]
    # with cosine dedup off, the near duplicate comes back, the exact copy still does not
    off = make(index, dedup_cosine=1.0).retrieve("Who invented the Tessaline loom?", k=3)
    assert [c.source for c in off[:2]].count("a/loom_near.md") == 1
    assert len({c.content_hash for c in off}) == len(off)


def test_scores_descend_order_is_stable_and_metadata_complete(index):
    ret = Retriever.from_config(index)
    a = ret.retrieve("glass heron feathers", k=4)
    b = ret.retrieve("glass heron feathers", k=4)
    assert [c.id for c in a] == [c.id for c in b]
    assert all(x.score >= y.score for x, y in zip(a, a[1:], strict=False))
    assert a[0].source == "b/heron.md" and a[0].start == 0 and len(a[0].content_hash) == 64
    cands = ret.candidates("glass heron feathers", 6)
    assert len(cands) == 6 and [c.id for c in cands[:4]] == [c.id for c in a]


def test_overlapping_spans_of_one_source_are_near_duplicates(index):
    ret = Retriever.from_config(index)
    base = ret.find(source="b/heron.md")[0]
    shifted = Chunk("other", base.text[10:] + " more", base.source, base.start + 10, "h2")
    elsewhere = Chunk("x", base.text, "z/other.md", 0, base.content_hash)  # same hash
    far = Chunk("far", "unrelated words here", base.source, base.start + 5000, "h3")
    out = make(index, dedup_cosine=1.0).fit([base, shifted, elsewhere, far], None)
    assert [c.id for c in out] == [base.id, "far"]
    # offsets of JSONL records count within their record: start 0 twice is no overlap
    r1 = Chunk("r1", "first record", "n.jsonl", 0, "h4", metadata={"line": 1})
    r2 = Chunk("r2", "second record", "n.jsonl", 0, "h5", metadata={"line": 2})
    r2b = Chunk("r2b", "second record!", "n.jsonl", 0, "h6", metadata={"line": 2})
    assert [c.id for c in make(index, dedup_cosine=1.0).fit([r1, r2, r2b], None)] == ["r1", "r2"]


def test_budget_drops_what_does_not_fit_and_truncates_a_lone_first_chunk():
    chunks = [
        Chunk(str(i), " ".join(["w"] * n), "s", i * 1000, str(i)) for i, n in enumerate([5, 8, 3])
    ]
    assert [c.id for c in fit_budget(chunks, 9, words)] == ["0", "2"]
    assert [c.id for c in fit_budget(chunks, 100, words)] == ["0", "1", "2"]
    cut = fit_budget(chunks, 4, words)
    assert cut[0].id == "0" and words(cut[0].text) == 4 and cut[0].metadata["truncated"]
    assert cut[0].content_hash != chunks[0].content_hash
    assert fit_budget(chunks, 0, words) == []


def test_retrieve_applies_budget_with_the_token_counter(index):
    ret = Retriever.from_config(index, token_counter=words)
    full = ret.retrieve("railway signal cabinet code", k=3)
    small = ret.retrieve("railway signal cabinet code", k=3, budget_tokens=12)
    assert sum(words(c.text) for c in small) <= 12 < sum(words(c.text) for c in full)
    assert small[0].id == full[0].id or small[0].metadata.get("truncated")
    # without a counter the budget cannot be measured: returned unchanged (warned once)
    plain = Retriever.from_config(index)
    assert len(plain.retrieve("railway", k=3, budget_tokens=1)) == 3


def test_hybrid_finds_a_rare_code_that_dense_ranks_lower(index):
    q = "QX-7731"
    dense = make(index, hybrid=False).candidates(q, 8)
    hybrid = make(index, hybrid=True).retrieve(q, k=1)
    assert hybrid[0].source == "b/code.md"
    assert hybrid[0].metadata["dense_score"] == pytest.approx(
        next(c.score for c in dense if c.source == "b/code.md"), abs=1e-5
    )
    assert bm25_tokens("月森焼 Code-7") == ["月", "森", "焼", "月森", "森焼", "code", "7"]


def test_mmr_prefers_diversity(index):
    q = "glass"
    plain = make(index, dedup_cosine=1.0).retrieve(q, k=3)
    diverse = make(index, dedup_cosine=1.0, mmr=True, mmr_lambda=0.1).retrieve(q, k=3)
    assert len(diverse) == 3
    loom_plain = sum(c.source.startswith("a/loom") for c in plain)
    loom_mmr = sum(c.source.startswith("a/loom") for c in diverse)
    assert loom_mmr < loom_plain
    assert diverse[0].id == plain[0].id  # the most relevant is still first


def test_find_is_case_insensitive_and_filters_by_source(index):
    ret = Retriever.from_config(index)
    hits = ret.find(contains="TESSALINE LOOM")
    assert {c.source for c in hits} == {"a/loom.md", "a/loom_copy.md", "a/loom_near.md"}
    assert all(c.score is None for c in hits)
    assert [c.source for c in ret.find(contains="loom", source="a/loom_near.md")] == [
        "a/loom_near.md"
    ]
    assert ret.find(contains="釉薬")[0].source == "c/ja.txt"
    assert ret.find(contains="no such text anywhere") == []
    assert len(ret.find(limit=2)) == 2


def test_settings_and_langchain_face(index):
    ret = Retriever.from_config(index)
    s = ret.settings()
    for key in (
        "embedding_model",
        "normalize",
        "chunk_size",
        "chunk_overlap",
        "chunk_unit",
        "k",
        "fetch_k",
        "dedup_cosine",
        "hybrid",
        "mmr",
        "mmr_lambda",
        "context_tokens",
        "persist_dir",
        "collection",
        "server",
    ):
        assert key in s
    assert s["chunk_size"] == 400 and s["collection"].startswith("rt-minilm-l6-n-c400")
    from langchain_core.retrievers import BaseRetriever

    lc = ret.as_langchain()
    assert isinstance(lc, BaseRetriever)
    docs = lc.invoke("Which ferry crosses the bay?")
    assert len(docs) == 3 and docs[0].metadata["source"] == "c/ferry.md"
    assert {"source", "start", "score", "id"} <= set(docs[0].metadata)
    emb = ret.embed(["a", "b"])
    assert emb.shape == (2, 384) and abs(float((emb[0] ** 2).sum()) - 1) < 1e-4


def test_missing_index_is_a_clear_error(index, tmp_path):
    from dataclasses import replace

    with pytest.raises(IndexNotFoundError, match="run python train/index.py"):
        Retriever.from_config(replace(index, persist_dir=str(tmp_path / "none")))
