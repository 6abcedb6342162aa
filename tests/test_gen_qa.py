"""QA generation from the corpus: parsing, filters, resume, outputs (train/gen_qa.py).

The tiny test model writes gibberish, so the filter logic runs on a scripted fake LM; one smoke
test drives the real Generator path end to end.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from ragtune.qa_filters import (
    Support,
    answered_by_corpus,
    language_ok,
    leaks_answer,
    length_ok,
    round_trip,
    standalone,
)
from ragtune.qa_gen import (
    ANSWERABLE,
    FILTERS,
    UNANSWERABLE,
    GenQASettings,
    Job,
    generate,
    load_schemas,
    parse_pair,
    plan_jobs,
    read_generated,
    select,
)
from ragtune.types import Chunk

DOCS = {
    "harbour.md": "The Velmora harbour was built in 1821 by the engineer Ada Penrose. Its granite "
    "breakwater is four hundred metres long and shelters the fishing fleet from winter storms.",
    "glass.md": "Velmora blue glass is coloured with cobalt from the Dunmarrow mines. The "
    "glassworks of Hesketh Lorne fired its kilns with peat until 1903, when coal replaced it.",
    "festival.md": "The Lantern Tide festival is held on the second Saturday of October. Paper "
    "lanterns are floated on the lake at dusk to mark the end of the reed harvest.",
}


class ScriptedLM:
    """A fake LM: ``script(prompt)`` is the text it 'generates'; counts the prompts it saw."""

    def __init__(self, tokenizer, script, fail_on_call: int | None = None):
        self.tokenizer, self.script, self.fail_on_call = tokenizer, script, fail_on_call
        self.prompts: list[str] = []
        self.calls = 0

    def generate_batch(self, prompts, batch_size=8, max_new_tokens=None):
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise KeyboardInterrupt  # the run is killed mid-way
        self.prompts.extend(prompts)
        return [SimpleNamespace(text=self.script(p)) for p in prompts]


def _chunk(text: str, source: str) -> Chunk:
    h = hashlib.sha1(f"{source}\x00{text}".encode()).hexdigest()[:16]
    return Chunk(id=h, text=text, source=source, start=0, content_hash=h)


class MemoryRetriever:
    """Word-overlap ranking over a fixed chunk list (the filters' view of the retriever)."""

    def __init__(self, chunks):
        self.chunks = chunks

    def candidates(self, query, n):
        q = set(query.lower().replace("?", " ").split())
        return sorted(self.chunks, key=lambda c: (-len(q & set(c.text.lower().split())), c.id))[:n]

    def find(self, contains=None, source=None, limit=50):
        out = [
            c
            for c in self.chunks
            if (contains is None or contains.casefold() in c.text.casefold())
            and (source is None or c.source == source)
        ]
        return out[:limit] if limit else out


# --------------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    "text,pair",
    [
        ("Question: Who built it?\nAnswer: Ada Penrose", ("Who built it?", "Ada Penrose")),
        (
            "**Question:** Who built it?\n**Answer:** Ada Penrose.",
            ("Who built it?", "Ada Penrose."),
        ),
        ('1. Q: Who built it?\n   A: "Ada"\n\nQuestion: Other?', ("Who built it?", "Ada")),
        ("Who built it?\nAnswer: Ada", ("Who built it?", "Ada")),
        ("質問：誰が建てた？\n答え：エイダ", ("誰が建てた？", "エイダ")),
        ("Question: Who built it? Answer: Ada", ("Who built it?", "Ada")),
        ('Question: First?\n\nAnswer: The answer is: "Ada"\n\nMore.', ("First?", "Ada")),
        ("Question: Who  built\tit?\nAnswer: Ada   Penrose", ("Who built it?", "Ada Penrose")),
        ("Question: **\nAnswer: Ada", None),  # a label with no question after it
        ("The harbour is old and nice.", None),
        ("Answer: Ada", None),
        ("", None),
    ],
)
def test_parse_pair_reads_the_formats_small_models_write(text, pair):
    assert parse_pair(text) == pair


# --------------------------------------------------------------------------- filters
JA = "ヴェルモラの港は1821年にエイダ・ペンローズによって建設された。防波堤は四百メートルある。"


@pytest.fixture(scope="module")
def world():
    chunks = [_chunk(t, s) for s, t in DOCS.items()]
    chunks.append(_chunk(JA, "ja.md"))
    return chunks, MemoryRetriever(chunks)


