"""The one retriever: ranking, de-duplication, stable order, token budget, hybrid, MMR,
find, LangChain face."""

from __future__ import annotations

import math
import uuid

import numpy as np
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


class TableEmbedder:
    """Stands in for the sentence-transformer: each text's vector comes from a table."""

    device = "cpu"

    def __init__(self, table: dict[str, np.ndarray]):
        self.table = table

    def get_sentence_embedding_dimension(self) -> int:
        return 2

    def encode(self, texts, **kw):
        return np.stack([self.table[t] for t in texts])


def toy(tmp_path, dense_order: list[tuple[str, str]], query: str, metas=None, **kw) -> Retriever:
    """A retriever over hand-placed 2-D vectors: ``dense_order`` lists (id, text) best first
    for ``query`` (each a further 0.1 rad away), so dense ranks are exact; BM25 sees the
    texts. One chunk per source unless ``metas`` (id -> metadata) says otherwise; cosine
    dedup off unless ``kw`` turns it on."""
    import chromadb

    vec = {query: np.array([1.0, 0.0], np.float32)}
    for i, (_, text) in enumerate(dense_order):
        vec[text] = np.array([math.cos(0.1 * (i + 1)), math.sin(0.1 * (i + 1))], np.float32)
    coll = chromadb.EphemeralClient().create_collection(
        f"toy-{uuid.uuid4().hex}", configuration={"hnsw": {"space": "cosine"}}
    )
    coll.add(
        ids=[cid for cid, _ in dense_order],
        documents=[text for _, text in dense_order],
        metadatas=[
            (metas or {}).get(cid, {"source": f"{cid}.md", "start": 0}) for cid, _ in dense_order
        ],
        embeddings=[vec[text] for _, text in dense_order],
    )
    rcfg = RetrieverConfig(persist_dir=str(tmp_path / "unused"), **{"dedup_cosine": 1.0, **kw})
    return Retriever(rcfg, coll, TableEmbedder(vec))


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
    # overlap is a share of the shorter span, and dedup_overlap itself counts as a duplicate
    long = Chunk("long", "x" * 200, "s.md", 0, "h7")
    inside = Chunk("inside", "y" * 40, "s.md", 50, "h8")
    half = Chunk("half", "z" * 100, "t.md", 0, "h9")
    half2 = Chunk("half2", "w" * 100, "t.md", 50, "h10")
    less = Chunk("less", "v" * 100, "t.md", 51, "h11")
    kept = make(index, dedup_cosine=1.0, dedup_overlap=0.5).fit([long, inside, half, half2], None)
    assert [c.id for c in kept] == ["long", "half"]
    assert [c.id for c in make(index, dedup_cosine=1.0).fit([half, less], None)] == ["half", "less"]
    # the same chunk twice comes back once
    assert [c.id for c in make(index, dedup_cosine=1.0).fit([base, base], None)] == [base.id]


def test_fit_drops_near_duplicates_by_cosine_even_outside_the_index(index):
    ret = Retriever.from_config(index)  # dedup_cosine 0.95
    loom, near = (ret.find(source=s)[0] for s in ("a/loom.md", "a/loom_near.md"))
    outside = Chunk("new", LOOM.replace("glass", "crystal"), "z/new.md", 0, "h12")
    heron = ret.find(source="b/heron.md")[0]
    assert [c.id for c in ret.fit([loom, near, outside, heron], None)] == [loom.id, heron.id]


def test_budget_drops_what_does_not_fit_and_truncates_a_lone_first_chunk():
    chunks = [
        Chunk(str(i), " ".join(["w"] * n), "s", i * 1000, str(i)) for i, n in enumerate([5, 8, 3])
    ]
    assert [c.id for c in fit_budget(chunks, 9, words)] == ["0", "2"]
    assert [c.id for c in fit_budget(chunks, 8, words)] == ["0", "2"]  # exactly full
    assert [c.id for c in fit_budget(chunks, 100, words)] == ["0", "1", "2"]
    cut = fit_budget(chunks, 4, words)
    assert cut[0].id == "0" and words(cut[0].text) == 4 and cut[0].metadata["truncated"]
    assert cut[0].content_hash != chunks[0].content_hash
    assert [c.id for c in cut] == ["0"]  # the cut chunk uses the budget: "2" no longer fits
    assert fit_budget(chunks, 0, words) == []


