"""Concurrent streaming clients through the OpenAI-compatible server (issue 20.2).

The real app (``ragtune.server.create_app`` over a ``RagPipeline``, closed book) runs under
uvicorn in this process; ``--clients`` threads each send one streamed ``/v1/completions``
request at once (a question of ``--prompt`` tokens, ``max_tokens=--new``). Reported per wave:
aggregate tok/s (completion tokens of the wave / its wall time), p50/p95 latency and time to
the first text piece. ``--modes``: where the client threads run, each for ``--waves`` waves:
``threads`` = in this process (they share the server's GIL: the setup of the first
measurements), ``process`` = in a child process (as real clients), ``-1ms`` = this process's
GIL switch interval at 1 ms instead of CPython's 5 (no effect beyond the waves' spread on the
H200), ``-pf`` = the batcher's ``prefill_first``, ``-gN`` = prompts prefilled in groups of N
(default: the server's, ``ragtune.batchstream.prefill_group_for``),
``-cp`` / ``-ep`` = the prompts' forward compiled / eager (``StepBatcher(prefill_compiled)``;
the graphs of a setting other than the server's are captured before the first wave), ``-enc3`` = each request's intake as
before 2026-12-02 (helper srv4: the prompt encoded three times), ``-fresh`` = each request
builds a new HTTP client inside the clock, as every measurement before 2026-12-02 (srv3) did;
without it each client thread connects first and the clock starts when all are connected.
Each wave also reports, in server-side seconds from its start, when its requests reached the
batcher, were queued on the device and finished.
Then the same prompts straight into the batcher, and the requests one at a time
(``--sequential``): their answers must equal the concurrent ones (``equal``), and their speed
is the lone-request figure. Then the same with prompts prefilled in groups of ``--group``
(``ragtune.batchprefill``; ``--group 1``: skipped, and so is the probe below). ``--weights``:
the batcher's weights (``server.batch_weights``: FP8 or dense 16-bit copies); the answers of
two runs with different weights show how far FP8 moves them (``texts`` in ``--json``). Last
(``bench/serve_gpu.py``), the GPU time of one decode step and of each prefill shape the waves
ran (CUDA events, batcher idle), so that each wave's wall time splits into GPU work and the
rest, the attention of a step alone at several cache lengths, and a probe of whether grouped
prefills could keep answers invariant (bitwise, every padded length).

    # GPU, the Mistral-Nemo-12B shape with random weights, in NF4 as merged_4bit loads:
    python bench/serve_load.py --random --model .gpu/smol_tok --bnb4 --clients 32
    # CPU smoke test on a small model folder:
    python bench/serve_load.py --model PATH --clients 4 --prompt 64 --new 8 --batching true
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import multiprocessing
import socket
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("serve_load")


def build_pipeline(args: argparse.Namespace) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.decode import random_nemo, to_bnb4
    from ragtune.config import GenerateConfig
    from ragtune.rag import RagPipeline
    from ragtune.schema import get_schema

    tok = AutoTokenizer.from_pretrained(args.model)
    if args.random:
        model = random_nemo(args.model, args.layers)
    else:
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    if args.bnb4:
        t0 = time.perf_counter()
        model = to_bnb4(model)
        log.info("NF4 in %.1fs", time.perf_counter() - t0)
    gcfg = GenerateConfig(max_new_tokens=args.new, fast=torch.cuda.is_available())
    return RagPipeline(
        model,
        tok,
        get_schema("alpaca_rag"),
        None,
        gcfg,
        max_seq_length=args.max_seq_len,
        name="load",
    )


def questions(tok: Any, n: int, tokens: int) -> list[str]:
    """``n`` different questions of 75-100% of ``tokens`` tokens (decoded random ids)."""
    g = torch.Generator().manual_seed(0)
    top = min(len(tok), 49152)  # ids the random model's head can emit, words for the tokenizer
    out = []
    for i in range(n):
        k = int(tokens * (0.75 + 0.25 * ((i * 7) % n) / max(n - 1, 1)))
        ids = torch.randint(1000, top, (k,), generator=g).tolist()
        out.append(tok.decode(ids, skip_special_tokens=True).replace("#", " "))
    return out


def one(
    base: str, question: str, new: int, client: httpx.Client | None = None, t0: float = 0.0
) -> dict[str, Any]:
    """One streamed completion: text, completion tokens, latency and time to first piece.

    ``client``: an open, connected client (latency counted from ``t0``); None: a new client
    for this request, its setup inside the latency (httpx builds an SSL context per client,
    ~20-50 ms of the client process's GIL: 32 of them spread a wave's arrivals over ~0.5-1 s)."""
    body = {"prompt": question, "max_tokens": new, "stream": True}
    t0 = t0 or time.perf_counter()
    text, ttft, usage = "", None, {}
    with (client or httpx).stream(
        "POST", f"{base}/v1/completions", json=body, timeout=600
    ) as r:  # fmt: skip
        if r.status_code != 200:
            return {
                "status": r.status_code,
                "text": "",
                "tokens": 0,
                "latency_s": 0.0,
                "ttft_s": 0.0,
            }
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            piece = "".join(c.get("text") or "" for c in event.get("choices", []))
            if piece and ttft is None:
                ttft = time.perf_counter() - t0
            text += piece
            usage = event.get("usage") or usage
    latency = time.perf_counter() - t0
    return {
        "status": 200,
        "text": text,
        "tokens": int(usage.get("completion_tokens", 0)),
        "latency_s": latency,
        "ttft_s": ttft if ttft is not None else latency,
    }


def pct(vals: list[float], q: float) -> float:
    vals = sorted(vals)
    return round(vals[min(len(vals) - 1, int(q * len(vals)))], 3) if vals else 0.0


def wave(base: str, qs: list[str], new: int, fresh: bool = False) -> dict[str, Any]:
    """All of ``qs`` at once, one thread each. By default each thread opens its client and
    connection first and the clock starts when all are connected (the server's time, as
    clients with open connections see it); ``fresh``: a new client per request inside the
    clock (the measurements before 2026-12-02, helper srv3)."""
    n = len(qs)
    start: list[float] = []
    ready = threading.Barrier(n, action=lambda: start.append(time.perf_counter()))

    def client(q: str) -> dict[str, Any]:
        if fresh:
            ready.wait()
            return one(base, q, new)
        with httpx.Client(timeout=600) as c:
            c.get(f"{base}/healthz")  # the connection is open before the clock starts
            ready.wait()
            return one(base, q, new, c, start[0])

    with ThreadPoolExecutor(n) as pool:
        got = list(pool.map(client, qs))
    wall = time.perf_counter() - start[0]
    tokens = sum(g["tokens"] for g in got)
    return {
        "clients": len(qs),
        "wall_s": round(wall, 3),
        "tokens": tokens,
        "aggregate_tok_s": round(tokens / wall, 1),
        "latency_p50_s": pct([g["latency_s"] for g in got], 0.5),
        "latency_p95_s": pct([g["latency_s"] for g in got], 0.95),
        "ttft_p50_s": pct([g["ttft_s"] for g in got], 0.5),
        "ttft_p95_s": pct([g["ttft_s"] for g in got], 0.95),
        "non_200": sum(g["status"] != 200 for g in got),
        "texts": [g["text"] for g in got],
        "t_start": start[0],
    }


def timeline(reqs: list[Any], t0: float) -> dict[str, Any]:
    """Where a wave's requests were, in server-side seconds from the wave's start: reaching
    the batcher (HTTP, retrieve, render, encode), their prompts queued on the device, done."""
    if not reqs:
        return {}

    def q(vals: list[float]) -> list[float]:  # first, median, last
        vals = sorted(v - t0 for v in vals)
        return [round(vals[0], 3), round(vals[len(vals) // 2], 3), round(vals[-1], 3)]

    return {
        "submit_s": q([r.t_submit for r in reqs]),
        "admit_s": q([r.t_admit for r in reqs if r.t_admit]),
        "done_s": q([r.t_done for r in reqs if r.t_done]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model folder, or tokenizer with --random")
    ap.add_argument("--random", action="store_true", help="random Nemo-12B shape (bench/decode)")
    ap.add_argument("--layers", type=int, default=None, help="with --random: fewer layers")
    ap.add_argument("--bnb4", action="store_true", help="NF4 Linear layers, as merged_4bit")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=512, help="question tokens (75-100%%)")
    ap.add_argument("--new", type=int, default=128, help="max_tokens of each request")
    ap.add_argument("--max-seq-len", type=int, default=1024, help="model.max_seq_length")
    ap.add_argument("--batching", default="auto", help="server.batching: auto|true|false")
    ap.add_argument("--max-batch", type=int, default=32, help="server.max_batch")
    ap.add_argument("--batch-invariant", default="true", help="server.batch_invariant: true|false")
    ap.add_argument(
        "--weights", default="auto", help="server.batch_weights, or several: dense,fp8 (in turn)"
    )
    ap.add_argument("--waves", type=int, default=2, help="measured concurrent waves per mode")
    ap.add_argument(
        "--modes",
        default="process,process-fresh",
        help="client placement, e.g. threads,process-1ms",
    )
    ap.add_argument("--group", default="4", help="then prefill groups of these, e.g. 2,4 (1: no)")
    ap.add_argument("--sequential", type=int, default=-1, help="one-at-a-time requests (-1 all)")
    ap.add_argument("--deadline-s", type=float, default=1e9, help="skip what starts after this")
    ap.add_argument("--json", default=None, help="append result lines here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    import uvicorn

    from ragtune.server import create_app

    start = time.perf_counter()

    def late() -> bool:
        return time.perf_counter() - start > args.deadline_s

    tag: dict[str, Any] = {}  # added to every record: the weights being measured

    def emit(rec: dict[str, Any]) -> None:
        rec = {**tag, **rec, "elapsed_s": round(time.perf_counter() - start, 1)}
        print(
            json.dumps({k: v for k, v in rec.items() if k not in ("texts", "t_start")}), flush=True
        )
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(rec) + "\n")

    pipe = build_pipeline(args)
    answers: dict[str, list[str]] = {}
    base = ""
    srv: Any = None
    choices = args.weights.split(",")
    for k, weights in enumerate(choices):
        if late():
            break
        t0 = time.perf_counter()
        invariant = args.batch_invariant.lower() == "true"
        mode = args.batching if k == 0 else "true"  # (auto: the batcher replaced the fast path)
        on = pipe.generator.start_batching(
            mode, args.max_batch, invariant=invariant, weights=weights
        )
        batcher = pipe.generator._batcher
        tag["weights"] = (batcher.decoder.quantize or "model's own") if batcher else None
        dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        emit({"what": "setup", "device": dev, "batching": on,
              "prefill_group": batcher.prefiller.group if batcher else None,
              "prefill_compiled": batcher.prefiller.compiled if batcher else None,
              "dynamo_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
              "warm_s": round(time.perf_counter() - t0, 1)})  # fmt: skip
        if srv is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            app = create_app(pipe, None, max_queue=1024)
            cfg = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
            srv = uvicorn.Server(cfg)
            threading.Thread(target=srv.run, daemon=True).start()
            while not srv.started:
                time.sleep(0.05)
            base = f"http://127.0.0.1:{port}"
        texts = measure(args, pipe, base, batcher, emit, late)
        if texts:
            answers[str(tag["weights"])] = texts
        if k + 1 < len(choices) and batcher is not None:  # free its copies for the next
            batcher.close()
            pipe.generator._batcher = batcher = None
            gc.collect()
            torch.cuda.empty_cache()
    tag.pop("weights", None)
    if len(answers) > 1:  # how far the answers move with the weights (one-at-a-time answers)
        (first, want), *rest = answers.items()
        for name, got in rest:
            emit({"what": f"answers, {name} vs {first}", **agreement(pipe.tokenizer, got, want)})
    if srv is not None:
        srv.should_exit = True


def agreement(tok: Any, got: list[str], want: list[str]) -> dict[str, Any]:
    """Equal answers, and each pair's leading equal tokens (the texts re-encoded)."""
    lead = []
    for a, b in zip(got, want, strict=False):
        x, y = tok.encode(a, add_special_tokens=False), tok.encode(b, add_special_tokens=False)
        n = min(len(x), len(y))
        lead.append(next((i for i in range(n) if x[i] != y[i]), n))
    return {
        "answers": len(lead),
        "equal": sum(a == b for a, b in zip(got, want, strict=False)),
        "leading_tokens_equal": lead,
        "leading_tokens_equal_mean": round(sum(lead) / max(len(lead), 1), 1),
    }


