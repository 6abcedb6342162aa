"""Ingest: incremental and idempotent, change/delete handling, encodings, settings guard,
the writer lock, token-unit chunking and a real Chroma server on loopback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ragtune.config import RetrieverConfig
from ragtune.ingest import (
    IndexLockedError,
    IndexMismatchError,
    collection_name,
    ingest,
    open_client,
    open_collection,
    scan_sources,
    writer_lock,
)
from ragtune.paths import PROJECT_ROOT
from ragtune.retriever import Retriever

JA = (
    "霞台町の蛍灯祭は、毎年七月の第二土曜日に鏡川の河原で開かれる。"
    "灯守と呼ばれる役の者が最初の灯籠を川に流す。祭りの起源は江戸時代にさかのぼる！"
    "見物客は年々増えている？いいえ、町の人口と同じく横ばいである。"
)
DOCS = {
    "towns/alder.md": "# Alder\n\nAlder is a harbour town known for its rope walk. "
    "The rope walk is 300 metres long and was built in 1790.\n\n"
    "Every spring Alder holds the Knot Fair, where sailors compete at tying knots.",
    "towns/birch.txt": "Birch is an inland town on a chalk ridge. Its market sells "
    "cheese and wool. The Birch windmill has six sails and still grinds flour.",
    "science/comet.md": "The comet Velisande returns every 83 years. It was first "
    "recorded by the astronomer Ottilie Marsh in 1841 from the Harrow observatory.",
}


def rcfg_for(tmp: Path, **kw) -> RetrieverConfig:
    base = {"persist_dir": str(tmp / "index"), "chunk_size": 120, "chunk_overlap": 20}
    base.update(kw)
    return RetrieverConfig(**base)


def write_corpus(root: Path, docs: dict[str, str | bytes] = DOCS) -> Path:
    for rel, text in docs.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            p.write_bytes(text)
        else:
            p.write_text(text, encoding="utf-8")
    return root


def ids_by_source(rcfg) -> dict[str, set[str]]:
    return scan_sources(open_collection(open_client(rcfg), rcfg, create=False))


def test_ingest_is_incremental_and_idempotent(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    rcfg = rcfg_for(tmp_path)
    first = ingest(corpus, rcfg, show_progress=False)
    assert first.ok and first.new_files == 3 and first.embedded == first.added_chunks > 3
    before = ids_by_source(rcfg)
    assert set(before) == set(DOCS)

    again = ingest(corpus, rcfg, show_progress=False)
    assert again.embedded == 0 and again.added_chunks == 0 and again.removed_chunks == 0
    assert again.unchanged_files == 3 and again.total_chunks == first.total_chunks
    assert ids_by_source(rcfg) == before  # same deterministic ids

    # change one file: only its chunks are replaced; delete another: its chunks go
    (corpus / "towns/birch.txt").write_text("Birch is now famous for its glass bell foundry.")
    (corpus / "science/comet.md").unlink()
    third = ingest(corpus, rcfg, show_progress=False)
    assert (third.changed_files, third.deleted_files, third.unchanged_files) == (1, 1, 1)
    after = ids_by_source(rcfg)
    assert set(after) == {"towns/alder.md", "towns/birch.txt"}
    assert after["towns/alder.md"] == before["towns/alder.md"]
    assert not (after["towns/birch.txt"] & before["towns/birch.txt"])
    assert third.embedded == len(after["towns/birch.txt"])
    assert third.removed_chunks == len(before["towns/birch.txt"]) + len(before["science/comet.md"])
    ret = Retriever.from_config(rcfg)
    assert ret.find(contains="GLASS BELL")[0].source == "towns/birch.txt"
    assert not ret.find(contains="Velisande")


def test_chunk_metadata_offsets_and_ids(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    rcfg = rcfg_for(tmp_path)
    ingest(corpus, rcfg, show_progress=False)
    chunks = Retriever.from_config(rcfg).find(source="towns/alder.md", limit=0)
    assert len(chunks) >= 2
    text = DOCS["towns/alder.md"]
    for c in chunks:
        assert text[c.start : c.start + len(c.text)] == c.text  # start offset is exact
        assert len(c.text) <= 120 and len(c.content_hash) == 64
    # ids depend on source + content only: a second index elsewhere gives the same ids
    other = rcfg_for(tmp_path / "b")
    ingest(corpus, other, show_progress=False)
    assert ids_by_source(other) == ids_by_source(rcfg)


def test_shift_jis_japanese_round_trips_and_splits_at_japanese_punctuation(tmp_path):
    corpus = write_corpus(
        tmp_path / "corpus",
        {
            "ja/sjis.txt": JA.encode("cp932"),
            "ja/euc.md": JA.replace("霞台", "星浦").encode("euc_jp"),
        },
    )
    rcfg = rcfg_for(tmp_path, chunk_size=50, chunk_overlap=0)
    rep = ingest(corpus, rcfg, show_progress=False)
    assert rep.ok, rep.skipped
    ret = Retriever.from_config(rcfg)
    sjis = ret.find(source="ja/sjis.txt", limit=0)
    assert "".join(c.text for c in sjis) == JA.replace("\n", "")  # nothing lost or garbled
    assert all(c.text[-1] in "。！？、" for c in sjis[:-1])  # split at Japanese punctuation
    assert ret.find(contains="星浦町の蛍灯祭")[0].source == "ja/euc.md"


def test_token_unit_chunks_fit_in_embedding_tokens(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    rcfg = rcfg_for(tmp_path, chunk_unit="tokens", chunk_size=16, chunk_overlap=4)
    ingest(corpus, rcfg, show_progress=False)
    ret = Retriever.from_config(rcfg)
    tok = ret.model.tokenizer
    chunks = ret.find(limit=0)
    assert len(chunks) >= 8  # ~130 tokens of text in 16-token pieces
    assert max(len(tok.encode(c.text, add_special_tokens=False)) for c in chunks) <= 16


def test_collection_name_tracks_settings_and_mismatch_is_an_error(tmp_path):
    a, b = rcfg_for(tmp_path), rcfg_for(tmp_path, chunk_size=500)
    assert collection_name(a) != collection_name(b)
    assert collection_name(a) != collection_name(rcfg_for(tmp_path, normalize=False))
    corpus = write_corpus(tmp_path / "corpus")
    fixed = rcfg_for(tmp_path, collection="shared")
    ingest(corpus, fixed, show_progress=False)
    with pytest.raises(IndexMismatchError, match=r"chunk_size=120.*chunk_size=500"):
        ingest(corpus, rcfg_for(tmp_path, collection="shared", chunk_size=500))
    with pytest.raises(IndexMismatchError, match="embedding_model"):
        Retriever.from_config(rcfg_for(tmp_path, collection="shared", embedding_model="x/y"))


def test_every_setting_that_changes_chunks_or_vectors_names_and_guards_the_collection(tmp_path):
    from dataclasses import replace

    from ragtune.store import check_metadata, index_metadata

    a = rcfg_for(tmp_path)
    for other in (
        rcfg_for(tmp_path, chunk_unit="tokens"),
        rcfg_for(tmp_path, chunk_overlap=10),
        rcfg_for(tmp_path, normalize=False),
    ):
        assert collection_name(other) != collection_name(a)
    # two local model folders of the same name are two models
    x, y = (rcfg_for(tmp_path, embedding_model=str(tmp_path / d / "model")) for d in "xy")
    assert collection_name(x) != collection_name(y)
    # a named collection records the chunk unit too, and a foreign collection is refused
    with pytest.raises(IndexMismatchError, match=r"chunk_unit='chars'.*chunk_unit='tokens'"):
        check_metadata("shared", index_metadata(a), replace(a, chunk_unit="tokens"))
    with pytest.raises(IndexMismatchError, match="not made by ragtune"):
        check_metadata("theirs", {"hnsw:space": "cosine"}, a)


def test_a_reader_never_opens_a_collection_whose_settings_only_share_a_name_prefix(tmp_path):
    """chunk_overlap=2's name is a prefix of chunk_overlap=20's."""
    corpus = write_corpus(tmp_path / "corpus")
    o2, o20 = rcfg_for(tmp_path, chunk_overlap=2), rcfg_for(tmp_path, chunk_overlap=20)
    client = open_client(o2)
    made = open_collection(client, o2, create=True, corpus=corpus)
    open_collection(client, o20, create=True, corpus=corpus)
    assert open_collection(client, o2, create=False).name == made.name


def test_scan_sources_reads_every_page(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    rcfg = rcfg_for(tmp_path)
    coll = open_collection(open_client(rcfg), rcfg, create=True, corpus=corpus)
    ids = [f"c{i}" for i in range(4)]
    coll.add(
        ids=ids,
        documents=ids,
        metadatas=[{"source": f"s{i % 2}.md"} for i in range(4)],
        embeddings=[[1.0, float(i)] for i in range(4)],
    )
    want = {"s0.md": {"c0", "c2"}, "s1.md": {"c1", "c3"}}
    assert scan_sources(coll, page=2) == scan_sources(coll, page=3) == want


def test_second_writer_is_refused_with_a_clear_message(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    rcfg = rcfg_for(tmp_path)
    with writer_lock(rcfg), pytest.raises(IndexLockedError, match="another process is writing"):
        ingest(corpus, rcfg, show_progress=False)
    assert ingest(corpus, rcfg, show_progress=False).ok  # lock released -> fine


def test_unsupported_and_bad_files_are_skipped_and_the_rest_ingests(tmp_path):
    corpus = write_corpus(
        tmp_path / "corpus",
        {**DOCS, "bin/blob.txt": bytes(range(256)) * 4, "empty.md": b"", "x.docx": b"PK\x03"},
    )
    rep = ingest(corpus, rcfg_for(tmp_path), show_progress=False)
    assert not rep.ok and rep.new_files == 3
    reasons = dict(rep.skipped)
    assert set(reasons) == {"bin/blob.txt", "empty.md", "x.docx"}
    assert "binary" in reasons["bin/blob.txt"] and "empty" in reasons["empty.md"]


def test_index_entry_point_exits_1_with_a_summary_naming_skipped_files(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", {**DOCS, "bad.txt": b"\x00\x01\x02" * 50})
    env = {**os.environ, "RAGTUNE_OUTPUTS": str(tmp_path / "out")}
    cmd = [sys.executable, str(PROJECT_ROOT / "train/index.py"), f"data.corpus={corpus}"]
    cmd += [
        "retriever.chunk_size=200",
        "retriever.chunk_overlap=10",
        "hydra.run.dir=" + str(tmp_path / "run"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "skipped bad.txt: binary" in proc.stdout
    assert "3 new" in proc.stdout and "1 skipped" in proc.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_chroma_server_on_loopback(tmp_path):
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
        rcfg = rcfg_for(tmp_path, server=f"127.0.0.1:{port}")
        rep = ingest(corpus, rcfg, show_progress=False)
        assert rep.ok and rep.embedded > 0
        assert ingest(corpus, rcfg, show_progress=False).embedded == 0
        assert not (tmp_path / "index" / "chroma.sqlite3").exists()  # data lives in the server
        assert (tmp_path / "db" / "chroma.sqlite3").exists()
        top = Retriever.from_config(rcfg).retrieve("Which comet returns every 83 years?", k=1)
        assert top[0].source == "science/comet.md"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_pipelined_embedding_equals_sentence_transformers_encode():
    """The GPU path (tokenizer threads ahead of the model) gives encode's vectors, in order."""
    import numpy as np

    from ragtune.embedding import _embed_pipelined, _fast_tokenizer, load_embedder

    model = load_embedder("minilm-l6", "cpu")
    assert _fast_tokenizer(model) is not None  # BERT-like: the GIL-free tokenizer path is taken
    texts = [f"Chunk {i}: " + "the harbour keeper logs the tide " * (1 + i % 7) for i in range(37)]
    want = model.encode(texts, batch_size=8, normalize_embeddings=True, convert_to_numpy=True)
    got = _embed_pipelined(model, texts, normalize=True, batch_size=8, progress=False)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
    raw = _embed_pipelined(model, texts[:5], normalize=False, batch_size=2, progress=False)
    np.testing.assert_allclose(raw, model.encode(texts[:5], batch_size=2), atol=1e-5)


