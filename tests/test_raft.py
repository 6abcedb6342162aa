"""The RAFT builder's properties, on a small in-memory retriever (fast, deterministic)."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from ragtune.raft import BuildSettings, build_examples, find_oracle, save_dataset
from ragtune.schema import get_schema
from ragtune.types import Chunk, QARecord

TOPICS = ["harbor", "bridge", "mill", "tower", "garden", "canal", "forge", "abbey"]


def _chunk(i: int, text: str, source: str) -> Chunk:
    return Chunk(
        id=f"c{i}",
        text=text,
        source=source,
        start=200 * i,  # spans that do not overlap: the real dedup drops overlapping ones
        content_hash=hashlib.sha1(text.encode()).hexdigest(),
    )


class MemoryRetriever:
    """Word-overlap ranking over a fixed chunk list; ``fit`` (dedup + budget) is the real one.

    ``raw=True`` returns candidates with duplicates, as a ranking before de-duplication would,
    so the builder's own call to ``Retriever.fit`` is what keeps a context duplicate-free.
    """

    def __init__(self, chunks, count, raw=False):
        from ragtune.config import RetrieverConfig
        from ragtune.retriever import Retriever

        self.chunks, self.count, self.raw = chunks, count, raw
        # dedup_cosine=1.0: by hash and span only, no embeddings needed
        self._real = Retriever(RetrieverConfig(dedup_cosine=1.0), None, None, count)

    def candidates(self, query, n):
        q = set(query.lower().split())
        ranked = sorted(self.chunks, key=lambda c: (-len(q & set(c.text.lower().split())), c.id))
        if self.raw:
            return ranked[:n]
        seen, out = set(), []
        for c in ranked:
            if c.content_hash not in seen:
                seen.add(c.content_hash)
                out.append(c)
        return out[:n]

    def find(self, contains=None, source=None, limit=50):
        return [
            c
            for c in self.chunks
            if (contains is None or contains.lower() in c.text.lower())
            and (source is None or c.source == source)
        ][:limit]

    def fit(self, chunks, budget_tokens):
        return self._real.fit(chunks, budget_tokens)


@pytest.fixture(scope="module")
def corpus():
    chunks, records = [], []
    for t, topic in enumerate(TOPICS):
        for j in range(4):
            keeper = f"Keeper{t}{j}"
            text = f"The {topic} record {j}: the {topic} keeper in year {1800 + j} was {keeper}."
            chunks.append(_chunk(len(chunks), text, f"{topic}.md"))
            records.append(
                QARecord(
                    f"Who was the {topic} keeper in year {1800 + j}?", keeper, source=f"{topic}.md"
                )
            )
        records.append(QARecord(f"What colour is the {topic} roof?", ""))  # unanswerable
    # an exact duplicate in the index, under another id and file (a copied document)
    copy = _chunk(len(chunks), chunks[0].text, "copies/harbor.md")
    chunks.append(dataclasses.replace(copy, id="c0-copy"))  # ranked right after c0
    return chunks, records


def _build(corpus, tokenizer, raw=False, **kw):
    chunks, records = corpus
    count = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    settings = BuildSettings(**{"k": 3, "fetch_k": 10, "max_seq_length": 512, **kw})
    return build_examples(
        records,
        MemoryRetriever(chunks, count, raw),
        get_schema("alpaca_rag"),
        tokenizer,
        settings,
        progress=False,
    )


def test_oracle_fraction_and_abstain_targets(corpus, tokenizer):
    examples, stats = _build(corpus, tokenizer, oracle_fraction=0.75)
    answerable = [e for e in examples if e["answer"]]
    kept = [e for e in answerable if e["kind"] == "oracle"]
    assert len(kept) == round(0.75 * len(answerable))
    assert stats["oracle_rate"] == pytest.approx(0.75, abs=0.02)
    abstain = get_schema("alpaca_rag").abstain
    for e in examples:
        holds = any(e["answer"] and e["answer"].lower() in s.lower() for s in _context(e))
        if e["kind"] == "oracle":
            assert e["target"] == e["answer"] and holds
        else:  # dropped oracle or unanswerable: the context lacks the answer, the target abstains
            assert e["target"] == abstain and not holds
        assert e["completion"] == e["target"] + tokenizer.eos_token


def _context(e):
    prompt = e["prompt"]
    return prompt[prompt.index("### Context:") : prompt.rindex("### Response:")].split("\n\n")


def test_distractors_are_hard_negatives_from_the_retriever(corpus, tokenizer):
    examples, _ = _build(corpus, tokenizer, oracle_fraction=1.0)
    e = next(x for x in examples if x["kind"] == "oracle")
    topic = e["instruction"].split()[3]
    # the distractors are the same topic's other records: what the retriever confuses
    assert all(s["source"] == f"{topic}.md" for s in e["sources"])
    assert len(e["sources"]) == 3


def test_no_duplicate_chunk_in_a_context_and_contexts_fit_the_budget(corpus, tokenizer):
    """The candidates hold duplicates and overflow the budget; the contexts do neither."""
    examples, stats = _build(corpus, tokenizer, raw=True, context_tokens=60)
    count = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    chunks = {c.id: c for c in corpus[0]}
    # the situation the builder must handle: k=3 chunks never fit in 60 tokens
    assert all(count(c.text) > 20 for c in chunks.values())
    harbor = [e for e in examples if "harbor" in e["instruction"]]
    raw = MemoryRetriever(corpus[0], count, raw=True).candidates(harbor[0]["instruction"], 10)
    assert len({c.text for c in raw}) < len(raw)  # duplicates were offered
    for e in examples:
        texts = [chunks[s["id"]].text for s in e["sources"]]
        assert texts, e["instruction"]
        assert len(set(texts)) == len(texts)
        assert sum(count(t) for t in texts) <= 60
    assert stats["over_max_seq_length"] == 0


def test_deterministic_under_a_seed_and_seed_matters(corpus, tokenizer):
    a, _ = _build(corpus, tokenizer, seed=1)
    b, _ = _build(corpus, tokenizer, seed=1)
    c, _ = _build(corpus, tokenizer, seed=2)
    assert a == b
    assert [e["kind"] for e in a] != [e["kind"] for e in c] or [e["prompt"] for e in a] != [
        e["prompt"] for e in c
    ]


def test_oracle_position_is_shuffled(corpus, tokenizer):
    examples, _ = _build(corpus, tokenizer, oracle_fraction=1.0)
    positions = {
        [s["id"] for s in e["sources"]].index(e["oracle_id"])
        for e in examples
        if e["kind"] == "oracle"
    }
    assert len(positions) > 1


def test_answer_from_memory_option(corpus, tokenizer):
    examples, _ = _build(corpus, tokenizer, oracle_fraction=0.5, abstain_without_oracle=False)
    dropped = [e for e in examples if e["kind"] == "memory_no_oracle"]
    assert dropped and all(e["target"] == e["answer"] for e in dropped)


def test_closed_book_mode_has_no_context(corpus, tokenizer):
    examples, stats = _build(corpus, tokenizer, mode="closed")
    assert all("\n### Context:\n" not in e["prompt"] for e in examples)
    assert stats["kinds"]["closed"] == sum(1 for r in corpus[1] if r.answerable)


def test_oracle_search_prefers_the_records_source(tokenizer):
    same = _chunk(1, "Mara Ostend built it.", "a.md")
    other = _chunk(2, "Some say Mara Ostend.", "b.md")
    r = MemoryRetriever([other, same], len)
    assert find_oracle(QARecord("q", "Mara Ostend", source="a.md"), [other], r).chunk == same
    assert find_oracle(QARecord("q", "Nobody"), [other], r).how == "none"


def test_saved_dataset_is_readable(corpus, tokenizer, tmp_path):
    examples, stats = _build(corpus, tokenizer)
    save_dataset(examples, stats, tmp_path, num_preview=2)
    assert (tmp_path / "train.jsonl").read_text().count("\n") == len(examples)
    preview = (tmp_path / "preview.md").read_text()
    assert preview.count("### Response:") == 2


def test_unanswerable_cap_sets_the_abstention_balance(corpus, tokenizer):
    _, records = corpus
    many = records + [QARecord(f"What colour is door {i}?", "") for i in range(40)]
    chunks = corpus[0]
    count = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    for cap in (0.25, 0.5):
        settings = BuildSettings(k=3, fetch_k=10, max_seq_length=512, unanswerable_fraction=cap)
        examples, stats = build_examples(
            many,
            MemoryRetriever(chunks, count),
            get_schema("alpaca_rag"),
            tokenizer,
            settings,
            progress=False,
        )
        n_un = sum(e["kind"] == "unanswerable" for e in examples)
        n_ans = sum(bool(e["answer"]) for e in examples)
        assert n_ans == 32  # answerable records are never dropped
        assert n_un == int(cap * n_ans / (1 - cap))  # as many unanswerable as the cap allows
        assert stats["unanswerable_dropped"] == 48 - n_un
    # no cap, or a cap above the actual share: every record stays
    _, stats = _build(corpus, tokenizer, unanswerable_fraction=None)
    assert stats["unanswerable_dropped"] == 0 and stats["examples"] == len(records)
    _, stats = _build(corpus, tokenizer, unanswerable_fraction=0.9)
    assert stats["unanswerable_dropped"] == 0


def test_stats_count_abstain_targets_and_only_sequences_longer_than_the_model_takes(
    corpus, tokenizer
):
    """``abstain_rate`` is the share of examples whose target is the abstain answer, and a
    sequence of exactly ``max_seq_length`` tokens fits (it is not "over")."""
    examples, stats = _build(corpus, tokenizer, oracle_fraction=0.5)
    abstain = get_schema("alpaca_rag").abstain
    share = sum(e["target"] == abstain for e in examples) / len(examples)
    assert 0 < share < 1 and stats["abstain_rate"] == pytest.approx(share)
    # a fixed context budget, so that max_seq_length changes only what counts as "over"
    fixed = {"oracle_fraction": 0.5, "context_tokens": 400}
    longest = _build(corpus, tokenizer, **fixed)[1]["tokens"]["max"]
    _, at = _build(corpus, tokenizer, max_seq_length=longest, **fixed)
    _, below = _build(corpus, tokenizer, max_seq_length=longest - 1, **fixed)
    assert at["over_max_seq_length"] == 0 and below["over_max_seq_length"] >= 1


def test_an_unanswerable_record_keeps_its_plausible_answer_for_the_preference_step(tokenizer):
    """The preference step pairs "I don't know" against an unanswerable record's plausible
    answer: the example must carry it."""
    chunks = [_chunk(0, "The harbor keeper was Mara.", "harbor.md")]
    rec = QARecord("Who painted the harbor?", "", source="harbor.md", plausible="Mara")
    count = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    (example,), _ = build_examples(
        [rec],
        MemoryRetriever(chunks, count),
        get_schema("alpaca_rag"),
        tokenizer,
        BuildSettings(k=1, fetch_k=5, max_seq_length=512),
        progress=False,
    )
    assert example["kind"] == "unanswerable" and example["plausible"] == "Mara"


def test_the_preview_says_how_each_oracle_was_found(corpus, tokenizer, tmp_path):
    examples, stats = _build(corpus, tokenizer, oracle_fraction=1.0)
    save_dataset(examples, stats, tmp_path, num_preview=6)
    assert "oracle found: exact (score 1.00)" in (tmp_path / "preview.md").read_text()


def test_settings_come_from_every_raft_key():
    """``BuildSettings.from_config`` reads each ``raft`` key (a preset's choice must reach the
    builder, not fall back to the dataclass default)."""
    from ragtune.config import compose

    cfg = compose(
        "sft",
        [
            "conf=qwen_rag",
            "raft.unanswerable_fraction=0.3",
            "raft.ablated_twin=true",
            "raft.abstain_without_oracle=false",
            "raft.shuffle_oracle=false",
            "raft.max_unsupported_fraction=0.5",
            "retriever.k=4",
            "retriever.fetch_k=12",
            "retriever.context_tokens=300",
            "seed=7",
        ],
    )
    s = BuildSettings.from_config(cfg)
    assert (s.contrastive, s.unanswerable_on_topic, s.swapped_twin, s.ablated_twin) == (True,) * 4
    assert s.oracle_fraction == 1.0 and s.unanswerable_fraction == 0.3
    assert (s.abstain_without_oracle, s.shuffle_oracle, s.max_unsupported_fraction) == (
        False,
        False,
        0.5,
    )
    assert (s.k, s.fetch_k, s.context_tokens, s.seed, s.mode) == (4, 12, 300, 7, "rag")
    assert s.max_seq_length == cfg.model.max_seq_length


def test_which_unanswerable_records_the_cap_drops_follows_the_seed():
    from ragtune.raft import cap_unanswerable

    records = [QARecord("a?", "x")] * 10 + [QARecord(f"u{i}?", "") for i in range(30)]
    kept = {s: [r.instruction for r in cap_unanswerable(records, 0.5, s)] for s in (1, 1, 2, 3)}
    assert kept[1] == [r.instruction for r in cap_unanswerable(records, 0.5, 1)]
    assert len({tuple(v) for v in kept.values()}) == 3  # each seed its own sample
    assert all(sum(not q.startswith("a") for q in v) == 10 for v in kept.values())


def test_every_context_holds_k_chunks_when_the_budget_allows(corpus, tokenizer):
    """Oracle-kept, oracle-dropped, unanswerable examples and the contrastive twins all see k
    chunks: only whether the answer is among them differs."""
    examples, _ = _build(corpus, tokenizer, oracle_fraction=0.5, contrastive=True)
    assert {e["kind"] for e in examples} >= {
        "oracle",
        "abstain_no_oracle",
        "unanswerable",
        "contrast_no_oracle",
    }
    assert {len(e["sources"]) for e in examples} == {3}


def test_which_records_keep_their_oracle_and_the_twins_order_are_drawn_by_the_seed(
    corpus, tokenizer
):
    """The records that keep their oracle are a seeded sample, not the first ones in the file,
    and a contrastive twin's chunks are shuffled too, not left in retrieval order."""
    examples, _ = _build(corpus, tokenizer, oracle_fraction=0.5, contrastive=True)
    kept = [e["kind"] == "oracle" for e in examples if e["answer"] and "contrast" not in e["kind"]]
    assert len(kept) == 32 and sum(kept) == 16
    assert kept != sorted(kept, reverse=True)  # not the first 16 answerable records
    chunks, _ = corpus
    count = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    ranked = MemoryRetriever(chunks, count)
    twins = [e for e in examples if e["kind"] == "contrast_no_oracle"]
    orders = [
        [s["id"] for s in t["sources"]]
        == [
            c.id
            for c in ranked.candidates(t["instruction"], 10)
            if c.id in {s["id"] for s in t["sources"]}
        ]
        for t in twins
    ]
    assert not all(orders)


def test_the_oracle_rate_counts_answers_from_memory_as_answerable(corpus, tokenizer):
    _, stats = _build(corpus, tokenizer, oracle_fraction=0.5, abstain_without_oracle=False)
    assert stats["oracle_rate"] == pytest.approx(0.5)


def test_records_that_differ_only_in_their_input_get_different_ids(tokenizer):
    chunks = [_chunk(0, "The harbor keeper was Mara.", "harbor.md")]
    count = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    recs = [QARecord("Who was it?", "Mara", input=i) for i in ("the harbor", "the mill")]
    examples, _ = build_examples(
        recs,
        MemoryRetriever(chunks, count),
        get_schema("alpaca_rag"),
        tokenizer,
        BuildSettings(k=1, fetch_k=5, max_seq_length=512, oracle_fraction=1.0),
        progress=False,
    )
    assert len({e["id"] for e in examples}) == 2
