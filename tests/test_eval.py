"""Evaluation modes on one index and one QA set: resolution, outputs, scoring plumbing."""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import pytest

from ragtune.config import ConfigError, compose, validate
from ragtune.evaluate import (
    EVAL_TOP_LEVEL,
    evaluate_model,
    markdown_table,
    resolve_modes,
    run_eval,
)
from ragtune.manifest import ManifestError, write_manifest
from ragtune.paths import PROJECT_ROOT
from ragtune.schema import get_schema

QA = [
    {
        "instruction": "When is the Lantern Tide held in Velmora?",
        "output": "second Saturday of October",
        "source": "velmora.md",
        "id": "q1",
    },
    {
        "instruction": "Who developed the alloy Corvanite?",
        "output": "Ismay Trelawn",
        "answers": ["Ismay Trelawn", "Trelawn"],
        "source": "corvanite.md",
        "id": "q2",
    },
    {
        "instruction": "Who is the mayor of Velmora?",
        "output": "",
        "source": "velmora.md",
        "id": "q3",
    },
    {
        "instruction": "What are Corvanite ship parts?",
        "output": "propellers",
        "source": "corvanite.md",
        "id": "q4",
    },
]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaldata")
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "velmora.md").write_text(
        "# Velmora\n\nVelmora is a lake town in the north. Its Lantern Tide festival is held on "
        "the second Saturday of October, when the Keeper of the Wick lights the first lantern.\n"
    )
    (corpus / "corvanite.md").write_text(
        "# Corvanite\n\nCorvanite is a heavy copper-nickel alloy developed by Ismay Trelawn at "
        "the Brindlecombe Metallurgical Works. Shipyards cast propellers from it.\n"
    )
    qa = root / "qa.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in QA))
    return {"root": root, "corpus": corpus, "qa": qa, "index": root / "index"}


def _fake_trained(dst: Path, tiny_lm_path: str, mode: str, chunk_size: int) -> Path:
    """A model folder as train/sft.py leaves it: weights, schema, manifest (written last)."""
    shutil.copytree(tiny_lm_path, dst)
    get_schema("alpaca_rag").save(dst)
    write_manifest(
        dst,
        {
            "base_model": tiny_lm_path,
            "prompt": {"name": "alpaca_rag"},
            "retriever": {
                "embedding_model": "minilm-l6",
                "chunk_size": chunk_size,
                "chunk_overlap": 20,
                "k": 2,
                "persist_dir": "/somewhere/else/not/used",
            },
            "model": {"max_seq_length": 320, "dtype": "float32"},
            "raft": {"mode": mode},
        },
    )
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tiny_lm_path: str) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evalmodels")
    return {
        "ft_closed": _fake_trained(root / "closed", tiny_lm_path, "closed", 400),
        "raft_rag": _fake_trained(root / "raft", tiny_lm_path, "rag", 150),
    }


def _cfg(tmp_path: Path, data: dict[str, Path], tiny_lm_path: str, *extra: str):
    cfg = compose(
        "eval",
        [
            f"output_dir={tmp_path / 'run'}",
            f"model.name_or_path={tiny_lm_path}",
            "model.max_seq_length=320",
            "retriever.chunk_size=400",
            "retriever.chunk_overlap=20",
            f"retriever.persist_dir={data['index']}",
            f"data.corpus={data['corpus']}",
            f"data.qa_eval={data['qa']}",
            "generate.max_new_tokens=6",
            "eval.batch_size=3",
            *extra,
        ],
    )
    return cfg


