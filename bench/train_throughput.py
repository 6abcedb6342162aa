"""QLoRA training throughput through ragtune's own SFT code path (unsloth vs hf backend).

    python bench/train_throughput.py --model /tmp/nemo12b --json $OUT/train.json

Each run is a separate process (Unsloth patches transformers/TRL globally on import, which
must not leak into the hf measurement) that calls exactly what ``train/sft.py`` calls:
``ragtune.training.recipe.train(cfg, examples, schema, output_dir)`` (which loads the model, applies
LoRA, tokenizes with ``tokenize_examples`` and runs TRL's SFTTrainer) with the ``nemo_rag``
preset and ``train.max_steps``. The only addition is a Trainer callback, hooked in through
``ragtune.training.checkpoints.callbacks``, that synchronises CUDA and times every optimizer step.

Scenarios:

``full``    every example exactly ``--seq`` tokens, no packing: tokens/s at batch x seq,
            seconds/step, peak GPU memory (the issue's reference: Unsloth 6,713 tok/s at
            9.7 GiB, batch 2 x 2048, H100).
``bare``    the reference loop (:func:`bare_loop`): same load and batches as ``full``, a plain
            PyTorch loop in place of the Trainer, to measure the trainer's overhead.
``packed``  realistic RAG examples of 300-1,500 tokens with ``train.packing=true`` (TRL's
            best-fit-decreasing packing, padding-free batches): non-pad tokens/s and how full
            the batch x seq capacity is (padding waste = 1 - fill).
``rag``     the same examples unpacked, ``train.packing=false``: padded or padding-free per
            ``train.padding_free`` / ``train.train_sampling_strategy`` (set them with the run's overrides);
            padding waste is measured on the batches the Trainer actually ran.

Steps: the first ``--warmup`` steps (kernel compilation, autotuning) are excluded.
"""

from __future__ import annotations

import argparse
import gc
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


# --------------------------------------------------------------------------- profiling
_SYNC_OPS = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "cudaHostAlloc",
    "cudaMalloc",
    "cudaFree",
)