def test_retrieve_applies_budget_with_the_token_counter(index):
    from dataclasses import replace

    ret = Retriever.from_config(index, token_counter=words)
    full = ret.retrieve("railway signal cabinet code", k=3)
    small = ret.retrieve("railway signal cabinet code", k=3, budget_tokens=12)
    assert sum(words(c.text) for c in small) <= 12 < sum(words(c.text) for c in full)
    assert small[0].id == full[0].id or small[0].metadata.get("truncated")
    # without a counter the budget cannot be measured: returned unchanged (warned once)
    plain = Retriever.from_config(index)
    assert len(plain.retrieve("railway", k=3, budget_tokens=1)) == 3
    # a copy with a counter budgets; the original still has none
    counted = plain.with_token_counter(words)
    assert sum(words(c.text) for c in counted.retrieve("railway", k=3, budget_tokens=12)) <= 12
    assert len(plain.retrieve("railway", k=3, budget_tokens=1)) == 3
    # context_tokens is the budget when none is passed
    conf = Retriever.from_config(replace(index, context_tokens=12), token_counter=words)
    assert sum(words(c.text) for c in conf.retrieve("railway signal cabinet code", k=3)) <= 12


def test_hybrid_finds_a_rare_code_that_dense_ranks_lower(index):
    q = "QX-7731"
    dense = make(index, hybrid=False).candidates(q, 8)
    hybrid = make(index, hybrid=True).retrieve(q, k=1)
    assert hybrid[0].source == "b/code.md"
    assert hybrid[0].metadata["dense_score"] == pytest.approx(
        next(c.score for c in dense if c.source == "b/code.md"), abs=1e-5
    )
    assert bm25_tokens("月森焼 Code-7") == ["月", "森", "焼", "月森", "森焼", "code", "7"]


KELP = [  # dense order for the query "kelp", best first; BM25 sees the words
    ("t_dense", "reef stone sand moss"),
    ("d1", "reef stone sand shell"),
    ("both", "kelp reef stone sand"),
    ("d3", "reef stone moss shell"),
    ("d4", "kelp kelp reef stone"),
    ("d5", "stone sand moss shell"),
    ("d6", "reef sand moss shell"),
    ("d7", "reef stone sand gull"),
    ("d8", "reef gull sand moss"),
    ("t_lex", "kelp kelp kelp reef"),
]


def test_hybrid_fuses_ranks_with_rrf_60_and_fetches_lexical_only_hits(tmp_path):
    """k=5 fetches 5 per list. Dense: t_dense, d1, both, d3, d4; BM25: t_lex, d4, both (no
    other chunk has the word). With RRF's k=60 a chunk third in both lists (2/63) beats one
    first in a single list (1/61); t_lex comes only from BM25 and is fetched from the index
    with its own cosine."""
    ret = toy(tmp_path, KELP, "kelp", hybrid=True, fetch_k=3)
    got = ret.retrieve("kelp", k=5)
    assert [c.id for c in got] == ["both", "d4", "t_dense", "t_lex", "d1"]
    assert got[0].score == pytest.approx(2 / 63) and got[2].score == pytest.approx(1 / 61)
    assert got[3].metadata["dense_score"] == pytest.approx(math.cos(1.0), abs=1e-5)
    assert got[0].metadata["dense_score"] == pytest.approx(math.cos(0.3), abs=1e-5)


def test_hybrid_gives_no_lexical_credit_to_chunks_without_a_query_word(tmp_path):
    got = toy(tmp_path, KELP, "kelp", hybrid=True, fetch_k=20).retrieve("kelp", k=10)
    assert len(got) == 10
    assert [c.id for c in got if "kelp" not in c.text] == [
        cid for cid, text in KELP if "kelp" not in text
    ]


def test_k_above_fetch_k_still_returns_k_and_candidates_fetch_past_duplicates(index, tmp_path):
    got = toy(tmp_path, KELP, "kelp", fetch_k=2).retrieve("kelp", k=5)
    assert [c.id for c in got] == [cid for cid, _ in KELP[:5]]
    # the three loom copies fill the top 3: fetching only 3 would leave one after dedup
    cands = make(index, fetch_k=1).candidates("Who invented the Tessaline loom?", 3)
    assert len(cands) == 3 and sum(c.source.startswith("a/loom") for c in cands) == 1


def test_mmr_prefers_diversity(index):
    q = "glass"
    plain = make(index, dedup_cosine=1.0).retrieve(q, k=3)
    diverse = make(index, dedup_cosine=1.0, mmr=True, mmr_lambda=0.1).retrieve(q, k=3)
    assert len(diverse) == 3
    loom_plain = sum(c.source.startswith("a/loom") for c in plain)
    loom_mmr = sum(c.source.startswith("a/loom") for c in diverse)
    assert loom_mmr < loom_plain
    assert diverse[0].id == plain[0].id  # the most relevant is still first
    relevance = make(index, dedup_cosine=1.0, mmr=True, mmr_lambda=1.0).retrieve(q, k=3)
    assert [c.id for c in relevance] == [c.id for c in plain]


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


