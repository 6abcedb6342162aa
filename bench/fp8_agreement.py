"""How far the batcher's FP8 weights move a trained model's greedy answers (issue 20.2, CPU).

The server's batcher holds e4m3 copies of the weights on Hopper (``server.batch_weights=auto``,
``ragtune/fp8weights.py``). On the 12B-shaped random model the answers of fp8 and 16-bit weights
share almost nothing, because its logits are nearly flat; that says nothing about a trained
model. This script answers the questions of a ``bench/squad_cpu.sh`` run with a model it
trained, on the contexts its evaluation retrieved, through ``FastDecoder`` twice: the model's
own weights (``quantize=None``) and FP8 (``quantize="fp8"``; on CPU the float32 emulation of the
same e4m3 arithmetic the GPU's ``torch._scaled_mm`` does), and reports how many answers are
identical, the leading tokens they share, and the SQuAD F1 of each against the gold answers.

    python bench/fp8_agreement.py /tmp/squad1 --model /tmp/squad1/runs/raft/model --n 60
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ragtune.fastdecode import FastDecoder  # noqa: E402
from ragtune.loading import load_model  # noqa: E402
from ragtune.metrics import f1_score, max_over_gold  # noqa: E402
from ragtune.schema import PromptFields, get_schema  # noqa: E402


def prompts_of(work: Path, schema, tokenizer, n: int, chunk: int) -> list[tuple[str, list[str]]]:
    """(prompt, gold answers) for the first ``n`` raft_rag questions of the run's evaluation."""
    texts: dict[str, str] = {}
    out = []
    for line in (work / "runs" / "eval" / "answers.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["mode"] != "raft_rag":
            continue
        chunks = []
        for hit in row["retrieved"]:
            src = hit["source"]
            if src not in texts:
                texts[src] = (work / "corpus" / src).read_text(encoding="utf-8")
            chunks.append(texts[src][hit["start"] : hit["start"] + chunk])
        fields = PromptFields(instruction=row["question"], context=chunks)
        out.append((schema.render_prompt(fields, tokenizer), row["gold"]))
        if len(out) == n:
            break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path, help="a bench/squad_cpu.sh work folder")
    ap.add_argument("--model", required=True, help="a model folder the run trained")
    ap.add_argument("--prompt", default="alpaca_rag_short")
    ap.add_argument("--chunk", type=int, default=300, help="retriever.chunk_size of the run")
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--new", type=int, default=32)
    args = ap.parse_args()

    torch.manual_seed(0)
    model, tok = load_model(args.model, device="cpu", dtype="float32")
    schema = get_schema(args.prompt)
    rows = prompts_of(args.work, schema, tok, args.n, args.chunk)
    eos = [tok.eos_token_id]
    answers = {}
    for weights in (None, "fp8"):
        fd = FastDecoder(model, tok, max_seq_len=1024, compile=False, quantize=weights)
        t0 = time.perf_counter()
        answers[weights] = [
            fd.generate(tok(p, add_special_tokens=False)["input_ids"], args.new, eos)
            for p, _ in rows
        ]
        print(f"{weights or 'own weights'}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        del fd
    own, fp8 = answers[None], answers["fp8"]
    same = sum(a == b for a, b in zip(own, fp8, strict=True))
    lead = []
    for a, b in zip(own, fp8, strict=True):
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        lead.append(k / max(1, len(a)))

    def f1(ids_list):
        texts = [tok.decode(ids, skip_special_tokens=True).strip() for ids in ids_list]
        return (
            100
            * sum(
                max_over_gold(f1_score, t, gold) for t, (_, gold) in zip(texts, rows, strict=True)
            )
            / len(rows)
        )

    print(
        json.dumps(
            {
                "questions": len(rows),
                "identical_answers": same,
                "mean_shared_lead_of_own_answer": round(sum(lead) / len(lead), 3),
                "f1_own": round(f1(own), 1),
                "f1_fp8": round(f1(fp8), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
