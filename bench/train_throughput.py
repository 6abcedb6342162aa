"""QLoRA training throughput through ragtune's own SFT code path (unsloth vs hf backend).

    python bench/train_throughput.py --model /tmp/nemo12b --json $OUT/train.json

Each run is a separate process (Unsloth patches transformers/TRL globally on import, which
must not leak into the hf measurement) that calls exactly what ``train/sft.py`` calls:
``ragtune.train.train(cfg, examples, schema, output_dir)`` (which loads the model, applies
LoRA, tokenizes with ``tokenize_examples`` and runs TRL's SFTTrainer) with the ``nemo_rag``
preset and ``train.max_steps``. The only addition is a Trainer callback, hooked in through
``ragtune.train._callbacks``, that synchronises CUDA and times every optimizer step.

Scenarios:

``full``    every example exactly ``--seq`` tokens, no packing: tokens/s at batch x seq,
            seconds/step, peak GPU memory (the issue's reference: Unsloth 6,713 tok/s at
            9.7 GiB, batch 2 x 2048, H100).
``packed``  realistic RAG examples of 300-1,500 tokens with ``train.packing=true`` (TRL's
            best-fit-decreasing packing, padding-free batches): non-pad tokens/s and how full
            the batch x seq capacity is (padding waste = 1 - fill).

Steps: the first ``--warmup`` steps (kernel compilation, autotuning) are excluded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
log = logging.getLogger("bench.train")

ANSWERS = [
    "Ida Varnholm designed the breakwater.",
    "The lighthouse was built in 1871 by the harbour board.",
    "I don't know: the context does not say.",
    "It burned colza oil until 1903, then paraffin vapour.",
]


# --------------------------------------------------------------------------- examples
def _filler(n_words: int, rng: random.Random) -> str:
    words = ["harbour", "light", "keeper", "tide", "pier", "stone", "lamp", "board", "winter"]
    return " ".join(rng.choice(words) for _ in range(n_words))


def make_examples(
    schema: Any, tok: Any, lengths: list[int], seed: int = 0
) -> tuple[list[dict], list[int]]:
    """Prompt/completion examples whose tokenized length (as train() tokenizes) hits each
    target in ``lengths`` (exactly, or within a few tokens). Returns (examples, lengths)."""
    from ragtune.schema import PromptFields

    rng = random.Random(seed)
    examples, got = [], []

    def length(prompt: str, completion: str) -> int:
        c = tok(completion, add_special_tokens=False)["input_ids"]
        return len(schema.encode_prompt(tok, prompt)) + len(c) + (c[-1:] != [tok.eos_token_id])

    for i, target in enumerate(lengths):
        answer = ANSWERS[i % len(ANSWERS)]
        words = max(1, target // 2)
        for _ in range(8):
            ctx = [_filler(words, rng)]
            fields = PromptFields("Who designed the breakwater at Kessa?", "", ctx)
            prompt, completion = schema.render_example(fields, answer, tok)
            n = length(prompt, completion)
            if n == target:
                break
            words = max(1, words + (target - n))  # ~one token per filler word
        examples.append({"prompt": prompt, "completion": completion, "kind": "oracle"})
        got.append(n)
    return examples, got


def padded_waste(lengths: list[int], batch: int, seed: int = 0) -> float:
    """Padding share if the same examples were batched unpacked (pad to the batch's longest)."""
    rng = random.Random(seed)
    order = lengths[:]
    rng.shuffle(order)
    real = padded = 0
    for i in range(0, len(order) - batch + 1, batch):
        chunk = order[i : i + batch]
        real += sum(chunk)
        padded += max(chunk) * len(chunk)
    return 1 - real / padded if padded else 0.0


# --------------------------------------------------------------------------- one run (worker)
def worker(args: argparse.Namespace) -> dict:
    if args.backend == "unsloth" and args.unsloth_first:
        import unsloth  # noqa: F401  (patches transformers/TRL before anything imports them)
    import torch
    from transformers import AutoTokenizer, TrainerCallback

    import ragtune.train as rt
    from ragtune.config import compose, validate
    from ragtune.schema import get_schema
    from ragtune.sft import SFT_TOP_LEVEL

    out = Path(tempfile.mkdtemp(prefix=f"bench-train-{args.backend}-{args.scenario}-"))
    steps = args.warmup + args.steps
    packing = args.scenario == "packed"
    overrides = [
        "conf=nemo_rag",
        f"model.name_or_path={args.model}",
        f"model.max_seq_length={args.seq}",
        f"train.backend={args.backend}",
        f"train.batch_size={args.batch}",
        "train.grad_accum=1",
        f"train.max_steps={steps}",
        f"train.packing={str(packing).lower()}",
        "train.save_method=lora",
        f"train.logging_steps={args.logging_steps}",
        "train.save_steps=100000",
        f"output_dir={out}",
        *args.override,
    ]
    cfg = validate(compose("sft", overrides), SFT_TOP_LEVEL)
    schema = get_schema(cfg.prompt.name)
    tok = AutoTokenizer.from_pretrained(args.model)
    rng = random.Random(0)
    if packing:
        n = max(64, steps * args.batch * 2 * args.seq // 900 + 32)
        targets = [rng.randint(args.min_len, args.max_len) for _ in range(n)]
    else:
        targets = [args.seq] * (steps * args.batch + 8)
    examples, lengths = make_examples(schema, tok, targets)

    times: list[float] = []
    seen: list[int] = []
    t_first: list[float] = []

    cuda = torch.cuda.is_available()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):  # noqa: ANN001
            sync()
            if not t_first:
                t_first.append(time.perf_counter())
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):  # noqa: ANN001
            sync()
            times.append(time.perf_counter() - self.t0)
            seen.append(int(state.num_input_tokens_seen or 0))

    orig = rt._callbacks
    rt._callbacks = lambda *a, **k: [*orig(*a, **k), StepTimer()]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = rt.train(cfg, examples, schema, out)
    wall = time.perf_counter() - t0

    per_step = [b - a for a, b in zip([0, *seen[:-1]], seen, strict=True)]
    m_times, m_tokens = times[args.warmup :], per_step[args.warmup :]
    capacity = args.batch * args.seq
    tok_s = sum(m_tokens) / sum(m_times) if m_times else 0.0
    fill = statistics.mean(m_tokens) / capacity if m_tokens else 0.0
    res = {
        "backend": result.backend,
        "scenario": args.scenario,
        "gpu": torch.cuda.get_device_name(0) if cuda else "cpu",
        "batch": args.batch,
        "seq": args.seq,
        "packing": packing,
        "lora_r": int(cfg.train.lora.r),
        "gradient_checkpointing": str(cfg.train.gradient_checkpointing),
        "unsloth_imported_first": bool(args.unsloth_first),
        "logging_steps": args.logging_steps,
        "steps_measured": len(m_times),
        "s_per_step": round(statistics.median(m_times), 3) if m_times else None,
        "tokens_per_s": round(tok_s, 1),  # non-pad tokens (num_input_tokens_seen)
        "tokens_per_step": round(statistics.mean(m_tokens), 1) if m_tokens else None,
        "batch_fill": round(fill, 4),
        "padding_waste": round(1 - fill, 4),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        "train_peak_gib": round(result.peak_memory_gb or 0.0, 2),
        "load_and_setup_s": round(t_first[0] - t0, 1) if t_first else None,
        "train_s": round(result.seconds, 1),
        "wall_s": round(wall, 1),
        "losses": [round(x, 4) for x in result.losses],
        "step_times": [round(x, 3) for x in times],
        "examples": len(examples),
        "example_tokens_mean": round(statistics.mean(lengths), 1),
        "dataset_stats": result.dataset_stats,
    }
    if packing:
        res["unpacked_padding_waste_computed"] = round(padded_waste(lengths, args.batch), 4)
    return res


