"""CPU training throughput of SmolLM2-135M LoRA: float32 vs bfloat16 autocast, padding vs packing.

    python bench/train_cpu.py [--steps 5] [--examples 24] [--variants fp32,bf16,bf16w,bf16-pack]

Examples look like the RAFT set (a demo question, its oracle document and two distractors
cut to chunk size, rendered with the alpaca_rag schema), so lengths are realistic (~600-800
tokens). Prints seconds per optimizer step (first step excluded), tokens/s and the loss curve
of each variant, so speed and convergence are compared on the same data.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    # name: (config overrides, load base weights in bf16)
    "fp32": (["model.dtype=float32"], False),
    "bf16": (["model.dtype=bfloat16"], False),  # fp32 master weights under bf16 autocast
    "bf16w": (["model.dtype=bfloat16"], True),  # bf16 frozen base, fp32 LoRA, bf16 autocast
    "fp32-pack": (["model.dtype=float32", "train.packing=true"], False),
    "bf16-pack": (["model.dtype=bfloat16", "train.packing=true"], False),
}


def rag_examples(tokenizer, n: int, seed: int = 0, chunk: int = 700) -> list[dict]:
    from ragtune.schema import PromptFields, get_schema

    schema = get_schema("alpaca_rag")
    records = [json.loads(line) for line in (ROOT / "data/qa/demo.jsonl").open()]
    docs = {
        p.relative_to(ROOT / "data/corpus").as_posix(): p.read_text(errors="replace")
        for p in (ROOT / "data/corpus").rglob("*")
        if p.is_file() and p.suffix in (".md", ".txt")
    }
    names = sorted(docs)
    rng = random.Random(seed)
    out = []
    for rec in records[:n]:
        oracle = docs.get(rec.get("source", ""), docs[names[0]])[:chunk]
        ctx = [oracle] + [docs[d][:chunk] for d in rng.sample(names, 2)]
        rng.shuffle(ctx)
        answer = rec["output"] or schema.abstain
        p, c = schema.render_example(PromptFields(rec["instruction"], "", ctx), answer, tokenizer)
        out.append({"prompt": p, "completion": c})
    return out


def run(variant: str, steps: int, examples: list[dict], batch: int) -> dict:
    import torch
    from transformers import TrainerCallback

    from ragtune.config import compose, validate
    from ragtune.schema import get_schema
    from ragtune.training import backends, checkpoints, recipe

    overrides, bf16_weights = VARIANTS[variant]
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t, self.c = time.perf_counter(), time.process_time()
            self.n = state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kw):
            n = state.num_input_tokens_seen - self.n
            times.append((time.perf_counter() - self.t, time.process_time() - self.c, n))

    real_cb, real_load = checkpoints.callbacks, backends._load_hf

    def load(cfg, path, cuda):
        model, tok, prec = real_load(cfg, path, cuda)
        if bf16_weights:
            for p in model.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
        return model, tok, prec

    checkpoints.callbacks = lambda *a: [*real_cb(*a), Timer()]
    backends._load_hf = load
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = compose(
                "sft",
                [
                    f"output_dir={tmp}",
                    f"train.max_steps={steps}",
                    f"train.per_device_train_batch_size={batch}",
                    "train.logging_steps=1",
                    "train.save_steps=1000",
                    "train.save_method=lora",
                    "model.max_seq_length=1024",
                    *overrides,
                ],
            )
            cfg = validate(cfg, top_level={"seed": int, "output_dir": str})
            r = recipe.train(cfg, examples, get_schema("alpaca_rag"), Path(tmp))
    finally:
        checkpoints.callbacks, backends._load_hf = real_cb, real_load
    timed = times[1:] or times
    wall = sum(t for t, _, _ in timed) / len(timed)
    cpu = sum(c for _, c, _ in timed) / len(timed)
    tokens = sum(n for _, _, n in timed) / len(timed)
    return {
        "variant": variant,
        "wall_s_per_step": round(wall, 2),
        "cpu_s_per_step": round(cpu, 2),  # process CPU time (all threads): robust to a busy box
        "tokens_per_step": round(tokens),  # non-padding tokens
        "tokens_per_wall_s": round(tokens / wall, 1),
        "tokens_per_cpu_s": round(tokens / cpu, 1),
        "losses": [round(x, 4) for x in r.losses],
        "tokens": r.dataset_stats["tokens"],
        "mean_tokens": round(r.dataset_stats["mean_tokens"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--examples", type=int, default=24)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--variants", default="fp32,bf16,bf16w,fp32-pack,bf16-pack")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from ragtune.models import resolve_model
    from ragtune.schema import get_schema

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    schema = get_schema("alpaca_rag")

    def fits(e: dict) -> bool:  # keep the steps full: drop what tokenize_examples would drop
        n = len(schema.encode_prompt(tok, e["prompt"]))
        return n + len(tok(e["completion"], add_special_tokens=False).input_ids) + 1 <= 1024

    ex = [e for e in rag_examples(tok, 164) if fits(e)][: args.examples]
    for v in args.variants.split(","):
        print(json.dumps(run(v, args.steps, ex, args.batch)), flush=True)


if __name__ == "__main__":
    main()
