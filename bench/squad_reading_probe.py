"""How well does a base model read, before any fine-tuning? Few-shot extractive QA on SQuAD v2
questions given their own (gold) paragraph: answerable F1, and the AUROC of the first-token
log-odds of "unanswerable" against the best first token (unanswerable = positive).

    python bench/squad_reading_probe.py gemma3-270m --n 120
    python bench/squad_reading_probe.py smollm2-135m-instruct --n 120

Used to choose a second embedded base model (docs/benchmarks.md, "Gemma 3 270M"); CPU, ~5 min.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
import string
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHOTS = (
    "Context: The Amazon rainforest covers much of the Amazon basin of South America. The basin "
    "encompasses seven million square kilometres, of which five and a half million are covered "
    "by the rainforest.\nQuestion: How many square kilometres does the basin encompass?\n"
    "Answer: seven million\n\n"
    "Context: Oxygen is a chemical element with symbol O and atomic number 8. It was discovered "
    "by Carl Wilhelm Scheele in Uppsala in 1773.\nQuestion: Who discovered nitrogen?\n"
    "Answer: unanswerable\n\n"
    "Context: The Eiffel Tower was completed in 1889 as the entrance to the World's Fair. It was "
    "designed by the company of Gustave Eiffel.\nQuestion: When was the Eiffel Tower completed?\n"
    "Answer: 1889\n\n"
)
ARTICLES = ("Steam_engine", "Packet_switching", "1973_oil_crisis")


def _norm(s: str) -> str:
    s = "".join(c for c in s.lower() if c not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def _f1(pred: str, gold: str) -> float:
    p, g = _norm(pred).split(), _norm(gold).split()
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    return 0.0 if common == 0 else 2 * common / (len(p) + len(g))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="short name, folder or hub id")
    ap.add_argument("--squad", default="../shared/data/squad2-public/squad2-public.json")
    ap.add_argument("--n", type=int, default=120)
    args = ap.parse_args()

    import torch
    from sklearn.metrics import roc_auc_score
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragtune.models import resolve_model

    path = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    items = [
        (p["context"], q["question"], [a["text"] for a in q["answers"]], q["is_impossible"])
        for a in json.loads(Path(args.squad).read_text())["data"]
        if a["title"] in ARTICLES
        for p in a["paragraphs"]
        for q in p["qas"]
    ]
    random.Random(0).shuffle(items)
    unanswerable = tok(" unanswerable", add_special_tokens=False)["input_ids"][0]
    f1s, labels, scores, t0 = [], [], [], time.time()
    with torch.no_grad():
        for context, question, gold, impossible in items[: args.n]:
            text = SHOTS + f"Context: {context}\nQuestion: {question}\nAnswer:"
            ids = tok(text, return_tensors="pt")["input_ids"]
            out = model.generate(
                ids,
                max_new_tokens=16,
                do_sample=False,
                return_dict_in_generate=True,
                output_scores=True,
            )
            answer = tok.decode(out.sequences[0, ids.shape[1] :], skip_special_tokens=True)
            first = torch.log_softmax(out.scores[0][0].float(), -1)
            labels.append(int(impossible))
            scores.append(float(first[unanswerable] - first.max()))
            if not impossible:
                f1s.append(max(_f1(answer.split("\n")[0].strip(), g) for g in gold))
    print(
        f"{args.model}: {len(labels)} questions, answerable F1 {100 * sum(f1s) / len(f1s):.1f}, "
        f"AUROC (unanswerable first-token log-odds) {roc_auc_score(labels, scores):.3f}, "
        f"{time.time() - t0:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
