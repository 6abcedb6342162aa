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


def _held_out(mode: str = "rag", fraction: float = 0.3, unanswerable_every: int = 3, n: int = 200):
    """calibration_split on n records over 10 documents (every k-th unanswerable)."""
    from omegaconf import OmegaConf

    from ragtune.training.calibration import calibration_split
    from ragtune.types import QARecord

    records = [
        QARecord(f"q{i}", "" if i % unanswerable_every == 0 else "a", source=f"doc{i % 10}")
        for i in range(n)
    ]
    cfg = OmegaConf.create({"seed": 0, "raft": {"mode": mode, "calibration_fraction": fraction}})
    train, val = calibration_split(cfg, records)
    assert len(train) + len(val) == n
    return train, val


def test_calibration_holds_out_whole_documents_of_the_training_qa():
    train, val = _held_out()
    assert len(val) >= 0.3 * 200 and not {r.source for r in val} & {r.source for r in train}


@pytest.mark.parametrize(
    ("why", "kwargs"),
    [
        ("off", {"fraction": 0.0}),
        ("closed book: no retrieval to decide on", {"mode": "closed"}),
        ("too few questions", {"n": 60, "fraction": 0.5}),  # 30 held out: 20 + 10
        ("too few unanswerable ones", {"unanswerable_every": 1000}),
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
    outputs, tiny_lm_path, monkeypatch, extremes, cut
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
