"""The SFT stage end to end on the tiny model: index, build, train, save, manifest."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ragtune.config import compose
from ragtune.manifest import read_manifest
from ragtune.paths import PROJECT_ROOT
from ragtune.schema import PromptSchema, get_schema


def _cfg(outputs: Path, tiny_lm_path: str, *extra: str):
    return compose(
        "sft",
        [
            f"output_dir={outputs / 'run'}",
            f"model.name_or_path={tiny_lm_path}",
            "model.max_seq_length=384",
            "retriever.chunk_size=400",
            "retriever.chunk_overlap=40",
            "data.max_records=12",
            "train.max_steps=3",
            "train.per_device_train_batch_size=4",
            "train.save_steps=100",
            *extra,
        ],
    )


def test_run_sft_writes_a_complete_model_folder(outputs, tiny_lm_path, monkeypatch):
    import ragtune.manifest
    from ragtune.modelcard import TRAIN_INFO
    from ragtune.training import run_sft

    real_write, seen = ragtune.manifest.write_manifest, []

    def write_manifest(model_dir, data):  # what the folder holds when the manifest is written
        seen.append(sorted(p.name for p in Path(model_dir).iterdir()))
        return real_write(model_dir, data)

    monkeypatch.setattr(ragtune.manifest, "write_manifest", write_manifest)
    cfg = _cfg(outputs, tiny_lm_path)
    result = run_sft(cfg)
    run = outputs / "run"
    # the manifest is written last: once, into a folder that already holds everything else
    assert len(seen) == 1 and "manifest.json" not in seen[0]
    assert sorted(p.name for p in (run / "model").iterdir()) == sorted([*seen[0], "manifest.json"])
    for name in (TRAIN_INFO, "prompt_schema.json", "tokenizer.json", "config.json"):
        assert name in seen[0], name
    last = (run / "model" / "manifest.json").stat().st_mtime_ns
    assert all(p.stat().st_mtime_ns <= last for p in (run / "model").iterdir())
    assert result.run_dir == run and result.model_dir == run / "model" and result.metrics is None
    model_dir = run / "model"
    manifest = read_manifest(model_dir)
    schema = get_schema("alpaca_rag_short")  # the default variant
    assert manifest["prompt"] == {
        "name": "alpaca_rag_short",
        "fingerprint": schema.fingerprint,
        "skeleton": schema.skeleton(),
    }
    assert PromptSchema.load(model_dir).fingerprint == schema.fingerprint
    r = manifest["retriever"]
    assert (r["embedding_model"], r["chunk_size"], r["chunk_overlap"], r["k"]) == (
        "minilm-l6",
        400,
        40,
        3,
    )
    for key in (
        "base_model",
        "backend",
        "train",
        "dataset_stats",
        "final_loss",
        "git_commit",
        "versions",
    ):
        assert key in manifest, key
    assert manifest["backend"] == "hf" and manifest["versions"]["transformers"] == "5.17.0"
    assert result.metric == pytest.approx(-manifest["final_loss"]) == -result.final_loss
    stats = json.loads((run / "dataset" / "stats.json").read_text())
    assert stats["examples"] == 12 and stats["kinds"]
    # 12 records are too few to fit an answer-or-abstain decision: none held out, none fitted
    assert "answerability" not in manifest and not (run / "dataset/calibration.jsonl").exists()
    assert (run / "dataset" / "preview.md").read_text().count("### Response:") >= 1
    assert not (run / "status.json").exists()  # the entry script's job, not the library's
    assert (outputs / "latest").resolve() == model_dir.resolve()
    assert list(model_dir.glob("*.safetensors")) and not list(model_dir.glob("*.bin"))


_KILLED_MANIFEST = """
import json, sys, time
from pathlib import Path
import ragtune.manifest as manifest
def half_dump(obj, f, **kw):
    f.write(json.dumps(obj)[:40])
    f.flush()
    print("ready", flush=True)
    time.sleep(600)
