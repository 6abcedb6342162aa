"""Which examples set off a gradient-norm spike in an SFT run: batch order and per-example grads.

A run's grad-norm spikes fall at the same step on the same data order (docs/benchmarks.md,
session 27: "where the spike comes from"). Three steps find out what the batches there hold and
which examples carry the gradient, on the CPU:

    # 1. the training order: which dataset rows each optimizer step trains on (the Trainer's
    #    own dataloader over the run's saved examples; the model does not matter for the order)
    python bench/spike_probe.py order RUN --model PATH --seed 42 --batch 8 -o order.json
    # 2. the LoRA weights after update N (or N,M,...): resume the run from a checkpoint before
    #    N and stop after the last (several steps: {step} in the file name)
    python bench/spike_probe.py save-at 83 w83.pt -- <the run's train/sft.py arguments> \
        train.resume=true train.divergence_factor=null
    # 3. each example's completion loss and gradient norm on step N+1's batch at those weights
    python bench/spike_probe.py grads RUN --model PATH --weights w83.pt --order order.json \
        --steps 84 85
    # 4. the same along one update: the weights a share of the way from one save to the next
    #    (0 = --weights, 1 = --toward); how fast the gradients grow says how sharp it is there
    python bench/spike_probe.py grads RUN --model PATH --weights w82.pt --toward w83.pt \
        --at 0.25 0.5 0.75 --order order.json --steps 80 84 85

RUN is the run folder (its ``dataset/train.jsonl``); PATH the base model folder. Gradients are
taken as the Trainer takes them: each example's token losses summed and divided by the batch's
completion tokens, so the per-example norms are the parts of the batch's gradient.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any


def load_examples(run: Path) -> list[dict[str, Any]]:
    with open(run / "dataset" / "train.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def batch_order(
    examples: list[dict[str, Any]],
    tokenizer: Any,
    schema: Any,
    max_len: int,
    seed: int,
    batch: int,
    epochs: int = 1,
) -> list[list[int]]:
    """Row indices of ``examples`` per optimizer step, as ragtune's SFT Trainer draws them.

    The rows are tokenized as training tokenizes them (rows too long are dropped there, so an
    index is a position among the kept rows) and drawn through the Trainer's own dataloader
    (its sampler, seeded with ``seed`` = the run's ``seed``); a tiny random model stands in."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig

    from ragtune.training.data import tokenize_examples
    from ragtune.training.trainer import trainer_class

    dataset, _ = tokenize_examples(examples, tokenizer, schema, max_len)
    key: dict[tuple[int, ...], int] = {}
    for i, ids in enumerate(dataset["input_ids"]):
        key.setdefault(tuple(ids), i)  # identical rows are one row to the probe
    tiny = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    steps: list[list[int]] = []
    with tempfile.TemporaryDirectory(prefix="spike_probe_") as scratch:  # nothing is saved there
        args = SFTConfig(
            output_dir=scratch,
            per_device_train_batch_size=batch,
            seed=seed,
            data_seed=seed,
            use_cpu=True,
            completion_only_loss=True,
            max_length=max_len,
            report_to=[],
            num_train_epochs=epochs,
        )
        trainer = trainer_class()(
            model=tiny, args=args, train_dataset=dataset, processing_class=tokenizer
        )
        loader = trainer.get_train_dataloader()
        for _ in range(epochs):  # each pass reshuffles, as the Trainer's epochs do
            for b in loader:
                steps.append(rows_of(b, key))
    return steps


def rows_of(batch: dict[str, Any], key: dict[tuple[int, ...], int]) -> list[int]:
    """The dataset rows of one collated batch (padding dropped by the attention mask)."""
    ids, mask = batch["input_ids"].tolist(), batch["attention_mask"].tolist()
    return [
        key.get(tuple(t for t, m in zip(r, mm, strict=True) if m), -1)
        for r, mm in zip(ids, mask, strict=True)
    ]


def example_gradients(
    model: Any,
    tokenizer: Any,
    schema: Any,
    examples: list[dict[str, Any]],
    rows: list[int],
    autocast: bool = True,
) -> tuple[list[dict[str, Any]], float]:
    """Per example of one batch: its completion tokens, their losses, its gradient norm; and
    the norm of their sum, the batch's gradient (bfloat16 autocast as CPU training runs)."""
    import torch

    from ragtune.training.data import encode_completion

    encoded = [
        (
            schema.encode_prompt(tokenizer, examples[i]["prompt"]),
            encode_completion(tokenizer, examples[i]["completion"]),
        )
        for i in rows
    ]
    total = sum(len(c) for _, c in encoded)
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    summed = [torch.zeros_like(q, dtype=torch.float32) for q in params]
    for i, (p_ids, c_ids) in zip(rows, encoded, strict=True):
        model.zero_grad()
        ids = torch.tensor([p_ids + c_ids])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids).logits.float()
        logp = torch.log_softmax(logits[0, len(p_ids) - 1 : -1], -1)
        nll = -logp.gather(1, torch.tensor(c_ids)[:, None])[:, 0]
        (nll.sum() / total).backward()
        grads = [q.grad if q.grad is not None else torch.zeros_like(q) for q in params]
        norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads)).item()
        for acc, g in zip(summed, grads, strict=True):
            acc += g.float()
        out.append(
            {
                "row": i,
                "kind": examples[i].get("kind"),
                "tokens": [tokenizer.decode([t]) for t in c_ids],
                "nll": [round(x, 3) for x in nll.tolist()],
                "grad_norm": round(norm, 3),
                "question": examples[i].get("instruction", "")[:100],
            }
        )
    return out, torch.sqrt(sum((g**2).sum() for g in summed)).item()


