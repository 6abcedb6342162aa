"""Retrieval benchmark on SQuAD v2, or on a QA file over a corpus folder.

    nice -n 10 python bench/retrieval.py [SQUAD_JSON] [--embedding-model M[,M2...]] [--device cuda]
    nice -n 10 python bench/retrieval.py SQUAD_JSON --held-out outputs/data/squad/split.json \
        --embedding-model minilm-l6,outputs/embedders/squad-minilm --chunk-sizes 1000
    nice -n 10 python bench/retrieval.py --qa data/qa/demo_eval.jsonl --corpus data/corpus \
        --chunk-sizes 300 --overlap 0.1 --embedding-model minilm-l6,outputs/embedders/squad-minilm

``--embedding-model`` takes a comma-separated list (a short name, hub id or a tuned folder from
``train/embed_ft.py``); each model gets its own index. ``--held-out SPLIT_JSON`` (written by
``train/prepare_squad.py``) keeps only the questions of the split's test articles, so a tuned
embedder is measured on documents it never trained on (the corpus still holds every article).
``--qa``/``--corpus`` measure a QA file over a corpus folder instead: a hit is a chunk of the
record's ``source`` that contains its answer (case-insensitive).

Each answerable question's target is the place its answer sits in its paragraph: a retrieved
chunk is a hit when it comes from that paragraph's document and its span contains a gold
answer span (so a 500-character piece of the right paragraph that misses the answer does
not count). Two corpus layouts show how paragraphs map to chunks:

- ``paragraph``: one JSONL record per paragraph (paragraphs never share a chunk);
- ``article``: one text file per article, paragraphs separated by blank lines (the splitter
  packs neighbouring paragraphs into one chunk up to chunk_size).

For each layout x chunk size (500/1000/2000 characters) the corpus is ingested with the real
pipeline (``ragtune.ingest``) into a fresh index, then queried dense and hybrid (BM25 + dense,
reciprocal-rank fusion) through ``Retriever.retrieve``: recall@1/3/5, MRR@10, query latency
p50/p99, ingest throughput (chunks/s) and re-ingest time of the unchanged corpus. Embedding
throughput on ~256-token chunks is measured separately (the GPU target). The last output line
is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ragtune.config import RetrieverConfig  # noqa: E402
from ragtune.embedding import embed_texts, load_embedder  # noqa: E402
from ragtune.ingest import ingest  # noqa: E402
from ragtune.paths import PROJECT_ROOT  # noqa: E402
from ragtune.retriever import Retriever  # noqa: E402
from ragtune.store import collection_name  # noqa: E402

DEFAULT_SQUAD = PROJECT_ROOT.parent / "shared" / "data" / "squad2-public" / "squad2-public.json"


def build_corpus(
    squad: dict, root: Path, layout: str, articles: set[int] | None = None
) -> list[dict]:
    """Write the corpus (every article); return one target per answerable question.

    ``articles``: indexes of the articles whose questions become targets (None = all).
    """
    root.mkdir(parents=True)
    targets = []
    for ai, art in enumerate(squad["data"]):
        title = art.get("title", f"article{ai}")
        name = f"{ai:03d}_{''.join(ch if ch.isalnum() else '_' for ch in title)[:40]}"
        if layout == "paragraph":
            path = root / f"{name}.jsonl"
            lines, offset = [], 0
        else:
            path = root / f"{name}.txt"
            parts, offset = [], 0
        for pi, para in enumerate(art["paragraphs"]):
            ctx = para["context"].strip()
            lead = len(para["context"]) - len(para["context"].lstrip())
            if layout == "paragraph":
                lines.append(json.dumps({"text": ctx, "id": f"{ai}-{pi}"}, ensure_ascii=False))
                key, base = pi + 1, 0  # JSONL line number, offsets inside the record
            else:
                key, base = None, offset
                parts.append(ctx)
                offset += len(ctx) + 2
            for qa in para["qas"]:
                if qa.get("is_impossible") or not qa.get("answers"):
                    continue
                if articles is not None and ai not in articles:
                    continue
                spans = [
                    (
                        base + a["answer_start"] - lead,
                        base + a["answer_start"] - lead + len(a["text"]),
                    )
                    for a in qa["answers"]
                ]
                targets.append(
                    {"q": qa["question"], "source": path.name, "line": key, "spans": spans}
                )
        if layout == "paragraph":
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        else:
            path.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    return targets


def held_out_articles(squad_path: str, split_json: str) -> set[int]:
    """Indexes (file order) of the test articles of a ``prepare_squad`` split."""
    from ragtune.qa import squad_documents

    test = set(json.loads(Path(split_json).read_text(encoding="utf-8"))["test_articles"])
    held = {i for i, (src, _) in enumerate(squad_documents(squad_path)) if src in test}
    if len(held) != len(test):
        raise SystemExit(f"{split_json}: its test articles are not all in {squad_path}")
    return held


def qa_targets(qa_path: str) -> list[dict]:
    """Answerable records of a QA file: hit = a chunk of its source containing the answer."""
    from ragtune.qa import load_qa

    return [
        {"q": r.instruction, "source": r.source, "answer": r.output.strip()}
        for r in load_qa(qa_path)
        if r.answerable and r.source
    ]


def is_hit(chunk, target) -> bool:
    if chunk.source != target["source"]:
        return False
    if "answer" in target:
        return target["answer"].casefold() in chunk.text.casefold()
    if target["line"] is not None and chunk.metadata.get("line") != target["line"]:
        return False
    a, b = chunk.start, chunk.start + len(chunk.text)
    return any(a <= s and e <= b for s, e in target["spans"])


def evaluate(ret: Retriever, targets: list[dict]) -> dict:
    ranks, lat, lens = [], [], []
    for t in targets:
        t0 = time.perf_counter()
        got = ret.retrieve(t["q"], k=10)
        lat.append(time.perf_counter() - t0)
        lens.append(sum(len(c.text) for c in got[:3]))
        ranks.append(next((i + 1 for i, c in enumerate(got) if is_hit(c, t)), None))
    n = len(targets)
    lat_ms = sorted(x * 1000 for x in lat)
    return {
        "recall@1": round(sum(1 for r in ranks if r and r <= 1) / n, 4),
        "recall@3": round(sum(1 for r in ranks if r and r <= 3) / n, 4),
        "recall@5": round(sum(1 for r in ranks if r and r <= 5) / n, 4),
        "mrr@10": round(sum(1 / r for r in ranks if r) / n, 4),
        "query_p50_ms": round(statistics.median(lat_ms), 1),
        "query_p99_ms": round(lat_ms[min(n - 1, int(0.99 * n))], 1),
        "top3_chars": round(statistics.mean(lens)),
    }


def embed_throughput(rcfg: RetrieverConfig, texts: list[str], n: int) -> dict:
    """Chunks/s embedding ~256-token pieces (no index writes), after a warm-up batch."""
    model = load_embedder(rcfg.embedding_model, rcfg.device)
    tok = model.tokenizer
    ids = tok(" ".join(texts), add_special_tokens=False)["input_ids"]
    pieces = [tok.decode(ids[i : i + 250]) for i in range(0, len(ids) - 250, 250)]
    pieces = (pieces * (n // max(1, len(pieces)) + 1))[:n]
    embed_texts(
        model, pieces[: rcfg.batch_size], normalize=rcfg.normalize, batch_size=rcfg.batch_size
    )
    dev = str(model.device)
    if dev.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    t0 = time.perf_counter()
    embed_texts(
        model, pieces, normalize=rcfg.normalize, batch_size=rcfg.batch_size
    )  # ingest's path
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    ntok = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in pieces[:50]]
    return {
        "embed_chunks_per_s": round(n / dt, 1),
        "embed_chunk_tokens": round(statistics.mean(ntok)),
        "embed_n": n,
        "device": dev,
        "dtype": str(next(model.parameters()).dtype),
    }


def corpora(args: argparse.Namespace, work: Path) -> list[tuple[str, Path, list[dict]]]:
    """(layout, corpus folder, targets) to measure: SQuAD layouts, or the given QA + corpus."""
    if args.qa:
        return [("corpus", Path(args.corpus), qa_targets(args.qa))]
    squad = json.loads(Path(args.squad).read_text(encoding="utf-8"))
    articles = held_out_articles(args.squad, args.held_out) if args.held_out else None
    out = []
    for layout in args.layouts.split(","):
        corpus = work / f"corpus-{layout}"
        if corpus.exists():
            shutil.rmtree(corpus)
        targets = build_corpus(squad, corpus, layout, articles)
        out.append((layout, corpus, targets[: args.max_questions or None]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("squad", nargs="?", default=str(DEFAULT_SQUAD))
    ap.add_argument("--embedding-model", default="minilm-l6", help="one or more, comma-separated")
    ap.add_argument("--held-out", default="", help="split.json of prepare_squad: its test articles")
    ap.add_argument("--qa", default="", help="QA file to measure instead of SQuAD (with --corpus)")
    ap.add_argument("--corpus", default="", help="corpus folder of --qa")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--chunk-sizes", default="500,1000,2000")
    ap.add_argument("--layouts", default="paragraph,article")
    ap.add_argument("--modes", default="dense,hybrid")
    ap.add_argument("--overlap", type=float, default=0.1, help="chunk_overlap / chunk_size")
    ap.add_argument("--max-questions", type=int, default=0, help="0 = all answerable")
    ap.add_argument(
        "--embed-n", type=int, default=0, help="texts for the throughput figure (-1: skip it)"
    )
    ap.add_argument("--workdir", default="", help="keep corpora and indexes here")
    ap.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (1 is fastest on a busy CPU)"
    )
    args = ap.parse_args()
    if bool(args.qa) != bool(args.corpus):
        ap.error("--qa and --corpus go together")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    models = args.embedding_model.split(",")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="rt-bench-"))
    results = []
    thr: dict = {}
    try:
        for layout, corpus, targets in corpora(args, work):
            for model in models:
                for size in (int(s) for s in args.chunk_sizes.split(",")):
                    rcfg = RetrieverConfig(
                        embedding_model=model,
                        device=args.device,
                        batch_size=args.batch_size,
                        k=10,
                        fetch_k=30,
                        chunk_size=size,
                        chunk_overlap=int(size * args.overlap),
                    )
                    rcfg = replace(
                        rcfg, persist_dir=str(work / f"index-{layout}-{collection_name(rcfg)}")
                    )
                    shutil.rmtree(rcfg.persist_dir, ignore_errors=True)
                    first = ingest(corpus, rcfg, show_progress=False)
                    again = ingest(corpus, rcfg, show_progress=False)
                    assert again.embedded == 0
                    row_base = {
                        "model": model,
                        "layout": layout,
                        "chunk_size": size,
                        "chunk_overlap": rcfg.chunk_overlap,
                        "chunks": first.total_chunks,
                        "ingest_s": round(first.seconds, 2),
                        "ingest_chunks_per_s": round(first.total_chunks / first.seconds, 1),
                        "reingest_s": round(again.seconds, 3),
                        "reingest_ratio": round(again.seconds / first.seconds, 4),
                        "questions": len(targets),
                    }
                    for mode in args.modes.split(","):
                        ret = Retriever.from_config(replace(rcfg, hybrid=mode == "hybrid"))
                        row = {**row_base, "mode": mode, **evaluate(ret, targets)}
                        results.append(row)
                        print(
                            f"{model[-24:]:24s} {layout:9s} {size:5d} {mode:6s} "
                            f"chunks={row['chunks']:4d} q={len(targets)} "
                            f"R@1={row['recall@1']:.3f} R@3={row['recall@3']:.3f} "
                            f"R@5={row['recall@5']:.3f} MRR={row['mrr@10']:.3f} "
                            f"p50={row['query_p50_ms']}ms p99={row['query_p99_ms']}ms "
                            f"ingest={row['ingest_chunks_per_s']}/s "
                            f"reingest={row['reingest_s']}s ({100 * row['reingest_ratio']:.2f}%)",
                            flush=True,
                        )
        if args.embed_n >= 0 and not args.qa:
            squad = json.loads(Path(args.squad).read_text(encoding="utf-8"))
            paras = [p["context"] for a in squad["data"] for p in a["paragraphs"]]
            base = RetrieverConfig(
                embedding_model=models[0], device=args.device, batch_size=args.batch_size
            )
            dev = load_embedder(base.embedding_model, base.device).device
            n = args.embed_n or (20000 if str(dev).startswith("cuda") else 256)
            thr = embed_throughput(base, paras, n)
            print(f"embedding throughput: {thr}", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    best = max(results, key=lambda r: (r["recall@3"], r["mrr@10"]))
    summary = {
        "bench": "retrieval",
        "squad": None if args.qa else str(args.squad),
        "held_out": args.held_out or None,
        "qa": args.qa or None,
        "embedding_models": models,
        "threads": args.threads or None,
        "results": results,
        "best": {
            k: best[k] for k in ("model", "layout", "chunk_size", "mode", "recall@3", "mrr@10")
        },
        **thr,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
