"""An answerability cross-encoder on the GPU study's packs (issue 17; measured, not adopted).

all-MiniLM-L6-v2 with a one-logit head learns "this chunk holds the answer to this question"
from a pack's training pairs (``train_plain.jsonl`` of ``bench/squad_abstain_prep.py``); a
question's score is its best context chunk; AUROC against "answerable" on the validation and
test packs, beside the retrieval score (docs/benchmarks.md, "More levers tried")::

    python bench/squad_xenc.py outputs/ab/pack/s0 --epochs 2 --lr 2e-4
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from sentence_transformers.cross_encoder import (
    CrossEncoder,
    CrossEncoderTrainer,
    CrossEncoderTrainingArguments,
)
from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss
from sklearn.metrics import roc_auc_score

from ragtune.models import resolve_embedder
from ragtune.oracle import normalize


def read_jsonl(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def section(prompt: str, start: str, end: str) -> str:
    return prompt.split(start, 1)[1].split(end, 1)[0]


def training_pairs(pack: Path) -> list[tuple[str, str, float]]:
    """(question, chunk, 1 if the chunk holds an answerable question's answer else 0)."""
    pairs = []
    for r in read_jsonl(pack / "train_plain.jsonl"):
        question = section(r["prompt"], "### Instruction:\n", "\n\n### Context")
        context = section(r["prompt"], "### Context:\n", "\n\nIf the context does not")
        answer = normalize(r["completion"].replace("<|im_end|>", ""))
        for chunk in filter(str.strip, context.split("\n\n")):
            hit = r["kind"] == "oracle" and bool(answer) and answer in normalize(chunk)
            pairs.append((question, chunk, float(hit)))
    random.Random(0).shuffle(pairs)
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pack", type=Path)
    ap.add_argument("--epochs", type=float, default=1)
    ap.add_argument("--lr", type=float, default=5e-5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    pairs = training_pairs(args.pack)
    print(f"pairs {len(pairs)}, positive {sum(p[2] for p in pairs):.0f}", flush=True)
    model = CrossEncoder(resolve_embedder("minilm-l6"), num_labels=1, max_length=256)
    data = Dataset.from_dict({k: [p[i] for p in pairs] for i, k in enumerate(("q", "c", "label"))})
    targs = CrossEncoderTrainingArguments(
        output_dir=f"/tmp/squad_xenc_{args.pack.name}",
        num_train_epochs=args.epochs,
        per_device_train_batch_size=32,
        learning_rate=args.lr,
        warmup_steps=0.1,
        save_strategy="no",
        logging_steps=50,
        report_to=[],
        seed=0,
        use_cpu=True,
    )
    t0 = time.time()
    trainer = CrossEncoderTrainer(
        model=model, args=targs, train_dataset=data, loss=BinaryCrossEntropyLoss(model)
    )
    trainer.train()
    print(f"train_s {time.time() - t0:.1f}", flush=True)
    for split in ("val", "test"):
        rows = read_jsonl(args.pack / f"eval_{split}.jsonl")
        flat = [(i, r["question"], c) for i, r in enumerate(rows) for c in r["context"]]
        scores = model.predict([(q, c) for _, q, c in flat], batch_size=64)
        best = np.full(len(rows), -np.inf)
        for (i, _, _), s in zip(flat, scores, strict=True):
            best[i] = max(best[i], s)
        answerable = [r["answerable"] for r in rows]
        retrieval = [max(r["scores"]) for r in rows]
        print(
            f"{split}: AUROC cross-encoder {roc_auc_score(answerable, best):.3f}, "
            f"retrieval {roc_auc_score(answerable, retrieval):.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
