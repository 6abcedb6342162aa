"""The command line: ``ragtune <command> [question] [key=value ...]`` and the entry scripts.

Each command is one Hydra app over ``conf/<config>.yaml``; ``python train/sft.py ...`` and
``ragtune train ...`` run the same app with the same overrides. The stage bodies here are
the only code that prints or sets an exit status; the library functions they call do neither.
Every body runs inside :func:`ragtune.stage.run_stage` (status.json, one-line errors, Ctrl-C).

``ragtune ask`` takes its question verbatim, whatever its characters, outside Hydra's override
grammar: as positional words (``ragtune ask "What's the 東京 festival, naïve?"``), after
``--``, as ``question=...``, or one per line on stdin.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ragtune import __version__
from ragtune.paths import CONF_DIR
from ragtune.stage import INTERRUPTED_EXIT, USER_ERROR_EXIT, StageResult, configure_threads

# --------------------------------------------------------------------------- stage bodies


def index(cfg: DictConfig) -> None:
    """Bring the index up to date with ``data.corpus``; exit status 1 when files were skipped."""
    from ragtune.config import validate
    from ragtune.ingest import ingest_corpus

    cfg = validate(cfg, top_level={})
    report = ingest_corpus(cfg)
    print(report.summary(), flush=True)
    if not report.ok:
        print(
            f"warning: {len(report.skipped)} file(s) or record(s) were skipped (see above)",
            file=sys.stderr,
        )
        raise SystemExit(1)


def build_data(cfg: DictConfig) -> None:
    """Write the retrieval-augmented SFT set into ``<run>/dataset`` without training."""
    from ragtune.config import validate
    from ragtune.training.data import build_dataset
    from ragtune.training.recipe import SFT_TOP_LEVEL

    validate(cfg, SFT_TOP_LEVEL)
    out = Path(cfg.output_dir)
    _examples, stats, _tokenizer, _retriever = build_dataset(cfg, out)
    print(f"dataset: {stats.get('examples')} examples -> {out / 'dataset'}", flush=True)


def train(cfg: DictConfig) -> StageResult:
    """The SFT stage: index, build, train, save, manifest. The metric is what a sweep ranks."""
    _import_unsloth_first(str(cfg.train.get("backend", "auto")))
    from ragtune.training import run_sft
    from ragtune.training.distributed import is_main_process

    if not is_main_process():  # under torchrun, rank 0 alone reports
        logging.getLogger("ragtune").setLevel(logging.WARNING)
    result = run_sft(cfg)
    summary = {
        "model_dir": str(result.model_dir),
        "final_loss": result.final_loss,
        "metric": result.metric,
        "metrics": result.metrics or {},
        "dataset": result.dataset_stats,
        "divergence": result.divergence,
    }
    return StageResult(metric=result.metric, details=summary)


def embed_ft(cfg: DictConfig) -> StageResult:
    """Tune the retriever's embedder on the training QA; print where it went and what's next."""
    from ragtune.training.embedder import run_embed_ft

    result = run_embed_ft(cfg)
    print(f"validation before: {result.recall_before}")
    print(f"validation after:  {result.recall_after}")
    print(f"tuned embedder: {result.path}  ({result.n_train} rows, {result.seconds:.0f} s)")
    print("next: re-index, build the RAFT set and train the LM with it:")
    print(f"  ragtune index retriever.embedding_model={result.path}")
    print(f"  ragtune train retriever.embedding_model={result.path}")
    return StageResult(metric=None, details={"path": str(result.path)})


def gen_qa(cfg: DictConfig) -> StageResult:
    """Generate a RAG-SFT QA set from the corpus with the configured local LM."""
    from ragtune.qa_gen_stage import run_gen_qa

    result = run_gen_qa(cfg)
    print(result.summary)
    return StageResult(metric=None, details={"qa_path": str(result.qa_path)})


def _import_unsloth_first(backend: str) -> None:
    """Unsloth patches transformers when imported; importing it first halves 12B load time.

    Not with ``train.backend=hf``: that run must be plain transformers + PEFT + TRL, as on CPU.
    """
    if backend == "hf" or importlib.util.find_spec("unsloth") is None:
        return
    import torch

    if torch.cuda.is_available():
        import unsloth  # noqa: F401


def evaluate(cfg: DictConfig) -> StageResult:
    """Evaluate every configured mode; print the table. The metric is the headline overall."""
    from ragtune.evaluate import run_eval

    results = run_eval(cfg)
    print(results["table"], flush=True)
    head = results["headline"]
    metrics = results["modes"][head]
    return StageResult(metric=float(metrics["overall"]), details={"mode": head, "metrics": metrics})


def serve(cfg: DictConfig) -> None:
    """Load the pipeline, then serve it with uvicorn until Ctrl-C."""
    import logging
    import socket

    import uvicorn

    from ragtune.config import validate
    from ragtune.rag import open_pipeline
    from ragtune.server import LOOPBACK, SERVER_TOP_LEVEL, create_app

    validate(cfg, SERVER_TOP_LEVEL)
    s = cfg.server
    if s.host not in LOOPBACK and not s.api_key:
        logging.getLogger(__name__).warning(
            "server.host=%s exposes the server beyond this machine without an API key; "
            "set RAGTUNE_API_KEY",
            s.host,
        )
    # generation-only: an engine for another ragtune, which retrieves; no index opens here
    pipeline = open_pipeline(cfg, context="closed" if s.generation_only else "auto")
    # before the app exists: the batcher compiles its steps before any request arrives
    pipeline.generator.start_batching(
        s.batching, s.max_batch, invariant=s.batch_invariant, weights=s.batch_weights
    )
    app = create_app(
        pipeline,
        s.api_key,
        max_body_bytes=s.max_body_bytes,
        max_queue=s.max_queue,
        model_id=s.model_id,
        history_tokens=s.history_tokens,
        generation_only=s.generation_only,
    )
    port = s.port
    if port == 0:
        with socket.socket() as sock:
            sock.bind((s.host, 0))
            port = sock.getsockname()[1]
    print(
        f"ragtune server{' (generation only)' if s.generation_only else ''}: "
        f"http://{s.host}:{port}/v1 (model {s.model_id or pipeline.name}, "
        f"{'API key required' if s.api_key else 'no API key'})",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(
        app,
        host=s.host,
        port=port,
        log_level=s.log_level,
        access_log=False,
        timeout_keep_alive=s.keep_alive_s,
    )


def ask(cfg: DictConfig, questions: Sequence[str] | None = None) -> list[Any]:
    """Answer ``questions`` (the command line's), else ``question``, else stdin's lines, else
    each line typed at the prompt. Streams the answer, then prints abstention and sources."""
    from ragtune.config import ConfigError, validate
    from ragtune.rag import ASK_TOP_LEVEL, PipelineError, open_pipeline

    validate(cfg, ASK_TOP_LEVEL)
    for key in ("json", "allow_mismatch"):
        if not isinstance(cfg[key], bool):
            raise ConfigError(f"{key}: must be true or false, got {cfg[key]!r}")
    if cfg.question is not None and not isinstance(cfg.question, str):
        cfg.question = str(cfg.question)
    if questions is None and cfg.question:
        questions = [cfg.question]
    given = questions is not None  # an error about a given question ends the command
    as_json = cfg.json
    pipeline = open_pipeline(cfg)
    stream = bool(pipeline.generator.settings.stream) and not as_json
    if questions is None:
        piped = sys.stdin is not None and not sys.stdin.isatty()
        questions = stdin_questions(sys.stdin) if piped else typed_questions(pipeline)
    answers = []
    for q in questions:
        try:
            answers.append(print_answer(pipeline, q, stream=stream, as_json=as_json))
        except PipelineError as e:
            if given:
                raise
            print(f"error: {e}", file=sys.stderr)
    return answers


def print_answer(pipeline: Any, question: str, *, stream: bool, as_json: bool = False) -> Any:
    """Answer one question and print it (streamed when asked), then abstention and sources;
    with ``as_json`` one JSON object instead."""
    if stream:
        print(f"Q: {question}\nA: ", end="", flush=True)
        s = pipeline.stream(question)
        for piece in s:
            print(piece, end="", flush=True)
        print()
        assert s.answer is not None
        ans = s.answer
    else:
        ans = pipeline.answer(question)
    if as_json:
        print(json.dumps({"question": question, **ans.to_dict()}, ensure_ascii=False), flush=True)
        return ans
    if not stream:
        print(f"Q: {question}\nA: {ans.text}")
    calibration = getattr(pipeline, "calibration", None)
    threshold = None if calibration is None else calibration.threshold
    print(describe_answer(ans, threshold), flush=True)
    return ans


def describe_answer(ans: Any, threshold: float | None = None) -> str:
    """Abstention (with the support score against the model's threshold, and the answer it
    held back), sources with offsets and scores, and timings of one answer."""
    lines = [f"abstained: {'yes' if ans.abstained else 'no'}"]
    if ans.score is not None:
        cut = (
            ""
            if threshold is None
            else f" ({'>=' if ans.score >= threshold else '<'} threshold {threshold:+.2f})"
        )
        lines.append(f"support: {ans.score:+.2f}{cut}")
        if ans.abstained and ans.candidate and ans.candidate.strip() != ans.text.strip():
            # what the decision held back: a user judging the threshold needs to see it
            lines.append(f"held back: {ans.candidate}")
    lines.append("sources:")
    if not ans.sources:
        lines.append("  (none: closed book)")
    for i, (src, start, score) in enumerate(ans.sources, 1):
        sc = "" if score is None else f"  score {score:.3f}"
        lines.append(f"  {i}. {src} @ {start}{sc}")
    lines.append(
        f"({ans.latency_s:.2f}s: retrieval {ans.retrieval_s:.2f}s, "
        f"{ans.new_tokens} new tokens, stop: {ans.stop_reason})"
    )
    return "\n".join(lines)


def stdin_questions(lines: Iterable[str]) -> Iterator[str]:
    """One question per non-empty line, as written (surrounding whitespace dropped)."""
    for line in lines:
        q = line.strip()
        if q:
            yield q


def typed_questions(pipeline: Any) -> Iterator[str]:
    """The interactive prompt: a question per line until an empty line, Ctrl-D or Ctrl-C."""
    info = pipeline.describe()
    print(
        f"ragtune: {info['name']} | prompt {info['prompt']['name']} | empty line or Ctrl-D quits",
        file=sys.stderr,
    )
    while True:
        try:
            q = input("question> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if not q or q in ("exit", "quit"):
            return
        yield q


# --------------------------------------------------------------------------- commands
@dataclass(frozen=True)
class Command:
    config: str  # conf/<config>.yaml
    job: str  # hydra.job.name: run folders go to <outputs>/runs/<job>/
    body: Callable[..., Any]
    summary: str


COMMANDS: dict[str, Command] = {
    "index": Command("index", "index", index, "ingest data.corpus into the index"),
    "build-data": Command(
        "sft", "build_data", build_data, "write the RAG-SFT examples without training"
    ),
    "train": Command("sft", "sft", train, "index, build the examples, train, merge, manifest"),
    "gen-qa": Command(
        "gen_qa", "gen_qa", gen_qa, "generate a QA set from the corpus with the local LM"
    ),
    "embed-ft": Command(
        "embed_ft", "embed_ft", embed_ft, "tune the retriever's embedder on the training QA"
    ),
    "ask": Command("ask", "ask", ask, "ask a trained model (question as argument or stdin)"),
    "serve": Command("server", "server", serve, "OpenAI-compatible server over a trained model"),
    "eval": Command("eval", "eval", evaluate, "evaluate modes on one QA set and one index"),
}

# Hydra's options that take a value in the next argument (an optional one for --info).
_VALUE_FLAGS = {
    "-c",
    "--cfg",
    "-p",
    "--package",
    "-cp",
    "--config-path",
    "-cn",
    "--config-name",
    "-cd",
    "--config-dir",
    "--experimental-rerun",
}
_INFO_TOPICS = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
# key=value, +key=value, ++key=value, ~key[=value], group/option@pkg=value: Hydra overrides.
_OVERRIDE = re.compile(r"(\+\+?|~)?[A-Za-z_][\w.\-/@]*=|~[A-Za-z_][\w.\-/@]*$")


def split_question(args: Sequence[str]) -> tuple[list[str], str | None]:
    """Hydra's arguments, and the question taken verbatim: the value of ``question=...``, or
    the words that are neither an override nor an option (everything after ``--`` too),
    joined by spaces."""
    hydra_args: list[str] = []
    words: list[str] = []
    question = None
    i = 0
    while i < len(args):
        a = args[i]
        i += 1
        if a == "--":
            words.extend(args[i:])
            break
        if a.startswith("question=") and a != "question=null":
            question = a.removeprefix("question=")
        elif a.startswith("-"):
            hydra_args.append(a)
            takes = a in _VALUE_FLAGS or (
                a in ("-i", "--info") and i < len(args) and args[i] in _INFO_TOPICS
            )
            if takes and i < len(args):
                hydra_args.append(args[i])
                i += 1
        elif _OVERRIDE.match(a):
            hydra_args.append(a)
        else:
            words.append(a)
    if words:
        question = " ".join(words)
    if question is not None and not question.strip():
        question = None
    return hydra_args, question


def run_command(name: str, args: Sequence[str] | None = None) -> Any:
    """Run command ``name`` as its Hydra app with ``args`` (default: ``sys.argv[1:]``)."""
    from ragtune.stage import run_stage

    configure_threads()
    cmd = COMMANDS[name]
    args = list(sys.argv[1:] if args is None else args)
    body = cmd.body
    if name == "ask":
        args, question = split_question(args)
        if question is not None:
            body = functools.partial(ask, questions=[question])

    _check_presets(args)

    import hydra

    import ragtune.config  # noqa: F401  (registers the ${ragtune_root:} resolver)

    def task(cfg: DictConfig) -> float | None:
        return run_stage(body, cfg)

    # Hydra names the job (hydra.job.name: runs/<job>/...) after the last part of the task
    # function's module, so every way in keeps the script's name (runs/sft/, runs/ask/).
    task.__module__ = f"{__name__}.{cmd.job}"
    app = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=cmd.config)(task)
    saved, sys.argv = sys.argv, [sys.argv[0], *args]
    try:
        return app()
    except KeyboardInterrupt:  # before or after the stage (Hydra's start-up, imports)
        print("interrupted", file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED_EXIT) from None
    finally:
        sys.argv = saved


def _check_presets(args: Sequence[str]) -> None:
    """A ``conf=<preset>`` that does not exist: one line and exit 2, not Hydra's exit-1 page."""
    presets = CONF_DIR / "conf"
    for arg in args:
        key, _, value = arg.partition("=")
        if key.lstrip("+~") != "conf" or not value:
            continue
        for name in value.split(","):  # a multirun sweeps several presets
            if not (presets / f"{name}.yaml").is_file():
                known = ", ".join(sorted(p.stem for p in presets.glob("*.yaml"))) or "none"
                print(f"error: conf={name}: no preset {presets / name}.yaml (presets: {known})",
                      file=sys.stderr, flush=True)  # fmt: skip
                raise SystemExit(USER_ERROR_EXIT)


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: ragtune <command> [key=value ...] [hydra options]",
        "       ragtune ask [question] [key=value ...]",
        "",
        "commands (each is a Hydra app; `ragtune <command> --help` lists its config):",
    ]
    lines += [f"  {n:<{width}}  {c.summary} (conf/{c.config}.yaml)" for n, c in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> Any:
    """The ``ragtune`` console command."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return None
    if args[0] == "--version":
        print(f"ragtune {__version__}")
        return None
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"error: unknown command '{name}'; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT)
    return run_command(name, rest)


if __name__ == "__main__":
    main()