# --------------------------------------------------------------------------- resolution
def test_modes_default_to_base_rag_plus_given_models(tmp_path, data, tiny_lm_path, models):
    cfg = validate(_cfg(tmp_path, data, tiny_lm_path), EVAL_TOP_LEVEL)
    specs = resolve_modes(cfg)
    assert [s.name for s in specs] == ["base_rag"]
    assert specs[0].model == tiny_lm_path and specs[0].rcfg.chunk_size == 400

    cfg = _cfg(
        tmp_path,
        data,
        tiny_lm_path,
        f"eval.models.ft_closed={models['ft_closed']}",
        f"eval.models.raft_rag={models['raft_rag']}",
    )
    specs = {s.name: s for s in resolve_modes(validate(cfg, EVAL_TOP_LEVEL))}
    assert list(specs) == ["base_rag", "ft_closed", "ft_then_rag", "raft_rag"]
    assert specs["ft_closed"].rcfg is None  # closed book
    assert specs["ft_then_rag"].rcfg.chunk_size == 400  # the evaluation's retriever
    assert specs["ft_then_rag"].model == specs["ft_closed"].model != specs["raft_rag"].model
    raft = specs["raft_rag"].rcfg
    # raft_rag: the model's own retriever settings, on the evaluation's index location
    assert (raft.chunk_size, raft.k) == (150, 2)
    assert raft.persist_dir == str(data["index"])
    assert specs["raft_rag"].max_seq_length == 320 and not specs["raft_rag"].notes
    # eval.persist_dir: every RAG mode answers from the evaluation's own index
    cfg = _cfg(
        tmp_path,
        data,
        tiny_lm_path,
        f"eval.models.raft_rag={models['raft_rag']}",
        f"eval.persist_dir={tmp_path / 'eval_index'}",
    )
    specs = resolve_modes(validate(cfg, EVAL_TOP_LEVEL))
    assert {s.rcfg.persist_dir for s in specs} == {str(tmp_path / "eval_index")}


def test_mode_errors_name_the_key(tmp_path, data, tiny_lm_path, models):
    cfg = _cfg(tmp_path, data, tiny_lm_path, "eval.modes=[raft_rag]")
    with pytest.raises(ConfigError, match="eval.models.raft_rag: mode 'raft_rag' needs"):
        resolve_modes(validate(cfg, EVAL_TOP_LEVEL))
    with pytest.raises(ConfigError, match="eval.modes: unknown mode 'rag'"):
        validate(_cfg(tmp_path, data, tiny_lm_path, "eval.modes=[rag]"), EVAL_TOP_LEVEL)
    with pytest.raises(ConfigError, match="eval.batch_size: must be > 0"):
        validate(_cfg(tmp_path, data, tiny_lm_path, "eval.batch_size=0"), EVAL_TOP_LEVEL)
    cfg = _cfg(tmp_path, data, tiny_lm_path, f"eval.models.ft_closed={tmp_path}")
    with pytest.raises(ManifestError, match="manifest.json not found"):
        resolve_modes(validate(cfg, EVAL_TOP_LEVEL))
    # a folder trained the other way round is used, with a note
    cfg = _cfg(tmp_path, data, tiny_lm_path, f"eval.models.raft_rag={models['ft_closed']}")
    raft = resolve_modes(validate(cfg, EVAL_TOP_LEVEL))[-1]
    assert raft.notes == ["eval.models.raft_rag was trained with raft.mode=closed"]


def test_run_eval_refuses_an_unknown_key_before_anything_runs(tmp_path, data, tiny_lm_path):
    cfg = _cfg(tmp_path, data, tiny_lm_path, "+max_question=3")
    with pytest.raises(ConfigError, match="unknown config key 'max_question'"):
        run_eval(cfg)


def test_the_headline_is_raft_rag_when_it_ran_else_the_first_mode_asked(
    tmp_path, data, tiny_lm_path, models, monkeypatch
):
    """A sweep ranks runs by the headline mode's overall score."""
    import ragtune.evaluate as ev

    monkeypatch.setattr(
        ev, "evaluate_modes", lambda cfg, specs, *a, **kw: {"modes": {s.name: {} for s in specs}}
    )
    trained = [f"eval.models.{k}={models[k]}" for k in ("ft_closed", "raft_rag")]
    for asked, headline in (
        ("ft_then_rag,base_rag", "ft_then_rag"),
        ("base_rag,raft_rag,ft_closed", "raft_rag"),
    ):
        cfg = _cfg(tmp_path, data, tiny_lm_path, f"eval.modes=[{asked}]", *trained)
        assert run_eval(cfg)["headline"] == headline


def test_run_eval_names_a_missing_qa_file(tmp_path, data, tiny_lm_path, outputs):
    cfg = _cfg(tmp_path, data, tiny_lm_path, f"data.qa_eval={tmp_path / 'missing.jsonl'}")
    with pytest.raises(Exception, match="QA file not found"):
        run_eval(cfg)


