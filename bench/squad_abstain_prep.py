"""Answer-or-abstain study, CPU half: retrieval and prompts for bench/squad_abstain_gpu.py.

    python bench/squad_abstain_prep.py SPLIT_DIR PACK_DIR [--val-articles 1] [--set KEY=VALUE ...]

SPLIT_DIR is a train/prepare_squad.py split with all questions (--max-train 0 --max-test 0).
One training article (seeded, by source) is held out as the validation split that fits the
threshold; the rest trains. Writes into PACK_DIR: ``train_<variant>.jsonl`` (rendered
prompt/completion examples from ragtune.raft.build_examples with ragtune's retriever on the
training articles' index) and ``eval_val.jsonl`` / ``eval_test.jsonl`` (per question: rendered
RAG prompt with the context the evaluation retriever returns, the closed-book prompt, golds,
retrieval scores). The GPU half trains and decodes from these files alone. ``--set`` adds config
overrides to every stage (e.g. ``retriever.embedding_model=DIR`` for a tuned embedder: training
contexts and evaluation contexts then both come from it, each index rebuilt for it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

R = [
    "prompt=alpaca_rag_short",
    "retriever.chunk_size=300",
    "retriever.chunk_overlap=30",
    "model.max_seq_length=384",
]
# name -> (raft overrides, which records: all | answerable | recipe600)
VARIANTS = {
    "recipe": (["raft.oracle_fraction=1.0", "raft.unanswerable_fraction=0.33"], "recipe600"),
    "plain": (["raft.oracle_fraction=1.0"], "all"),
    "answer_only": (["raft.oracle_fraction=1.0"], "answerable"),
    "contrast": (
        ["raft.oracle_fraction=1.0", "raft.contrastive=true", "raft.unanswerable_on_topic=true"],
        "all",
    ),
    "contrast_ans": (["raft.oracle_fraction=1.0", "raft.contrastive=true"], "answerable"),
    "closed": (["raft.mode=closed", "raft.oracle_fraction=1.0"], "all"),
}


class _Memo:
    """The retriever with its candidates remembered: every variant asks the same questions."""

    def __init__(self, retriever):  # noqa: ANN001
        self.r, self.memo = retriever, {}

    def candidates(self, query: str, n: int):  # noqa: ANN201
        if (query, n) not in self.memo:
            self.memo[query, n] = self.r.candidates(query, n)
        return self.memo[query, n]

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.r, name)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("split_dir", type=Path)
    ap.add_argument("pack_dir", type=Path)
    ap.add_argument("--val-articles", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()

    from ragtune.answerability import split_by_source
    from ragtune.budget import ANSWER_RESERVE, token_counter
    from ragtune.config import compose
    from ragtune.ingest import ingest
    from ragtune.metrics import retrieval_hit
    from ragtune.qa import gold_answers, load_qa, sample_records
    from ragtune.raft import BuildSettings, build_examples
    from ragtune.retriever import Retriever
    from ragtune.schema import PromptFields, get_schema
    from ragtune.training.data import load_tokenizer

    sd, pack = args.split_dir.resolve(), args.pack_dir.resolve()
    pack.mkdir(parents=True, exist_ok=True)
    records = load_qa(sd / "train.jsonl")
    train, val = split_by_source(records, args.val_articles, args.seed)
    test = load_qa(sd / "test.jsonl")
    (pack / "split.json").write_text(
        json.dumps(
            {
                "val_sources": sorted({r.source for r in val}),
                "n_train": len(train),
                "n_val": len(val),
                "n_test": len(test),
            },
            indent=2,
        )
    )

    def cfg(extra: list[str], corpus: Path, index: Path):  # noqa: ANN202
        return compose(
            "sft",
            [
                *R,
                *args.set,
                *extra,
                f"data.corpus={corpus}",
                f"retriever.persist_dir={index}",
                "output_dir=/tmp/x",
            ],
        )

    base = cfg([], sd / "corpus_train", sd / "index_train")
    schema = get_schema(base.prompt.name)
    tok = load_tokenizer(base)
    ingest(sd / "corpus_train", base.retriever, show_progress=False)
    r_train = _Memo(Retriever.from_config(base.retriever, token_counter=token_counter(tok)))
    for name in args.variants.split(","):
        extra, which = VARIANTS[name]
        c = cfg(extra, sd / "corpus_train", sd / "index_train")
        recs = {
            "all": train,
            "answerable": [r for r in train if r.answerable],
            "recipe600": sample_records(records, 600, 0),
        }[which]
        ex, stats = build_examples(
            recs, r_train, schema, tok, BuildSettings.from_config(c), progress=False
        )
        with (pack / f"train_{name}.jsonl").open("w") as f:
            for e in ex:
                f.write(json.dumps({k: e[k] for k in ("prompt", "completion", "kind")}) + "\n")
        print(name, json.dumps(stats["kinds"]), f"abstain_rate={stats['abstain_rate']:.2f}")
        sys.stdout.flush()

    full = cfg([], sd / "corpus", sd / "index_all")
    ingest(sd / "corpus", full.retriever, show_progress=False)
    r_all = Retriever.from_config(full.retriever, token_counter=token_counter(tok))
    reserve = max(ANSWER_RESERVE, 32)  # evaluation's answer reserve at max_new_tokens=32
    for split, recs, retr in (("val", val, r_train), ("test", test, r_all)):
        with (pack / f"eval_{split}.jsonl").open("w") as f:
            for rec in recs:
                budget = schema.context_budget(
                    tok, PromptFields(rec.instruction, rec.input, []), 384, reserve
                )
                chunks = retr.retrieve(rec.instruction, k=3, budget_tokens=budget)
                ctx = [c.text for c in chunks]
                golds = list(gold_answers(rec))
                row = {
                    "id": rec.id,
                    "question": rec.instruction,
                    "gold": golds,
                    "answerable": rec.answerable,
                    "source": rec.source,
                    "context": ctx,
                    "scores": [c.score for c in chunks],
                    "hit": retrieval_hit(golds, chunks, rec.source),
                    "prompt_rag": schema.render_prompt(
                        PromptFields(rec.instruction, rec.input, ctx), tok
                    ),
                    "prompt_closed": schema.render_prompt(
                        PromptFields(rec.instruction, rec.input, None), tok
                    ),
                }
                f.write(json.dumps(row) + "\n")
        print(split, len(recs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
