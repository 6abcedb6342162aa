"""retriever.server takes a Chroma address as ``chroma run`` prints it (``http://host:port``)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ragtune.store import IndexError_, parse_server, state_dir


@pytest.mark.parametrize(
    ("given", "want"),
    [
        ("localhost:8000", ("localhost", 8000, False)),
        ("http://localhost:8000", ("localhost", 8000, False)),
        ("http://localhost:8000/", ("localhost", 8000, False)),
        ("https://chroma.example.com", ("chroma.example.com", 443, True)),
        ("http://[::1]:8001", ("::1", 8001, False)),
    ],
)
def test_server_addresses(given, want):
    assert parse_server(given) == want


@pytest.mark.parametrize("bad", ["localhost", "ftp://h:1", "http://h:1/api/v2", "h:port"])
def test_bad_server_addresses_name_the_key(bad):
    with pytest.raises(IndexError_, match="retriever.server must be"):
        parse_server(bad)


def test_one_writer_lock_however_the_address_is_written(tmp_path):
    from ragtune.config import RetrieverConfig

    a = RetrieverConfig(persist_dir=str(tmp_path), server="127.0.0.1:8000")
    b = RetrieverConfig(persist_dir=str(tmp_path), server="http://127.0.0.1:8000/")
    assert state_dir(a) == state_dir(b)
    # the embedded index and another server are other indexes: other locks
    local = RetrieverConfig(persist_dir=str(tmp_path))
    other = RetrieverConfig(persist_dir=str(tmp_path), server="127.0.0.1:8001")
    assert len({state_dir(a), state_dir(local), state_dir(other)}) == 3


@pytest.mark.slow
def test_a_url_reaches_a_real_chroma_server(tmp_path):
    from test_ingest import _free_port, rcfg_for, write_corpus

    from ragtune.ingest import ingest
    from ragtune.retriever import Retriever

    chroma = shutil.which("chroma") or str(Path(sys.executable).parent / "chroma")
    if not Path(chroma).exists():
        pytest.skip("the chroma CLI is not installed")
    port = _free_port()
    proc = subprocess.Popen(
        [chroma, "run", "--host", "127.0.0.1", "--port", str(port), "--path", str(tmp_path / "db")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "ANONYMIZED_TELEMETRY": "False"},
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert proc.poll() is None, "chroma server exited"
                time.sleep(0.3)
        corpus = write_corpus(tmp_path / "corpus")
        rcfg = rcfg_for(tmp_path, server=f"http://127.0.0.1:{port}")
        assert ingest(corpus, rcfg, show_progress=False).embedded > 0
        plain = rcfg_for(tmp_path, server=f"127.0.0.1:{port}")
        assert ingest(corpus, plain, show_progress=False).embedded == 0  # the same index
        top = Retriever.from_config(rcfg).retrieve("Which comet returns every 83 years?", k=1)
        assert top[0].source == "science/comet.md"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