def test_a_qa_set_for_another_corpus_stops_before_any_model_loads(
    tmp_path, data, tiny_lm_path, outputs, monkeypatch, caplog
):
    import ragtune.evaluate as ev

    def no_model(*a, **kw):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ev, "_load", no_model)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({**QA[0], "source": "towns/velmora.md"}) + "\n")
    with pytest.raises(ConfigError, match=r"data.qa_eval=.*none of its 1 source documents"):
        run_eval(_cfg(tmp_path, data, tiny_lm_path, f"data.qa_eval={other}"))
    some = tmp_path / "some.jsonl"
    some.write_text(json.dumps(QA[0]) + "\n" + json.dumps({**QA[1], "source": "x/gone.md"}))
    with pytest.raises(AssertionError, match="a model was loaded"):  # warned, went on
        run_eval(_cfg(tmp_path, data, tiny_lm_path, f"data.qa_eval={some}"))
    assert "1 of 2 source documents are not in" in caplog.text and "x/gone.md" in caplog.text


# --------------------------------------------------------------------------- running
def test_all_four_modes_answer_the_same_questions(tmp_path, data, tiny_lm_path, models, outputs):
    cfg = _cfg(
        tmp_path,
        data,
        tiny_lm_path,
        f"eval.models.ft_closed={models['ft_closed']}",
        f"eval.models.raft_rag={models['raft_rag']}",
    )
    results = run_eval(cfg)
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    modes = metrics["modes"]
    assert list(modes) == ["base_rag", "ft_closed", "ft_then_rag", "raft_rag"]
    assert metrics["n_questions"] == 4 and metrics["n_unanswerable"] == 1
    assert results["headline"] == "raft_rag" and results["modes"] == modes
    for name, m in modes.items():
        assert (m["n"], m["n_answerable"], m["n_unanswerable"]) == (4, 3, 1)
        for key in ("overall", "f1", "exact_match", "false_abstention_rate"):
            assert 0.0 <= m[key] <= 100.0, (name, key)
        assert m["latency_s"] > 0
        assert (m["recall_at_k"] is None) == (name == "ft_closed")
    assert modes["raft_rag"]["retriever"]["chunk_size"] == 150
    # every RAG answer carries an answerability score; their AUROC and ROC plot are reported
    assert modes["ft_closed"]["abstention_auroc"] is None
    for name in ("base_rag", "ft_then_rag", "raft_rag"):
        assert 0.0 <= modes[name]["abstention_auroc"] <= 1.0
    assert (run / "roc.png").stat().st_size > 0

    rows = [json.loads(line) for line in (run / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 16
    by_mode: dict[str, list[dict]] = {}
    for r in rows:
        by_mode.setdefault(r["mode"], []).append(r)
    assert all([r["id"] for r in rs] == ["q1", "q2", "q3", "q4"] for rs in by_mode.values())
    for r in by_mode["ft_closed"]:
        assert r["retrieved"] is None and r["retrieval_hit"] is None
    for r in by_mode["raft_rag"]:
        assert 1 <= len(r["retrieved"]) <= 2  # the model's own k=2
        assert {"question", "answer", "score", "gold", "abstained"} <= set(r)
        assert isinstance(r["answerability"], float) and "margin" in r["features"]
    assert by_mode["base_rag"][1]["gold"] == ["Ismay Trelawn", "Trelawn"]
    assert by_mode["base_rag"][2]["retrieval_hit"] is None  # unanswerable: no oracle
    table = (run / "results.md").read_text()
    assert table.count("\n| ") == 6 and "| raft_rag |" in table and "overall" in table


def test_scores_flow_from_answers_to_metrics(tmp_path, data, tiny_lm_path, outputs, monkeypatch):
    """With answers fixed by hand, every metric is known in advance."""
    from ragtune.generate import GenerationResult, Generator

    abstain = get_schema("alpaca_rag").abstain
    answers = {
        "When is the Lantern Tide held in Velmora?": "The second Saturday of October.",
        "Who developed the alloy Corvanite?": "Trelawn",  # EM via the second gold answer
        "Who is the mayor of Velmora?": abstain,
        "What are Corvanite ship parts?": abstain,  # a false abstention
    }

    def fake_batch(self, prompts, batch_size=8, **kwargs):
        out = []
        for p in prompts:
            q = next(q for q in answers if q in p)
            out.append(GenerationResult(answers[q], [1], "eos", 2, 0.01, 10))
        return out

    monkeypatch.setattr(Generator, "generate_batch", fake_batch)
    got = []  # the AUROC's interval is asked for on the same scores and labels as the AUROC
    monkeypatch.setattr(
        "ragtune.evaluate.auroc_interval", lambda s, y: got.append((s, y)) or (0.25, 0.75)
    )
    run_eval(_cfg(tmp_path, data, tiny_lm_path))
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())["modes"]["base_rag"]
    assert m["abstention_auroc_95"] == [0.25, 0.75] and len(got) == 1
    assert list(got[0][1]) == [True, True, False, True]  # answerable, in the QA file's order
    assert "[0.250, 0.750]" in (tmp_path / "run" / "results.md").read_text()
    assert m["exact_match"] == pytest.approx(200 / 3, abs=0.01)
    assert m["f1"] == pytest.approx(200 / 3, abs=0.01)
    assert m["false_abstention_rate"] == pytest.approx(100 / 3, abs=0.01)
    assert m["unanswerable_abstention_rate"] == 100.0
    assert m["overall"] == 75.0  # (1 + 1 + 1 + 0) / 4
    assert m["recall_at_k"] == 100.0  # each answer sits in the one chunk of its document


def test_answers_and_metrics_keep_non_ascii_text_readable(tmp_path, data, tiny_lm_path, outputs):
    """People read answers.jsonl and metrics.json in an editor or with grep: a Japanese
    question or a file name with an accent is written as itself, not as escapes."""
    qa = tmp_path / "qa-é.jsonl"
    qa.write_text(json.dumps({**QA[1], "instruction": "コルバナイトを開発したのは誰ですか?"}))
    run_eval(
        _cfg(tmp_path, data, tiny_lm_path, f"data.qa_eval='{qa}'", "generate.max_new_tokens=2")
    )
    assert "コルバナイトを開発したのは誰ですか" in (tmp_path / "run" / "answers.jsonl").read_text(
        encoding="utf-8"
    )
    assert "qa-é.jsonl" in (tmp_path / "run" / "metrics.json").read_text(encoding="utf-8")


def test_evaluate_model_for_sweeps(tmp_path, data, tiny_lm_path, models, outputs):
    """What run_sft calls with train.eval_after=true: the run's own settings, eval/ folder."""
    base = [
        f"output_dir={tmp_path / 'sft'}",
        f"model.name_or_path={tiny_lm_path}",
        "model.max_seq_length=320",
        "retriever.chunk_size=400",
        "retriever.chunk_overlap=20",
        f"retriever.persist_dir={data['index']}",
        f"data.corpus={data['corpus']}",
        f"data.qa_eval={data['qa']}",
        "eval.batch_size=4",
    ]
    cfg = validate(compose("sft", base), {"seed": int, "output_dir": str})
    got = evaluate_model(cfg, models["raft_rag"])
    assert got["mode"] == "raft_rag" and got["n"] == 4 and 0 <= got["overall"] <= 100
    assert got["retriever"]["chunk_size"] == 400  # the run's settings, not a manifest's
    assert (tmp_path / "sft" / "eval" / "answers.jsonl").exists()
    cfg = validate(compose("sft", [*base, "raft.mode=closed"]), {"seed": int, "output_dir": str})
    got = evaluate_model(cfg, models["ft_closed"], out_dir=tmp_path / "closed_eval")
    assert got["mode"] == "ft_closed" and got["recall_at_k"] is None


def test_markdown_table() -> None:
    row = {
        "overall": 61.111,
        "f1": 40.0,
        "exact_match": 30.0,
        "false_abstention_rate": 5.0,
        "unanswerable_abstention_rate": 80.0,
        "recall_at_k": None,
        "abstention_auroc": 0.71234,
        "latency_s": 0.12345,
    }
    table = markdown_table({"ft_closed": row})
    want = "| ft_closed | 61.1 | 40.0 | 30.0 | 5.0 | 80.0 | n/a | 0.712 | 0.123 |"
    assert table.splitlines()[2] == want
    # the AUROC's bootstrap interval, when there is one, in brackets after it
    table = markdown_table({"raft_rag": {**row, "abstention_auroc_95": [0.6512, 0.79]}})
    assert "| 0.712 [0.651, 0.790] |" in table.splitlines()[2]


@pytest.mark.slow
def test_cli_reports_config_errors_in_one_line() -> None:
    res = subprocess.run(
        [sys.executable, "train/eval.py", "eval.modes=[raft_rag]"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: eval.models.raft_rag:")


# --------------------------------------------------------------------------- the rules of a run
def test_modes_are_checked_and_asked_once_each(tmp_path, data, tiny_lm_path):
    """resolve_modes checks the names itself (a library caller need not validate first), and a
    mode named twice runs once."""
    with pytest.raises(ConfigError, match=r"eval.modes: unknown mode\(s\) \['rag'\]"):
        resolve_modes(_cfg(tmp_path, data, tiny_lm_path, "eval.modes=[rag]"))
    specs = resolve_modes(_cfg(tmp_path, data, tiny_lm_path, "eval.modes=[base_rag,base_rag]"))
    assert [s.name for s in specs] == ["base_rag"]


def test_max_questions_samples_by_the_run_seed(tmp_path, data, tiny_lm_path):
    from ragtune.evaluate import _records

    def sample(seed: int) -> list[str]:
        cfg = _cfg(tmp_path, data, tiny_lm_path, "eval.max_questions=2", f"seed={seed}")
        return [r.id for r in _records(cfg, str(data["qa"]))]

    assert len(sample(0)) == 2 and sample(0) == sample(0)
    assert len({tuple(sample(seed)) for seed in range(6)}) > 1
    assert len(_records(_cfg(tmp_path, data, tiny_lm_path), str(data["qa"]))) == len(QA)


def test_without_qa_eval_the_training_qa_is_evaluated(tmp_path, data, tiny_lm_path, outputs):
    cfg = _cfg(tmp_path, data, tiny_lm_path, "data.qa_eval=''", f"data.qa_train={data['qa']}")
    run_eval(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["qa_file"] == str(data["qa"]) and metrics["n_questions"] == len(QA)


def test_models_load_once_contexts_are_retrieved_once_results_come_as_asked(
    tmp_path, data, tiny_lm_path, models, outputs, monkeypatch
):
    """Modes sharing a model run back to back (one load), modes sharing retriever settings and
    budget share each context (one retrieval), one retriever per setting, and the results
    keep the order asked."""
    import ragtune.evaluate as ev
    from ragtune.retriever import Retriever

    loads: list[str] = []
    alive_at_load: list[bool] = []
    earlier: list[weakref.ref] = []
    real_load, real_retrieve, real_open = (
        ev._load,
        Retriever.retrieve,
        Retriever.from_config.__func__,
    )

    def load(spec, ecfg):
        # at 12B two models do not fit: the previous one must be gone before the next loads
        alive_at_load.append(any(ref() is not None for ref in earlier))
        loads.append(spec.name)
        model, tokenizer = real_load(spec, ecfg)
        cycle: list = [model]
        cycle.append(cycle)  # a reference cycle holding the model, as hooks and caches make
        earlier.append(weakref.ref(model))
        return model, tokenizer

    monkeypatch.setattr(ev, "_load", load)
    retrieved: list[str] = []
    monkeypatch.setattr(
        Retriever,
        "retrieve",
        lambda self, q, *a, **kw: retrieved.append(q) or real_retrieve(self, q, *a, **kw),
    )
    opened: list[int] = []
    monkeypatch.setattr(
        Retriever,
        "from_config",
        classmethod(
            lambda cls, rcfg, **kw: opened.append(rcfg.chunk_size) or real_open(cls, rcfg, **kw)
        ),
    )
    asked = ["ft_closed", "base_rag", "ft_then_rag", "raft_rag"]
    cfg = _cfg(
        tmp_path,
        data,
        tiny_lm_path,
        f"eval.modes=[{','.join(asked)}]",
        "prompt=alpaca_rag",  # the fake trained folders' schema: the same context budget
        f"eval.models.ft_closed={models['ft_closed']}",
        f"eval.models.raft_rag={models['raft_rag']}",
    )
    gc.disable()  # only evaluation's own collection may free a model in a cycle
    try:
        results = run_eval(cfg)
    finally:
        gc.enable()
    assert list(results["modes"]) == asked
    assert loads == ["ft_closed", "base_rag", "raft_rag"]  # ft_then_rag reuses ft_closed's
    assert alive_at_load == [False, False, False]
    assert sorted(opened) == [150, 400]  # the evaluation's retriever and raft_rag's own
    assert len(retrieved) == 2 * len(QA)  # base_rag and ft_then_rag share theirs


def test_the_trained_context_budget_caps_raft_rag_contexts(
    tmp_path, data, tiny_lm_path, outputs, monkeypatch
):
    from ragtune.manifest import read_manifest
    from ragtune.retriever import Retriever

    capped = _fake_trained(tmp_path / "capped", tiny_lm_path, "rag", 150)
    manifest = {k: v for k, v in read_manifest(capped).items() if k != "files"}
    manifest["retriever"]["context_tokens"] = 24
    write_manifest(capped, manifest)
    budgets: list[int | None] = []
    real = Retriever.retrieve
    monkeypatch.setattr(
        Retriever,
        "retrieve",
        lambda self, q, k=None, budget_tokens=None: (
            budgets.append(budget_tokens) or real(self, q, k, budget_tokens)
        ),
    )
    run_eval(
        _cfg(
            tmp_path, data, tiny_lm_path, "eval.modes=[raft_rag]", f"eval.models.raft_rag={capped}"
        )
    )
    assert budgets == [24] * len(QA)


def test_eval_corpus_is_answered_from_and_hits_count_in_the_questions_own_document(
    tmp_path, data, tiny_lm_path, outputs
):
    """``eval.corpus`` names the corpus to index and answer from, even in an index that holds
    another corpus with the same settings; a gold answer found only in another document than
    the question's is no retrieval hit."""
    from omegaconf import OmegaConf

    from ragtune.ingest import ingest
    from ragtune.store import as_rcfg

    index, other = tmp_path / "index", tmp_path / "other"
    other.mkdir()
    (other / "harbour.md").write_text("Harbour notes: Velmora's ferry leaves at dawn.\n")
    qa = tmp_path / "qa.jsonl"  # the answer sits in velmora.md, the record names corvanite.md
    qa.write_text(
        json.dumps(
            {
                "instruction": "Which lake town holds the Lantern Tide festival?",
                "output": "Velmora",
                "source": "corvanite.md",
                "id": "x1",
            }
        )
        + "\n"
    )
    cfg = _cfg(
        tmp_path,
        data,
        tiny_lm_path,
        f"retriever.persist_dir={index}",
        "data.corpus=''",
        f"eval.corpus={data['corpus']}",
        f"data.qa_eval={qa}",
    )
    ingest(other, as_rcfg(OmegaConf.to_container(cfg.retriever, resolve=True)), show_progress=False)
    run_eval(cfg)
    (row,) = [json.loads(x) for x in (tmp_path / "run" / "answers.jsonl").read_text().splitlines()]
    assert {r["source"] for r in row["retrieved"]} == {"velmora.md", "corvanite.md"}
    assert row["retrieval_hit"] is False


def test_evaluate_model_applies_the_calibration_training_passes(
    tmp_path, data, tiny_lm_path, models, outputs
):
    """run_sft evaluates before it writes the calibration into the manifest: the one it
    passes is the decision evaluated (here a threshold no answer reaches)."""
    from ragtune.answerability import MANIFEST_KEY, Calibration

    cfg = validate(
        compose(
            "sft",
            [
                f"output_dir={tmp_path / 'sft'}",
                f"model.name_or_path={tiny_lm_path}",
                "model.max_seq_length=320",
                f"retriever.persist_dir={data['index']}",
                f"data.corpus={data['corpus']}",
                f"data.qa_eval={data['qa']}",
            ],
        ),
        {"seed": int, "output_dir": str},
    )
    never = Calibration(threshold=1e9, weights={"margin": 1.0}).to_dict()
    got = evaluate_model(cfg, models["raft_rag"], manifest={MANIFEST_KEY: never})
    assert got["calibrated"] is True
    assert got["false_abstention_rate"] == 100.0 and got["unanswerable_abstention_rate"] == 100.0
