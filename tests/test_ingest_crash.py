"""Ingest under crashes (issue 8.1), with real processes: ``python train/index.py`` is killed
with SIGKILL at random points, >= 20 times, while the corpus keeps changing between trials.

After each kill, a fresh process checks that the index opens and holds only complete chunks
(id, hash, embedding and metadata agree) that belong either to the state before the trial or
to the current corpus, and that every file the journal calls committed is complete. Then it
re-runs the ingest to completion and checks the index is exactly the current corpus: no
duplicates, nothing missing, nothing stale. A second concurrent writer is refused.

Slow (several minutes): ``pytest -m slow tests/test_ingest_crash.py``.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import trials

from ragtune.paths import PROJECT_ROOT

pytestmark = pytest.mark.slow

TRIALS = trials(20, ci=6)  # RAGTUNE_CI=1: 6 trials
WORDS = [
    "harbour",
    "lantern",
    "alloy",
    "heron",
    "loom",
    "treaty",
    "festival",
    "river",
    "bridge",
    "ferry",
    "comet",
    "observatory",
    "market",
    "windmill",
    "choir",
    "lighthouse",
    "cottage",
    "glass",
    "copper",
    "nickel",
    "tide",
    "ember",
    "keeper",
    "wick",
]


def _fresh_client(rcfg):
    """A client that re-reads the index from disk (Chroma caches one system per path)."""
    from chromadb.api.shared_system_client import SharedSystemClient

    from ragtune.ingest import open_client

    SharedSystemClient.clear_system_cache()
    return open_client(rcfg)


def _expected(corpus: Path, rcfg) -> tuple[set[str], dict[str, set[str]], dict[str, str]]:
    from ragtune.ingest import chunk_docs, make_splitter
    from ragtune.loaders import discover, load_file, read_bytes

    files, _ = discover(corpus)
    splitter = make_splitter(rcfg)
    ids, per_file, shas = set(), {}, {}
    for rel, path in files:
        data = read_bytes(path, 0)
        shas[rel] = hashlib.sha256(data).hexdigest()
        per_file[rel] = {c.id for c in chunk_docs(load_file(path, rel, data).docs, splitter)}
        ids |= per_file[rel]
    return ids, per_file, shas


def _snapshot(rcfg, corpus: Path) -> dict | None:
    """Open the index as a crash left it; check every chunk is whole; None if not created."""
    import numpy as np

    from ragtune.ingest import chunk_id, collection_name

    client = _fresh_client(rcfg)
    names = [c if isinstance(c, str) else c.name for c in client.list_collections()]
    if collection_name(rcfg, corpus) not in names:
        return None
    coll = client.get_collection(collection_name(rcfg, corpus), embedding_function=None)
    got = coll.get(include=["documents", "metadatas", "embeddings"])
    bad = []
    for i, doc, meta, emb in zip(
        got["ids"], got["documents"], got["metadatas"], got["embeddings"], strict=True
    ):
        whole = (
            i == chunk_id(meta["source"], doc)
            and meta["content_hash"] == hashlib.sha256(doc.encode()).hexdigest()
            and isinstance(meta.get("start"), int)
            and len(emb) == 384
            and abs(float(np.linalg.norm(emb)) - 1) < 1e-3
        )
        if not whole:
            bad.append(i)
    q = coll.query(query_embeddings=[np.ones(384) / np.sqrt(384)], n_results=1)
    return {
        "ids": got["ids"],
        "bad": bad,
        "count": coll.count(),
        "query_ok": len(q["ids"][0]) == min(1, len(got["ids"])),
    }


def _check(corpus: Path, rcfg_d: dict, rerun: bool) -> dict:
    from ragtune.config import RetrieverConfig
    from ragtune.ingest import Journal, collection_name, ingest, state_dir

    rcfg = RetrieverConfig(**rcfg_d)
    exp_ids, per_file, shas = _expected(corpus, rcfg)
    out: dict = {"expected": exp_ids, "after_kill": _snapshot(rcfg, corpus)}
    journal = Journal(state_dir(rcfg) / f"{collection_name(rcfg, corpus)}.journal.jsonl").load()
    have = set(out["after_kill"]["ids"]) if out["after_kill"] else set()
    out["committed_incomplete"] = sorted(
        rel
        for rel, e in journal.items()
        if shas.get(rel) == e.get("sha256") and not per_file[rel] <= have
    )
    if rerun:
        _fresh_client(rcfg)
        out["rerun_ok"] = ingest(corpus, rcfg, show_progress=False).ok
        out["final"] = _snapshot(rcfg, corpus)
    return out


def _text(rng: random.Random, n_sentences: int) -> str:
    return "\n\n".join(
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))).capitalize() + "."
        for _ in range(n_sentences)
    )


def _mutate(corpus: Path, rng: random.Random, step: int) -> None:
    files = sorted(corpus.rglob("*.md"))
    for _ in range(rng.randint(2, 6)):
        action = rng.choice(["add", "change", "change", "delete"]) if files else "add"
        if action == "add":
            (corpus / f"f{step}_{rng.randint(0, 10**6)}.md").write_text(_text(rng, 4))
        elif action == "change":
            rng.choice(files).write_text(_text(rng, rng.randint(2, 6)))
        elif len(files) > 3:
            victim = rng.choice(files)
            victim.unlink()
            files.remove(victim)


class _Watch:
    """Read a child's merged output in a thread: when the file loop started, and how many
    chunks its embedding progress bar has reported (each report follows a commit group)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.buf, self.started, self.embedded = proc, b"", None, 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        fd = self.proc.stdout.fileno()
        while True:
            data = os.read(fd, 4096)
            if not data:
                return
            self.buf += data
            if self.started is None and b"files:" in self.buf:
                self.started = time.monotonic()
            counts = re.findall(rb"embedding: (\d+)chunk", self.buf[-4096:])
            if counts:
                self.embedded = int(counts[-1])


