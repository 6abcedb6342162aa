"""Oracle detection beyond verbatim answers, and the build's refusal to hide unsupported ones."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from ragtune.oracle import OracleFinder, exact_match, normalize, semantic_claim, tokens
from ragtune.raft import BuildSettings, UnsupportedAnswersError, build_examples, save_dataset
from ragtune.schema import get_schema
from ragtune.types import Chunk, QARecord

TEXTS = {
    "corvanite.md": [
        "Corvanite was developed by Ismay Trelawn at the Brindlecombe\nMetallurgical Works, "
        "a private laboratory and rolling mill on the shore of Corva Sound.",
        "To prove its resistance to corrosion, Trelawn hung polished plates of the alloy from a "
        "pier and left them in the sea for seven years. They lost almost no thickness.",
    ],
    "harp.md": [
        "Brennick players pluck the strings with their fingernails. The left hand plays a "
        "steady drone on the lowest three strings, while the right hand plays the melody.",
        "The Harp Moot is held every three years in Kilmory Cross, a fishing village on the "
        "southern coast, and lasts for a long weekend in late June.",
    ],
    "murrowfin.txt": [
        "The murrowfin spawns in late February, when the lake is often still partly covered "
        "in ice. The females bury their eggs in shallow nests in the gravel.",
    ],
}
LONG_FORM = (  # reworded: neither the exact nor the fuzzy step finds it
    "Brennick harpists pluck the strings using their fingernails. Their left hand plays a "
    "constant drone on the three lowest strings and the right hand plays the tune."
)


def _chunks() -> list[Chunk]:
    out = []
    for source, texts in TEXTS.items():
        for i, t in enumerate(texts):
            h = hashlib.sha1(t.encode()).hexdigest()
            out.append(Chunk(f"{source}#{i}", t, source, i * 1000, h))
    return out


class Store:
    """Chunks by source and a word-overlap ranking; the real embedder for the semantic step."""

    def __init__(self, embed=None):
        self.chunks = _chunks()
        if embed is not None:
            self.embed = embed

    def find(self, contains=None, source=None, limit=50):
        return [c for c in self.chunks if source is None or c.source == source][:limit]

    def candidates(self, query, n):
        q = set(query.lower().split())
        return sorted(self.chunks, key=lambda c: -len(q & set(c.text.lower().split())))[:n]

    def fit(self, chunks, budget_tokens):
        return list({c.id: c for c in chunks}.values())


@pytest.fixture(scope="module")
def embed():
    from ragtune.ingest import embed_texts, load_embedder

    model = load_embedder("minilm-l6", "cpu")
    return lambda texts: embed_texts(model, list(texts), normalize=True, batch_size=16)


def _find(record: QARecord, embed=None):
    store = Store(embed)
    return OracleFinder(store, embed).find(record, store.candidates(record.instruction, 5))


def test_number_words_and_digits_normalise_alike():
    assert normalize("Seven years") == normalize("7 years") == "7 years"
    assert normalize("twenty-one") == "21" and normalize("2,000 men") == "2000 men"
    assert normalize("The U.S.\nArmy") == normalize("the u.s. army")


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("The Eiffel Tower", "eiffel tower"),  # articles go, as in SQuAD's normalisation
        ("resis-\n  tance to corro- \nsion", "resistance to corrosion"),  # hyphenated lines
        ("2.5 kg", "2.5 kg"),  # a decimal stays one number
        ("3.5 million people", "3500000 people"),  # digits then a scale word
        ("two hundred thousand", "200000"),  # a scale under 1,000 multiplies on
        ("one hundred and five", "105"),
        ("bread and one egg", "bread and 1 egg"),  # "and" joins only number words
    ],
)
def test_normalisation_joins_what_writing_splits(text, normalised):
    assert normalize(text) == normalised


def test_an_exact_match_is_whole_tokens():
    assert exact_match(tokens("7 years"), tokens("for seven years"))
    assert not exact_match(tokens("7 years"), tokens("for 17 years"))
    assert not exact_match(tokens("ice"), tokens("a nice day"))


def test_a_bare_yes_or_no_is_looked_for_as_the_question_it_answers():
    q = "Is the Harp Moot held in Kilmory Cross?"
    assert semantic_claim("Yes.", q) == q
    assert semantic_claim("No, it is not", q) == f"{q} it is not"
    assert semantic_claim("Yes", "") is None  # nothing to look for
    assert semantic_claim("12 years", q) is None  # too short to embed on its own


def _store_with(texts: dict[str, list[str]]) -> Store:
    store = Store()
    store.chunks = [
        Chunk(f"{src}#{i}", t, src, i * 1000, hashlib.sha1(t.encode()).hexdigest())
        for src, ts in texts.items()
        for i, t in enumerate(ts)
    ]
    return store


def test_the_search_space_is_the_source_else_what_retrieval_found():
    store = _store_with(
        {
            "a.md": ["The bridge opened in 1932 to traffic."],
            "b.md": ["Its rival bridge opened in 1932 too.", "Tolls began in 1932 as well."],
        }
    )
    finder = OracleFinder(store)
    a0, b0, b1 = store.chunks
    rec = QARecord("When did the bridge open?", "1932", source="b.md")
    assert finder.find(rec, [a0, b1]).chunk.id == "b.md#1"  # the source only, retrieved first
    assert finder.find(rec, [a0]).chunk.id == "b.md#0"  # the source's own chunks in order
    sourceless = QARecord("When did the bridge open?", "1932")
    assert finder.find(sourceless, [b1]).chunk.id == "b.md#1"  # only what retrieval found
    assert finder.find(sourceless, []).how == "none"
    missing = QARecord("When did the bridge open?", "1932", source="gone.md")
    assert finder.find(missing, [a0]).chunk.id == "a.md#0"  # a source not in the index


def test_a_paraphrased_number_answer_finds_its_chunk():
    m = _find(
        QARecord("How long were the plates left in the sea?", "7 years", source="corvanite.md")
    )
    assert (m.how, m.chunk.id) == ("exact", "corvanite.md#1")


def test_an_answer_split_by_a_line_break_finds_its_chunk():
    rec = QARecord(
        "Where was it developed?", "Brindlecombe Metallurgical Works", source="corvanite.md"
    )
    m = _find(rec)
    assert (m.how, m.chunk.id) == ("exact", "corvanite.md#0")


def test_a_reworded_answer_is_a_fuzzy_match():
    rec = QARecord(
        "Where is the Harp Moot?", "every three years at Kilmory Cross", source="harp.md"
    )
    m = _find(rec)
    assert (m.how, m.chunk.id) == ("fuzzy", "harp.md#1") and 0.8 <= m.score < 1.0


def test_a_long_form_answer_is_found_by_meaning(embed):
    m = _find(QARecord("How is the Brennick harp played?", LONG_FORM, source="harp.md"), embed)
    assert (m.how, m.chunk.id) == ("semantic", "harp.md#0")


@pytest.mark.parametrize(
    "answer",
    [
        "12 years",
        "It spawns in the autumn, in October, in the deep middle of the lake far from streams.",
    ],
)
def test_a_wrong_answer_gets_no_oracle(embed, answer):
    rec = QARecord("When does the murrowfin spawn, and how long did the plates stay?", answer)
    assert _find(rec, embed).how == "none"


@pytest.fixture()
def build(tokenizer, embed):
    def run(records, **kw):
        settings = BuildSettings(**{"k": 2, "fetch_k": 5, "max_seq_length": 512, **kw})
        return build_examples(
            records, Store(embed), get_schema("alpaca_rag"), tokenizer, settings, progress=False
        )

    return run


def test_sourceless_alpaca_records_get_an_oracle_context_not_abstention(build, tmp_path):
    records = [  # plain Alpaca data: no source, answers not verbatim
        QARecord("How is the Brennick harp played?", LONG_FORM),
        QARecord("How long were the corvanite plates left in the sea?", "7 years"),
        QARecord("Where was Corvanite developed?", "Brindlecombe Metallurgical Works"),
    ]
    examples, stats = build(records, oracle_fraction=1.0)
    assert [e["kind"] for e in examples] == ["oracle"] * 3
    assert [e["target"] for e in examples] == [r.output for r in records]
    assert [e["oracle_how"] for e in examples] == ["semantic", "exact", "exact"]
    assert stats["oracle_how"] == {"exact": 2, "fuzzy": 0, "semantic": 1, "none": 0}
    assert stats["unsupported"]["count"] == 0
    save_dataset(examples, stats, tmp_path, num_preview=3)
    assert "oracle found: semantic" in (tmp_path / "preview.md").read_text()


def test_a_distractor_never_supports_the_answer(build):
    rec = QARecord("How does the left hand play a Brennick harp?", LONG_FORM, source="harp.md")
    (e,), _ = build([rec], oracle_fraction=0.0)  # oracle dropped: the context must lack it
    assert e["kind"] == "abstain_no_oracle" and "harp.md#0" not in [s["id"] for s in e["sources"]]


def _unsupported_set(n_bad: int) -> list[QARecord]:
    good = [
        QARecord("How long were the plates left in the sea?", "7 years", id=f"qa:{i}")
        for i in range(1, 10)
    ]
    bad = [
        QARecord("Who built the harp?", "Tamsin Brennick", id=f"qa:{i}")
        for i in range(20, 20 + n_bad)
    ]
    on_purpose = [
        QARecord("What colour is the harp?", "", id="qa:30"),  # unanswerable (SQuAD is_impossible)
        QARecord("Who owns the mill?", get_schema("alpaca_rag").abstain, id="qa:31"),
    ]
    return good + bad + on_purpose


def test_above_the_share_the_build_stops_with_one_line_naming_the_key(build):
    import re

    with pytest.raises(UnsupportedAnswersError) as err:
        build(_unsupported_set(2))  # 2 of 11 answerable records: 18% > 10%
    msg = str(err.value)
    assert "\n" not in msg and "raft.max_unsupported_fraction" in msg and "qa:20" in msg
    # the setting it names, at the value it suggests, lets this very build go on
    suggested = float(re.search(r"raft\.max_unsupported_fraction=([0-9.]+)", msg).group(1))
    assert build(_unsupported_set(2), max_unsupported_fraction=suggested)[1]["unsupported"]


def test_the_key_lets_the_build_go_on_and_lists_the_records(build, caplog):
    examples, stats = build(_unsupported_set(2), max_unsupported_fraction=0.2)
    assert stats["unsupported"]["records"] == ["qa:20", "qa:21"]
    assert stats["unsupported"]["share"] == pytest.approx(2 / 11)
    assert stats["oracle_how"]["none"] == 2  # the unanswerable and abstain-answer ones don't count
    assert "qa:20, qa:21" in caplog.text
    _, stats = build(_unsupported_set(1))  # 1 of 10: not above the default share, listed anyway
    assert stats["unsupported"]["records"] == ["qa:20"]


def test_semantic_cache_follows_the_text_not_the_id(embed):
    store = Store(embed)
    finder = OracleFinder(store, embed)
    a = store.chunks[2]
    b = Chunk(a.id, "Nothing about harps at all: a note on tide tables.", a.source, 0, "x")
    s = finder.semantic_scores(LONG_FORM, [a, b])
    assert s[0] > 0.8 > s[1] and np.isfinite(s).all()


def test_without_answer_cuts_the_answer_sentence_and_keeps_the_rest():
    store = Store()
    finder = OracleFinder(store)
    plates = next(c for c in store.chunks if c.id == "corvanite.md#1")
    rec = QARecord("How long were the plates in the sea?", "seven years", source="corvanite.md")
    cut = finder.without_answer(rec, plates)
    assert cut is not None and cut.source == plates.source and cut.id != plates.id
    assert cut.text == "They lost almost no thickness."  # the on-topic rest, one fact short
    assert not any(finder.supporting(rec, [cut]))
    # an answer spread over two sentences cannot be cut out of one: no twin
    spread = QARecord("?", "seven years. They lost", source="corvanite.md")
    assert finder.without_answer(spread, plates) is None
    # what is left still holds it across a sentence break: no twin
    rejoined = Chunk("x", "It took seven years. He was seven. Years later he left.", "x.md", 0, "h")
    assert finder.without_answer(QARecord("?", "seven years", source="x.md"), rejoined) is None
    # a chunk that never held the answer has nothing to cut: no twin
    harp = next(c for c in store.chunks if c.id == "harp.md#0")
    assert finder.without_answer(rec, harp) is None
    # every sentence holds the answer: nothing would be left
    murrow = next(c for c in store.chunks if c.source == "murrowfin.txt")
    assert finder.without_answer(QARecord("?", "in", source="murrowfin.txt"), murrow) is None


def _plates(n: int) -> list[QARecord]:
    q = "How long were the plates left in the sea?"
    return [QARecord(q, "7 years", id=f"qa:{i}", source="corvanite.md") for i in range(n)]


def test_the_oracle_is_kept_for_round_p_times_n_records(build):
    examples, _ = build(_plates(7), oracle_fraction=0.8)  # 5.6 -> 6
    assert [e["kind"] for e in examples].count("oracle") == 6


def test_a_contrastive_twin_has_as_many_chunks_and_counts_once(build):
    from ragtune.raft import TWIN_KINDS

    examples, stats = build(_plates(3), oracle_fraction=1.0, contrastive=True)
    oracle = [e for e in examples if e["kind"] == "oracle"]
    twins = [e for e in examples if e["kind"] == TWIN_KINDS[0]]
    assert len(oracle) == len(twins) == 3
    assert all(
        len(t["sources"]) == len(o["sources"]) == 2 for o, t in zip(oracle, twins, strict=True)
    )
    assert all("corvanite.md#1" not in [s["id"] for s in t["sources"]] for t in twins)
    assert stats["oracle_how"]["exact"] == 3  # one per record, not per example


def test_an_unanswerable_context_leads_with_its_own_document(build):
    rec = QARecord("When do Brennick harp players tune the strings?", "", source="murrowfin.txt")
    (e,), _ = build([rec], unanswerable_on_topic=True, shuffle_oracle=False)
    assert e["kind"] == "unanswerable" and e["sources"][0]["source"] == "murrowfin.txt"
    (e,), _ = build([rec], shuffle_oracle=False)  # off: retrieval order (the harp first)
    assert e["sources"][0]["source"] == "harp.md"


def test_an_oracle_the_budget_cuts_short_trains_as_dropped(tokenizer, embed):
    """When the context budget cuts the answer out of the oracle chunk, the example must not
    teach answering from it: it becomes an abstain target, counted in the stats."""
    import dataclasses

    class CutStore(Store):
        def fit(self, chunks, budget_tokens):  # a budget that keeps 60 characters a chunk
            return [dataclasses.replace(c, text=c.text[:60]) for c in super().fit(chunks, 0)]

    settings = BuildSettings(k=2, fetch_k=5, max_seq_length=512, oracle_fraction=1.0)
    schema = get_schema("alpaca_rag")
    examples, stats = build_examples(
        _plates(1), CutStore(embed), schema, tokenizer, settings, progress=False
    )
    assert [e["kind"] for e in examples] == ["abstain_no_oracle"]
    assert stats["oracle_truncated_by_budget"] == 1


def test_full_width_digits_and_ligatures_match_their_plain_forms():
    """NFKC first: text pasted from PDFs and CJK documents writes digits and letters apart."""
    assert tokens("１９９０ ﬁnal") == ["1990", "final"]


def test_a_short_answer_one_token_off_is_a_different_answer_not_a_fuzzy_match():
    """Below FUZZY_MIN_TOKENS the fuzzy step never runs: "7 years" is not "8 years"."""
    from ragtune.oracle import FUZZY_MIN_TOKENS, fuzzy_score

    assert FUZZY_MIN_TOKENS == 3
    assert fuzzy_score(tokens("7 years"), tokens("it lasted 8 years")) == 0.0
    chunk = Chunk("c", "The voyage lasted 8 years.", "v.md", 0, "h")
    assert OracleFinder(Store()).best("7 years", [chunk]).how == "none"


def test_a_fuzzy_score_at_the_threshold_is_support():
    """Four of five answer tokens in order score exactly FUZZY_MIN (0.8), which is enough."""
    chunk = Chunk("c", "x alpha beta gamma delta zeta y", "g.md", 0, "h")
    m = OracleFinder(Store()).best("alpha beta gamma delta epsilon", [chunk])
    assert (m.how, m.score) == ("fuzzy", pytest.approx(0.8))


def test_sentences_are_stripped_and_blank_ones_dropped():
    from ragtune.oracle import sentences

    assert sentences("\n\nA.  \n\n  \nB. C!\n") == ["A.", "B.", "C!"]


def test_a_distractor_that_holds_the_answer_nearly_word_for_word_supports_it():
    """Distractors are checked by the exact and the fuzzy step too: a context said to lack the
    answer must not hold it reworded by a word."""
    rec = QARecord("Where is the Harp Moot?", "every three years at Kilmory Cross")
    harp, murrow = [c for c in _chunks() if c.id in ("harp.md#1", "murrowfin.txt#0")]
    assert OracleFinder(Store()).supporting(rec, [harp, murrow]) == [True, False]


def test_a_long_answer_scores_the_mean_over_its_sentences_of_each_best_match():
    """Each claim sentence is embedded alone and meets its best chunk sentence; the chunk's
    score is the mean: one sentence found (1.0) and one not (0.0) give 0.5."""
    whole = "Alpha is red. Gamma is old."
    # the chunk as a whole means what "Omega." means, and the vectors come unnormalised
    basis = {"Alpha is red.": 0, "Beta is blue.": 1, "Gamma is old.": 2, whole: 3, "Omega.": 3}

    def embed(texts):
        rows = np.zeros((len(texts), 5), dtype=np.float32)
        for r, t in enumerate(texts):
            rows[r, basis.get(t, 4)] = 3.0  # anything else points elsewhere
        return rows

    chunk = Chunk("c", whole, "a.md", 0, "h")
    finder = OracleFinder(Store(), embed)
    assert finder.semantic_scores("Alpha is red. Beta is blue.", [chunk]) == [pytest.approx(0.5)]
    assert finder.semantic_scores("Alpha is red. Gamma is old.", [chunk]) == [pytest.approx(1.0)]
    # a claim may match the chunk as a whole, not any one of its sentences
    assert finder.semantic_scores("Omega.", [chunk]) == [pytest.approx(1.0)]


def test_an_answer_of_six_tokens_is_embedded_and_a_shorter_one_is_not():
    assert semantic_claim("alpha beta gamma delta epsilon zeta", "q?") is not None
    assert semantic_claim("alpha beta gamma delta epsilon", "q?") is None