def _lora_model(model_path: str, weights: str, r: int, alpha: int) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    lora = LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    load_lora(model, weights)
    return model.eval()


def lora_state(model: Any) -> dict[str, Any]:
    """A copy of the model's trainable (LoRA) parameters."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def move_between(model: Any, start: dict[str, Any], end: dict[str, Any], share: float) -> None:
    """Set the LoRA to the point ``share`` of the way from ``start`` to ``end`` (a straight
    line in parameter space, as an optimizer step moves; 0 = start, 1 = end)."""
    import torch

    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in start:
                p.copy_(start[n] + share * (end[n] - start[n]))


def load_lora(model: Any, weights: str) -> None:
    """Load save-at's state dict or a checkpoint's adapter_model.safetensors into ``model``."""
    import torch

    if str(weights).endswith(".safetensors"):  # a checkpoint's adapter_model.safetensors
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        loaded = set_peft_model_state_dict(model, load_file(weights))
    else:  # save-at's state dict
        loaded = model.load_state_dict(torch.load(weights), strict=False)
    if loaded.unexpected_keys:
        raise SystemExit(
            f"{weights}: keys the LoRA does not have, e.g. {loaded.unexpected_keys[0]}"
        )


def _save_at(steps: list[int], weights: str, sft_args: list[str]) -> None:
    """Train as ``sft_args`` say, saving the LoRA after each update in ``steps`` (``weights``
    with ``{step}`` in it, or one file for one step); exit after the last."""
    import torch
    from transformers import TrainerCallback

    from ragtune.cli import run_command
    from ragtune.training import checkpoints

    class SaveAt(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):  # noqa: ANN001
            if state.global_step in steps:
                path = weights.format(step=state.global_step)
                lora = {
                    k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k
                }
                torch.save(lora, path)
                print(f"saved the LoRA after update {state.global_step} to {path}", file=sys.stderr)
                if state.global_step == max(steps):
                    raise SystemExit(0)  # the rest of the stage (save, calibrate) is not wanted
            return control

    real = checkpoints.callbacks
    checkpoints.callbacks = lambda d: [*real(d), SaveAt()]
    run_command("train", sft_args)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["save-at"]:
        if "--" not in argv or argv.index("--") < 3:
            raise SystemExit("usage: spike_probe.py save-at STEP[,STEP...] WEIGHTS -- <sft args>")
        steps = [int(x) for x in argv[1].split(",")]
        if len(steps) > 1 and "{step}" not in argv[2]:
            raise SystemExit("save-at: several steps need {step} in the weights path")
        _save_at(steps, argv[2], argv[argv.index("--") + 1 :])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=["order", "grads"])
    ap.add_argument("run", type=Path, help="the run folder (dataset/train.jsonl)")
    ap.add_argument("--model", required=True, help="the base model folder")
    ap.add_argument("--prompt", default="alpaca_rag_short")
    ap.add_argument("--max-len", type=int, default=384)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("-o", "--out", type=Path, default=Path("order.json"))
    ap.add_argument("--weights", help="grads: save-at's LoRA, or an adapter_model.safetensors")
    ap.add_argument("--toward", help="grads: a later save; measure on the line to it (--at)")
    ap.add_argument("--at", type=float, nargs="*", default=[0.5], help="shares of the way")
    ap.add_argument("--order", type=Path, help="grads: the order file")
    ap.add_argument("--steps", type=int, nargs="*", default=[])
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    a = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from ragtune.schema import get_schema

    examples = load_examples(a.run)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    schema = get_schema(a.prompt)
    if a.command == "order":
        order = batch_order(examples, tokenizer, schema, a.max_len, a.seed, a.batch, a.epochs)
        a.out.write_text(json.dumps(order))
        print(f"{len(order)} steps -> {a.out}")
        return
    order = json.loads(a.order.read_text())
    model = _lora_model(a.model, a.weights, a.r, a.alpha)
    points: list[tuple[str, float]] = [("", 0.0)]
    if a.toward:
        start = lora_state(model)
        load_lora(model, a.toward)
        end = lora_state(model)
        points = [(f" at {s:g} of the way to {a.toward}", s) for s in a.at]
    for where, share in points:
        if a.toward:
            move_between(model, start, end, share)
        for step in a.steps:
            found, norm = example_gradients(model, tokenizer, schema, examples, order[step - 1])
            print(
                f"== step {step}{where}: {len(found)} examples, the batch's gradient norm {norm:.2f}"
            )
            for e in found:
                grad, nll = e["grad_norm"], e["nll"]
                print(f"  row {e['row']:5d} {e['kind']!s:18} grad {grad:7.2f} nll {nll}")
                print(f"        {e['tokens']}  Q: {e['question']!r}")


if __name__ == "__main__":
    main()
