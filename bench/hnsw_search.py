"""How exact Chroma's approximate (HNSW) search is for ragtune's queries, per ``ef_search``.

    python bench/hnsw_search.py CORPUS QA_JSONL [--ef-search 100,400] [--builds 2] [--fetch-k 20]

For each ``ef_search`` the corpus is ingested ``--builds`` times into fresh indexes with the real
pipeline (``ragtune.ingest``, the retriever's defaults otherwise), and every question of the QA
file fetches its top ``fetch_k`` chunks by dense similarity, as the retriever does before
de-duplication and fusion. Reported: the questions whose fetched set misses an exact neighbour
(brute-force cosine over the index's own vectors), the questions whose set differs between two
builds of the same corpus (what makes a training set rebuild differently), and query seconds.
The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ragtune.config import RetrieverConfig  # noqa: E402
from ragtune.ingest import ingest  # noqa: E402
from ragtune.qa import load_qa  # noqa: E402
from ragtune.retriever import Retriever  # noqa: E402


def fetched(ret: Retriever, queries: np.ndarray, n: int) -> tuple[list[frozenset[str]], float]:
    """Each query's top ``n`` chunk ids from the HNSW index, and the seconds it took."""
    start = time.perf_counter()
    got = ret.collection.query(query_embeddings=queries.tolist(), n_results=n, include=[])
    return [frozenset(ids) for ids in got["ids"]], time.perf_counter() - start


def exact(ret: Retriever, queries: np.ndarray, n: int) -> list[frozenset[str]]:
    """Each query's true top ``n`` by cosine over the vectors the index holds."""
    rows = ret.collection.get(include=["embeddings"])
    ids, vecs = rows["ids"], np.asarray(rows["embeddings"], np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    top = np.argsort(-(queries @ vecs.T), axis=1)[:, :n]
    return [frozenset(ids[j] for j in row) for row in top]


def measure(corpus: Path, questions: list[str], ef_search: int, builds: int, fetch_k: int) -> dict:
    sets, seconds, misses = [], [], []
    for _ in range(builds):
        with tempfile.TemporaryDirectory() as tmp:
            rcfg = RetrieverConfig(persist_dir=tmp, ef_search=ef_search, fetch_k=fetch_k)
            ingest(corpus, rcfg, show_progress=False)
            ret = Retriever.from_config(rcfg)
            queries = ret.embed(questions)
            got, secs = fetched(ret, queries, fetch_k)
            truth = exact(ret, queries, fetch_k)
            sets.append(got)
            seconds.append(secs)
            misses.append(sum(g != t for g, t in zip(got, truth, strict=True)))
    differ = [sum(a != b for a, b in zip(sets[0], other, strict=True)) for other in sets[1:]]
    return {
        "ef_search": ef_search,
        "questions": len(questions),
        "missing_an_exact_neighbour": misses,
        "differing_between_builds": differ,
        "query_seconds": [round(s, 2) for s in seconds],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", type=Path)
    ap.add_argument("qa", type=Path, help="a QA JSONL file; its questions are the queries")
    ap.add_argument("--ef-search", default="100,400", help="comma-separated values to compare")
    ap.add_argument("--builds", type=int, default=2)
    ap.add_argument("--fetch-k", type=int, default=20)
    args = ap.parse_args()
    questions = [r.instruction for r in load_qa(str(args.qa))]
    rows = []
    for ef in (int(v) for v in args.ef_search.split(",")):
        row = measure(args.corpus, questions, ef, args.builds, args.fetch_k)
        print(
            f"ef_search {ef}: {row['missing_an_exact_neighbour']} of {row['questions']} questions "
            f"miss an exact top-{args.fetch_k} neighbour; {row['differing_between_builds']} "
            f"differ between builds; query {row['query_seconds']} s"
        )
        rows.append(row)
    print(json.dumps({"corpus": str(args.corpus), "fetch_k": args.fetch_k, "rows": rows}))


if __name__ == "__main__":
    main()
