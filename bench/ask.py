"""Serving latency and throughput on CPU: per-question latency and the server under 1/8/32 clients.

    python bench/ask.py [--model-dir outputs/latest] [--questions 30] [--max-new-tokens 24]
                        [--concurrency 1,8,32] [--requests 48] [--skip-server]

1. Latency: ``RagPipeline.answer`` (retrieve k=3 with the model's own retriever, render with
   its schema, greedy decode of up to ``--max-new-tokens``) over the questions of
   ``data/qa/demo_eval.jsonl``; p50/p95/mean per question, split into retrieval and decoding.
2. Throughput: ``python serve/server.py`` started on a free loopback port with the same model
   and settings, then ``--requests`` chat completions sent by 1, 8 and 32 concurrent clients
   (the official ``openai`` client); requests/s, tokens/s and client-side latency p50/p95.

``--model-dir base`` benchmarks the base SmolLM2 with the default retriever and prompt.
Results are printed as markdown and written to ``<outputs>/bench/ask.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see serve/ask.py
sys.path.insert(0, str(ROOT / "tests"))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[i]


def load_questions(n: int) -> list[str]:
    rows = [json.loads(line) for line in (ROOT / "data/qa/demo_eval.jsonl").open() if line.strip()]
    return [r["instruction"] for r in rows][:n]


def overrides(args: argparse.Namespace) -> list[str]:
    model_dir = "null" if args.model_dir == "base" else str(Path(args.model_dir).resolve())
    return [f"model_dir={model_dir}", f"generate.max_new_tokens={args.max_new_tokens}"]


def bench_latency(args: argparse.Namespace, questions: list[str]) -> dict:
    from ragtune.config import compose, validate
    from ragtune.rag import ASK_TOP_LEVEL, open_pipeline

    cfg = validate(compose("ask", overrides(args)), ASK_TOP_LEVEL)
    if args.model_dir == "base":  # the base model uses the configured index: build it if needed
        from ragtune.ingest import ingest

        print(ingest(cfg.data.corpus, cfg.retriever, show_progress=False), flush=True)
    t0 = time.perf_counter()
    pipe = open_pipeline(cfg, explicit=["generate.max_new_tokens"])
    load_s = time.perf_counter() - t0
    pipe.answer(questions[0])  # warm-up (first call allocates)
    rows = []
    for q in questions:
        a = pipe.answer(q)
        rows.append((a.latency_s, a.retrieval_s, a.new_tokens, a.prompt_tokens, a.abstained))
    lat = [r[0] for r in rows]
    ret = [r[1] for r in rows]
    gen = [r[0] - r[1] for r in rows]
    toks = sum(r[2] for r in rows)
    info = pipe.describe()
    return {
        "model": info["name"],
        "prompt": info["prompt"]["name"],
        "k": (info["retriever"] or {}).get("k"),
        "questions": len(rows),
        "load_s": round(load_s, 2),
        "p50_s": round(pct(lat, 50), 3),
        "p95_s": round(pct(lat, 95), 3),
        "mean_s": round(statistics.mean(lat), 3),
        "retrieval_p50_s": round(pct(ret, 50), 3),
        "decode_p50_s": round(pct(gen, 50), 3),
        "prompt_tokens_mean": round(statistics.mean(r[3] for r in rows)),
        "new_tokens_mean": round(toks / len(rows), 1),
        "decode_tok_s": round(toks / sum(gen), 1),
        "abstained": sum(r[4] for r in rows),
    }


def bench_server(args: argparse.Namespace, questions: list[str]) -> list[dict]:
    from openai import OpenAI
    from test_server import start_server, stop_server

    outputs = Path(os.environ.get("RAGTUNE_OUTPUTS", ROOT / "outputs"))
    model_dir = overrides(args)[0].split("=", 1)[1]
    proc, base, _ = start_server(
        Path(model_dir) if model_dir != "null" else Path("null"),
        outputs,
        f"generate.max_new_tokens={args.max_new_tokens}",
        "server.max_queue=1024",
        api_key=None,
    )
    results = []
    try:
        client = OpenAI(base_url=f"{base}/v1", api_key="none", timeout=600, max_retries=0)
        served = client.models.list().data[0].id  # the server refuses other model names

        def one(i: int) -> tuple[float, int]:
            t = time.perf_counter()
            res = client.chat.completions.create(
                model=served, messages=[{"role": "user", "content": questions[i % len(questions)]}]
            )
            return time.perf_counter() - t, res.usage.completion_tokens

        one(0)  # warm-up
        for c in args.concurrency:
            n = max(args.requests, c)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                got = list(pool.map(one, range(n)))
            wall = time.perf_counter() - t0
            lat = [g[0] for g in got]
            results.append(
                {
                    "clients": c,
                    "requests": n,
                    "seconds": round(wall, 1),
                    "req_per_s": round(n / wall, 2),
                    "tok_per_s": round(sum(g[1] for g in got) / wall, 1),
                    "latency_p50_s": round(pct(lat, 50), 2),
                    "latency_p95_s": round(pct(lat, 95), 2),
                }
            )
            print(json.dumps(results[-1]), flush=True)
    finally:
        stop_server(proc)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-dir", default=str(ROOT / "outputs" / "latest"))
    p.add_argument("--questions", type=int, default=30)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--skip-server", action="store_true")
    args = p.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.model_dir != "base" and not Path(args.model_dir).exists():
        sys.exit(f"{args.model_dir} not found: train first (make demo) or pass --model-dir base")

    import torch

    questions = load_questions(args.questions)
    print(f"torch threads {torch.get_num_threads()}, {len(questions)} questions", flush=True)
    lat = bench_latency(args, questions)
    print(json.dumps(lat), flush=True)
    server = [] if args.skip_server else bench_server(args, questions)

    print(
        "\n| model | prompt | k | questions | p50 s | p95 s | mean s | retrieval p50 s "
        "| decode p50 s | prompt tok | new tok | decode tok/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {lat['model']} | {lat['prompt']} | {lat['k']} | {lat['questions']} | {lat['p50_s']} "
        f"| {lat['p95_s']} | {lat['mean_s']} | {lat['retrieval_p50_s']} | {lat['decode_p50_s']} "
        f"| {lat['prompt_tokens_mean']} | {lat['new_tokens_mean']} | {lat['decode_tok_s']} |"
    )
    if server:
        print("\n| clients | requests | req/s | tok/s | latency p50 s | latency p95 s |")
        print("|---|---|---|---|---|---|")
        for r in server:
            print(
                f"| {r['clients']} | {r['requests']} | {r['req_per_s']} | {r['tok_per_s']} "
                f"| {r['latency_p50_s']} | {r['latency_p95_s']} |"
            )
    out = Path(os.environ.get("RAGTUNE_OUTPUTS", ROOT / "outputs")) / "bench" / "ask.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"latency": lat, "server": server}, indent=2) + "\n")
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