manifest.json.dump = half_dump
manifest.write_manifest(Path(sys.argv[1]), {"base_model": "base"})
"""


def test_a_kill_while_the_manifest_is_written_leaves_the_folder_incomplete(tmp_path):
    """SIGKILL mid-write: no manifest.json (only a hidden temp file), so nothing serves it."""
    from conftest import sigkill_when_ready

    from ragtune.manifest import ManifestError

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    sigkill_when_ready(_KILLED_MANIFEST, str(model_dir))
    assert not (model_dir / "manifest.json").exists()
    assert [p.name for p in model_dir.glob(".manifest-*")]  # the half-written temp file
    with pytest.raises(ManifestError, match="not a complete ragtune model folder"):
        read_manifest(model_dir)


@pytest.mark.parametrize(
    "features",
    [
        None,
        "margin,mean_lp,lp_abstain,p_abstain_first,grounded,retrieval",
        # computed only when asked for: by the calibration pass, then by eval_after's pipeline
        "abstain_logodds_rotated,retrieval",
    ],
)
def test_run_sft_fits_the_decision_on_held_out_sources(
    outputs, tiny_lm_path, monkeypatch, features
):
    import ragtune.answerability as answerability
    from ragtune.qa import gold_answers, load_qa
    from ragtune.training import calibration, run_sft

    monkeypatch.setattr(calibration, "MIN_QUESTIONS", 6)
    monkeypatch.setattr(calibration, "MIN_PER_CLASS", 1)
    # the tiny random model's answers are all wrong, whose cut is +inf (abstain on everything);
    # a finite cut shows the fitted decision lands
    monkeypatch.setattr(answerability, "expected_score_threshold", lambda *a, **k: 0.25)
    cfg = _cfg(
        outputs,
        tiny_lm_path,
        "data.max_records=40",
        "raft.calibration_fraction=0.25",
        "train.eval_after=true",
        "data.qa_eval=data/qa/demo_eval.jsonl",
        "eval.max_questions=3",
        *([f"raft.calibration_features=[{features}]"] if features else []),
    )
    result = run_sft(cfg)
    run = outputs / "run"
    held = load_qa(run / "dataset" / "calibration.jsonl")
    assert len(held) >= 10 and {r.answerable for r in held} == {True, False}
    trained = [json.loads(x) for x in (run / "dataset" / "train.jsonl").read_text().splitlines()]
    assert len(trained) == 40 - len(held)  # held-out questions never train
    assert not {e["instruction"] for e in trained} & {r.instruction for r in held}
    cal = read_manifest(run / "model")["answerability"]
    assert cal["threshold"] == 0.25 and cal["n_validation"] == len(held)
    assert set(cal["validation_sources"]) == {r.source for r in held}
    # the mix weighs the configured features (default: the first token's abstain log-odds and
    # the retrieval score), and serving scores with exactly those
    assert list(cal["weights"]) == (
        features.split(",") if features else ["abstain_logodds", "retrieval"]
    )
    assert result.metrics["calibrated"]  # eval_after applied the decision before the manifest
    rows = [json.loads(x) for x in (run / "calibration/answers.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [r.id for r in held]  # every held-out question, in order
    # each row carries its gold answers, so it can be re-scored alone (bench/calibration_variants.py)
    assert [r["gold"] for r in rows] == [list(gold_answers(h)) for h in held]
    assert any(r["gold"] for r in rows) and any(not r["gold"] for r in rows)
    fields = {f.name for f in dataclasses.fields(answerability.AnswerFeatures)}
    feats = [answerability.AnswerFeatures(**{k: r["features"][k] for k in fields}) for r in rows]
    scores = answerability.combine(feats, cal["weights"], cal["bias"])
    assert [r["score"] for r in rows] == pytest.approx(scores, abs=1e-3)
    assert [r["answered"] for r in rows] == [s >= 0.25 for s in scores]
    assert (run / "calibration/roc.png").stat().st_size > 1000


def test_calibrate_scores_each_candidate_against_its_gold_with_the_model_as_served(
    tmp_path, monkeypatch
):
    """The decision's cut weighs what answering earns: each held-out candidate's F1 against
    its own gold answers (the candidate, not the possibly abstaining text). The model answers
    loaded for inference (eval mode, adapter merged), as serving loads it."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    import ragtune.answerability as answerability
    import ragtune.loading as loading
    import ragtune.rag as rag
    import ragtune.roc as roc
    from ragtune.training.calibration import calibrate, save_validation
    from ragtune.types import QARecord

    held = [
        QARecord("Who developed Corvanite?", "Ismay Trelawn", source="a.md"),
        QARecord("Where is Velmora?", "in Ardent", source="a.md"),
        QARecord("Who is the mayor of Velmöra?", "", source="b.md"),
    ]
    save_validation(held, tmp_path / "dataset")
    candidates = {held[0].instruction: "Ismay Trelawn", held[1].instruction: "Ardent"}
    loaded: list[dict] = []

    def load_model(folder, **kwargs):
        loaded.append(kwargs)
        return object(), object()

    class Pipeline:
        def __init__(self, *args, **kwargs):
            pass

        def answer_batch(self, questions, inputs, batch_size):
            # the model is sure it must abstain only where the context lacks the answer
            return [
                SimpleNamespace(
                    candidate=candidates.get(q, "no idea"),
                    features=answerability.AnswerFeatures(
                        0.0, 1, 0.0, 0.1 if q in candidates else 0.9, 0.0
                    ),
                )
                for q in questions
            ]

    fitted: list[list[float]] = []
    plotted: dict[str, tuple] = {}
    real_fit = answerability.fit_calibration
    monkeypatch.setattr(roc, "plot_roc", lambda curves, path: plotted.update(curves))
    monkeypatch.setattr(loading, "load_model", load_model)
    monkeypatch.setattr(rag, "RagPipeline", Pipeline)
    monkeypatch.setattr(
        answerability,
        "fit_calibration",
        lambda feats, labels, f1, *a, **kw: (
            fitted.append(list(f1)) or real_fit(feats, labels, f1, *a, **kw)
        ),
    )
    cfg = OmegaConf.create(
        {
            "raft": {"calibration_features": ["abstain_logodds"]},
            "model": {"dtype": "float32", "trust_remote_code": False, "max_seq_length": 256},
            "retriever": {"context_tokens": 0},
            "eval": {"batch_size": 2},
        }
    )
    cal = calibrate(cfg, None, tmp_path / "model", object(), tmp_path)
    assert fitted == [[1.0, pytest.approx(2 / 3), 0.0]]  # "Ardent" vs "in Ardent": F1 2/3
    assert [kw["for_inference"] for kw in loaded] == [True]
    # a decision that answers some questions and not others is the one returned
    feats = [answerability.AnswerFeatures(0.0, 1, 0.0, p, 0.0) for p in (0.1, 0.1, 0.9)]
    assert cal is not None and cal.answers(feats) == [True, True, False]
    # what it was fitted on, for a person: each question as written, and each feature's ROC
    # turned the way the mix weighs it (abstaining is the unanswerable sign: negated)
    assert "Velmöra" in (tmp_path / "calibration" / "answers.jsonl").read_text(encoding="utf-8")
    assert cal.weights["abstain_logodds"] < 0 and "abstain_logodds" not in plotted
    assert plotted["-abstain_logodds"][0] == [-f.abstain_logodds for f in feats]
    assert plotted["margin"][0] == [f.margin for f in feats]  # not weighed: as it is


