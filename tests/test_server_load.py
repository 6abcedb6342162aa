"""The server under load (issue 8.5): 200 concurrent clients for 60 s on loopback.

Valid requests (plain and streaming chat completions, /ask) mixed with hostile ones
(malformed JSON, oversized bodies, a wrong API key): no 5xx, no dropped connection, every
hostile request a 4xx, the server alive afterwards with stable memory (RSS). The LM is the
tiny random model, so the load is on the server, not on the language model.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

CLIENTS = 200
SECONDS = 60.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def _client(i: int, http: httpx.AsyncClient, key: str, stop_at: float, log: Counter) -> None:
    rng = random.Random(i)
    good = {"Authorization": f"Bearer {key}"}
    question = rng.choice(
        ["Who developed Corvanite?", "When is the Lantern Tide?", "What is Vellacourt?"]
    )
    chat = {"model": "ragtune", "messages": [{"role": "user", "content": question}]}
    while time.monotonic() < stop_at:
        kind = rng.choices(
            ["chat", "stream", "ask", "badjson", "oversized", "badkey", "nomessages"],
            weights=[40, 20, 15, 7, 6, 7, 5],
        )[0]
        try:
            if kind == "chat":
                r = await http.post("/v1/chat/completions", json=chat, headers=good)
                ok = r.status_code == 200 and r.json()["choices"][0]["message"]["role"]
            elif kind == "stream":
                async with http.stream(
                    "POST", "/v1/chat/completions", json={**chat, "stream": True}, headers=good
                ) as r:
                    lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
                ok = r.status_code == 200 and lines[-1] == "data: [DONE]"
                ok = ok and all("error" not in json.loads(x[6:]) for x in lines[:-1])
            elif kind == "ask":
                r = await http.post("/ask", json={"question": question}, headers=good)
                ok = r.status_code == 200 and "sources" in r.json()
            elif kind == "badjson":
                r = await http.post(
                    "/v1/chat/completions",
                    content=b'{"messages": [',
                    headers={**good, "Content-Type": "application/json"},
                )
                ok = r.status_code == 400
            elif kind == "oversized":
                big = {"messages": [{"role": "user", "content": "x" * 20_000}]}
                r = await http.post("/v1/chat/completions", json=big, headers=good)
                ok = r.status_code == 413
            elif kind == "badkey":
                r = await http.post(
                    "/v1/chat/completions", json=chat, headers={"Authorization": "Bearer nope"}
                )
                ok = r.status_code == 401
            else:
                r = await http.post("/v1/chat/completions", json={"model": "ragtune"}, headers=good)
                ok = r.status_code == 400
            log[f"{kind}:{r.status_code}"] += 1
            if r.status_code >= 500:
                log["5xx"] += 1
            if not ok:
                log[f"unexpected:{kind}:{r.status_code}"] += 1
        except httpx.HTTPError as e:
            log[f"error:{kind}:{type(e).__name__}"] += 1


async def _load(base: str, key: str, pid: int) -> tuple[Counter, list[float]]:
    log: Counter = Counter()
    rss: list[float] = []
    limits = httpx.Limits(max_connections=CLIENTS + 10, max_keepalive_connections=CLIENTS + 10)
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as http:
        stop_at = time.monotonic() + SECONDS

        async def sample() -> None:
            while time.monotonic() < stop_at:
                rss.append(rss_mb(pid))
                await asyncio.sleep(2)

        await asyncio.gather(
            sample(), *(_client(i, http, key, stop_at, log) for i in range(CLIENTS))
        )
    return log, rss


@pytest.mark.slow
def test_200_concurrent_clients_for_60_seconds(tmp_path, tiny_lm_path):
    from test_rag import build_model_dir
    from test_server import KEY, start_server, stop_server

    model_dir, _ = build_model_dir(tmp_path, tiny_lm_path)
    proc, base, server_log = start_server(
        model_dir,
        tmp_path / "outputs",
        "generate.max_new_tokens=4",
        "server.max_body_bytes=8192",
        "server.max_queue=512",
    )
    try:
        # warm up (first requests build caches), then measure memory under load
        for _ in range(5):
            httpx.post(
                f"{base}/ask",
                json={"question": "Who developed Corvanite?"},
                headers={"Authorization": f"Bearer {KEY}"},
                timeout=120,
            ).raise_for_status()
        rss_start = rss_mb(proc.pid)
        t0 = time.monotonic()
        log, rss = asyncio.run(_load(base, KEY, proc.pid))
        elapsed = time.monotonic() - t0
        alive = proc.poll() is None
        health = httpx.get(f"{base}/healthz", timeout=30).json() if alive else {}
    finally:
        code = stop_server(proc)

    total = sum(v for k, v in log.items() if ":" in k and not k.startswith(("unexpected", "error")))
    summary = {
        "requests": total,
        "seconds": round(elapsed, 1),
        "req_per_s": round(total / elapsed, 1),
        "rss_start_mb": round(rss_start, 1),
        "rss_max_mb": round(max(rss), 1),
        "rss_end_mb": round(rss[-1], 1),
        "rss_samples_mb": [round(x) for x in rss],
        "counts": dict(sorted(log.items())),
    }
    print(json.dumps(summary, indent=2))
    (tmp_path / "load-summary.json").write_text(json.dumps(summary, indent=2))
    assert alive, server_log.read_text()[-3000:]
    assert health.get("status") == "ok"
    assert log["5xx"] == 0, summary
    assert not [k for k in log if k.startswith(("unexpected", "error"))], summary
    valid = sum(log[k] for k in log if k.split(":")[0] in ("chat", "stream", "ask"))
    assert valid >= CLIENTS, summary  # every client got answers, not only refusals
    # memory: after warm-up, growth under a minute of load stays small (no per-request leak)
    third = max(1, len(rss) // 3)
    early, late = max(rss[:third]), max(rss[-third:])
    assert late <= early * 1.10 + 40, summary
    assert code in (0, -2, 130), f"server exit code {code}"
