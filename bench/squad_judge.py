"""Would a yes/no judge prompt tell answerable from unanswerable questions better than the
decision's features? A study on a finished product run (bench/squad_product_gpu.sh), GPU.

For every question of the run's test answers (``runs/eval/answers.jsonl``) and of its
validation answers (``runs/raft/calibration/answers.jsonl``) the context is retrieved again
exactly as the answer path did (``RagPipeline.prepare``: the same index, budget and prompt; the
log says how many test contexts match the eval's record of them), and three prompts are made:

- ``judge``: the model's own schema with the question, the decision's candidate answer and
  "is the proposed answer correct according to the context? yes or no";
- ``judge_q``: the schema with the question alone, "does the context answer it? yes or no";
- ``judge_chat``: ``judge``'s text in the base model's own chat template.

Each is scored as the log-odds of a yes-token against a no-token at the first answer position
(one prefill, no decoding): the schema prompts by the fine-tuned model (``*_tuned``) and, with
``--base``, all three by the base model (``*_base``). Writes one JSON line per question:
``id``, ``split`` (test / validation) and the scores; ``bench/calibration_variants.py --judge``
refits the decision with them (CPU). Measured in docs/benchmarks.md ("A yes/no judge").

    python bench/squad_judge.py RUN_DIR --base /tmp/ab/qwen --out judge_s0.jsonl \
        prompt=alpaca_rag_short retriever.chunk_size=300 ... (the run's eval keys)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ragtune.budget import token_counter  # noqa: E402
from ragtune.config import compose  # noqa: E402
from ragtune.decoding import Decoding  # noqa: E402
from ragtune.schema import PromptFields, get_schema  # noqa: E402

log = logging.getLogger("squad_judge")

JUDGE = (
    "{question}\n\nProposed answer: {candidate}\n\n"
    "Is the proposed answer correct according to the context? Answer yes or no."
)
JUDGE_Q = "Does the context answer this question: {question}\n\nAnswer yes or no."
YES, NO = ("yes", "Yes", " yes", " Yes", "YES"), ("no", "No", " no", " No", "NO")


def first_ids(tokenizer: Any, words: Sequence[str]) -> list[int]:
    return sorted({tokenizer.encode(w, add_special_tokens=False)[0] for w in words})


def yes_no(
    model: Any, tokenizer: Any, schema: Any, prompts: Sequence[str], batch: int, chat: bool = False
) -> list[float]:
    """log P(yes-tokens) - log P(no-tokens) at the first answer position of each prompt."""
    import torch

    from ragtune.answerability import right_padded

    yes, no = first_ids(tokenizer, YES), first_ids(tokenizer, NO)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if chat:  # the base model asked in its own chat format
        ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    else:
        ids = [schema.encode_prompt(tokenizer, p) for p in prompts]
    out = [0.0] * len(ids)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for b in range(0, len(order), batch):
        idx = order[b : b + batch]
        x, mask = right_padded([ids[i] for i in idx], pad)
        with torch.inference_mode():
            logits = model(input_ids=x.to(device), attention_mask=mask.to(device)).logits
        for r, i in enumerate(idx):
            lp = torch.log_softmax(logits[r, len(ids[i]) - 1].float(), dim=-1)
            out[i] = float(torch.logsumexp(lp[yes], 0) - torch.logsumexp(lp[no], 0))
    return out


def rows_of(run: Path) -> list[dict[str, Any]]:
    test = [
        {**r, "split": "test"}
        for line in (run / "runs/eval/answers.jsonl").open()
        if (r := json.loads(line))["mode"] == "raft_rag"
    ]
    val = [
        {**json.loads(line), "split": "validation"}
        for line in (run / "runs/raft/calibration/answers.jsonl").open()
    ]
    return test + val


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--base", help="the base model's folder (its judge scores too)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from omegaconf import OmegaConf

    from ragtune.loading import load_model
    from ragtune.rag import RagPipeline
    from ragtune.retriever import Retriever
    from ragtune.store import as_rcfg

    run = args.run
    cfg = compose("eval", args.overrides)
    model, tok = load_model(
        str(run / "runs/raft/model"), dtype="bfloat16", for_inference=True, max_seq_length=384
    )

    def retriever(index: str) -> Retriever:
        rcfg = as_rcfg(OmegaConf.merge(cfg.retriever, {"persist_dir": str(run / index)}))
        return Retriever.from_config(rcfg).with_token_counter(token_counter(tok))

    test_retriever, val_retriever = retriever("index_all"), retriever("index_train")
    pipe = RagPipeline(
        model,
        tok,
        get_schema(cfg.prompt.name),
        test_retriever,
        cfg.generate,
        max_seq_length=cfg.model.max_seq_length,
        context_tokens=cfg.retriever.context_tokens,
    )
    rows = rows_of(run)
    judge, judge_q, judge_chat, same = [], [], [], 0
    for r in rows:
        pipe.retriever = test_retriever if r["split"] == "test" else val_retriever
        # the calibration answered with train/sft.py's generate.max_new_tokens (64), the eval
        # with 32: the context budget depends on it
        p = pipe.prepare(
            r["question"], decoding=Decoding(max_new_tokens=32 if r["split"] == "test" else 64)
        )
        if "retrieved" in r:  # the eval's own record of its context: check it is the same
            same += [(c.source, c.start) for c in p.chunks] == [
                (x["source"], x["start"]) for x in r["retrieved"]
            ]
        ctx = [c.text for c in p.chunks]
        q, cand = r["question"], r["candidate"]
        judge.append(
            pipe.schema.render_prompt(
                PromptFields(JUDGE.format(question=q, candidate=cand), "", ctx), pipe.tokenizer
            )
        )
        chat_text = (
            "Context:\n" + "\n\n".join(ctx) + "\n\n" + JUDGE.format(question=q, candidate=cand)
        )
        judge_chat.append(
            pipe.tokenizer.apply_chat_template(
                [{"role": "user", "content": chat_text}], tokenize=False, add_generation_prompt=True
            )
        )
        judge_q.append(
            pipe.schema.render_prompt(
                PromptFields(JUDGE_Q.format(question=q), "", ctx), pipe.tokenizer
            )
        )
    n_test = sum(r["split"] == "test" for r in rows)
    log.info("contexts: %d of %d test questions retrieved as in the eval", same, n_test)
    scores = {
        "judge_tuned": yes_no(pipe.model, pipe.tokenizer, pipe.schema, judge, args.batch),
        "judge_q_tuned": yes_no(pipe.model, pipe.tokenizer, pipe.schema, judge_q, args.batch),
    }
    if args.base:
        schema = pipe.schema
        del pipe, model  # the tuned model goes before the base model comes
        model, tok = load_model(args.base, dtype="bfloat16", for_inference=True, max_seq_length=384)
        scores["judge_base"] = yes_no(model, tok, schema, judge, args.batch)
        scores["judge_q_base"] = yes_no(model, tok, schema, judge_q, args.batch)
        scores["judge_chat_base"] = yes_no(model, tok, schema, judge_chat, args.batch, chat=True)
    with args.out.open("w") as f:
        for i, r in enumerate(rows):
            row = {"id": r["id"], "split": r["split"]} | {k: v[i] for k, v in scores.items()}
            f.write(json.dumps(row) + "\n")
    print(
        f"wrote {args.out}: {len(rows)} questions ({n_test} test), contexts as eval {same}/{n_test}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