def _index_cmd(corpus: Path, rcfg: dict, run_dir: Path) -> list[str]:
    return [
        sys.executable,
        str(PROJECT_ROOT / "train/index.py"),
        f"data.corpus={corpus}",
        f"hydra.run.dir={run_dir}",
        *(f"retriever.{k}={v}" for k, v in rcfg.items()),
    ]


def test_sigkill_at_random_points_never_corrupts_or_loses(tmp_path):
    from ragtune.config import RetrieverConfig

    rng = random.Random(1234)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(14):
        (corpus / f"doc{i:02d}.md").write_text(_text(rng, 5))
    # batch_size=1 -> a commit every 8 new chunks: many commit points to land a kill in
    rcfg = {
        "persist_dir": str(tmp_path / "index"),
        "chunk_size": 160,
        "chunk_overlap": 16,
        "batch_size": 1,
    }
    env = {**os.environ, "RAGTUNE_OUTPUTS": str(tmp_path / "out"), "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")  # much faster than 2 threads on a busy 2-core CPU

    # a baseline run measures how long the file loop takes (where the interesting kills are)
    t0 = time.monotonic()
    p = subprocess.Popen(
        _index_cmd(corpus, rcfg, tmp_path / "run0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    w = _Watch(p)
    assert p.wait(timeout=600) == 0, w.buf[-3000:]
    total = time.monotonic() - t0
    previous = set(_check(corpus, rcfg, False)["after_kill"]["ids"])

    kinds = {"in-loop": 0, "startup": 0, "finished": 0}
    for trial in range(TRIALS):
        _mutate(corpus, rng, trial)
        fresh = trial % 3 == 2  # every 3rd trial: a fresh index, so the kill hits a big first run
        if fresh:
            rcfg["persist_dir"] = str(tmp_path / f"index{trial}")
            previous = set()
        todo = len(_expected(corpus, RetrieverConfig(**rcfg))[0] - previous)  # to embed
        proc = subprocess.Popen(
            _index_cmd(corpus, rcfg, tmp_path / f"run{trial + 1}"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        watch = _Watch(proc)
        if todo and rng.random() < 0.8:
            # kill after a random number of embedded chunks (between commit groups or
            # inside one), plus a random delay, so kills land all over the write phase
            target, delay = rng.randint(0, todo), rng.uniform(0.0, 0.4)
            while proc.poll() is None and (watch.started is None or watch.embedded < target):
                time.sleep(0.005)
            time.sleep(delay)
        else:
            deadline = time.monotonic() + rng.uniform(0.2, total)  # anywhere, startup included
            while time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.01)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kinds["in-loop" if watch.started else "startup"] += 1
        else:
            kinds["finished"] += 1
        proc.wait()

        res = _check(corpus, rcfg, True)
        expected = res["expected"]
        after = res["after_kill"]
        if after is not None:  # None: killed before the collection existed
            assert after["query_ok"] and not after["bad"], (trial, after["bad"])
            assert len(after["ids"]) == len(set(after["ids"])) == after["count"]
            assert set(after["ids"]) <= previous | expected, trial  # nothing half-made
        assert res["committed_incomplete"] == [], (trial, res["committed_incomplete"])
        final = res["final"]
        assert res["rerun_ok"] and not final["bad"]
        assert len(final["ids"]) == len(set(final["ids"])), f"duplicates after trial {trial}"
        assert set(final["ids"]) == expected, f"missing/stale after trial {trial}"
        print(
            f"trial {trial}: killed={proc.returncode == -9} in_loop={watch.started is not None} "
            f"to embed={todo} chunks after kill={len(after['ids']) if after else None} "
            f"final={len(expected)}",
            flush=True,
        )
        previous = expected
    print("kill points:", kinds)
    assert sum(kinds.values()) == TRIALS
    # most trials killed the writer while files were being committed (the phase that matters)
    assert kinds["in-loop"] >= TRIALS // 2, kinds


def test_second_concurrent_writer_is_refused_and_a_killed_holder_frees_the_lock(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.md").write_text(_text(random.Random(7), 3))
    rcfg = {"persist_dir": str(tmp_path / "index"), "chunk_size": 120, "chunk_overlap": 0}
    env = {**os.environ, "RAGTUNE_OUTPUTS": str(tmp_path / "out"), "PYTHONUNBUFFERED": "1"}
    # another writer: holds the index's writer lock the way a running ingest does
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from ragtune.config import RetrieverConfig; "
            "from ragtune.ingest import writer_lock; "
            f"lock = writer_lock(RetrieverConfig(persist_dir={rcfg['persist_dir']!r})); "
            "lock.acquire(); print('locked', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run(
            _index_cmd(corpus, rcfg, tmp_path / "r2"),
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert second.returncode == 2, second.stderr[-2000:]
        assert "another process is writing to the index" in second.stderr
        assert "ingest.lock" in second.stderr
        assert not (tmp_path / "index" / "chroma.sqlite3").exists()  # refused before opening
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the OS drops the lock of a killed holder: no stale lock blocks the next run
    third = subprocess.run(
        _index_cmd(corpus, rcfg, tmp_path / "r3"),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert third.returncode == 0, third.stderr[-2000:]
    assert "1 new" in third.stdout
