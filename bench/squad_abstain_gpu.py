"""Answer-or-abstain study, GPU half: train one variant, decode, score every answer.

    python bench/squad_abstain_gpu.py --model DIR --pack PACK --variant NAME --out FILE

Reads bench/squad_abstain_prep.py's PACK (rendered examples and evaluation prompts), so the
GPU machine needs only torch, transformers and peft. Training mirrors ragtune.training's hf
backend: the same token ids (schema.encode_prompt + completion + EOS, over-long examples
dropped), loss on completion tokens only, LoRA r=16 / alpha 32 / all-linear, AdamW, 5% warmup,
cosine, float32. ``--variant base`` trains nothing (base_rag); ``closed`` is the closed-book
fine-tune, decoded without context (ft_closed) and with it (ft_then_rag).

For every evaluation question (validation and test splits) the output row holds the greedy
answer, the best answer with the abstain answer's first token blocked (the candidate), and
ragtune.answerability's features of that candidate. bench/squad_abstain_report.py scores them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEV = "cpu"  # set in main: cuda when present


def train_lora(model, tok, schema, examples, args):  # noqa: ANN001, ANN201
    import torch
    from peft import LoraConfig, get_peft_model

    eos = tok.eos_token_id
    rows = []
    for e in examples:
        p = schema.encode_prompt(tok, e["prompt"])
        c = list(tok(e["completion"], add_special_tokens=False)["input_ids"])
        if not c or c[-1] != eos:
            c.append(eos)
        if len(p) + len(c) <= args.max_seq_length:
            rows.append((p + c, len(p)))
    cfg = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules="all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=DEV == "cuda")
    steps_per_epoch = math.ceil(len(rows) / args.bs)
    total = steps_per_epoch * args.epochs
    warm = math.ceil(0.05 * total)

    def lr_at(step: int) -> float:
        if step < warm:
            return step / max(1, warm)
        prog = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * prog))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = random.Random(args.seed)
    model.train()
    step, t0, losses = 0, time.time(), []
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    for _ in range(args.epochs):
        order = list(range(len(rows)))
        rng.shuffle(order)
        for b in range(0, len(order), args.bs):
            batch = [rows[i] for i in order[b : b + args.bs]]
            width = max(len(r) for r, _ in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for j, (r, plen) in enumerate(batch):
                ids[j, : len(r)] = torch.tensor(r)
                labels[j, plen : len(r)] = torch.tensor(r[plen:])
                mask[j, : len(r)] = 1
            out = model(input_ids=ids.to(DEV), attention_mask=mask.to(DEV), labels=labels.to(DEV))
            out.loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(out.loss))
            step += 1
    model.eval()
    info = {
        "examples": len(rows),
        "dropped": len(examples) - len(rows),
        "steps": step,
        "train_s": round(time.time() - t0, 1),
        "loss_first": round(sum(losses[:10]) / max(1, len(losses[:10])), 4),
        "loss_last": round(sum(losses[-10:]) / max(1, len(losses[-10:])), 4),
    }
    return model.merge_and_unload(), info


def decode(model, tok, schema, prompts, block: bool, bs: int = 64):  # noqa: ANN001, ANN201
    """Greedy answers (32 new tokens); ``block``: the abstain answer's first token banned at
    the first step (the candidate answer)."""
    from ragtune.answerability import abstain_first_token
    from ragtune.generate import Generator

    gen = Generator(model, tok, schema, {"max_new_tokens": 32})
    banned = [abstain_first_token(tok, schema)] if block else []
    return [r.text for r in gen.generate_batch(prompts, bs, block_first_tokens=banned)]


def hidden_states(model, tok, schema, prompts, answers, layers, bs: int = 16):  # noqa: ANN001, ANN201
    """Hidden states (float16) at two positions of prompt + answer, for an answerability probe:
    the prompt's last token (where the model chooses between answering and abstaining) and the
    answer's last token (after it has read its own answer). Shape (2, len(layers), n, hidden)."""
    import numpy as np
    import torch

    from ragtune.answerability import right_padded

    p_ids = [schema.encode_prompt(tok, p) for p in prompts]
    a_ids = [
        list(tok(a, add_special_tokens=False)["input_ids"]) or [tok.eos_token_id] for a in answers
    ]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = np.zeros((2, len(layers), len(prompts), model.config.hidden_size), dtype=np.float16)
    for b in range(0, len(prompts), bs):
        seqs = [p + a for p, a in zip(p_ids[b : b + bs], a_ids[b : b + bs], strict=True)]
        ids, mask = right_padded(seqs, pad)
        with torch.no_grad():
            hs = model(
                input_ids=ids.to(DEV), attention_mask=mask.to(DEV), output_hidden_states=True
            ).hidden_states
        rows = torch.arange(len(seqs))
        last_p = torch.tensor([len(p) - 1 for p in p_ids[b : b + bs]])
        last_a = torch.tensor([len(x) - 1 for x in seqs])
        for k, layer in enumerate(layers):
            h = hs[layer].float().cpu()
            out[0, k, b : b + len(seqs)] = h[rows, last_p].numpy()
            out[1, k, b : b + len(seqs)] = h[rows, last_a].numpy()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--pack", required=True, type=Path)
    ap.add_argument("--variant", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--bs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--max-seq-length", type=int, default=384)
    ap.add_argument("--tag", default="")
    ap.add_argument(
        "--states", default="", help="hidden-state layers to save for a probe, e.g. 14,21,28"
    )
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragtune.answerability import answer_features
    from ragtune.schema import get_schema

    global DEV
    DEV = "cuda" if torch.cuda.is_available() else "cpu"
    if os.environ.get("RAGTUNE_TF32"):  # TF32 matmuls: the study's speed, not the CPU's numerics
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(args.seed)
    schema = get_schema("alpaca_rag_short")
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(DEV)
    info: dict = {"variant": args.variant, "tag": args.tag}
    if args.variant != "base":
        data = [json.loads(x) for x in (args.pack / f"train_{args.variant}.jsonl").open()]
        model, tinfo = train_lora(model, tok, schema, data, args)
        info.update(tinfo)
    model.eval()
    modes = {"base": ["base_rag"], "closed": ["ft_closed", "ft_then_rag"]}.get(
        args.variant, ["raft_rag"]
    )
    t0 = time.time()
    rows_out, states = [], {}
    for split in ("val", "test"):
        rows = [json.loads(x) for x in (args.pack / f"eval_{split}.jsonl").open()]
        for mode in modes:
            closed = mode == "ft_closed"
            prompts = [r["prompt_closed" if closed else "prompt_rag"] for r in rows]
            greedy = decode(model, tok, schema, prompts, block=False)
            cand = decode(model, tok, schema, prompts, block=True)
            feats = answer_features(
                model,
                tok,
                schema,
                prompts,
                cand,
                [None if closed else r["context"] for r in rows],
                [max(r["scores"] or [0.0]) if not closed else 0.0 for r in rows],
                batch_size=16,
            )
            if args.states and mode in ("raft_rag", "base_rag"):
                layers = [int(x) for x in args.states.split(",")]
                states[split] = hidden_states(model, tok, schema, prompts, cand, layers)
                states[f"{split}_ids"] = [r["id"] for r in rows]
            for r, g, c, f in zip(rows, greedy, cand, feats, strict=True):
                rows_out.append(
                    {
                        "split": split,
                        "mode": mode,
                        "variant": args.variant,
                        "id": r["id"],
                        "answerable": r["answerable"],
                        "gold": r["gold"],
                        "hit": r["hit"],
                        "greedy": g,
                        "candidate": c,
                        **f.to_dict(),
                    }
                )
    info["eval_s"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as f:
        f.write(json.dumps({"info": info}) + "\n")
        for row in rows_out:
            f.write(json.dumps(row) + "\n")
    if states:
        import numpy as np

        np.savez(args.out.with_suffix(".states.npz"), layers=np.array(layers), **states)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