def _held_out(
    mode: str = "rag",
    fraction: float = 0.3,
    unanswerable_every: int = 3,
    n: int = 200,
    docs: int = 10,
):
    """calibration_split on n records over ``docs`` documents (every k-th unanswerable)."""
    from omegaconf import OmegaConf

    from ragtune.training.calibration import calibration_split
    from ragtune.types import QARecord

    records = [
        QARecord(f"q{i}", "" if i % unanswerable_every == 0 else "a", source=f"doc{i % docs}")
        for i in range(n)
    ]
    cfg = OmegaConf.create({"seed": 0, "raft": {"mode": mode, "calibration_fraction": fraction}})
    train, val = calibration_split(cfg, records)
    assert len(train) + len(val) == n
    return train, val


def test_calibration_holds_out_whole_documents_of_the_training_qa():
    train, val = _held_out()
    assert len(val) >= 0.3 * 200 and not {r.source for r in val} & {r.source for r in train}


def test_calibration_fits_on_exactly_the_minimum_it_needs(caplog):
    from ragtune.training.calibration import MIN_PER_CLASS, MIN_QUESTIONS

    caplog.set_level("INFO", logger="ragtune.training.calibration")
    train, val = _held_out(n=100, fraction=0.4)  # four documents of ten questions
    unanswerable = sum(not r.answerable for r in val)
    assert len(val) == MIN_QUESTIONS == 40 and unanswerable >= MIN_PER_CLASS and len(train) == 60
    assert "40% of the QA; raft.calibration_fraction=0.4) from 4 held-out" in caplog.text


def test_the_held_out_questions_are_saved_readable_and_forgotten_when_none(tmp_path):
    from ragtune.training.calibration import VALIDATION_FILE, save_validation
    from ragtune.types import QARecord

    save_validation([QARecord("月森焼はどこで作られますか?", "月森村", source="ja.md")], tmp_path)
    assert "月森焼はどこで作られますか" in (tmp_path / VALIDATION_FILE).read_text(encoding="utf-8")
    save_validation([], tmp_path)  # a rerun without calibration leaves no stale questions
    assert not (tmp_path / VALIDATION_FILE).exists()


@pytest.mark.parametrize(
    ("why", "kwargs"),
    [
        ("off", {"fraction": 0.0}),
        ("closed book: no retrieval to decide on", {"mode": "closed"}),
        ("too few questions", {"n": 60, "fraction": 0.5}),  # 30 held out: 20 + 10
        ("too few unanswerable ones", {"unanswerable_every": 1000}),
        ("too few source documents: one in all", {"docs": 1}),
    ],
)
def test_calibration_holds_nothing_out_when_it_cannot_fit(why, kwargs, caplog):
    train, val = _held_out(**kwargs)
    assert val == [] and len(train) == kwargs.get("n", 200), why
    # turned off is no reason to warn; a fit that cannot be made says why
    warned = [r for r in caplog.records if r.levelname == "WARNING"]
    assert bool(warned) == (why.startswith("too few")), why


