"""QA generation's settings, plan and generation log (ragtune/qa_gen.py): what is refused, what
is asked about, and what a resumed or repeated run reads back."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from ragtune.config import ConfigError
from ragtune.qa_gen import (
    ANSWERABLE,
    GENERATED,
    UNANSWERABLE,
    GenQASettings,
    check_resumable,
    generate,
    load_schemas,
    plan_jobs,
    read_generated,
)
from tests.test_gen_qa import DOCS, ScriptedLM, _chunk, _script_by_chunk


@pytest.fixture()
def chunks():
    return [_chunk(t, s) for s, t in DOCS.items()]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num_chunks", -1),
        ("unanswerable_fraction", 1.0),
        ("unanswerable_oversample", 0.5),
        ("batch_size", 0),
        ("dedup_jaccard", 0.0),
        ("dedup_jaccard", 1.5),
        ("round_trip_k", -1),
        ("min_question_words", 0),
        ("min_question_words", 61),  # above max_question_words (60)
        ("max_answer_words", 0),
    ],
)
def test_a_bad_setting_is_refused_naming_its_key(key, value):
    with pytest.raises(ConfigError, match=rf"^gen_qa\.{key}: "):
        GenQASettings.from_config({key: value})


def test_the_edges_of_each_range_are_accepted():
    s = GenQASettings.from_config(
        {"num_chunks": 0, "unanswerable_oversample": 1.0, "dedup_jaccard": 1.0, "round_trip_k": 0}
    )
    assert (s.num_chunks, s.dedup_jaccard, s.round_trip_k) == (0, 1.0, 0)


def test_short_chunks_are_never_asked_about(chunks):
    short = _chunk("Velmora.", "stub.md")
    jobs = plan_jobs([*chunks, short], GenQASettings(num_chunks=0, min_chunk_chars=20), seed=0)
    assert short.id not in {j.chunk.id for j in jobs}
    assert {j.chunk.id for j in jobs} == {c.id for c in chunks}


def test_which_chunks_are_sampled_follows_the_seed(chunks):
    s = GenQASettings(num_chunks=1, unanswerable_fraction=0.0, min_chunk_chars=10)
    picked = {plan_jobs(chunks, s, seed=seed)[0].chunk.id for seed in range(12)}
    assert len(picked) > 1  # not always the first chunk by id
    assert plan_jobs(chunks, s, seed=5) == plan_jobs(list(reversed(chunks)), s, seed=5)


@pytest.mark.parametrize(("oversample", "want"), [(1.0, 1), (2.0, 2), (9.0, 3)])
def test_unanswerable_candidates_are_oversampled_and_capped(chunks, oversample, want):
    """3 chunks at a 20% share need 3 * 0.2 / 0.8 = 0.75 -> 1 unanswerable record; candidates
    are generated ``oversample`` times that (rounded up), never more than one per chunk."""
    s = GenQASettings(
        num_chunks=0,
        unanswerable_fraction=0.2,
        unanswerable_oversample=oversample,
        min_chunk_chars=10,
    )
    jobs = plan_jobs(chunks, s, seed=0)
    assert sum(j.kind == ANSWERABLE for j in jobs) == 3
    assert sum(j.kind == UNANSWERABLE for j in jobs) == want


def test_the_first_generation_of_a_job_wins_and_an_unended_line_is_redone(tmp_path):
    path = tmp_path / GENERATED
    first = {"job": "a:1", "raw": "first"}
    lines = [first, {"job": "a:1", "raw": "second"}, {"job": "a:2", "raw": "x"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + json.dumps({"job": "a:3"}))
    done = read_generated(path)
    assert done == {"a:1": first, "a:2": lines[2]}  # a:3 was never ended by its newline
    assert path.read_text().endswith('"raw": "x"}\n')


def test_jobs_left_and_no_model_is_an_error_but_a_finished_log_needs_none(
    tmp_path, tokenizer, chunks
):
    s = GenQASettings(num_chunks=0, unanswerable_fraction=0.0, min_chunk_chars=10)
    jobs, schemas, path = plan_jobs(chunks, s, seed=0), load_schemas(s), tmp_path / GENERATED
    with pytest.raises(ValueError, match="3 jobs left to generate and no LM"):
        generate(jobs, None, schemas, path, progress=False)
    generate(jobs, ScriptedLM(tokenizer, _script_by_chunk), schemas, path, progress=False)
    assert generate(jobs, None, schemas, path, progress=False)["jobs_run"] == 0


class DrawingLM:
    """Writes a question numbered by a draw from torch's generator, as sampled decoding does."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def generate_batch(self, prompts, batch_size=8):
        import torch

        draws = torch.randint(0, 10**9, (len(prompts),)).tolist()
        return [SimpleNamespace(text=f"Question: Q{d}?\nAnswer: A") for d in draws]


def test_a_jobs_sampled_generation_does_not_hang_on_what_ran_before_it(tmp_path, tokenizer, chunks):
    """Each batch draws from a seed of its first job, so a resumed run (or one with more
    chunks) samples a job's text exactly as an uninterrupted run did, and jobs differ."""
    s = GenQASettings(num_chunks=0, unanswerable_fraction=0.0, min_chunk_chars=10)
    jobs, schemas = plan_jobs(chunks, s, seed=0), load_schemas(s)
    whole = tmp_path / "whole.jsonl"
    generate(jobs, DrawingLM(tokenizer), schemas, whole, batch_size=1, seed=7, progress=False)
    last = tmp_path / "last.jsonl"
    generate(jobs[-1:], DrawingLM(tokenizer), schemas, last, batch_size=1, seed=7, progress=False)
    texts = {k: r["raw"] for k, r in read_generated(whole).items()}
    assert read_generated(last)[jobs[-1].key]["raw"] == texts[jobs[-1].key]
    assert len(set(texts.values())) == len(jobs)
    other = tmp_path / "other.jsonl"
    generate(jobs[-1:], DrawingLM(tokenizer), schemas, other, batch_size=1, seed=8, progress=False)
    assert read_generated(other)[jobs[-1].key]["raw"] != texts[jobs[-1].key]


def test_resume_false_starts_over_and_resume_true_keeps_the_log(tmp_path):
    ident = {"model": "m", "prompts": {}, "decoding": {}, "seed": None}
    out = tmp_path / "gen"
    check_resumable(out, ident, resume=True)
    (out / GENERATED).write_text('{"job": "a:1"}\n')
    check_resumable(out, ident, resume=True)
    assert (out / GENERATED).exists()
    check_resumable(out, ident, resume=False)
    assert not (out / GENERATED).exists()
    assert json.loads((out / "generation.json").read_text()) == ident


def test_the_seed_is_part_of_a_generation_only_when_decoding_samples(chunks):
    """Greedy text does not depend on the seed, so resuming it under another seed is fine;
    sampled text does, so the seed is recorded (and a resume with another one refused)."""
    from ragtune.qa_gen import identity

    schemas = load_schemas(GenQASettings())
    decoding = {"max_new_tokens": 64, "top_p": 1.0, "repetition_penalty": 1.0}
    greedy = [identity("m", schemas, decoding | {"temperature": 0.0}, seed) for seed in (1, 2)]
    assert greedy[0] == greedy[1] and greedy[0]["seed"] is None
    sampled = [identity("m", schemas, decoding | {"temperature": 0.7}, seed) for seed in (1, 2)]
    assert sampled[0] != sampled[1] and sampled[0]["seed"] == 1