SCRIPT = {  # (kind, source) -> generation
    (ANSWERABLE, "harbour.md"): "Question: Who built the Velmora harbour?\nAnswer: Ada Penrose",
    (ANSWERABLE, "glass.md"): "Question: What colours Velmora blue glass?\nAnswer: copper oxide",
    (ANSWERABLE, "festival.md"): "the festival is lovely",
    (ANSWERABLE, "ja.md"): "Question: Who built the Velmora harbour in 1821?\nAnswer: Ada Penrose",
    (UNANSWERABLE, "harbour.md"): "Question: How deep is the Velmora harbour?\nAnswer: 9 metres",
    (UNANSWERABLE, "glass.md"): "Question: Who owned the glass kilns?\nAnswer: Hesketh Lorne",
    (UNANSWERABLE, "festival.md"): "Question: What fuel did the glassworks kilns burn?\nA: wood",
    (UNANSWERABLE, "ja.md"): "質問：港の深さは？\n答え：unknown",
}


def _jobs(chunks):
    return [Job(f"{k[0]}:{c.id}", k, c) for c in chunks for k in (ANSWERABLE, UNANSWERABLE)]


def _generated(jobs, script):
    return {
        j.key: {"job": j.key, "pair": parse_pair(script[(j.kind, j.chunk.source)])}
        for j in jobs
        if (j.kind, j.chunk.source) in script
    }


def _select(chunks, script, k=1, **overrides):
    retriever = MemoryRetriever(chunks)
    settings = {"num_chunks": 0, "unanswerable_fraction": 0.5, "min_chunk_chars": 10}
    s = GenQASettings(**(settings | overrides))
    jobs = _jobs(chunks)
    return select(jobs, _generated(jobs, script), retriever, Support(retriever), s, k=k, fetch_k=4)


def _reasons(sel):
    return {(r["job"][0], r["pair"][0] if r["pair"] else None): r["reason"] for r in sel.rejected}


def test_each_filter_removes_what_it_should_and_counts_it(world):
    sel = _select(world[0], SCRIPT)
    kept = {(r["kind"], r["instruction"]) for r in sel.records}
    assert kept == {
        (ANSWERABLE, "Who built the Velmora harbour?"),
        (UNANSWERABLE, "How deep is the Velmora harbour?"),
    }
    assert _reasons(sel) == {
        ("a", "What colours Velmora blue glass?"): "unsupported",
        ("a", None): "unparsable",
        ("a", "Who built the Velmora harbour in 1821?"): "language",  # about a Japanese chunk
        ("u", "Who owned the glass kilns?"): "answered_by_corpus",
        ("u", "What fuel did the glassworks kilns burn?"): "off_topic",  # asked about festival.md
        ("u", "港の深さは？"): "unverifiable",
    }
    assert sel.removed[ANSWERABLE]["unsupported"] == 1
    n_removed = sum(sum(c.values()) for c in sel.removed.values())
    assert n_removed + len(sel.records) == sum(sel.candidates.values()) == 8


def test_near_duplicates_length_leaks_and_round_trip():
    chunks = [_chunk(t, s) for s, t in DOCS.items()]
    chunks.append(_chunk(DOCS["harbour.md"].replace("engineer", "builder"), "harbour2.md"))
    script = {
        (ANSWERABLE, "harbour.md"): "Question: Who built the Velmora harbour?\nAnswer: Ada Penrose",
        (ANSWERABLE, "harbour2.md"): "Question: Who built the Velmora harbour ?\nA: Ada Penrose",
        (ANSWERABLE, "glass.md"): "Question: Is Velmora glass coloured with cobalt?\nA: cobalt",
        (ANSWERABLE, "festival.md"): "Question: When?\nAnswer: on the second Saturday",
    }
    sel = _select(chunks, script, k=2)
    assert _reasons(sel) == {
        ("a", "Who built the Velmora harbour ?"): "duplicate",
        ("a", "Is Velmora glass coloured with cobalt?"): "leaks_answer",
        ("a", "When?"): "length",
    }
    assert [r["instruction"] for r in sel.records] == ["Who built the Velmora harbour?"]
    # supported by the glass chunk, but the question retrieves the harbour chunks
    script[(ANSWERABLE, "glass.md")] = "Q: Which harbour did Ada Penrose build?\nA: cobalt"
    reasons = _reasons(_select(chunks, script, k=2))
    assert reasons[("a", "Which harbour did Ada Penrose build?")] == "round_trip"
    script[(ANSWERABLE, "glass.md")] = (
        "Q: What does the passage say about Velmora glass?\nA: cobalt"
    )
    reasons = _reasons(_select(chunks, script, k=2))
    assert reasons[("a", "What does the passage say about Velmora glass?")] == "not_standalone"


