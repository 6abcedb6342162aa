"""serve/demo.py's training step: a failure is one line the user can act on."""

import importlib.util
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _demo():
    spec = importlib.util.spec_from_file_location("demo", ROOT / "serve" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fail_with(monkeypatch, returncode: int) -> list[str]:
    calls: list[list[str]] = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, returncode)

    monkeypatch.setattr(subprocess, "run", run)
    return calls


def test_a_killed_training_run_says_how_to_continue_it(tmp_path, monkeypatch):
    """conf=qwen_rag's preference step was OOM-killed on a 24 GiB CPU after a 37-minute SFT:
    the demo names the signal, the likely cause with the setting that helps, and the command
    that resumes the same run from its checkpoints (nothing saved is lost)."""
    demo = _demo()
    calls = _fail_with(monkeypatch, -9)
    with pytest.raises(SystemExit) as e:
        demo._train(tmp_path, ["conf=qwen_rag"])
    msg = str(e.value)
    run_dir = calls[0][-1].split("=", 1)[1]
    assert "\n" not in msg and "SIGKILL" in msg and "train.gradient_checkpointing=true" in msg
    resume = msg.split(": ")[-1].split()
    assert resume[:2] == ["python", "train/sft.py"]
    assert resume[2:] == [
        *demo.DEMO_OVERRIDES,
        "conf=qwen_rag",
        "train.resume=true",
        f"hydra.run.dir={run_dir}",
    ]


def test_a_failed_training_run_gives_its_exit_status(tmp_path, monkeypatch):
    demo = _demo()
    _fail_with(monkeypatch, 2)
    with pytest.raises(SystemExit, match=r"^demo: train/sft.py failed with exit status 2$"):
        demo._train(tmp_path, [])