@pytest.mark.parametrize("cut", [float("inf"), 1e9])
@pytest.mark.parametrize("extremes", ["apply", "ignore"])
def test_a_fit_that_abstains_on_everything_is_the_decision_unless_ignored(
    outputs, tiny_lm_path, monkeypatch, extremes, cut, caplog
):
    """When the fitted decision abstains on every held-out question (worthless answers: +inf;
    or a finite cut above all their scores), the manifest says so and every answer path
    abstains (apply); ``raft.calibration_extremes=ignore`` writes no decision."""
    import ragtune.answerability as answerability
    from ragtune.answerability import read_calibration
    from ragtune.training import calibration, run_sft

    monkeypatch.setattr(calibration, "MIN_QUESTIONS", 6)
    monkeypatch.setattr(calibration, "MIN_PER_CLASS", 1)
    monkeypatch.setattr(answerability, "expected_score_threshold", lambda *a, **k: cut)
    cfg = _cfg(
        outputs,
        tiny_lm_path,
        "data.max_records=24",
        "raft.calibration_fraction=0.25",
        f"raft.calibration_extremes={extremes}",
    )
    run_sft(cfg)
    cal = read_calibration(outputs / "run" / "model")
    assert "the fitted decision ends up abstaining on every held-out question" in caplog.text
    if extremes == "ignore":
        assert cal is None
    else:
        assert cal is not None and cal.threshold == cut and cal.n_validation >= 2


def test_closed_book_run_records_no_context(outputs, tiny_lm_path):
    from ragtune.training import run_sft

    run_sft(_cfg(outputs, tiny_lm_path, "raft.mode=closed", "train.save_method=lora"))
    first = json.loads((outputs / "run" / "dataset" / "train.jsonl").read_text().splitlines()[0])
    assert "\n### Context:\n" not in first["prompt"] and first["sources"] == []


_NO_MODEL = """
import runpy, sys
import ragtune.models
from transformers import AutoModelForCausalLM, AutoTokenizer
def loaded(*a, **k):
    print("error: a model was loaded before the refusal", file=sys.stderr)
    sys.exit(99)
ragtune.models.resolve_model = loaded
AutoModelForCausalLM.from_pretrained = AutoTokenizer.from_pretrained = loaded
sys.argv = ["train/sft.py", *sys.argv[1:]]
runpy.run_path("train/sft.py", run_name="__main__")
"""


def test_bad_config_stops_before_any_model_loads(outputs):
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _NO_MODEL,  # the entry script, with every model loader exiting 99
            "retriever.chunk_overlap=5000",
            f"paths.outputs={outputs}",
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: retriever.chunk_overlap")
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("eval_after", [True, False])
def test_a_sweep_ranks_by_eval_overall_when_asked_else_by_the_loss(
    outputs, tmp_path, monkeypatch, eval_after
):
    """The metric Hydra's sweeper optimises: the evaluation's overall score with
    train.eval_after, minus the final loss without it (the stages around it stubbed)."""
    import ragtune.evaluate
    import ragtune.training.calibration as calibration
    import ragtune.training.data as data
    import ragtune.training.recipe as recipe
    import ragtune.training.saving as saving

    cfg = compose("sft", [f"output_dir={tmp_path / 'run'}", f"train.eval_after={eval_after}"])
    staged = tmp_path / "run" / ".new-model"
    monkeypatch.setattr(data, "shared_dataset", lambda c, o: ([], {}, None, o))
    monkeypatch.setattr(recipe, "train", lambda *a, **k: recipe.TrainResult(staged, 0.25))
    monkeypatch.setattr(calibration, "calibrate", lambda *a, **k: None)
    evaluated = []

    def evaluate_model(cfg, model_dir, manifest):
        evaluated.append(model_dir)
        return {"overall": 71.5, "f1": 60.0}

    monkeypatch.setattr(ragtune.evaluate, "evaluate_model", evaluate_model)
    monkeypatch.setattr(recipe, "_write_manifest", lambda *a: None)
    monkeypatch.setattr(saving, "publish_model", lambda staged, final: final)
    sft = recipe.run_sft(cfg)
    if eval_after:
        assert evaluated == [staged]  # the staged model, before it replaces model/
        assert sft.metric == 71.5 and sft.metrics == {"overall": 71.5, "f1": 60.0}
    else:
        assert evaluated == [] and sft.metric == -0.25 and sft.metrics is None