def test_the_language_check_tells_scripts_apart_by_their_letters_alone():
    english = _chunk(DOCS["harbour.md"], "harbour.md")
    # Cyrillic and Latin letters are both "small letters": still two scripts
    assert not language_ok("Кто построил гавань Velmora?", english, [])
    assert language_ok("Кто построил гавань?", english, ["cyrillic"])
    # digits, spaces and punctuation are no script: a question full of years is still English
    assert language_ok("Was it 1821, 1822, 1823 or 1824?", english, [])
    assert not language_ok("Was it 1821, 1822, 1823 or 1824?", english, ["cyrillic"])


def test_every_kept_record_passes_every_filter(world):
    chunks, retriever = world
    by_id = {c.id: c for c in chunks}
    sel = _select(chunks, SCRIPT)
    s, support = GenQASettings(), Support(retriever)
    assert sel.records
    for r in sel.records:
        chunk = by_id[r["chunk_id"]]
        answer = r["output"] or r["plausible_answer"]
        assert length_ok(r["instruction"], answer, s, answerable=r["kind"] == ANSWERABLE)
        assert language_ok(r["instruction"], chunk, [])
        assert not leaks_answer(r["instruction"], answer)
        assert standalone(r["instruction"])
        if r["kind"] == ANSWERABLE:
            assert support.supporting(answer, [chunk]) is not None
            assert round_trip(r["instruction"], answer, chunk, retriever, support, 1)
        else:
            assert not answered_by_corpus(r["instruction"], answer, chunk, retriever, support, 4)


def test_unanswerable_share_is_capped(world):
    chunks = world[0]
    assert sum(r["kind"] == UNANSWERABLE for r in _select(chunks, SCRIPT).records) == 1
    none = _select(chunks, SCRIPT, unanswerable_fraction=0.0)
    assert all(r["kind"] == ANSWERABLE for r in none.records)
    assert none.removed[UNANSWERABLE]["over_share"] == 1


# --------------------------------------------------------------------------- resume
def _script_by_chunk(prompt: str) -> str:
    for source, text in DOCS.items():
        if text[:40] in prompt:
            subject = source.removesuffix(".md")
            return f"Question: What about the {subject}?\nAnswer: {text.split()[1]}"
    return "nothing"


def test_resume_after_a_kill_generates_the_rest_once(tmp_path, tokenizer, world):
    chunks, _ = world
    s = GenQASettings(num_chunks=0, unanswerable_fraction=0.5, min_chunk_chars=10)
    jobs = plan_jobs(chunks, s, seed=1)
    schemas = load_schemas(s)
    path = tmp_path / "generated.jsonl"
    killed = ScriptedLM(tokenizer, _script_by_chunk, fail_on_call=3)
    with pytest.raises(KeyboardInterrupt):
        generate(jobs, killed, schemas, path, batch_size=2, progress=False)
    with path.open("a") as f:
        f.write('{"job": "torn')  # killed in the middle of a write
    first = read_generated(path)
    assert len(first) == 4 and path.read_text().endswith("\n")
    rest = ScriptedLM(tokenizer, _script_by_chunk)
    stats = generate(jobs, rest, schemas, path, batch_size=2, progress=False)
    assert stats["jobs_run"] == len(jobs) - 4 == len(rest.prompts)
    keys = [json.loads(line)["job"] for line in path.read_text().splitlines()]
    assert sorted(keys) == sorted(j.key for j in jobs)  # every job once: no duplicates
    again = ScriptedLM(tokenizer, _script_by_chunk)
    assert generate(jobs, again, schemas, path, progress=False)["jobs_run"] == 0
    assert again.calls == 0
    # the same as one uninterrupted run
    whole = tmp_path / "whole.jsonl"
    generate(jobs, ScriptedLM(tokenizer, _script_by_chunk), schemas, whole, progress=False)
    assert read_generated(whole) == read_generated(path)


def test_plan_is_seeded_and_extends(world):
    chunks, _ = world
    s = GenQASettings(num_chunks=2, unanswerable_fraction=0.2, min_chunk_chars=10)
    a, b = plan_jobs(chunks, s, seed=3), plan_jobs(chunks, s, seed=3)
    assert a == b and sum(j.kind == ANSWERABLE for j in a) == 2
    more = plan_jobs(chunks, GenQASettings(num_chunks=3, min_chunk_chars=10), seed=3)
    assert {j.key for j in a if j.kind == ANSWERABLE} <= {j.key for j in more}


