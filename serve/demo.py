"""make demo: index data/ -> build the RAG-SFT set -> train -> merge -> ask two questions.

    python serve/demo.py [key=value ...]   (extra overrides go to train/sft.py)

Runs the SFT stage exactly as a user would (``python train/sft.py``, which ingests the
corpus, builds the retrieval-augmented examples, trains the LoRA, merges and writes the
manifest), then loads the trained folder the way ``serve/ask.py`` does and asks the two
questions of ``data/qa/demo_questions.json``: a grounded answer with its sources for the
answerable one, the abstain answer for the unanswerable one. CPU, offline, progress shown.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ragtune.stage import configure_threads  # noqa: E402

configure_threads()  # before torch loads; train/sft.py below inherits the environment

# The demo trains with conf/sft.yaml's CPU defaults (short prompt, 300-character chunks,
# max_seq_length 384, 2 epochs: well inside 20 minutes on 2 CPU cores, measured in
# docs/benchmarks.md), and keeps every oracle: with 164 records, each answer example counts.
DEMO_OVERRIDES: list[str] = [
    "raft.oracle_fraction=1.0",
]


def _banner(step: str, text: str) -> None:
    print(f"\n\033[1m[{step}] {text}\033[0m", flush=True)


def _train(outputs: Path, extra: list[str]) -> Path:
    run_dir = outputs / "demo" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    cmd = [
        sys.executable,
        str(ROOT / "train" / "sft.py"),
        *DEMO_OVERRIDES,
        *extra,
        f"hydra.run.dir={run_dir}",
    ]
    print("$ " + " ".join(cmd[1:]), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    if proc.returncode < 0:  # killed: what it saved is still there, so say how to go on
        sig = signal.Signals(-proc.returncode).name
        why = " (most likely out of memory: train.gradient_checkpointing=true holds less)"
        why = why if sig == "SIGKILL" else ""
        raise SystemExit(
            f"demo: train/sft.py was killed with {sig}{why}; its checkpoints are in {run_dir}: "
            f"python train/sft.py {' '.join(cmd[2:-1])} train.resume=true hydra.run.dir={run_dir}"
        )
    if proc.returncode != 0:
        raise SystemExit(f"demo: train/sft.py failed with exit status {proc.returncode}")
    model_dir = run_dir / "model"
    if not (model_dir / "manifest.json").exists():
        raise SystemExit(f"demo: {model_dir} has no manifest.json: training did not finish")
    return model_dir


def main(argv: list[str]) -> int:
    t0 = time.perf_counter()
    from ragtune.paths import outputs_root

    outputs = outputs_root()
    questions = json.loads((ROOT / "data" / "qa" / "demo_questions.json").read_text())

    _banner("1/3", "index data/corpus, build the RAG-SFT set, train the LoRA, merge")
    model_dir = _train(outputs, argv)
    t_train = time.perf_counter() - t0

    _banner("2/3", f"load {model_dir} with the retriever and prompt of its manifest")
    from ragtune.cli import print_answer
    from ragtune.config import compose, validate
    from ragtune.rag import ASK_TOP_LEVEL, RagPipeline

    cfg = validate(compose("ask", [f"model_dir={model_dir}"]), ASK_TOP_LEVEL)
    pipeline = RagPipeline.from_model_dir(model_dir, cfg)
    info = pipeline.describe()
    r = info["retriever"]
    print(
        f"prompt {info['prompt']['name']} ({info['prompt']['fingerprint']}), "
        f"index {r['collection']} (k={r['k']}), max {pipeline.generator.settings.max_new_tokens} "
        "new tokens"
    )

    _banner("3/3", "ask the two demo questions")
    good = questions["answerable"]
    bad = questions["unanswerable"]
    print("answerable (the answer is in the corpus):")
    a1 = print_answer(pipeline, good["question"], stream=True)
    print("\nunanswerable (the corpus does not say):")
    a2 = print_answer(pipeline, bad["question"], stream=True)

    grounded = good["answer"].lower() in a1.text.lower() and not a1.abstained
    abstained = a2.abstained
    total = time.perf_counter() - t0
    print(
        f"\nanswerable:   {'grounded answer' if grounded else 'MISSED'} "
        f"(expected '{good['answer']}')\n"
        f"unanswerable: {'abstained' if abstained else 'DID NOT ABSTAIN'} "
        f"(abstain answer: '{pipeline.schema.abstain}')\n"
        f"time: {total / 60:.1f} min (training stage {t_train / 60:.1f} min)\n"
        f"ask it yourself: python serve/ask.py model_dir={model_dir}"
    )
    return 0 if grounded and abstained else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
