"""The README is tested: every command block runs here with short settings, or is listed as
skipped with the reason, so the README cannot drift from the code.

Each shell command of README.md is matched against :data:`PLAN` (first match wins): ``run``
(the command as written, plus the short settings given: the 2-layer tiny LM, a few steps, a
tiny corpus), ``slow`` (the same, marked slow: over ~30 s on 2 cores) or ``skip`` (a reason:
GPU, hub, or another tool). A command the plan does not know fails
``test_every_readme_command_is_planned``. Python blocks are run against the same project.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ragtune.paths import PROJECT_ROOT

README = PROJECT_ROOT / "README.md"
TINY = "{tiny}"  # replaced by the tiny LM's folder
SHORT = [f"model.name_or_path={TINY}", "generate.max_new_tokens=4"]
TRAIN = [*SHORT, "train.max_steps=1", "data.max_records=6", "model.max_seq_length=256"]
EVAL = [*SHORT, "eval.max_questions=3", "eval.batch_size=3"]

# (command regex, kind, short settings or skip reason)
PLAN: list[tuple[str, str, list[str] | str]] = [
    (r"^make demo$", "skip", "the whole demo (~10 min on 2 cores); its steps run below"),
    (r"^make test$", "skip", "the test suite itself"),
    (r"^python train/sft\.py conf=nemo_rag --cfg job$", "run", []),
    (r"^python train/sft\.py conf=nemo_rag$", "skip", "GPU preset: Mistral-Nemo-12B from the hub"),
    (
        r"^python train/sft\.py model=gemma3$",
        "skip",
        "the optional .[gemma] package (253 MB): tests/test_models.py checks its tokenizer rebuild",
    ),
    (
        r"^python train/sft\.py model=qwen15$",
        "skip",
        "the optional .[qwen] packages (1.1 GB): tests/test_models.py checks how they are joined",
    ),
    (
        r"^python train/sft\.py conf=qwen_rag$",
        "skip",
        "the optional .[qwen] packages and a GPU: tests/test_config.py checks what the preset selects",
    ),
    (r"^python train/sft\.py raft=contrast$", "slow", TRAIN),
    (r"^python train/sft\.py raft=contrast raft\.swapped_twin=true$", "slow", TRAIN),
    (r"^python train/sft\.py train\.preference\.num_train_epochs=1$", "slow", TRAIN),
    (r"^python train/sft\.py -m ", "slow", [*TRAIN, "eval.max_questions=2"]),
    (r"^python train/sft\.py$", "slow", TRAIN),
    (r"^python serve/ask\.py model_dir=null$", "run", SHORT),
    (r"^python serve/ask\.py", "run", ["generate.max_new_tokens=4"]),
    (r"^RAGTUNE_API_KEY=secret python serve/server\.py", "server", []),
    (r"^python train/eval\.py .*data\.qa_eval=data/qa/ja_eval\.jsonl", "slow", EVAL),
    (r"^python train/eval\.py", "run", EVAL),
    (
        r"^python train/(index|sft)\.py retriever\.embedding_model=outputs/embedders",
        "skip",
        "needs the tuned embedder of the line above: tests/test_embed_ft.py runs that chain",
    ),
    (r"^python train/gen_qa\.py .*conf=nemo_rag", "skip", "GPU preset: Mistral-Nemo-12B"),
    (
        r"^python train/(gen_qa|sft)\.py data\.corpus=DIR",
        "skip",
        "DIR is the reader's folder: tests/test_gen_qa.py generates and trains end to end",
    ),
    (r"^pip install ", "skip", "installs the package: tests/test_install.py builds the wheel"),
    (r"^ragtune ", "skip", "the same Hydra apps as the scripts: tests/test_cli.py runs them"),
    (r"^python train/index\.py", "run", []),
    (r"^python train/embed_ft\.py", "skip", "tunes an embedder (minutes): tests/test_embed_ft.py"),
    (r"^python llama\.cpp/", "skip", "llama.cpp's converter is not a ragtune dependency"),
    (
        r"^(CONF=qwen_rag )?SQUAD=squad-v2\.json bash bench/squad_cpu\.sh ",
        "skip",
        "the SQuAD benchmark (~45 min on 2 cores; the preset's needs a GPU and a SQuAD file): "
        "tests/test_bench_scripts.py checks its stages and that CONF trains as the preset does",
    ),
]
PY_PLAN = {
    "from openai import OpenAI": "server",
    "from langchain_openai import ChatOpenAI": "server",
    "langchain_parts": "project",
}
QUESTION = "Who developed Corvanite?"


def code_blocks(lang: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def shell_commands() -> list[str]:
    """Every command of the README's bash blocks, its trailing comment removed."""
    out = []
    for block in code_blocks("bash"):
        for line in block.splitlines():
            cmd = re.split(r"\s+#\s", line, maxsplit=1)[0].strip()
            if cmd and not cmd.startswith("#"):
                out.append(cmd)
    return out


def plan_of(cmd: str) -> tuple[str, list[str] | str]:
    for pattern, kind, extra in PLAN:
        if re.search(pattern, cmd):
            return kind, extra
    return "unplanned", ""


def _params() -> list:
    params = []
    for cmd in shell_commands():
        kind, extra = plan_of(cmd)
        marks = [pytest.mark.slow] if kind == "slow" else []
        params.append(pytest.param(cmd, kind, extra, marks=marks, id=cmd[:70]))
    return params


