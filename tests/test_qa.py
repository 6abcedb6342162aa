"""QA loading: JSONL / JSON list / SQuAD v2, bad-input errors, and the by-article split."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from ragtune.qa import (
    QAFormatError,
    gold_answers,
    is_squad,
    load_qa,
    prepare_squad,
    record_to_json,
    sample_records,
    sources_not_in,
    squad_documents,
)
from ragtune.types import QARecord


def _squad(articles: list[dict]) -> dict:
    return {"version": "v2.0", "data": articles}


def _qa(qid: str, q: str, answers: list[str] | None = None, impossible: bool = False) -> dict:
    d = {"id": qid, "question": q, "is_impossible": impossible, "answers": []}
    if answers:
        d["answers"] = [{"text": a, "answer_start": 0} for a in answers]
    if impossible:
        d["plausible_answers"] = [{"text": "decoy", "answer_start": 0}]
    return d


def tiny_squad(n_articles: int = 2) -> dict:
    arts = []
    for i in range(n_articles):
        arts.append(
            {
                "title": f"Article_{i}",
                "paragraphs": [
                    {
                        "context": f"Article {i} first paragraph. The colour is blue{i}.",
                        "qas": [
                            _qa(
                                f"a{i}q1",
                                f"What colour in {i}?",
                                [f"blue{i}", f"colour is blue{i}"],
                            ),
                            _qa(f"a{i}q2", f"Who owns {i}?", impossible=True),
                        ],
                    },
                    {
                        "context": f"Article {i} second paragraph about trains.",
                        "qas": [_qa(f"a{i}q3", f"What about {i}?", ["about trains"])],
                    },
                ],
            }
        )
    return _squad(arts)


def write_json(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- good input
def test_jsonl_records(tmp_path: Path) -> None:
    p = write_lines(
        tmp_path / "qa.jsonl",
        [
            json.dumps({"instruction": "Q1?", "input": "", "output": "A1", "source": "x.md"}),
            "",
            json.dumps({"instruction": "Q2?", "output": "", "id": "q2"}),
            json.dumps({"instruction": "Q3?"}),  # output absent = unanswerable
            json.dumps({"instruction": "Q4?", "output": "A4", "answers": ["A4", "a four"]}),
            json.dumps({"instruction": "Q5?", "output": "", "plausible_answer": " Rollo "}),
            json.dumps({"instruction": "Q6?", "output": "A6", "plausible_answer": "x"}),
        ],
    )
    recs = load_qa(p)
    assert [r.instruction for r in recs] == ["Q1?", "Q2?", "Q3?", "Q4?", "Q5?", "Q6?"]
    assert recs[4].plausible == "Rollo" and not recs[4].answerable
    assert recs[5].plausible == ""  # only an unanswerable question has a plausible wrong answer
    assert load_qa(write_lines(tmp_path / "rt.jsonl", [json.dumps(record_to_json(recs[4]))])) == [
        QARecord("Q5?", id="qa:6", plausible="Rollo")
    ]
    assert recs[0] == QARecord("Q1?", "A1", "", "x.md", "qa:1")
    assert recs[1].id == "q2" and not recs[1].answerable
    assert not recs[2].answerable and recs[2].id == "qa:4"
    assert gold_answers(recs[3]) == ("A4", "a four")
    assert gold_answers(recs[0]) == ("A1",) and gold_answers(recs[1]) == ()


def test_jsonl_ids_and_sources_normalised(tmp_path: Path) -> None:
    p = write_lines(
        tmp_path / "qa.jsonl",
        [
            json.dumps({"instruction": "Q1?", "output": "A", "id": 7, "source": ""}),
            json.dumps({"instruction": "Q2?", "output": "B", "answers": ["B", "b", "B", " "]}),
        ],
    )
    r1, r2 = load_qa(p)
    assert r1.id == "7" and r1.source is None
    assert r2.answers == ("B", "b")


def test_jsonl_line_numbers_count_blank_lines(tmp_path: Path) -> None:
    good = json.dumps({"instruction": "Q?", "output": "A"})
    p = write_lines(tmp_path / "qa.jsonl", ["", good, "{oops"])
    with pytest.raises(QAFormatError, match="qa.jsonl: line 3: not valid JSON"):
        load_qa(p)
    assert [r.id for r in load_qa(p, on_error="skip")] == ["qa:2"]


def test_byte_order_mark_is_ignored(tmp_path: Path) -> None:
    p = tmp_path / "qa.jsonl"
    p.write_bytes(("\ufeff" + json.dumps({"instruction": "Q?", "output": "A"}) + "\n").encode())
    assert load_qa(p) == [QARecord("Q?", "A", id="qa:1")]


def test_gold_answers_never_include_a_blank_answer() -> None:
    """A blank gold answer would score an empty prediction as an exact match."""
    assert gold_answers(QARecord("Q?", "A", answers=("", "A", " ", "B"))) == ("A", "B")


def test_json_list_of_records(tmp_path: Path) -> None:
    p = write_json(tmp_path / "alpaca.json", [{"instruction": "Q?", "input": "", "output": "A"}])
    assert load_qa(p) == [QARecord("Q?", "A", "", None, "alpaca:0")]


def test_demo_data_loads() -> None:
    from ragtune.paths import DATA_DIR

    recs = load_qa(DATA_DIR / "qa" / "demo.jsonl")
    assert len(recs) == 164 and sum(not r.answerable for r in recs) == 40


def test_squad_records_and_documents(tmp_path: Path) -> None:
    p = write_json(tmp_path / "squad.json", tiny_squad(2))
    assert is_squad(p)
    recs = load_qa(p)
    assert [r.id for r in recs] == ["a0q1", "a0q2", "a0q3", "a1q1", "a1q2", "a1q3"]
    r = recs[0]
    assert (r.instruction, r.output, r.source) == (
        "What colour in 0?",
        "blue0",
        "squad/Article_0.txt",
    )
    assert gold_answers(r) == ("blue0", "colour is blue0")
    assert recs[1].output == "" and not recs[1].answerable
    assert recs[1].plausible == "decoy" and recs[0].plausible == ""  # the preference step's
    docs = squad_documents(p)
    assert [d[0] for d in docs] == ["squad/Article_0.txt", "squad/Article_1.txt"]
    assert docs[0][1] == (
        "Article 0 first paragraph. The colour is blue0.\n\nArticle 0 second paragraph about trains."
    )
    # every record's source is one of the documents, and answers occur in it
    texts = dict(docs)
    for rec in recs:
        assert rec.source in texts
        assert all(a in texts[rec.source] for a in gold_answers(rec))


def test_squad_answer_texts_stripped_deduplicated_and_blanks_dropped(tmp_path: Path) -> None:
    data = tiny_squad(1)
    data["data"][0]["paragraphs"][0]["qas"][0] = _qa(
        "q", "  Where?  ", [" ", " Paris ", "Paris", "the city"]
    )
    r = load_qa(write_json(tmp_path / "s.json", data))[0]
    assert (r.instruction, r.output, r.answers) == ("Where?", "Paris", ("Paris", "the city"))


def test_squad_impossible_question_is_unanswerable_with_first_plausible_answer(
    tmp_path: Path,
) -> None:
    data = tiny_squad(1)
    qa = _qa("q", "Who?", ["Rollo"], impossible=True)
    qa["plausible_answers"] = [{"text": " Rollo "}, {"text": "Richard"}]
    data["data"][0]["paragraphs"][0]["qas"][0] = qa
    r = load_qa(write_json(tmp_path / "s.json", data))[0]
    assert not r.answerable and r.answers == () and gold_answers(r) == ()
    assert r.plausible == "Rollo"


def test_squad_v1_question_without_is_impossible(tmp_path: Path) -> None:
    data = tiny_squad(1)
    qas = data["data"][0]["paragraphs"][0]["qas"]
    for qa in qas:
        qa.pop("is_impossible")
    answered, unanswered = load_qa(write_json(tmp_path / "s.json", data))[:2]
    assert answered.output == "blue0" and not unanswered.answerable


def test_squad_document_leaves_out_empty_paragraphs(tmp_path: Path) -> None:
    data = tiny_squad(1)
    data["data"][0]["paragraphs"].insert(1, {"context": "  ", "qas": []})
    ((_, text),) = squad_documents(write_json(tmp_path / "s.json", data))
    assert text == (
        "Article 0 first paragraph. The colour is blue0.\n\nArticle 0 second paragraph about trains."
    )


def test_squad_titles_become_safe_unique_paths(tmp_path: Path) -> None:
    data = tiny_squad(3)
    data["data"][0]["title"] = "A/B: c?"
    data["data"][1]["title"] = "A/B  c"
    data["data"][2]["title"] = "a_b_c"
    p = write_json(tmp_path / "s.json", data)
    names = [d[0] for d in squad_documents(p)]
    assert names == ["squad/A_B_c.txt", "squad/A_B_c_2.txt", "squad/a_b_c_3.txt"]
    assert {r.source for r in load_qa(p)} == set(names)


def test_squad_detected_without_json_extension(tmp_path: Path) -> None:
    p = write_json(tmp_path / "squad.data", tiny_squad(1))
    assert len(load_qa(p)) == 3


# --------------------------------------------------------------------------- bad input
BAD_JSONL = {
    "malformed JSON": ('{"instruction": "Q?", "output": "A"', "line 2: not valid JSON"),
    "not an object": ('["Q?", "A"]', "line 2: expected a JSON object, got list"),
    "no instruction": ('{"output": "A"}', "line 2: 'instruction' must be a non-empty string"),
    "empty instruction": ('{"instruction": "  "}', "line 2: 'instruction' must be a non-empty"),
    "numeric output": ('{"instruction": "Q?", "output": 42}', "line 2: 'output' must be a string"),
    "list input": ('{"instruction": "Q?", "input": ["x"]}', "line 2: 'input' must be a string"),
    "bad source": ('{"instruction": "Q?", "source": 3}', "line 2: 'source' must be a string"),
    "bad id": ('{"instruction": "Q?", "id": [1]}', "line 2: 'id' must be a string or integer"),
    "bad plausible": (
        '{"instruction": "Q?", "plausible_answer": ["x"]}',
        "line 2: 'plausible_answer' must be a string",
    ),
    "bad answers": (
        '{"instruction": "Q?", "output": "A", "answers": [1]}',
        "line 2: 'answers' must be a list of strings",
    ),
    "boolean id": ('{"instruction": "Q?", "id": true}', "line 2: 'id' must be a string or"),
    "answers without output": (
        '{"instruction": "Q?", "answers": ["A"]}',
        "line 2: 'answers' given but 'output' is empty",
    ),
    "duplicate id": ('{"instruction": "Q2?", "id": "dup"}', "id 'dup': duplicate id"),
}


def test_one_line_jsonl_with_a_bad_record_names_the_line(tmp_path: Path) -> None:
    """One JSON object parses as a whole document; only a .json file is then judged as SQuAD."""
    p = write_lines(tmp_path / "qa.jsonl", ['{"question": "Q?", "output": "A"}'])
    with pytest.raises(QAFormatError, match="line 1: 'instruction' must be a non-empty string"):
        load_qa(p)


@pytest.mark.parametrize("case", sorted(BAD_JSONL))
def test_bad_jsonl_raises_naming_file_and_line(tmp_path: Path, case: str) -> None:
    line, expected = BAD_JSONL[case]
    good = json.dumps({"instruction": "Good?", "output": "yes", "id": "dup"})
    p = write_lines(tmp_path / "bad.jsonl", [good, line])
    with pytest.raises(QAFormatError) as e:
        load_qa(p)
    assert str(p) in str(e.value) and expected in str(e.value)


@pytest.mark.parametrize("case", sorted(BAD_JSONL))
def test_bad_jsonl_skip_mode_keeps_good_records(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    line, expected = BAD_JSONL[case]
    good = json.dumps({"instruction": "Good?", "output": "yes", "id": "dup"})
    p = write_lines(tmp_path / "bad.jsonl", [good, line])
    problems: list[str] = []
    with caplog.at_level(logging.WARNING, logger="ragtune.qa"):
        recs = load_qa(p, on_error="skip", problems=problems)
    assert [r.instruction for r in recs] == ["Good?"]
    assert len(problems) == 1 and expected in problems[0]
    assert "skipping bad QA record" in caplog.text


def _mutate(fn) -> dict:
    data = tiny_squad(2)
    fn(data)
    return data


BAD_SQUAD_RECORDS = {
    "non-string answer": (
        lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"].append({"text": 5}),
        "question id 'a0q1': each answer must be an object with a string 'text'",
    ),
    "answer not an object": (
        lambda d: d["data"][0]["paragraphs"][0]["qas"][0].update(answers=["blue0"]),
        "question id 'a0q1': each answer must be an object",
    ),
    "answerable without answers": (
        lambda d: d["data"][1]["paragraphs"][1]["qas"][0].update(answers=[]),
        "question id 'a1q3': answerable question (is_impossible false) without",
    ),
    "missing question": (
        lambda d: d["data"][0]["paragraphs"][1]["qas"][0].pop("question"),
        "question id 'a0q3': 'question' must be a non-empty string",
    ),
    "empty id": (
        lambda d: d["data"][0]["paragraphs"][1]["qas"][0].update(id=""),
        "article 'Article_0', paragraph 1, question 0: 'id' must be a non-empty string",
    ),
    "missing id": (
        lambda d: d["data"][0]["paragraphs"][1]["qas"][0].pop("id"),
        "article 'Article_0', paragraph 1, question 0: 'id' must be a non-empty string",
    ),
    "is_impossible not bool": (
        lambda d: d["data"][0]["paragraphs"][0]["qas"][1].update(is_impossible="yes"),
        "question id 'a0q2': 'is_impossible' must be true or false",
    ),
    "duplicate qid": (
        lambda d: d["data"][1]["paragraphs"][0]["qas"][0].update(id="a0q1"),
        "id 'a0q1': duplicate id",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SQUAD_RECORDS))
def test_bad_squad_question_raises_or_skips(tmp_path: Path, case: str) -> None:
    fn, expected = BAD_SQUAD_RECORDS[case]
    p = write_json(tmp_path / "squad.json", _mutate(fn))
    with pytest.raises(QAFormatError) as e:
        load_qa(p)
    assert str(p) in str(e.value) and expected in str(e.value)
    problems: list[str] = []
    recs = load_qa(p, on_error="skip", problems=problems)
    assert len(recs) == 5 and len(problems) == 1 and expected in problems[0]


BAD_SQUAD_FILES = {
    "data not a list": ({"version": "v2.0", "data": {"title": "x"}}, "'data' must be a list"),
    "missing title": (_mutate(lambda d: d["data"][1].pop("title")), "article 1: 'title' must"),
    "missing paragraphs": (
        _mutate(lambda d: d["data"][0].pop("paragraphs")),
        "article 0 ('Article_0'): 'paragraphs' must be a list",
    ),
    "context not a string": (
        _mutate(lambda d: d["data"][0]["paragraphs"][1].update(context=None)),
        "article 0 ('Article_0'), paragraph 1: 'context' must be a string",
    ),
    "object without data": ({"version": "v2.0"}, "not SQuAD v2"),
}


@pytest.mark.parametrize("case", sorted(BAD_SQUAD_FILES))
def test_bad_squad_structure_is_fatal_even_when_skipping(tmp_path: Path, case: str) -> None:
    data, expected = BAD_SQUAD_FILES[case]
    p = write_json(tmp_path / "squad.json", data)
    with pytest.raises(QAFormatError) as e:
        load_qa(p, on_error="skip")
    assert str(p) in str(e.value) and expected in str(e.value)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(QAFormatError, match="QA file not found"):
        load_qa(tmp_path / "nope.jsonl")
    bad = tmp_path / "broken.json"
    bad.write_text('{"data": [', encoding="utf-8")
    with pytest.raises(QAFormatError, match="broken.json: not valid JSON"):
        load_qa(bad)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"instruction": "caf\xe9?"}\n'.encode("latin-1"))
    with pytest.raises(QAFormatError, match="latin.jsonl: not UTF-8"):
        load_qa(latin)
    empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(QAFormatError, match="no QA records"):
        load_qa(empty)
    with pytest.raises(QAFormatError, match="not a SQuAD JSON file"):
        squad_documents(write_lines(tmp_path / "x.jsonl", ['{"instruction": "Q?"}']))


# --------------------------------------------------------------------------- sampling, sources
def _numbered_records(n: int, unanswerable: set[int]) -> list[QARecord]:
    return [QARecord(f"Q{i}?", "" if i in unanswerable else "A", id=str(i)) for i in range(n)]


def test_sample_records_rounds_the_unanswerable_share() -> None:
    records = _numbered_records(10, {1, 5, 8})
    sample = sample_records(records, 6, seed=0)
    assert len(sample) == 6 and sum(not r.answerable for r in sample) == 2  # 6 * 0.3 = 1.8


def test_sample_records_seeded_and_in_file_order() -> None:
    records = _numbered_records(20, {0, 7, 13})
    samples = [sample_records(records, 5, seed) for seed in range(8)]
    assert sample_records(records, 5, 3) == samples[3]
    assert len({tuple(r.id for r in s) for s in samples}) > 1
    assert all(s == [r for r in records if r in s] for s in samples)


def test_sources_not_in_counts_distinct_named_sources() -> None:
    records = [
        QARecord("a?", "A", source="x.md"),
        QARecord("b?", "B", source="x.md"),
        QARecord("c?", "C"),
        QARecord("d?", "D", source=""),
        QARecord("e?", "E", source="y.md"),
    ]
    assert sources_not_in(records, {"x.md"}) == (["y.md"], 2)


# --------------------------------------------------------------------------- split
def test_prepare_squad_splits_by_article(tmp_path: Path) -> None:
    src = write_json(tmp_path / "squad.json", tiny_squad(4))
    out = tmp_path / "prepared"
    split = prepare_squad(src, out, test_fraction=0.25, seed=3)
    train, test = load_qa(split.train), load_qa(split.test)
    assert len(split.test_articles) == 1 and len(split.train_articles) == 3
    assert {r.source for r in test} == set(split.test_articles)
    assert not {r.source for r in train} & {r.source for r in test}
    assert len(train) + len(test) == 12 and split.n_test == len(test) == 3
    assert split.n_test_unanswerable == 1
    # records survive the round trip, gold answers included
    by_id = {r.id: r for r in load_qa(src)}
    assert all(by_id[r.id] == r for r in train + test)
    # the corpus holds every article; corpus_train never a test article
    all_docs = sorted(p.relative_to(split.corpus).as_posix() for p in split.corpus.rglob("*.txt"))
    train_docs = sorted(
        p.relative_to(split.corpus_train).as_posix() for p in split.corpus_train.rglob("*.txt")
    )
    assert all_docs == sorted(d for d, _ in squad_documents(src))
    assert train_docs == sorted(split.train_articles)
    assert (split.corpus / split.test_articles[0]).read_text() == dict(squad_documents(src))[
        split.test_articles[0]
    ]
    meta = json.loads((out / "split.json").read_text())
    assert meta["test_articles"] == split.test_articles and meta["seed"] == 3
    # deterministic under the seed
    again = prepare_squad(src, tmp_path / "again", test_fraction=0.25, seed=3)
    assert again.test_articles == split.test_articles
    assert split.test.read_text() == again.test.read_text()


def test_prepare_squad_writes_non_ascii_text_readably(tmp_path: Path) -> None:
    """train/test JSONL hold the questions as UTF-8 text (greppable), not \\u escapes."""
    data = tiny_squad(2)
    for art in data["data"]:
        art["paragraphs"][0]["qas"][0]["question"] = "東京の人口は?"
    split = prepare_squad(write_json(tmp_path / "squad.json", data), tmp_path / "o")
    for path in (split.train, split.test):
        text = path.read_text(encoding="utf-8")
        assert "東京の人口は?" in text and "\\u" not in text


def test_prepare_squad_caps_keep_unanswerable_share(tmp_path: Path) -> None:
    data = tiny_squad(4)
    for art in data["data"]:  # 9 questions per article: 3 unanswerable, 6 answerable
        for para in art["paragraphs"]:
            qas = para["qas"]
            para["qas"] = (
                qas
                + [dict(q, id=q["id"] + "b") for q in qas]
                + [dict(q, id=q["id"] + "c") for q in qas]
            )
    src = write_json(tmp_path / "squad.json", data)
    split = prepare_squad(src, tmp_path / "o", test_fraction=0.5, seed=0, max_train=6, max_test=3)
    assert (split.n_train, split.n_test) == (6, 3)
    assert (split.n_train_unanswerable, split.n_test_unanswerable) == (2, 1)
    assert {r.source for r in load_qa(split.test)} <= set(split.test_articles)


def test_prepare_squad_keeps_a_training_article_at_any_test_fraction(tmp_path: Path) -> None:
    split = prepare_squad(
        write_json(tmp_path / "s.json", tiny_squad(2)), tmp_path / "o", test_fraction=0.9
    )
    assert len(split.train_articles) == 1 and len(split.test_articles) == 1


def test_prepare_squad_rejects_bad_arguments(tmp_path: Path) -> None:
    src = write_json(tmp_path / "squad.json", tiny_squad(2))
    with pytest.raises(QAFormatError, match="test_fraction"):
        prepare_squad(src, tmp_path / "o", test_fraction=1.0)
    with pytest.raises(QAFormatError, match="max_train and max_test must be >= 0"):
        prepare_squad(src, tmp_path / "o", max_test=-1)
    one = write_json(tmp_path / "one.json", tiny_squad(1))
    with pytest.raises(QAFormatError, match="at least 2 articles"):
        prepare_squad(one, tmp_path / "o")


def test_prepare_squad_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    from ragtune.paths import PROJECT_ROOT

    spec = importlib.util.spec_from_file_location(
        "prepare_squad_cli", PROJECT_ROOT / "train" / "prepare_squad.py"
    )
    assert spec and spec.loader
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    src = write_json(tmp_path / "squad.json", tiny_squad(3))
    out = tmp_path / "out"
    assert cli.main([str(src), str(out), "--test-fraction", "0.34", "--max-test", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["n_test"] == 2 and len(printed["test_articles"]) == 1
    assert (out / "train.jsonl").exists() and (out / "corpus" / "squad").is_dir()
    assert cli.main([str(tmp_path / "missing.json"), str(out)]) == 2
    assert "QA file not found" in capsys.readouterr().err
