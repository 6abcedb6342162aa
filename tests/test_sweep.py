"""Sweep summary: the Hydra callback on fake run folders (fast) and on a real tiny multirun."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from ragtune.paths import PROJECT_ROOT
from ragtune.sweep import SweepSummary, collect_runs, read_status, summarize_sweep, write_status

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_run(sweep: Path, num: int, overrides: list[str], status: dict | None) -> Path:
    run = sweep / f"{num}_{','.join(overrides)}"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num}}}))
    if status is not None:
        write_status(run, **status)
    return run


def _metrics(overall: float, f1: float) -> dict:
    return {
        "overall": overall,
        "f1": f1,
        "exact_match": f1 / 2,
        "false_abstention_rate": 10.0,
        "unanswerable_abstention_rate": 80.0,
        "recall_at_k": 90.0,
        "latency_s": 0.5,
    }


@pytest.fixture()
def fake_sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "sweep"
    ok = "ok"
    _fake_run(
        sweep,
        0,
        ["retriever.chunk_size=500", "prompt=alpaca_rag"],
        {"status": ok, "metric": 40.0, "metrics": _metrics(40.0, 30.0), "final_loss": 1.2},
    )
    _fake_run(
        sweep,
        1,
        ["retriever.chunk_size=1000", "prompt=alpaca_rag"],
        {"status": ok, "metric": 55.5, "metrics": _metrics(55.5, 41.0), "final_loss": 1.1},
    )
    _fake_run(
        sweep,
        2,
        ["retriever.chunk_size=500", "prompt=alpaca_rag_short"],
        {"status": "failed", "error": "TrainError: out of memory\ntraceback..."},
    )
    killed = _fake_run(
        sweep,
        3,
        ["retriever.chunk_size=1000", "prompt=alpaca_rag_short"],
        {"status": "running"},
    )
    (killed / "status.json").write_text('{"status": "running"}')  # killed: no pid, no heartbeat
    _fake_run(sweep, 10, ["retriever.chunk_size=2000", "prompt=alpaca_rag"], None)  # no status
    # an override value with a slash nests Hydra's run folder: still found
    nested = sweep / "11_data.corpus=" / "tmp" / "corpus,prompt=alpaca_rag"
    (nested / ".hydra").mkdir(parents=True)
    (nested / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump(["data.corpus=/tmp/corpus", "prompt=alpaca_rag"])
    )
    write_status(nested, "ok", metric=12.0, metrics=_metrics(12.0, 5.0))
    (sweep / "multirun.yaml").write_text("{}")  # not a run folder
    return sweep


def test_collect_runs_reads_settings_status_and_metrics(fake_sweep: Path) -> None:
    rows = collect_runs(fake_sweep)
    assert [r["num"] for r in rows] == [0, 1, 2, 3, 10, 11]  # by job number, not by name
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "failed", "failed", "ok"]
    assert rows[5]["run"] == "11_data.corpus=/tmp/corpus,prompt=alpaca_rag"
    assert rows[5]["settings"]["data.corpus"] == "/tmp/corpus" and rows[5]["overall"] == 12.0
    assert rows[4]["error"].startswith("no status.json")
    assert rows[1]["settings"] == {"retriever.chunk_size": "1000", "prompt": "alpaca_rag"}
    assert rows[1]["overall"] == 55.5 and rows[1]["f1"] == 41.0 and rows[1]["final_loss"] == 1.1
    assert rows[2]["error"] == "TrainError: out of memory"
    assert "killed" in rows[3]["error"]
    assert rows[2]["overall"] is None


def test_summary_files(fake_sweep: Path) -> None:
    result = summarize_sweep(fake_sweep)
    assert result.swept == ["retriever.chunk_size", "prompt", "data.corpus"]
    with result.csv.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    assert rows[0]["retriever.chunk_size"] == "500" and rows[0]["prompt"] == "alpaca_rag"
    assert float(rows[1]["overall"]) == 55.5 and rows[2]["status"] == "failed"
    assert rows[2]["overall"] == "" and rows[2]["error"].startswith("TrainError")
    md = result.markdown.read_text()
    assert "6 runs, 3 failed." in md
    assert "Best overall: **55.50** in run 1." in md
    assert "| run | status | retriever.chunk_size | prompt | data.corpus | overall | f1 |" in md
    assert "| 1 | ok | 1000 | alpaca_rag |  | 55.5 | 41 |" in md
    assert "## Failed runs" in md and "out of memory" in md
    assert result.plot is not None and result.plot.read_bytes()[:8] == PNG_MAGIC
    assert result.plot.stat().st_size > 5000  # an actual figure, not an empty canvas


def test_callback_on_multirun_end_and_on_job_end(fake_sweep: Path, tmp_path: Path) -> None:
    from hydra.core.utils import JobReturn, JobStatus
    from hydra.types import RunMode

    cb = SweepSummary(metric="f1")
    # a job whose exception escaped the task function is recorded as failed
    run = tmp_path / "job"
    cfg = OmegaConf.create(
        {"hydra": {"mode": RunMode.MULTIRUN, "runtime": {"output_dir": str(run)}}}
    )
    ret = JobReturn(status=JobStatus.FAILED)
    ret.return_value = RuntimeError("boom")
    cb.on_job_end(cfg, ret)
    st = read_status(run)
    assert (st["status"], st["error"]) == ("failed", "RuntimeError: boom")
    # ... but a completed job, or a single run, is left alone
    other = tmp_path / "job2"
    done = JobReturn(status=JobStatus.COMPLETED)
    done.return_value = 1.0
    cb.on_job_end(
        OmegaConf.create(
            {"hydra": {"mode": RunMode.MULTIRUN, "runtime": {"output_dir": str(other)}}}
        ),
        done,
    )
    single = OmegaConf.create(
        {"hydra": {"mode": RunMode.RUN, "runtime": {"output_dir": str(other)}}}
    )
    cb.on_job_end(single, ret)
    assert not other.exists()

    cb.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(fake_sweep)}}}))
    md = (fake_sweep / "summary.md").read_text()
    assert "Best f1: **41.00**" in md
    assert (fake_sweep / "summary.csv").exists() and (fake_sweep / "summary.png").exists()


def test_summary_without_finished_runs_writes_table_but_no_plot(tmp_path: Path) -> None:
    sweep = tmp_path / "s"
    _fake_run(sweep, 0, ["train.lora.r=8"], {"status": "failed", "error": "x"})
    result = summarize_sweep(sweep)
    assert result.plot is None and "1 runs, 1 failed." in result.markdown.read_text()


def _tiny_data(root: Path) -> tuple[Path, Path]:
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    (corpus / "velmora.md").write_text(
        "# Velmora\n\nVelmora is a lake town. Its Lantern Tide festival is held on the second "
        "Saturday of October, when the Keeper of the Wick lights the first lantern.\n"
    )
    (corpus / "corvanite.md").write_text(
        "# Corvanite\n\nCorvanite is a heavy copper-nickel alloy developed by Ismay Trelawn at "
        "the Brindlecombe Metallurgical Works for ship propellers.\n"
    )
    qa = root / "qa.jsonl"
    rows = [
        {
            "instruction": "When is the Lantern Tide held?",
            "output": "second Saturday of October",
            "source": "velmora.md",
        },
        {
            "instruction": "Who developed Corvanite?",
            "output": "Ismay Trelawn",
            "source": "corvanite.md",
        },
        {"instruction": "Who is the mayor of Velmora?", "output": "", "source": "velmora.md"},
        {
            "instruction": "What is Corvanite used for?",
            "output": "ship propellers",
            "source": "corvanite.md",
        },
    ]
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return corpus, qa


@pytest.mark.slow
def test_tiny_multirun_trains_evaluates_and_summarises(tmp_path: Path, tiny_lm_path: str) -> None:
    """python train/sft.py -m over two chunk sizes: two run folders, one summary + plot."""
    corpus, qa = _tiny_data(tmp_path / "data")
    outputs = tmp_path / "outputs"
    sweep = outputs / "sweep"
    env = {**os.environ, "RAGTUNE_OUTPUTS": str(outputs), "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "train/sft.py",
        "-m",
        "retriever.chunk_size=120,200",
        "retriever.chunk_overlap=20",
        f"model.name_or_path={tiny_lm_path}",
        "model.max_seq_length=256",
        f"data.corpus={corpus}",
        f"data.qa_train={qa}",
        f"data.qa_eval={qa}",
        "train.max_steps=2",
        "train.per_device_train_batch_size=2",
        "train.eval_after=true",
        "train.save_method=lora",
        "eval.batch_size=4",
        f"hydra.sweep.dir={sweep}",
    ]
    res = subprocess.run(
        cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    runs = [sweep / r["run"] for r in collect_runs(sweep)]  # path overrides nest the folders
    assert len(runs) == 2
    for run in runs:
        st = read_status(run)
        assert st["status"] == "ok", st
        assert st["metrics"]["mode"] == "raft_rag" and 0.0 <= st["metrics"]["overall"] <= 100.0
        assert (run / "eval" / "metrics.json").exists() and (
            run / "eval" / "answers.jsonl"
        ).exists()
    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["retriever.chunk_size"] for r in rows] == ["120", "200"]
    assert all(r["status"] == "ok" and r["overall"] != "" for r in rows)
    assert "| run | status |" in (sweep / "summary.md").read_text()
    assert (sweep / "summary.png").read_bytes()[:8] == PNG_MAGIC


def test_plot_shows_both_abstention_errors(fake_sweep: Path, monkeypatch) -> None:
    from matplotlib.axes import Axes

    titles: list[str] = []
    real = Axes.set_title
    monkeypatch.setattr(
        Axes, "set_title", lambda ax, t, *a, **k: (titles.append(t), real(ax, t))[1]
    )
    summarize_sweep(fake_sweep)
    assert "false_abstention_rate" in titles and "unanswerable_abstention_rate" in titles


def test_a_sweep_of_training_loss_alone_is_not_ranked(tmp_path: Path) -> None:
    sweep = tmp_path / "s"
    for num, lr in enumerate(("1e-4", "5e-4")):
        _fake_run(sweep, num, [f"train.learning_rate={lr}"], {"status": "ok", "metric": 1.0 + num})
    md = summarize_sweep(sweep).markdown.read_text()
    assert "Best" not in md and "train.eval_after=true" in md
