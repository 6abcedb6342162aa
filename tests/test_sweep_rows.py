"""Sweep summary rows from fake run folders: what is a run, where its numbers come from, and
what the summary shows (ragtune/sweep.py); each test fails when its rule breaks."""

from __future__ import annotations

import json
import socket
import time

from ragtune.sweep import collect_runs, read_status, summarize_sweep, write_status
from tests.test_sweep import _fake_run


def test_settings_every_run_shares_are_listed_once_and_only_reported_metrics_get_columns(tmp_path):
    sweep = tmp_path / "sweep"
    for num, size, overall in ((0, 500, 40.0), (1, 1000, 55.0)):
        status = {"status": "ok", "metric": overall, "metrics": {"overall": overall, "f1": 30.0}}
        _fake_run(sweep, num, [f"retriever.chunk_size={size}", "train.learning_rate=1e-4"], status)
    result = summarize_sweep(sweep)
    assert result.swept == ["retriever.chunk_size"]
    md = result.markdown.read_text()
    assert "Same in every run: `train.learning_rate=1e-4`" in md
    assert "| run | status | retriever.chunk_size | overall | f1 | metric |" in md


def test_hidden_folders_are_not_runs(tmp_path):
    sweep = tmp_path / "sweep"
    _fake_run(sweep, 0, ["k=1"], {"status": "ok"})
    _fake_run(sweep / ".cache", 5, ["k=2"], {"status": "ok"})
    assert [r["run"] for r in collect_runs(sweep)] == ["0_k=1"]


def test_an_evaluation_run_is_read_from_its_metrics_file(tmp_path):
    """No status.json but metrics.json: ok, with raft_rag's numbers (the headline mode), in the
    run folder or its eval/ folder; no status and no metrics: failed."""
    sweep = tmp_path / "sweep"
    modes = {"base_rag": {"overall": 20.0}, "raft_rag": {"overall": 61.0}}
    here = _fake_run(sweep, 0, ["k=1"], None)
    (here / "metrics.json").write_text(json.dumps({"modes": modes}))
    below = _fake_run(sweep, 1, ["k=2"], {"status": "ok"})
    (below / "eval").mkdir()
    (below / "eval" / "metrics.json").write_text(
        json.dumps({"modes": {"ft_then_rag": {"f1": 9.0}}})
    )
    _fake_run(sweep, 2, ["k=3"], None)
    rows = collect_runs(sweep)
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    assert rows[0]["overall"] == 61.0 and rows[1]["f1"] == 9.0


def test_a_status_file_that_is_not_an_object_reads_as_none(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "status.json").write_text("[1, 2]")
    assert read_status(run) == {}


def test_not_a_number_is_no_number_and_a_failed_run_is_never_best(tmp_path):
    sweep = tmp_path / "sweep"
    _fake_run(sweep, 0, ["k=1"], {"status": "ok", "metrics": {"overall": float("nan")}})
    _fake_run(sweep, 1, ["k=2"], {"status": "ok", "metrics": {"overall": 50.0}})
    _fake_run(sweep, 2, ["k=3"], {"status": "failed", "metrics": {"overall": 99.0}})
    rows = collect_runs(sweep)
    assert rows[0]["overall"] is None
    assert "Best overall: **50.00** in run 1." in summarize_sweep(sweep).markdown.read_text()


def test_a_setting_with_a_pipe_does_not_break_the_table(tmp_path):
    sweep = tmp_path / "sweep"
    _fake_run(sweep, 0, ["eval.abstain_text=a|b"], {"status": "ok"})
    _fake_run(sweep, 1, ["eval.abstain_text=c"], {"status": "ok"})
    assert "| 0 | ok | a\\|b |" in summarize_sweep(sweep).markdown.read_text()


def test_a_run_on_another_machine_is_judged_by_its_heartbeat_not_a_local_pid(tmp_path):
    run = tmp_path / "run"
    write_status(run, "running")
    st = json.loads((run / "status.json").read_text())
    st |= {
        "host": socket.gethostname() + "-elsewhere",
        "pid": 2**22 + 12345,
        "heartbeat": time.time(),
    }
    (run / "status.json").write_text(json.dumps(st))
    assert read_status(run)["status"] == "running"
    st["host"] = socket.gethostname()  # here that pid is gone: dead
    (run / "status.json").write_text(json.dumps(st))
    assert read_status(run)["status"] == "dead"
