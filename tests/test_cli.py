"""The command line: ``ragtune <command>`` and the entry scripts run the same Hydra apps;
``ask`` takes its question verbatim; paths resolve from the current directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from ragtune.cli import COMMANDS, split_question
from ragtune.config import compose
from ragtune.paths import PROJECT_ROOT, current_project, outputs_root, resolve_path
from ragtune.sweep import read_status

QUESTION = "What's the 東京 festival, naïve? (a=b, ${oc.env:HOME}) 'quoted' \"too\""

# A process that runs the real command line with a pipeline that only records what it was
# asked: the question's way from argv/stdin to the pipeline, in seconds, without a model.
FAKE_RUNNER = """
import json, os, sys, types

from ragtune.errors import RagtuneError


class Answer:
    text, abstained, sources, latency_s, retrieval_s = "an answer", False, [], 0.0, 0.0
    new_tokens, stop_reason, score, candidate = 1, "eos", None, None

    def to_dict(self):
        return {"answer": self.text, "abstained": False, "sources": []}


class Stream:
    def __init__(self, answer):
        self.answer = answer

    def __iter__(self):
        yield self.answer.text


class Pipeline:
    generator = types.SimpleNamespace(settings=types.SimpleNamespace(stream=True))

    def answer(self, q):
        with open(os.environ["ASKED"], "a", encoding="utf-8") as f:
            f.write(json.dumps(q) + "\\n")
        return Answer()

    def stream(self, q):
        return Stream(self.answer(q))


# ragtune.rag without torch: what ask imports from it
rag = types.ModuleType("ragtune.rag")
rag.ASK_TOP_LEVEL = {"model_dir": str, "question": str, "json": bool, "allow_mismatch": bool}
rag.PipelineError = type("PipelineError", (RagtuneError,), {})
rag.open_pipeline = lambda cfg, *a, **k: Pipeline()
sys.modules["ragtune.rag"] = rag
from ragtune.cli import main, run_command

if sys.argv[1] == "script":  # what serve/ask.py does
    run_command("ask", sys.argv[2:])
else:
    main(sys.argv[1:])