# --------------------------------------------------------------------------- end to end
@pytest.fixture()
def corpus3(tmp_path, outputs) -> Path:
    root = tmp_path / "corpus"
    for name, text in DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def _cfg(tmp_path, corpus, *extra):
    from ragtune.config import compose

    return compose(
        "gen_qa",
        [
            f"data.corpus={corpus}",
            f"retriever.persist_dir={tmp_path}/index",
            f"gen_qa.out_dir={tmp_path}/gen",
            f"output_dir={tmp_path}/run",
            "gen_qa.num_chunks=0",
            "gen_qa.min_chunk_chars=50",
            *extra,
        ],
    )


def _e2e_script(prompt: str) -> str:
    unanswerable = "does not answer" in prompt
    for source, text in DOCS.items():
        if text[:40] in prompt:
            return SCRIPT[(UNANSWERABLE if unanswerable else ANSWERABLE, source)]
    raise AssertionError("a prompt without its chunk")


def test_end_to_end_on_three_documents(tmp_path, corpus3, tokenizer):
    from ragtune.qa import load_qa
    from ragtune.qa_gen_stage import run_gen_qa

    cfg = _cfg(
        tmp_path,
        corpus3,
        "retriever.k=1",
        "gen_qa.unanswerable_fraction=0.5",
        "gen_qa.unanswerable_oversample=1",
    )
    lm = ScriptedLM(tokenizer, _e2e_script)
    result = run_gen_qa(cfg, lm=lm, progress=False)
    assert len(lm.prompts) == 6  # 3 chunks x (answerable + unanswerable)
    records = load_qa(result.qa_path)
    assert [(r.instruction, r.output) for r in records if r.answerable] == [
        ("Who built the Velmora harbour?", "Ada Penrose")
    ]
    unans = [r for r in records if not r.answerable]
    assert [r.instruction for r in unans] == ["How deep is the Velmora harbour?"]
    assert unans[0].answers == () and unans[0].source == "harbour.md"
    raw = [json.loads(x) for x in result.qa_path.read_text().splitlines()]
    assert [r["is_impossible"] for r in raw if not r["output"]] == [True]
    rep = json.loads((result.qa_path.parent / "report.json").read_text())
    assert rep["records"] == 2 and rep["unanswerable"] == 1
    assert rep["by_kind"][ANSWERABLE]["removed"]["unsupported"] == 1
    assert rep["by_kind"][ANSWERABLE]["removed"]["unparsable"] == 1
    # each kind's own filters are listed; the cross-kind steps only where they removed some
    assert list(rep["by_kind"][ANSWERABLE]["removed"]) == list(FILTERS[ANSWERABLE])
    # every removed pair is kept with its reason, for the user to read why
    rejected = [json.loads(x) for x in (result.qa_path.parent / "rejected.jsonl").open()]
    removed = sum(sum(k["removed"].values()) for k in rep["by_kind"].values())
    assert len(rejected) == removed >= 2
    assert {"unsupported", "unparsable"} <= {r["reason"] for r in rejected}
    assert "2 records (1 answerable, 1 unanswerable)" in result.summary
    preview = (result.qa_path.parent / "preview.md").read_text()
    assert DOCS["harbour.md"] in preview and "How deep is the Velmora harbour?" in preview
    # a rerun continues: nothing left to generate, the same file
    again = ScriptedLM(tokenizer, _e2e_script)
    assert run_gen_qa(
        _cfg(
            tmp_path,
            corpus3,
            "retriever.k=1",
            "gen_qa.unanswerable_fraction=0.5",
            "gen_qa.unanswerable_oversample=1",
        ),
        lm=again,
        progress=False,
    )
    assert again.prompts == []
    assert load_qa(result.qa_path) == records


