"""bench/squad_cpu.sh runs the stages it is asked for: a stand-in python records every stage's
command line, so the script's own logic (which stages, which overrides) is checked in a second."""

import os
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$RECORD"
for a in "$@"; do case $a in hydra.run.dir=*eval) mkdir -p "${a#*=}"; : > "${a#*=}/results.md";; esac; done
"""


def _stages(tmp_path: Path, modes: str | None) -> list[str]:
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    record = tmp_path / "record.txt"
    env = {k: v for k, v in os.environ.items() if k != "MODES"}
    env.update(PYTHON=str(fake), RECORD=str(record), SQUAD="squad.json")
    if modes is not None:
        env["MODES"] = modes
    subprocess.run(
        ["bash", "bench/squad_cpu.sh", str(tmp_path / "b"), "0"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return record.read_text().splitlines()


@pytest.mark.parametrize(
    ("modes", "closed", "eval_modes"),
    [
        (None, True, None),
        ("raft_rag", False, "eval.modes=[raft_rag]"),
        ("base_rag raft_rag", False, "eval.modes=[base_rag,raft_rag]"),
        ("ft_then_rag raft_rag", True, "eval.modes=[ft_then_rag,raft_rag]"),
    ],
)
def test_squad_cpu_trains_the_closed_book_model_only_for_the_modes_that_need_it(
    tmp_path: Path, modes: str | None, closed: bool, eval_modes: str | None
) -> None:
    calls = _stages(tmp_path, modes)
    scripts = [c.split()[0] for c in calls]
    assert scripts[:2] == ["train/prepare_squad.py", "train/sft.py"]
    assert scripts[-1] == "train/eval.py"
    trained_closed = any("raft.mode=closed" in c for c in calls)
    assert trained_closed == closed
    evaluation = calls[-1].split()
    assert any(a.startswith("eval.models.ft_closed=") for a in evaluation) == closed
    assert any(a.startswith("eval.models.raft_rag=") for a in evaluation)
    if eval_modes is None:
        assert not any(a.startswith("eval.modes=") for a in evaluation)
    else:
        assert eval_modes in evaluation