"""


def _ask_fake(tmp_path: Path, *args: str, stdin: str | None = None) -> tuple[list[str], str]:
    runner = tmp_path / "runner.py"
    runner.write_text(FAKE_RUNNER)
    asked = tmp_path / "asked.jsonl"
    asked.unlink(missing_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(PROJECT_ROOT),
        "ASKED": str(asked),
        "RAGTUNE_OUTPUTS": str(tmp_path / "outputs"),
        "PYTHONIOENCODING": "utf-8",
    }
    res = subprocess.run(
        [sys.executable, str(runner), *args],
        input=stdin if stdin is not None else "",
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = [json.loads(line) for line in asked.read_text(encoding="utf-8").splitlines()]
    return got, res.stdout


# --------------------------------------------------------------------------- the question
def test_split_question_keeps_overrides_options_and_the_question_apart():
    assert split_question(["model_dir=x", "What's", "up,", "東京?", "json=true"]) == (
        ["model_dir=x", "json=true"],
        "What's up, 東京?",
    )
    assert split_question(["--cfg", "job", "-m", "+a.b=1", "~c", "Hi"]) == (
        ["--cfg", "job", "-m", "+a.b=1", "~c"],
        "Hi",
    )
    assert split_question(["question=a=b, c's", "k=1"]) == (["k=1"], "a=b, c's")
    assert split_question(["k=1", "--", "-5 degrees", "x=1?"]) == (["k=1"], "-5 degrees x=1?")
    assert split_question(["question=null", "k=1"]) == (["question=null", "k=1"], None)
    assert split_question(["--info", "defaults", "k=1"]) == (["--info", "defaults", "k=1"], None)
    assert split_question([]) == ([], None)


def test_question_reaches_the_pipeline_verbatim(tmp_path):
    """Positional (console and script), ``question=`` and after ``--``: no Hydra grammar."""
    got, out = _ask_fake(tmp_path, "ask", QUESTION, "json=true", "allow_mismatch=false")
    assert got == [QUESTION]
    assert json.loads(out.strip())["question"] == QUESTION
    got, out = _ask_fake(tmp_path, "script", f"question={QUESTION}")
    assert got == [QUESTION] and f"Q: {QUESTION}\nA: an answer" in out
    got, _ = _ask_fake(tmp_path, "ask", "--", "-5", "degrees,", "what's", "that?")
    assert got == ["-5 degrees, what's that?"]


def test_questions_on_stdin_are_taken_verbatim_one_per_line(tmp_path):
    got, out = _ask_fake(tmp_path, "ask", "json=true", stdin=f"{QUESTION}\n\n  東京はどこ？ \n")
    assert got == [QUESTION, "東京はどこ？"]
    assert [json.loads(line)["question"] for line in out.splitlines()] == got


# --------------------------------------------------------------------------- ask output
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_lm_path) -> Path:
    from test_rag import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("cli"), tiny_lm_path)[0]


def _ask_cfg(tmp: Path, *overrides: str):
    return compose("ask", [f"paths.outputs={tmp / 'outputs'}", *overrides])


def test_ask_json_prints_one_object(model_dir, tmp_path, capsys):
    from ragtune.cli import ask

    cfg = _ask_cfg(
        tmp_path,
        f"model_dir={model_dir}",
        "question=Who developed Corvanite?",
        "json=true",
        "generate.max_new_tokens=4",
    )
    answers = ask(cfg)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and len(answers) == 1
    obj = json.loads(out[0])
    assert obj["question"] == "Who developed Corvanite?"
    assert obj["answer"] == answers[0].text
    assert obj["sources"][0] == {
        "source": "materials/corvanite.md",
        "start": answers[0].sources[0][1],
        "score": answers[0].sources[0][2],
    }
    assert isinstance(obj["abstained"], bool)


def test_ask_streams_and_lists_sources(model_dir, tmp_path, capsys):
    from ragtune.cli import ask

    cfg = _ask_cfg(tmp_path, f"model_dir={model_dir}", "generate.max_new_tokens=4")
    answers = ask(cfg, questions=["Who developed Corvanite?", "When is Ember Tide?"])
    out = capsys.readouterr().out
    assert out.count("Q: ") == 2 and out.count("abstained: ") == 2
    assert "1. materials/corvanite.md @ 0  score " in out
    assert f"A: {answers[0].text}\n" in out


def test_ask_shows_the_support_score_and_the_answer_it_held_back():
    """With a calibrated model a user sees why it abstained: the score against the threshold
    and the answer the decision held back; an uncalibrated answer shows no score."""
    from ragtune.answer import Answer
    from ragtune.cli import describe_answer

    src = [("a.md", 0, 0.61)]
    held = Answer("I dont know", True, src, "p", 0.1, score=-1.24, candidate="the Treaties")
    out = describe_answer(held, threshold=0.24)
    assert "abstained: yes\nsupport: -1.24 (< threshold +0.24)\nheld back: the Treaties\n" in out
    given = Answer("the Treaties", False, src, "p", 0.1, score=1.5, candidate="the Treaties")
    out = describe_answer(given, threshold=0.24)
    assert "support: +1.50 (>= threshold +0.24)" in out and "held back" not in out
    assert "support" not in describe_answer(Answer("x", False, src, "p", 0.1))


def test_ask_with_a_missing_latest_says_what_to_do(tmp_path):
    from ragtune.cli import ask
    from ragtune.errors import RagtuneError

    cfg = _ask_cfg(tmp_path, "question=x")  # model_dir defaults to <outputs>/latest
    with pytest.raises(RagtuneError, match="train a model first"):
        ask(cfg)


# --------------------------------------------------------------------------- commands
def test_console_and_script_compose_the_same_app():
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}

    def show(*cmd: str) -> str:
        res = subprocess.run(
            [sys.executable, *cmd, "conf=nemo_rag", "--cfg", "job"],
            cwd=PROJECT_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr
        return res.stdout

    assert show("-m", "ragtune", "train") == show("train/sft.py")
    # every command is an app over a config that exists, and every entry script runs one
    assert all((PROJECT_ROOT / "conf" / f"{c.config}.yaml").exists() for c in COMMANDS.values())
    scripts = [*PROJECT_ROOT.glob("train/*.py"), *PROJECT_ROOT.glob("serve/*.py")]
    named = {
        s.read_text().split('run_command("')[1].split('"')[0]
        for s in scripts
        if 'run_command("' in s.read_text()
    }
    assert (
        named <= set(COMMANDS) and {"train", "ask", "serve", "eval", "index", "embed-ft"} <= named
    )


def test_console_user_error_from_another_folder(tmp_path):
    """``ragtune train`` outside the checkout: one line, exit 2, status.json under ./outputs."""
    res = subprocess.run(
        [sys.executable, "-m", "ragtune", "train", "retriever.chunk_overlap=5000"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: retriever.chunk_overlap")
    assert "Traceback" not in res.stderr
    (run,) = (tmp_path / "outputs" / "runs" / "sft").iterdir()  # the job keeps its name
    assert read_status(run)["status"] == "failed"


def test_console_usage_and_unknown_command(capsys):
    from ragtune.cli import main

    main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in ("index", "build-data", "train", "ask", "serve", "eval"))
    with pytest.raises(SystemExit) as e:
        main(["trian"])
    assert e.value.code == 2 and "unknown command 'trian'" in capsys.readouterr().err


# --------------------------------------------------------------------------- paths
def test_user_paths_resolve_from_the_current_directory(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "sub").mkdir(parents=True)
    monkeypatch.delenv("RAGTUNE_OUTPUTS", raising=False)
    monkeypatch.delenv("RAGTUNE_ROOT", raising=False)
    monkeypatch.chdir(project / "sub")
    assert resolve_path("../mydocs") == project / "sub" / ".." / "mydocs"
    assert current_project() == project / "sub"
    assert outputs_root() == project / "sub" / "outputs"
    cfg = compose("index", ["data.corpus=../mydocs"])
    assert cfg.paths.outputs == str(project / "sub" / "outputs")
    monkeypatch.setenv("RAGTUNE_OUTPUTS", "runs-here")
    assert outputs_root() == project / "sub" / "runs-here"
    monkeypatch.setenv("RAGTUNE_ROOT", str(project))
    assert current_project() == project
    monkeypatch.chdir(PROJECT_ROOT / "docs")  # inside the checkout: the checkout's outputs/
    monkeypatch.delenv("RAGTUNE_ROOT")
    assert current_project() == PROJECT_ROOT


# --------------------------------------------------------------------------- ask's own rules
class _ScriptedPipeline:
    """Answers each question with its own text; a question starting "bad" is a user error."""

    generator = SimpleNamespace(settings=SimpleNamespace(stream=False))
    calibration = None

    def __init__(self) -> None:
        self.asked: list[str] = []

    def answer(self, question):
        from ragtune.answer import Answer
        from ragtune.rag import PipelineError

        self.asked.append(question)
        if question.startswith("bad"):
            raise PipelineError(f"question: {question!r} is too long")
        return Answer(f"A to {question}", False, [], "p", 0.1)

    def describe(self):
        return {"name": "scripted", "prompt": {"name": "alpaca_rag"}}


@pytest.fixture()
def scripted(monkeypatch) -> _ScriptedPipeline:
    pipe = _ScriptedPipeline()
    monkeypatch.setattr("ragtune.rag.open_pipeline", lambda cfg, *a, **k: pipe)
    return pipe


@pytest.mark.parametrize("key", ["json", "allow_mismatch"])
def test_ask_refuses_a_switch_that_is_not_true_or_false(tmp_path, scripted, key):
    from ragtune.cli import ask
    from ragtune.config import ConfigError

    with pytest.raises(ConfigError, match=rf"^{key}: must be true or false, got 'maybe'"):
        ask(_ask_cfg(tmp_path, f"{key}=maybe", "question=x"))
    assert scripted.asked == []


def test_a_question_hydra_reads_as_a_number_is_asked_as_text(tmp_path, scripted, capsys):
    from ragtune.cli import ask

    ask(_ask_cfg(tmp_path, "question=1984"))
    assert scripted.asked == ["1984"] and "Q: 1984\nA: A to 1984\n" in capsys.readouterr().out


def test_a_bad_given_question_ends_ask_but_a_bad_line_on_stdin_is_skipped(
    tmp_path, scripted, monkeypatch, capsys
):
    import io

    from ragtune.cli import ask
    from ragtune.rag import PipelineError

    with pytest.raises(PipelineError, match="too long"):
        ask(_ask_cfg(tmp_path), questions=["bad one", "fine"])
    assert scripted.asked == ["bad one"]
    stdin = io.StringIO("bad one\nfine\n")
    stdin.isatty = lambda: False
    monkeypatch.setattr(sys, "stdin", stdin)
    answers = ask(_ask_cfg(tmp_path))
    assert [a.text for a in answers] == ["A to fine"]
    assert "error: question: 'bad one' is too long" in capsys.readouterr().err


def test_the_prompt_ends_at_exit_quit_or_an_empty_line(scripted, monkeypatch):
    from ragtune.cli import typed_questions

    for last in ("exit", "quit", ""):
        typed = iter(["one", " two ", last, "never"])
        monkeypatch.setattr("builtins.input", lambda _prompt, typed=typed: next(typed))
        assert list(typed_questions(scripted)) == ["one", "two"]


def test_an_answer_without_sources_says_closed_book_and_holds_nothing_back():
    from ragtune.answer import Answer
    from ragtune.cli import describe_answer

    out = describe_answer(
        Answer("I dont know", True, [], "p", 0.1, score=-2.0, candidate="I dont know")
    )
    assert "sources:\n  (none: closed book)" in out and "held back" not in out


def test_only_a_known_info_topic_is_taken_from_the_question():
    assert split_question(["--info", "What", "is", "it?"]) == (["--info"], "What is it?")
    assert split_question(["--info", "config", "Why?"]) == (["--info", "config"], "Why?")
    assert split_question(["k=1", "  "]) == (["k=1"], None)  # a blank question is no question


@pytest.mark.parametrize("arg", ["conf=nemo_rga", "+conf=nemo_rga", "conf=qwen_rag,nemo_rga"])
def test_an_unknown_preset_is_one_line_and_exit_2(arg, capsys):
    from ragtune.cli import _check_presets

    with pytest.raises(SystemExit) as e:
        _check_presets(["k=1", arg])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: conf=nemo_rga: no preset") and "presets: nemo_rag, qwen_rag" in err
    )
    _check_presets(["conf=qwen_rag,nemo_rag", "+conf=qwen_rag"])  # known ones pass


def test_console_version(capsys):
    from ragtune import __version__
    from ragtune.cli import main

    assert main(["--version"]) is None
    assert capsys.readouterr().out == f"ragtune {__version__}\n"
