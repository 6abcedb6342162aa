"""A wheel built from the repo installs and answers: ``pip install`` + ``ragtune ask``.

Offline: the wheel is built without build isolation, installed with ``--no-index --no-deps``
into a fresh venv, and the pinned dependencies come from the venv running the tests (a .pth
file added after the install, so pip never sees them and never touches that venv).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from ragtune.paths import PROJECT_ROOT

pytestmark = pytest.mark.slow

QUESTION = "What's the 東京 festival, naïve? Who developed Corvanite?"


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert res.returncode == 0, f"{cmd}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res


def _build_wheel(tmp: Path) -> Path:
    """From a copy of the sources, so the build leaves nothing in the checkout."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(PROJECT_ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("ragtune", "conf", "prompts"):
        shutil.copytree(PROJECT_ROOT / name, src / name, symlinks=True, ignore=ignore)
    dist = tmp / "dist"
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    _run([*pip, "-w", str(dist), str(src)])
    (wheel,) = dist.glob("ragtune-*.whl")
    return wheel


def _venv(tmp: Path, wheel: Path) -> Path:
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-index", "--no-deps",
          str(wheel)])  # fmt: skip
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "zz_pinned_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def test_wheel_installs_and_ragtune_ask_answers_from_another_folder(tmp_path, tiny_lm_path):
    from test_rag import build_model_dir

    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    for data in ("ragtune/conf/ask.yaml", "ragtune/conf/retriever/minilm.yaml"):
        assert data in names
    assert "ragtune/prompts/alpaca_rag_short.yaml" in names
    venv = _venv(tmp_path, wheel)

    project = tmp_path / "project"  # the user's folder: its own documents, index and model
    build_model_dir(project, tiny_lm_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONPATH", "RAGTUNE_"))}
    env.update(HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8")
    python = str(venv / "bin" / "python")
    where = _run(
        [python, "-c", "import ragtune.paths as p, ragtune.schema as s; "
         "print(p.CONF_DIR); print(s.get_schema('alpaca_rag_short').name)"],
        cwd=project, env=env,
    ).stdout.split()  # fmt: skip
    assert Path(where[0]).is_relative_to(venv) and where[1] == "alpaca_rag_short"

    res = _run(
        [str(venv / "bin" / "ragtune"), "ask", QUESTION, "model_dir=run/model", "json=true",
         "generate.max_new_tokens=4"],
        cwd=project, env=env, encoding="utf-8",
    )  # fmt: skip
    obj = json.loads(res.stdout.strip().splitlines()[-1])
    assert obj["question"] == QUESTION and obj["sources"]
    assert {s["source"] for s in obj["sources"]} <= {
        "towns/velmora.md",
        "towns/vellacourt.txt",
        "materials/corvanite.md",
        "notes/harbour.md",
    }
    assert list((project / "outputs" / "runs" / "ask").iterdir())  # outputs under ./outputs