def test_every_readme_command_is_planned():
    assert shell_commands(), "no commands found in README.md"
    missing = [c for c in shell_commands() if plan_of(c)[0] == "unplanned"]
    assert not missing, f"README commands not in tests/test_readme.py PLAN: {missing}"
    blocks = code_blocks("python")
    unplanned = [b[:60] for b in blocks if not any(k in b for k in PY_PLAN)]
    assert not unplanned, f"README python blocks not in PY_PLAN: {unplanned}"


# --------------------------------------------------------------------------- a user's project
@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_lm_path) -> Path:
    """A user's folder: a small corpus (English + the Japanese documents), the demo QA
    files, an index, and ``outputs/latest`` pointing at a model folder."""
    from test_rag import build_model_dir

    from ragtune.config import compose
    from ragtune.ingest import ingest
    from ragtune.rag import _get
    from ragtune.store import as_rcfg

    root = tmp_path_factory.mktemp("readme")
    src = PROJECT_ROOT / "data"
    for rel in ("towns/velmora.md", "materials/corvanite.md", "ja", "qa"):
        (root / "data" / "corpus" / rel).parent.mkdir(parents=True, exist_ok=True)
        s = src / ("corpus" if rel != "qa" else "") / rel
        d = root / "data" / ("corpus" if rel != "qa" else "") / rel
        shutil.copytree(s, d) if s.is_dir() else shutil.copy(s, d)
    # the user's QA is about the user's documents: keep the records whose source was copied
    # (training stops on answers no chunk supports, raft.max_unsupported_fraction)
    corpus = root / "data" / "corpus"
    for qa in ("demo.jsonl", "demo_eval.jsonl"):
        path = root / "data" / "qa" / qa
        kept = [
            line
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and (corpus / json.loads(line).get("source", "-")).exists()
        ]
        path.write_text("\n".join(kept) + "\n", encoding="utf-8")
    outputs = root / "outputs"
    cfg = compose("index", [f"paths.outputs={outputs}"])
    ingest(root / "data" / "corpus", as_rcfg(_get(cfg, "retriever")), show_progress=False)
    model, _ = build_model_dir(root / "model", tiny_lm_path)
    (outputs / "latest").symlink_to(model.parent)
    return root


def run_readme(
    cmd: str, extra: list[str], cwd: Path, tiny: str, **kw
) -> subprocess.CompletedProcess:
    """One README command as a user runs it in ``cwd``, plus the short settings."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("RAGTUNE_OUTPUTS", None)
    argv = shlex.split(cmd)
    while "=" in argv[0]:  # VAR=value prefixes
        k, v = argv.pop(0).split("=", 1)
        env[k] = v
    assert argv[0] == "python"
    script = str(PROJECT_ROOT / argv[1])
    args = [*argv[2:], *(e.replace(TINY, tiny) for e in extra)]
    return subprocess.run(
        [sys.executable, script, *args], cwd=cwd, env=env, capture_output=True, text=True, **kw
    )


@pytest.mark.parametrize(("cmd", "kind", "extra"), _params())
def test_readme_command(cmd, kind, extra, project, tmp_path, tiny_lm_path):
    if kind == "skip":
        pytest.skip(str(extra))
    if kind in ("server", "unplanned"):
        pytest.skip("run by test_readme_server_and_clients / reported by the plan test")
    cwd = project
    if cmd.startswith("python train/sft.py") and "--cfg" not in cmd:
        cwd = tmp_path / "own"  # training points outputs/latest: its own project copy
        shutil.copytree(project / "data", cwd / "data")
    stdin = f"{QUESTION}\n" if re.fullmatch(r"python serve/ask\.py( model_dir=null)?", cmd) else ""
    out = run_readme(cmd, list(extra), cwd, tiny_lm_path, input=stdin, timeout=1500)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    if "json=true" in cmd:
        assert set(json.loads(out.stdout.strip().splitlines()[-1])) >= {"answer", "sources"}
    if "--cfg job" in cmd:
        assert "Mistral-Nemo" in out.stdout
    if cmd.startswith("python train/sft.py -m"):
        sweeps = list((cwd / "outputs").rglob("summary.md"))
        assert sweeps and "Best overall" in sweeps[0].read_text()


def test_readme_server_and_clients(project, tiny_lm_path, monkeypatch):
    """The server line, then the README's OpenAI and ChatOpenAI blocks against it."""
    from test_server import free_port, stop_server

    cmd = next(c for c in shell_commands() if plan_of(c)[0] == "server")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("RAGTUNE_OUTPUTS", None)
    argv = shlex.split(cmd)
    while "=" in argv[0]:
        k, v = argv.pop(0).split("=", 1)
        env[k] = v
    log = project / "server.log"
    proc = subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / argv[1]), *argv[2:], f"server.port={port}",
         "generate.max_new_tokens=4"],
        cwd=project, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            import time

            time.sleep(0.5)
        for block in code_blocks("python"):
            if PY_PLAN.get(next((k for k in PY_PLAN if k in block), ""), "") != "server":
                continue
            code = block.replace("http://127.0.0.1:8000/v1", f"{base}/v1")
            exec(compile(code, "README.md", "exec"), {})
    finally:
        stop_server(proc)


def test_readme_langchain_block(project, monkeypatch):
    """The LCEL snippet, run from the user's folder (``outputs/latest`` from there), then asked."""
    block = next(b for b in code_blocks("python") if "langchain_parts" in b)
    monkeypatch.chdir(project)
    monkeypatch.delenv("RAGTUNE_OUTPUTS", raising=False)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert isinstance(scope["chain"].invoke(QUESTION), str)
