"""The stage wrapper every entry point runs in: status.json, one-line errors, Ctrl-C, sweeps.

The subprocess tests run a tiny Hydra entry (no models) through :func:`run_stage`, so they
see exactly what a user sees: exit status, stderr, status.json.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ragtune.errors import RagtuneError
from ragtune.paths import PROJECT_ROOT
from ragtune.stage import StageResult, run_stage
from ragtune.sweep import collect_runs, read_status

ENTRY = """
import logging
import time

import hydra

from ragtune.errors import RagtuneError
from ragtune.stage import StageResult, run_stage


def task(cfg):
    logging.getLogger("entry").info("starting %s", cfg.what)
    if cfg.what == "user":
        raise RagtuneError("data.corpus: /nowhere does not exist")
    if cfg.what == "bug":
        raise ValueError("a bug")
    if cfg.what == "wait":  # short sleeps: a signal the kernel hands to another thread
        for _ in range(1200):  # (the heartbeat's) still reaches the main thread within 0.1 s
            time.sleep(0.1)
    return StageResult(metric=0.5, details={"model_dir": "m"})


@hydra.main(version_base="1.3", config_path=None, config_name=None)
def main(cfg):
    return run_stage(task, cfg)


if __name__ == "__main__":
    main()
"""


def _entry(tmp_path: Path) -> Path:
    path = tmp_path / "entry.py"
    path.write_text(ENTRY)
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "HYDRA_FULL_ERROR": "0"}


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(_entry(tmp_path)), *args],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _single(tmp_path: Path, what: str) -> list[str]:
    run = tmp_path / "run"
    return [f"+what={what}", f"+output_dir={run}", f"hydra.run.dir={run}"]


# --------------------------------------------------------------------------- single runs
def test_ok_writes_the_metric_and_details(tmp_path):
    res = _run(tmp_path, *_single(tmp_path, "ok"))
    assert res.returncode == 0, res.stderr
    st = read_status(tmp_path / "run")
    assert (st["status"], st["metric"], st["model_dir"]) == ("ok", 0.5, "m")
    assert st["seconds"] >= 0


def test_user_error_is_one_line_and_exit_2(tmp_path):
    res = _run(tmp_path, *_single(tmp_path, "user"))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == "error: data.corpus: /nowhere does not exist"
    assert "Traceback" not in res.stderr
    st = read_status(tmp_path / "run")
    assert st["status"] == "failed" and "data.corpus" in st["error"] and "trace" not in st


def test_a_bug_keeps_its_traceback(tmp_path):
    res = _run(tmp_path, *_single(tmp_path, "bug"))
    assert res.returncode == 1
    assert "ValueError: a bug" in res.stderr and "Traceback" in res.stderr
    st = read_status(tmp_path / "run")
    assert st["status"] == "failed" and "ValueError" in st["trace"]


def test_ctrl_c_is_one_line_exit_130_and_status_interrupted(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(_entry(tmp_path)), *_single(tmp_path, "wait")],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a suite started in the background by a shell without job control inherits SIGINT
        # ignored, and Python then never raises KeyboardInterrupt: give the stage Ctrl-C's default
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.time() + 60
        while read_status(run).get("status") != "running":
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
    assert read_status(run)["status"] == "interrupted"


# --------------------------------------------------------------------------- multirun
def test_a_failed_multirun_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    res = _run(
        tmp_path,
        "-m",
        "+what=user,bug,ok",
        "+output_dir=${hydra:runtime.output_dir}",
        f"hydra.sweep.dir={sweep}",
    )
    assert res.returncode == 0, res.stderr
    rows = {r["settings"]["what"]: r for r in collect_runs(sweep)}
    assert rows["ok"]["status"] == "ok" and rows["ok"]["metric"] == 0.5
    assert rows["user"]["status"] == "failed" and "data.corpus" in rows["user"]["error"]
    assert rows["bug"]["status"] == "failed" and "a bug" in rows["bug"]["error"]


def test_multirun_failure_returns_nan(tmp_path, monkeypatch):
    import ragtune.stage

    monkeypatch.setattr(ragtune.stage, "is_multirun", lambda: True)
    cfg = OmegaConf.create({"output_dir": str(tmp_path)})

    def fail(cfg):
        raise RagtuneError("retriever.k: must be > 0")

    assert math.isnan(run_stage(fail, cfg))
    assert read_status(tmp_path)["status"] == "failed"
    monkeypatch.setattr(ragtune.stage, "is_multirun", lambda: False)
    with pytest.raises(SystemExit) as e:
        run_stage(fail, cfg)
    assert e.value.code == 2


def test_results_a_stage_may_return(tmp_path, monkeypatch):
    cfg = OmegaConf.create({"output_dir": str(tmp_path)})
    assert run_stage(lambda c: 3, cfg) == 3.0 and read_status(tmp_path)["metric"] == 3.0
    assert run_stage(lambda c: None, cfg) is None and read_status(tmp_path)["status"] == "ok"
    assert run_stage(lambda c: StageResult(1.5, {"mode": "x"}), cfg) == 1.5
    assert read_status(tmp_path)["mode"] == "x"
    # no run folder: no status; other torchrun ranks leave status to rank 0
    assert run_stage(lambda c: 1, OmegaConf.create({})) == 1.0
    monkeypatch.setenv("RANK", "1")
    other = tmp_path / "other"
    run_stage(lambda c: 1, OmegaConf.create({"output_dir": str(other)}))
    assert not (other / "status.json").exists()


def test_a_stage_that_exits_keeps_its_exit_status_and_is_recorded_failed(tmp_path):
    cfg = OmegaConf.create({"output_dir": str(tmp_path)})
    with pytest.raises(SystemExit) as e:
        run_stage(lambda c: sys.exit(3), cfg)
    assert e.value.code == 3
    st = read_status(tmp_path)
    assert (st["status"], st["error"]) == ("failed", "exit status 3")


def test_a_failed_multirun_job_logs_its_error(tmp_path, monkeypatch, caplog):
    """The sweep goes on, so the log is where a user sees which job failed and why."""
    import ragtune.stage

    monkeypatch.setattr(ragtune.stage, "is_multirun", lambda: True)

    def fail(cfg):
        raise RagtuneError("retriever.k: must be > 0")

    with caplog.at_level(logging.ERROR, logger="ragtune.stage"):
        run_stage(fail, OmegaConf.create({"output_dir": str(tmp_path)}))
    assert "run failed: RagtuneError: retriever.k: must be > 0" in caplog.text


def test_a_running_stage_refreshes_its_status(tmp_path, monkeypatch):
    """The heartbeat is how a reader on another host tells a live run from a dead one."""
    import ragtune.stage

    monkeypatch.setattr(ragtune.stage, "HEARTBEAT_S", 0.02)
    seen = []

    def task(cfg):
        for _ in range(20):
            time.sleep(0.02)
            seen.append(read_status(tmp_path)["seconds"])

    run_stage(task, OmegaConf.create({"output_dir": str(tmp_path)}))
    assert max(seen) > 0.1  # the first "running" said 0 seconds


def test_the_final_status_is_not_overwritten_by_a_late_heartbeat(tmp_path, monkeypatch):
    import ragtune.stage

    monkeypatch.setattr(ragtune.stage, "HEARTBEAT_S", 0.01)
    run_stage(lambda c: time.sleep(0.05), OmegaConf.create({"output_dir": str(tmp_path)}))
    time.sleep(0.1)  # several heartbeat periods
    assert read_status(tmp_path)["status"] == "ok"


def test_idle_openmp_threads_sleep_unless_the_user_chose_a_policy(monkeypatch):
    """Spinning OpenMP threads made a shared CPU several times slower; the user's setting wins."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "")  # so teardown restores what run_stage sets
    monkeypatch.delenv("OMP_WAIT_POLICY")
    run_stage(lambda c: None, OmegaConf.create({}))
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    run_stage(lambda c: None, OmegaConf.create({}))
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_logs_go_to_stderr(tmp_path):
    """stdout holds what the command prints; Hydra's console log handler is moved."""
    res = _run(tmp_path, *_single(tmp_path, "ok"))
    assert res.returncode == 0 and res.stdout == ""
    assert "starting ok" in res.stderr