def test_pipelined_embedding_lifts_tokenizer_parallelism_only_while_it_runs(monkeypatch):
    """Entry points turn the Rust tokenizer's threads off (forked workers must not inherit a
    busy pool); embedding may use them, then the setting is as it was."""
    from ragtune.embedding import _embed_pipelined, load_embedder

    model = load_embedder("minilm-l6", "cpu")
    texts = ["the harbour keeper", "the windmill grinds flour", "a comet returns"]
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    _embed_pipelined(model, texts, normalize=True, batch_size=2, progress=False)
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    _embed_pipelined(model, texts, normalize=True, batch_size=2, progress=False)
    assert "TOKENIZERS_PARALLELISM" not in os.environ


def test_pipelined_embedding_progress_counts_chunks(capsys):
    from ragtune.embedding import _embed_pipelined, load_embedder

    model = load_embedder("minilm-l6", "cpu")
    texts = [f"chunk {i} about the harbour" for i in range(5)]
    _embed_pipelined(model, texts, normalize=True, batch_size=2, progress=True)
    assert "5/5" in capsys.readouterr().err


def test_pipelined_embedding_normalises_a_model_without_a_normalize_layer():
    """normalize=True gives unit rows (cosine = dot product in the index) for any model, e.g. an
    embed-ft model whose modules end at pooling."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from ragtune.embedding import _embed_pipelined, load_embedder

    minilm = load_embedder("minilm-l6", "cpu")
    pooled = SentenceTransformer(modules=[minilm[0], minilm[1]], device="cpu")  # no Normalize
    texts = ["the harbour keeper logs the tide", "the windmill grinds flour", "a comet"]
    raw = _embed_pipelined(pooled, texts, normalize=False, batch_size=2, progress=False)
    norms = np.linalg.norm(raw, axis=1, keepdims=True)
    assert not np.allclose(norms, 1.0, atol=1e-3)  # the fixture really is unnormalised
    got = _embed_pipelined(pooled, texts, normalize=True, batch_size=2, progress=False)
    np.testing.assert_allclose(got, raw / norms, atol=1e-5)


def test_every_stage_reads_a_jsonl_corpus_by_the_configured_text_field(tmp_path):
    """``ingest_corpus`` (what index, train, eval, gen-qa and embed-ft call) takes the corpus,
    the retriever settings and ``data.jsonl_text_field`` from the stage's config."""
    import json

    from omegaconf import OmegaConf

    from ragtune.ingest import ingest_corpus

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rows = [{"text": "a title only", "body": "The comet Velisande returns every 83 years."}]
    (corpus / "notes.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    rcfg = rcfg_for(tmp_path)
    cfg = OmegaConf.create({"data": {"corpus": str(corpus), "jsonl_text_field": "body"}})
    cfg.retriever = OmegaConf.structured(rcfg)
    report = ingest_corpus(cfg)
    assert report.ok
    texts = [c.text for c in Retriever.from_config(rcfg).find(limit=0)]
    assert texts and all("Velisande" in t and "title" not in t for t in texts)
    # another corpus and retriever named by the caller (evaluation's eval.corpus)
    other = write_corpus(tmp_path / "other", {"a.md": DOCS["towns/birch.txt"]})
    rcfg2 = rcfg_for(tmp_path / "second")
    ingest_corpus(cfg, rcfg2, other)
    assert any("windmill" in c.text for c in Retriever.from_config(rcfg2).find(limit=0))