def test_find_orders_chunks_of_a_source_by_start_offset(tmp_path):
    rows = [("c0", "third part"), ("c1", "first part"), ("c2", "second part")]
    metas = {
        cid: {"source": "s.md", "start": start}
        for cid, start in zip(["c0", "c1", "c2"], [300, 0, 150], strict=True)
    }
    ret = toy(tmp_path, rows, "part", metas=metas)
    assert [c.text for c in ret.find(source="s.md")] == ["first part", "second part", "third part"]


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
        "ef_search",
        "dedup_cosine",
        "hybrid",
        "mmr",
        "mmr_lambda",
        "context_tokens",
        "persist_dir",
        "collection",
        "server",
        "dedup_overlap",
        "corpus",
    ):
        assert key in s
    same = ("normalize", "k", "fetch_k", "ef_search", "dedup_cosine", "dedup_overlap", "mmr_lambda")
    for key in same:
        assert s[key] == getattr(index, key)
    assert s["chunk_size"] == 400 and s["collection"].startswith("rt-minilm-l6-n-c400")
    from langchain_core.retrievers import BaseRetriever

    lc = ret.as_langchain()
    assert isinstance(lc, BaseRetriever)
    docs = lc.invoke("Which ferry crosses the bay?")
    assert len(docs) == 3 and docs[0].metadata["source"] == "c/ferry.md"
    assert {"source", "start", "score", "id"} <= set(docs[0].metadata)
    assert len(ret.as_langchain(k=1).invoke("Which ferry crosses the bay?")) == 1
    emb = ret.embed(["a", "b"])
    assert emb.shape == (2, 384) and abs(float((emb[0] ** 2).sum()) - 1) < 1e-4


def _hnsw_recall(coll, vectors: np.ndarray, queries: np.ndarray, n: int = 20) -> float:
    """The share of each query's exact top ``n`` (by cosine) that the index returns."""
    exact = np.argsort(-queries @ vectors.T, axis=1)[:, :n]
    got = coll.query(query_embeddings=queries.tolist(), n_results=n, include=[])["ids"]
    return float(
        np.mean(
            [
                len({int(i) for i in g} & set(e.tolist())) / n
                for g, e in zip(got, exact, strict=True)
            ]
        )
    )


def test_the_index_searches_as_wide_as_retriever_ef_search(tmp_path):
    """A new index and one built with another ef_search both search with the configured one:
    at 400 the fetched candidates are the exact nearest ones where Chroma's default (100)
    misses some (3,000 random 64-d vectors, the hard case for HNSW)."""
    from dataclasses import replace

    from ragtune.store import open_client, open_collection

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3000, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[:50] + 0.5 * rng.standard_normal((50, 64)).astype(np.float32)

    def built(ef_search: int):
        rcfg = RetrieverConfig(persist_dir=str(tmp_path / f"ef{ef_search}"), ef_search=ef_search)
        coll = open_collection(open_client(rcfg), rcfg, create=True, corpus=tmp_path)
        coll.add(ids=[str(i) for i in range(len(vectors))], embeddings=vectors.tolist())
        return rcfg, coll

    _, default = built(100)
    rcfg, wide = built(400)
    assert _hnsw_recall(default, vectors, queries) < 0.99  # precondition: the default misses
    assert _hnsw_recall(wide, vectors, queries) >= 0.995
    # An index built at Chroma's default gets the configured setting when opened (Chroma
    # loads it at the first query of a process, so the stored setting is what counts)
    old = replace(rcfg, persist_dir=str(tmp_path / "ef100"))
    reopened = open_collection(open_client(old), old, create=False, corpus=tmp_path)
    assert reopened.configuration["hnsw"]["ef_search"] == 400


def test_missing_index_is_a_clear_error(index, tmp_path):
    from dataclasses import replace

    with pytest.raises(IndexNotFoundError, match="run python train/index.py"):
        Retriever.from_config(replace(index, persist_dir=str(tmp_path / "none")))


@pytest.mark.parametrize("hybrid", [False, True])
def test_an_empty_index_retrieves_nothing_without_an_error(tmp_path, hybrid):
    """A corpus folder with no documents yet: every query gets an empty context, not a
    Chroma error about asking for 0 results."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rcfg = RetrieverConfig(persist_dir=str(tmp_path / "index"), hybrid=hybrid)
    assert ingest(corpus, rcfg, show_progress=False).total_chunks == 0
    ret = Retriever.from_config(rcfg)
    assert ret.retrieve("Who developed Corvanite?") == []
    assert ret.candidates("Who developed Corvanite?", 5) == []


def test_hybrid_retrieval_over_chunks_without_a_single_word(tmp_path):
    """BM25 over chunks with no word tokens (rules, symbols) and a query with none: no
    division by zero, the dense ranking alone answers."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "rules.md").write_text("*** --- +++ ***")
    rcfg = RetrieverConfig(persist_dir=str(tmp_path / "index"), hybrid=True)
    ingest(corpus, rcfg, show_progress=False)
    ret = Retriever.from_config(rcfg)
    assert [c.text for c in ret.retrieve("What is the rule?")] == ["*** --- +++ ***"]
    assert [c.text for c in ret.retrieve("???")] == ["*** --- +++ ***"]