# --------------------------------------------------------------------------- driver
def run_one(args: argparse.Namespace, backend: str, scenario: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        f"--backend={backend}",
        f"--scenario={scenario}",
        f"--model={args.model}",
        f"--seq={args.seq}",
        f"--batch={args.batch}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--min-len={args.min_len}",
        f"--max-len={args.max_len}",
        f"--logging-steps={args.logging_steps}",
        *(["--unsloth-first"] if args.unsloth_first else []),
        *[f"--override={o}" for o in args.override],
    ]
    log.info("running %s", " ".join(cmd[1:]))
    t0 = time.perf_counter()
    result: dict = {"backend": backend, "scenario": scenario}
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT ") :])
        rc = proc.wait(timeout=args.timeout)
        if rc != 0 and "error" not in result and "tokens_per_s" not in result:
            result["error"] = f"worker exited with {rc}"
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
    result["process_s"] = round(time.perf_counter() - t0, 1)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model folder (bench/make_nemo_shape.py)")
    ap.add_argument("--backends", default="unsloth,hf")
    ap.add_argument("--scenarios", default="full,packed", help="full and/or packed")
    ap.add_argument("--packed-backends", default="unsloth", help="backends that run 'packed'")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="measured steps")
    ap.add_argument("--warmup", type=int, default=3, help="steps excluded from the figures")
    ap.add_argument("--min-len", type=int, default=300)
    ap.add_argument("--max-len", type=int, default=1500)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--override", action="append", default=[], help="extra config override")
    ap.add_argument("--logging-steps", type=int, default=5, help="train.logging_steps (preset: 5)")
    ap.add_argument(
        "--unsloth-first",
        action="store_true",
        help="import unsloth before transformers (Unsloth warns that it is slower otherwise)",
    )
    ap.add_argument("--json", type=Path, default=None, help="append results (JSON lines)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="unsloth", help=argparse.SUPPRESS)
    ap.add_argument("--scenario", default="full", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    if args.worker:
        try:
            res = worker(args)
        except Exception as e:
            log.exception("worker failed")
            res = {
                "backend": args.backend,
                "scenario": args.scenario,
                "error": f"{type(e).__name__}: {e}"[:800],
            }
        print("RESULT " + json.dumps(res), flush=True)
        return

    results = []
    packed_for = {b.strip() for b in args.packed_backends.split(",")}
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        for scenario in [s.strip() for s in args.scenarios.split(",") if s.strip()]:
            if scenario == "packed" and backend not in packed_for:
                continue
            r = run_one(args, backend, scenario)
            results.append(r)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
    full = {r["backend"]: r for r in results if r.get("scenario") == "full" and "error" not in r}
    print("\nbackend  scenario  s/step  tokens/s  fill   peak_GiB  load_s  note")
    for r in results:
        if "error" in r:
            print(f"{r['backend']:<8} {r['scenario']:<8}  error: {r['error'][:100]}")
            continue
        note = ""
        if r["scenario"] == "packed":
            note = f"unpacked waste would be {r.get('unpacked_padding_waste_computed')}"
        print(
            f"{r['backend']:<8} {r['scenario']:<8}  {r['s_per_step']:>6}  {r['tokens_per_s']:>8}"
            f"  {r['batch_fill']:.3f}  {r['peak_gib']:>8}  {r['load_and_setup_s']:>6}  {note}"
        )
    if "unsloth" in full and "hf" in full and full["hf"]["tokens_per_s"]:
        print(f"unsloth / hf = {full['unsloth']['tokens_per_s'] / full['hf']['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