class StepProfiler:
    """torch.profiler over the ``n`` steps after the measured ones (they are not timed): GPU
    kernel time per step against wall time per step, the top kernels and CPU ops, and how often
    the step waits on the GPU (syncs, .item()) or allocates, to find where a step's time goes."""

    def __init__(self, first: int, n: int) -> None:
        self.first, self.n, self.prof, self.summary = first, n, None, None
        self.t0 = 0.0

    def begin(self, step: int) -> None:
        if self.n and step == self.first:
            import torch
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(ProfilerActivity.CUDA)
            self.prof = profile(activities=acts)
            self.prof.__enter__()
            self.t0 = time.perf_counter()

    def end(self, step: int) -> None:
        if self.prof is None or step != self.first + self.n - 1:
            return
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        ev = self.prof.key_averages()
        cuda = [e for e in ev if e.device_type == torch.autograd.DeviceType.CUDA]
        cpu = [e for e in ev if e.device_type == torch.autograd.DeviceType.CPU]

        def ms(us: float) -> float:  # profiler times are microseconds over all n steps
            return round(us / 1e3 / self.n, 2)

        self.summary = {
            "steps": self.n,
            "wall_ms_per_step": round(wall * 1e3 / self.n, 1),
            "kernel_ms_per_step": ms(sum(e.self_device_time_total for e in cuda)),
            "top_kernels_ms": [
                (e.key[:70], ms(e.self_device_time_total), e.count // self.n)
                for e in sorted(cuda, key=lambda e: -e.self_device_time_total)[:15]
            ],
            "top_cpu_ops_ms": [
                (e.key[:60], ms(e.self_cpu_time_total), e.count // self.n)
                for e in sorted(cpu, key=lambda e: -e.self_cpu_time_total)[:15]
            ],
            "waits_per_step": {
                e.key: (e.count // self.n, ms(e.self_cpu_time_total))
                for e in cpu
                if e.key in _SYNC_OPS
            },
        }
        self.prof = None


# --------------------------------------------------------------------------- one run (worker)
def worker(args: argparse.Namespace) -> dict:
    if args.backend == "unsloth" and args.unsloth_first:
        import unsloth  # noqa: F401  (patches transformers/TRL before anything imports them)
    import torch
    from transformers import AutoTokenizer, TrainerCallback

    from ragtune.config import compose, validate
    from ragtune.schema import get_schema
    from ragtune.training import checkpoints, padding, recipe, trainer
    from ragtune.training.recipe import SFT_TOP_LEVEL

    out = Path(tempfile.mkdtemp(prefix=f"bench-train-{args.backend}-{args.scenario}-"))
    steps = args.warmup + args.steps + args.profile_steps
    packing = args.scenario == "packed"
    rag_lengths = args.scenario in ("packed", "rag")
    overrides = [
        "conf=nemo_rag",
        f"model.name_or_path={args.model}",
        f"model.max_seq_length={args.seq}",
        f"train.backend={args.backend}",
        f"train.per_device_train_batch_size={args.batch}",
        "train.gradient_accumulation_steps=1",
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
    if rag_lengths:
        n = max(64, steps * args.batch * 2 * args.seq // 900 + 32)
        targets = [rng.randint(args.min_len, args.max_len) for _ in range(n)]
    else:
        targets = [args.seq] * (steps * args.batch + 8)
    examples, lengths = make_examples(schema, tok, targets)
    if args.scenario == "bare":
        return bare_loop(args, cfg, schema, examples)

    times: list[float] = []
    seen: list[int] = []
    t_first: list[float] = []
    # Python GC pauses, to tell a GC stall from a slow GPU step: (step, generation, seconds)
    gc_pauses: list[tuple[int, int, float]] = []
    gc_t0: list[float] = [0.0]
    in_step = [False]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_t0[0] = time.perf_counter()
        elif in_step[0]:
            gc_pauses.append((len(times), info["generation"], time.perf_counter() - gc_t0[0]))

    gc.callbacks.append(on_gc)

    cuda = torch.cuda.is_available()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    profiler = StepProfiler(args.warmup + args.steps, args.profile_steps)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):  # noqa: ANN001
            sync()
            profiler.begin(len(times))
            if not t_first:
                t_first.append(time.perf_counter())
            self.t0 = time.perf_counter()
            in_step[0] = True

        def on_step_end(self, a, state, control, **kw):  # noqa: ANN001
            sync()
            in_step[0] = False
            times.append(time.perf_counter() - self.t0)
            seen.append(int(state.num_input_tokens_seen or 0))
            profiler.end(len(times) - 1)

    orig = checkpoints.callbacks
    checkpoints.callbacks = lambda *a, **k: [*orig(*a, **k), StepTimer()]
    # the tokens each micro-batch carries, pads included (padding-free rows: none)
    batch_tokens: list[int] = []
    ran_padding_free: list[bool] = []
    trainer_class = trainer.trainer_class

    def counting_trainer() -> type:
        class Counting(trainer_class()):
            def training_step(self, model, inputs, *a, **k):  # noqa: ANN001
                batch_tokens.append(int(inputs["input_ids"].numel()))
                if not ran_padding_free:
                    ran_padding_free.append(
                        bool(getattr(self, "padding_free", self.args.padding_free))
                    )
                return super().training_step(model, inputs, *a, **k)

        return Counting

    trainer.trainer_class = counting_trainer
    if args.sft_arg:  # experiments on the Trainer's own settings (e.g. its per-step syncs)
        import yaml

        make_args = trainer.sft_config

        def patched_args(*a: Any, **k: Any) -> Any:
            sft_args = make_args(*a, **k)
            for kv in args.sft_arg:
                key, _, value = kv.partition("=")
                setattr(sft_args, key, yaml.safe_load(value))
            return sft_args

        trainer.sft_config = patched_args
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = recipe.train(cfg, examples, schema, out)
    wall = time.perf_counter() - t0

    per_step = [b - a for a, b in zip([0, *seen[:-1]], seen, strict=True)]
    if not any(seen) and not packing:  # token counting switched off (--sft-arg): rows are full
        per_step = [args.batch * args.seq] * len(seen)
    window = slice(args.warmup, args.warmup + args.steps)  # the profiled steps are not timed
    m_times, m_tokens = times[window], per_step[window]
    measured = range(args.warmup, args.warmup + args.steps)
    capacity = args.batch * args.seq
    tok_s = sum(m_tokens) / sum(m_times) if m_times else 0.0
    fill = statistics.mean(m_tokens) / capacity if m_tokens else 0.0
    if args.scenario == "rag" and batch_tokens[window]:  # unpacked: fill of the padded batches
        fill = sum(m_tokens) / sum(batch_tokens[window])
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
        "padding_free": ran_padding_free[0] if ran_padding_free else None,
        "sampling": str(cfg.train.train_sampling_strategy),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        "train_peak_gib": round(result.peak_memory_gb or 0.0, 2),
        "load_and_setup_s": round(t_first[0] - t0, 1) if t_first else None,
        "train_s": round(result.seconds, 1),
        "wall_s": round(wall, 1),
        "losses": [round(x, 4) for x in result.losses],
        "step_times": [round(x, 3) for x in times],
        "profile": profiler.summary,
        # GC pauses inside measured steps: count and seconds by generation, and the slow ones
        "gc_in_measured_steps": {
            str(g): [
                sum(1 for st, gg, _ in gc_pauses if gg == g and st in measured),
                round(sum(d for st, gg, d in gc_pauses if gg == g and st in measured), 3),
            ]
            for g in (0, 1, 2)
        },
        "gc_pauses_over_10ms": [(st, g, round(d, 3)) for st, g, d in gc_pauses if d > 0.01],
        "examples": len(examples),
        "example_tokens_mean": round(statistics.mean(lengths), 1),
        "dataset_stats": result.dataset_stats,
    }
    if rag_lengths:  # what the same examples would pad unpacked (ragtune's estimate)
        for sampling in ("random", "group_by_length"):
            waste = padding.padding_waste(lengths, args.batch, sampling, args.batch)
            res[f"unpacked_padding_waste_{sampling}"] = round(waste, 4)
    return res

    return None


def bare_loop(args: argparse.Namespace, cfg: Any, schema: Any, examples: list[dict]) -> dict:
    """The reference: the same model load and LoRA (ragtune's loader for the backend), then a
    plain PyTorch loop instead of TRL's SFTTrainer: forward with labels (the model's own loss),
    backward, grad clipping at 1.0, fused AdamW. Same batches, same per-step CUDA syncs; what
    ragtune's full-length run adds on top of this is the trainer's overhead."""
    import torch

    from ragtune.training import backends, data

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    if args.backend == "unsloth":
        model, tokenizer, precision = backends._load_unsloth(cfg, args.model)
    else:
        model, tokenizer, precision = backends._load_hf(cfg, args.model, cuda)
    ds, stats = data.tokenize_examples(examples, tokenizer, schema, args.seq)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(cfg.train.learning_rate), fused=cuda)
    model.train()
    dtype = torch.float16 if precision["fp16"] else torch.bfloat16
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses, load_s = [], [], time.perf_counter() - t0
    profiler = StepProfiler(args.warmup + args.steps, args.profile_steps)
    for step in range(args.warmup + args.steps + args.profile_steps):
        rows = ds[step * args.batch : (step + 1) * args.batch]
        ids = torch.tensor(rows["input_ids"], device=dev)
        keep = torch.tensor(rows["completion_mask"], device=dev).bool()
        labels = ids.masked_fill(~keep, -100)
        sync()
        profiler.begin(step)
        t = time.perf_counter()
        with torch.autocast(dev, dtype=dtype, enabled=precision["bf16"] or precision["fp16"]):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t)
        profiler.end(step)
        losses.append(round(float(loss), 4))
    measured = times[args.warmup : args.warmup + args.steps]
    tokens = args.batch * args.seq
    return {
        "backend": args.backend,
        "scenario": "bare",
        "gpu": torch.cuda.get_device_name(0) if cuda else "cpu",
        "batch": args.batch,
        "seq": args.seq,
        "steps_measured": len(measured),
        "s_per_step": round(statistics.median(measured), 3),
        "tokens_per_s": round(tokens * len(measured) / sum(measured), 1),
        "tokens_per_step": tokens,
        "batch_fill": 1.0,
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "load_and_setup_s": round(load_s, 1),
        "losses": losses,
        "step_times": [round(x, 3) for x in times],
        "profile": profiler.summary,
        "dataset_stats": stats,
    }


# --------------------------------------------------------------------------- driver
def run_one(
    args: argparse.Namespace, backend: str, scenario: str, extra: list[str] | None = None
) -> dict:
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
        f"--profile-steps={args.profile_steps}",
        f"--min-len={args.min_len}",
        f"--max-len={args.max_len}",
        f"--logging-steps={args.logging_steps}",
        *(["--unsloth-first"] if args.unsloth_first else []),
        *[f"--override={o}" for o in args.override],
        *[f"--override={o}" for o in (extra or []) if not o.startswith("sft:")],
        *[f"--sft-arg={o[4:]}" for o in (extra or []) if o.startswith("sft:")],
        *[f"--sft-arg={o}" for o in args.sft_arg],
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
    ap.add_argument("--scenarios", default="full,packed", help="full, packed, rag, bare")
    ap.add_argument("--packed-backends", default="unsloth", help="backends that run 'packed'")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="measured steps")
    ap.add_argument("--warmup", type=int, default=3, help="steps excluded from the figures")
    ap.add_argument(
        "--profile-steps", type=int, default=0, help="profile N more steps after the measured ones"
    )
    ap.add_argument("--min-len", type=int, default=300)
    ap.add_argument("--max-len", type=int, default=1500)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--override", action="append", default=[], help="extra config override")
    ap.add_argument(
        "--sft-arg",
        action="append",
        default=[],
        help="KEY=VALUE set on the SFTConfig ragtune builds (an experiment, not a config)",
    )
    ap.add_argument("--logging-steps", type=int, default=5, help="train.logging_steps (preset: 5)")
    ap.add_argument(
        "--unsloth-first",
        action="store_true",
        help="import unsloth before transformers (Unsloth warns that it is slower otherwise)",
    )
    ap.add_argument(
        "--run",
        action="append",
        default=[],
        help="LABEL=BACKEND/SCENARIO[:OVERRIDE;...], repeatable; replaces --backends x "
        "--scenarios; an override 'sft:KEY=VALUE' is an --sft-arg, "
        "e.g. 'ckpt=unsloth/full:train.gradient_checkpointing=true'",
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

    plan: list[tuple[str, str, str, list[str]]] = []  # (label, backend, scenario, overrides)
    for spec in args.run:
        label, _, rest = spec.partition("=")
        what, _, extra = rest.partition(":")
        backend, _, scenario = what.partition("/")
        plan.append((label, backend, scenario or "full", extra.replace(";", " ").split()))
    if not plan:
        packed_for = {b.strip() for b in args.packed_backends.split(",")}
        for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
            for scenario in [s.strip() for s in args.scenarios.split(",") if s.strip()]:
                if scenario != "packed" or backend in packed_for:
                    plan.append((backend, backend, scenario, []))
    results = []
    for label, backend, scenario, extra in plan:
        r = {"label": label, "overrides": extra, **run_one(args, backend, scenario, extra)}
        results.append(r)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")
    full: dict[str, dict] = {}
    for r in results:  # the first full-length run of each backend
        if r.get("scenario") == "full" and "error" not in r:
            full.setdefault(r["backend"], r)
    print("\nlabel        backend  scenario  s/step  tokens/s  fill   peak_GiB  load_s  note")
    for r in results:
        head = f"{r['label']:<12} {r['backend']:<8} {r['scenario']:<8}"
        if "error" in r:
            print(f"{head}  error: {r['error'][:100]}")
            continue
        timed = r["step_times"][args.warmup : args.warmup + args.steps]
        note = f"max step {max(timed or [0])} s"
        gc2 = r.get("gc_in_measured_steps", {}).get("2")
        if gc2:
            note += f", gen-2 GC x{gc2[0]} {gc2[1]} s"
        if r["scenario"] in ("packed", "rag"):
            note += f", padding_free={r.get('padding_free')} sampling={r.get('sampling')}"
            note += f", unpacked waste would be {r.get('unpacked_padding_waste_random')}"
        print(
            f"{head}  {r['s_per_step']:>6}  {r['tokens_per_s']:>8}"
            f"  {r['batch_fill']:.3f}  {r['peak_gib']!s:>8}  {r['load_and_setup_s']:>6}  {note}"
        )
    for r in results:
        p = r.get("profile")
        if not p:
            continue
        print(
            f"\nprofile {r['label']}: wall {p['wall_ms_per_step']} ms/step, GPU kernels "
            f"{p['kernel_ms_per_step']} ms/step; waits/allocs per step {p['waits_per_step']}"
        )
        for name, ms, n in p["top_kernels_ms"][:8]:
            print(f"  gpu {ms:>8} ms x{n:<5} {name}")
        for name, ms, n in p["top_cpu_ops_ms"][:10]:
            print(f"  cpu {ms:>8} ms x{n:<5} {name}")
    if "unsloth" in full and "hf" in full and full["hf"]["tokens_per_s"]:
        print(f"unsloth / hf = {full['unsloth']['tokens_per_s'] / full['hf']['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