_SLEEPER = """
import sys, time
from omegaconf import OmegaConf
from ragtune.stage import run_stage
run_stage(lambda cfg: time.sleep(120), OmegaConf.create({"output_dir": sys.argv[1]}))
"""


def test_a_killed_run_reads_as_dead_not_running(tmp_path):
    """status.json says running after a SIGKILL; readers see the dead pid (and, on another
    host, the stopped heartbeat)."""
    import json
    import signal
    import subprocess
    import sys
    import time

    from ragtune.sweep import STALE_S, collect_runs, read_status, write_status

    run = tmp_path / "sweep" / "0_x=1"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- x=1\n")
    proc = subprocess.Popen([sys.executable, "-c", _SLEEPER, str(run)])
    try:
        for _ in range(600):
            if (run / "status.json").exists():
                break
            time.sleep(0.1)
        assert read_status(run)["status"] == "running"  # alive: its pid answers
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    raw = json.loads((run / "status.json").read_text())
    assert raw["status"] == "running" and raw["pid"] == proc.pid
    st = read_status(run)
    assert st["status"] == "dead" and f"process {proc.pid} is gone" in st["error"]
    row = collect_runs(tmp_path / "sweep")[0]
    assert row["status"] == "failed" and "died without a final status" in row["error"]
    # a run on another machine: only the heartbeat tells
    write_status(run, "running")
    far = {**json.loads((run / "status.json").read_text()), "host": "elsewhere"}
    (run / "status.json").write_text(json.dumps(far))
    assert read_status(run)["status"] == "running"
    far["heartbeat"] -= STALE_S + 1
    (run / "status.json").write_text(json.dumps(far))
    assert "no heartbeat for" in read_status(run)["error"]