def test_unanswerable_records_train_abstention(tmp_path, corpus3, tokenizer):
    """The RAFT builder turns the generated unanswerable records into abstain targets."""
    from ragtune.qa import load_qa
    from ragtune.qa_gen_stage import run_gen_qa
    from ragtune.raft import BuildSettings, build_examples
    from ragtune.retriever import Retriever
    from ragtune.schema import get_schema

    cfg = _cfg(
        tmp_path,
        corpus3,
        "retriever.k=1",
        "gen_qa.unanswerable_fraction=0.5",
        "gen_qa.unanswerable_oversample=1",
    )
    result = run_gen_qa(cfg, lm=ScriptedLM(tokenizer, _e2e_script), progress=False)
    schema = get_schema("alpaca_rag_short")
    examples, _ = build_examples(
        load_qa(result.qa_path),
        Retriever.from_config(cfg.retriever),
        schema,
        tokenizer,
        BuildSettings(k=1, oracle_fraction=1.0),
        progress=False,
    )
    by_q = {e["instruction"]: e for e in examples}
    assert by_q["How deep is the Velmora harbour?"]["kind"] == "unanswerable"
    assert by_q["How deep is the Velmora harbour?"]["target"] == schema.abstain
    assert by_q["Who built the Velmora harbour?"]["target"] == "Ada Penrose"


def test_real_model_smoke(tmp_path, corpus3, tiny_lm_path):
    """The real path: load the configured LM, render through the schema, generate in batches."""
    from ragtune.qa_gen_stage import run_gen_qa

    cfg = _cfg(
        tmp_path,
        corpus3,
        f"model.name_or_path={tiny_lm_path}",
        "generate.max_new_tokens=8",
        "gen_qa.batch_size=4",
    )
    result = run_gen_qa(cfg, progress=False)
    lines = (tmp_path / "gen" / "generated.jsonl").read_text().splitlines()
    rep = result.report
    assert len(lines) == rep["generation"]["jobs_run"] == 3 + rep["by_kind"][UNANSWERABLE]["jobs"]
    assert all(isinstance(json.loads(x)["raw"], str) for x in lines)
    for kind in rep["by_kind"].values():
        assert kind["kept"] + sum(kind["removed"].values()) == kind["generated"]
    assert result.qa_path.exists()


# --------------------------------------------------------------------------- config
def test_bad_gen_qa_value_names_the_key(tmp_path, corpus3):
    from ragtune.config import ConfigError
    from ragtune.qa_gen_stage import run_gen_qa

    with pytest.raises(ConfigError, match="gen_qa.unanswerable_fraction"):
        run_gen_qa(_cfg(tmp_path, corpus3, "gen_qa.unanswerable_fraction=1.5"))
    with pytest.raises(ConfigError, match="gen_qa.prompt: prompt variant 'chat_rag'"):
        run_gen_qa(_cfg(tmp_path, corpus3, "gen_qa.prompt=chat_rag"))


def test_a_bad_top_level_value_is_refused_before_the_corpus_is_indexed(tmp_path, corpus3):
    from ragtune.config import ConfigError
    from ragtune.qa_gen_stage import run_gen_qa

    with pytest.raises(ConfigError, match="seed"):
        run_gen_qa(_cfg(tmp_path, corpus3, "seed=soon"))
    assert not (tmp_path / "index").exists()


def test_the_preview_says_when_a_records_chunk_left_the_index():
    from ragtune.qa_gen_stage import preview

    record = {"chunk_id": "gone", "kind": ANSWERABLE, "instruction": "Who?", "output": "Ada"}
    text = preview([{**record, "source": "a.md"}], chunks={}, n=1)
    assert "## answerable: Who?" in text and "(chunk no longer in the index)" in text


def test_resuming_with_another_model_is_refused(tmp_path, corpus3, tokenizer):
    from ragtune.qa_gen import GenQAError
    from ragtune.qa_gen_stage import run_gen_qa

    run_gen_qa(_cfg(tmp_path, corpus3), lm=ScriptedLM(tokenizer, _e2e_script), progress=False)
    with pytest.raises(GenQAError, match="decoding="):
        run_gen_qa(
            _cfg(tmp_path, corpus3, "generate.max_new_tokens=50"),
            lm=ScriptedLM(tokenizer, _e2e_script),
            progress=False,
        )


@pytest.mark.parametrize("value", ["null", "''", "missing.jsonl"])
def test_no_qa_train_points_to_gen_qa(tmp_path, outputs, value):
    from ragtune.config import compose, validate
    from ragtune.errors import RagtuneError
    from ragtune.training.data import build_dataset
    from ragtune.training.recipe import SFT_TOP_LEVEL

    cfg = compose("sft", [f"data.qa_train={value}", f"output_dir={tmp_path}"])
    validate(cfg, SFT_TOP_LEVEL)
    with pytest.raises(RagtuneError, match="data.qa_train.*ragtune gen-qa"):
        build_dataset(cfg, tmp_path)