def intake_before_srv4(pipe: Any, on: bool) -> None:
    """``-enc3``: each request's intake as before helper srv4 (for a same-call comparison): the
    closed-book context budget computed (a prompt rendered and encoded for nothing) and the
    prompt encoded again for the generation (no memo in ``Generator.encode``)."""
    from ragtune.decoding import NO_CHANGE
    from ragtune.rag import RagPipeline

    pipe.generator._recent_ids = None if on else {}
    if not on:
        pipe.__dict__.pop("prepare", None)
        return

    def prepare(question: str, input: str = "", decoding: Any = None, **kw: Any) -> Any:
        budget = decoding.max_new_tokens if decoding is not None else 0
        pipe.context_budget(question, input, budget or pipe.generator.settings.max_new_tokens)
        return RagPipeline.prepare(pipe, question, input, decoding or NO_CHANGE, **kw)

    pipe.prepare = prepare


def measure(
    args: argparse.Namespace, pipe: Any, base: str, batcher: Any, emit: Any, late: Any
) -> list[str]:
    """Every measurement of one batcher (its weights); returns the one-at-a-time answers."""
    server_switch = sys.getswitchinterval()
    default_group = batcher.prefiller.group if batcher is not None else 1
    compiled = batcher is not None and batcher.prefiller.compiled  # the server's setting

    def prefill_setting(tokens: list[str]) -> bool:  # -cp / -ep: compiled / eager forward
        return "cp" in tokens or (compiled and "ep" not in tokens)

    other = not compiled
    if batcher is not None and any(
        prefill_setting(m.split("-")[1:]) == other for m in args.modes.split(",")
    ):
        t0 = time.perf_counter()  # the other setting's graphs too, before any wave (idle)
        with torch.inference_mode():
            batcher.prefiller.compiled = other
            batcher.prefiller.warm()
            other = batcher.prefiller.compiled  # (False if the compiled forward failed)
            batcher.prefiller.compiled = compiled
        emit({"what": "prefill graphs of the other setting", "compiled": other,
              "warm_s": round(time.perf_counter() - t0, 1)})  # fmt: skip
    qs = questions(pipe.tokenizer, args.clients, args.prompt)
    emit({"what": "warm wave", **wave(base, qs, args.new)})  # prefill shapes, allocator
    waves: list[dict[str, Any]] = []
    clients = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    answers: list[str] = []

    def measured(mode: str, label: str) -> dict[str, Any]:
        """One wave; ``mode``: threads | process, then ``-Nms`` (the GIL switch interval, else
        the server's) and/or ``-fresh`` (a new client per request inside the clock)."""
        ms = next((m for m in mode.split("-")[1:] if m.endswith("ms")), None)
        tokens = mode.split("-")[1:]
        fresh = "fresh" in tokens
        intake_before_srv4(pipe, "enc3" in tokens)
        if batcher is not None:  # (idle between waves: read at the next cycle / prompt)
            batcher.prefill_first = "pf" in tokens
            sizes = [int(t[1:]) for t in tokens if t[:1] == "g" and t[1:].isdigit()]
            batcher.prefiller.group = sizes[0] if sizes else default_group
            batcher.prefiller.compiled = prefill_setting(tokens)
        sys.setswitchinterval(float(ms[:-2]) / 1e3 if ms else server_switch)
        before = pipe.generator.batching_stats() or {}
        if batcher is not None:
            batcher.trace = []
            shapes_before = batcher.prefiller.shapes.copy()
        if mode.startswith("threads"):
            got = wave(base, qs, args.new, fresh)
        else:
            got = clients.submit(wave, base, qs, args.new, fresh).result()
        t0 = got.pop("t_start")  # (CLOCK_MONOTONIC: one clock for both processes)
        after = pipe.generator.batching_stats() or {}
        counts = ("steps", "prefills", "prefill_runs")
        used = {k: after[k] - before.get(k, 0) for k in counts if k in after}
        if batcher is not None:  # prefill forwards by shape (rows, padded length)
            ran = batcher.prefiller.shapes - shapes_before
            used["shapes"] = {f"{n}x{t}": c for (n, t), c in sorted(ran.items())}
        if batcher is not None:
            used.update(timeline(batcher.trace, t0))
            batcher.trace = None
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0
        rec = {"what": label, "clients_in": mode, **got, **used}
        if batcher is not None:
            rec["prefill"] = "compiled" if batcher.prefiller.compiled else "eager"
            batcher.prefiller.compiled = compiled
        emit({**rec, "peak_gib": round(mem, 1)})
        sys.setswitchinterval(server_switch)
        return rec

    def one_at_a_time(concurrent: dict[str, Any], label: str) -> list[str]:
        n = len(qs) if args.sequential < 0 else min(args.sequential, len(qs))
        if batcher is not None:  # the concurrent wave's prefill setting (each rounds its own)
            batcher.prefiller.compiled = concurrent.get("prefill") == "compiled"
        seq = [one(base, q, args.new) for q in qs[:n] if not late()]
        if batcher is not None:
            batcher.prefiller.compiled = compiled
        if not seq:
            return []
        same = [s["text"] == c for s, c in zip(seq, concurrent["texts"], strict=False)]
        tokens = sum(s["tokens"] for s in seq)
        emit({
            "what": label,
            "prefill": concurrent.get("prefill"),
            "requests": len(seq),
            "equal": sum(same),
            "differ": [i for i, ok in enumerate(same) if not ok],
            "tok_s_each": round(tokens / sum(s["latency_s"] for s in seq), 1),
            "ttft_p50_s": pct([s["ttft_s"] for s in seq], 0.5),
            "latency_p50_s": pct([s["latency_s"] for s in seq], 0.5),
            "texts": [s["text"] for s in seq],
        })  # fmt: skip
        return [s["text"] for s in seq]

    for mode in args.modes.split(","):
        for i in range(args.waves):
            if not late():
                waves.append(measured(mode, f"wave {i + 1}"))
    if batcher is not None and not late():  # the same prompts straight into the batcher
        prompts = [pipe.generator.encode(pipe.render(q)) for q in qs]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(prompts)) as pool:
            n_tok = sum(pool.map(lambda p: len(list(batcher.stream(p, args.new, [], []))), prompts))
        wall = time.perf_counter() - t0
        emit({"what": "batcher alone (no HTTP, no EOS/stops)", "clients": len(prompts),
              "prefill_first": batcher.prefill_first,
              "wall_s": round(wall, 3), "aggregate_tok_s": round(n_tok / wall, 1)})  # fmt: skip
    if waves:
        answers = one_at_a_time(waves[-1], "one at a time")
    groups = [int(g) for g in str(args.group).split(",") if int(g) > 1]
    for group in groups:  # prompts prefilled in fixed groups
        if batcher is None or late():
            break
        mode = f"{args.modes.split(',')[-1]}-g{group}"
        batcher.prefiller.group = group  # (the batcher is idle: read at the next prompt)
        emit({"what": f"warm wave, prefill groups of {group}", **wave(base, qs, args.new)})
        for i in range(args.waves):
            if not late():
                label = f"wave {i + 1}, prefill groups of {group}"
                waves.append({**measured(mode, label), "group": group})
        one_at_a_time(waves[-1], f"one at a time, prefill groups of {group}")
        batcher.prefiller.group = default_group
    clients.shutdown()
    by_setting: dict[str, list[dict[str, Any]]] = {}
    for w in waves:
        by_setting.setdefault(w.get("prefill", "-"), []).append(w)
    for name, ws in by_setting.items():  # (the eager and compiled forwards round differently)
        same = sum(w["texts"] == ws[0]["texts"] for w in ws)
        emit({"what": "concurrent waves identical", "prefill": name, "waves": len(ws),
              "equal": same})  # fmt: skip
    if len(by_setting) > 1:  # how far the prefill settings move the answers
        (a, wa), (b, wb) = list(by_setting.items())[:2]
        pairs = zip(wa[0]["texts"], wb[0]["texts"], strict=False)
        emit({"what": f"answers, prefill {b} vs {a}", "answers": len(wa[0]["texts"]),
              "equal": sum(x == y for x, y in pairs)})  # fmt: skip
    if batcher is not None and torch.cuda.is_available():  # where a wave's time goes
        from bench.serve_gpu import attention_ms, gpu_ms, prefill_probe

        shapes = {tuple(int(x) for x in k.split("x")) for w in waves for k in w.get("shapes", {})}
        ms = gpu_ms(batcher, shapes)
        name = "compiled" if compiled else "eager"
        tables = {name: ms["prefill_ms"]}
        for setting in ("compiled", "eager"):  # the other setting's graphs, same shapes
            if setting != name and setting in by_setting:
                batcher.prefiller.compiled = setting == "compiled"
                tables[setting] = gpu_ms(batcher, shapes)["prefill_ms"]
                ms[f"prefill_{setting}_ms"] = tables[setting]
                batcher.prefiller.compiled = compiled
        for w in waves:
            table = tables.get(w.get("prefill", ""), ms["prefill_ms"])
            runs = sum(table[k] * c for k, c in w.get("shapes", {}).items())
            busy = (w.get("steps", 0) * ms["step_ms"] + runs) / 1e3
            w.update(gpu_busy_s=round(busy, 3), other_s=round(w["wall_s"] - busy, 3))
        keys = ("what", "clients_in", "prefill", "wall_s", "steps", "prefills", "prefill_runs")
        keys += ("gpu_busy_s", "other_s")
        longest = max(len(pipe.generator.encode(pipe.render(q))) for q in qs) + args.new
        cut = sorted({batcher.max_seq_len, -(-longest // 128) * 128, 512})
        ms.update(attention_ms(batcher, [n for n in cut if n <= batcher.max_seq_len]))
        emit({"what": "gpu time (CUDA events)", **ms, "highest_slot": longest,
              "waves": [{k: w.get(k) for k in keys} for w in waves]})  # fmt: skip
        for group in groups:
            emit({"what": "prefill invariance probe", **prefill_probe(batcher, args.prompt, group)})
    return answers


if __name__ == "__main__":
    main()
