"""One index per corpus: two corpora never share or delete each other's chunks, a moved corpus
deletes nothing, serving refuses another corpus than the manifest's, and a reader survives a
re-index of its own index."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from test_rag import ask_cfg, build_model_dir

from ragtune.config import RetrieverConfig
from ragtune.paths import PROJECT_ROOT

A = {"a.md": "Velmora is a lake town. Its Lantern Tide festival is held in October."}
B = {"b.md": "Corvanite is a copper-nickel alloy developed by Ismay Trelawn."}


def write(folder: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text, encoding="utf-8")
    return folder


def rcfg_for(tmp: Path, **kw) -> RetrieverConfig:
    return RetrieverConfig(persist_dir=str(tmp / "index"), chunk_size=200, chunk_overlap=20, **kw)


def test_a_second_corpus_with_the_same_settings_deletes_nothing(tmp_path):
    """The repro: index data.corpus=A then data.corpus=B with the same settings."""
    from ragtune.ingest import ingest
    from ragtune.retriever import Retriever
    from ragtune.store import IndexMismatchError

    rcfg = rcfg_for(tmp_path)
    a, b = write(tmp_path / "A", A), write(tmp_path / "B", B)
    first = ingest(a, rcfg, show_progress=False)
    second = ingest(b, rcfg, show_progress=False)
    assert (first.added_chunks, second.removed_chunks) == (1, 0)
    assert first.collection != second.collection
    assert ingest(a, rcfg, show_progress=False).unchanged_files == 1  # A is still whole
    texts_a = [c.text for c in Retriever.from_config(rcfg, corpus=a).find(limit=0)]
    texts_b = [c.text for c in Retriever.from_config(rcfg, corpus=b).find(limit=0)]
    assert texts_a == [A["a.md"]] and texts_b == [B["b.md"]]
    # a reader that does not say which corpus gets an error naming both, not a silent pick
    with pytest.raises(IndexMismatchError, match=r"2 corpora .*A\).*B\)"):
        Retriever.from_config(rcfg)


def test_a_named_collection_holding_another_corpus_is_refused(tmp_path):
    from ragtune.ingest import ingest
    from ragtune.retriever import Retriever
    from ragtune.store import IndexMismatchError

    rcfg = rcfg_for(tmp_path, collection="shared")
    a, b = write(tmp_path / "A", A), write(tmp_path / "B", B)
    ingest(a, rcfg, show_progress=False)
    with pytest.raises(IndexMismatchError, match=r"holds the chunks of corpus .*/A, not of"):
        ingest(b, rcfg, show_progress=False)
    assert [c.text for c in Retriever.from_config(rcfg).find(limit=0)] == [A["a.md"]]
    # the folder it holds is gone (moved, renamed): still refused, and the message says why
    # the user may not recognise it
    (tmp_path / "A").rename(tmp_path / "A-moved")
    with pytest.raises(
        IndexMismatchError, match=r"/A no longer exists: moved or renamed\?\), not of"
    ):
        ingest(b, rcfg, show_progress=False)
    assert [c.text for c in Retriever.from_config(rcfg).find(limit=0)] == [A["a.md"]]


def test_a_moved_corpus_gets_its_own_collection_and_the_old_one_is_kept(tmp_path, caplog):
    from ragtune.ingest import ingest
    from ragtune.retriever import Retriever

    rcfg = rcfg_for(tmp_path)
    a = write(tmp_path / "A", A)
    old = ingest(a, rcfg, show_progress=False)
    moved = a.rename(tmp_path / "A-renamed")
    with caplog.at_level(logging.WARNING, logger="ragtune.store"):
        new = ingest(moved, rcfg, show_progress=False)
    assert new.collection != old.collection and new.removed_chunks == 0
    assert f"'{old.collection}' was built from {a}, which no longer exists" in caplog.text
    kept = Retriever.from_config(rcfg_for(tmp_path, collection=old.collection)).find(limit=0)
    assert [c.text for c in kept] == [A["a.md"]]


def test_a_corpus_is_named_by_its_resolved_path_not_its_folder_name(tmp_path):
    from ragtune.store import collection_name

    rcfg = rcfg_for(tmp_path)
    x, y = write(tmp_path / "x" / "docs", A), write(tmp_path / "y" / "docs", A)
    assert collection_name(rcfg, x) != collection_name(rcfg, y)
    (tmp_path / "link").symlink_to(x)
    assert collection_name(rcfg, tmp_path / "link") == collection_name(rcfg, x)


def test_the_writer_names_its_corpus_and_a_live_corpus_beside_it_is_no_warning(tmp_path, caplog):
    from ragtune.store import open_client, open_collection

    rcfg = rcfg_for(tmp_path)
    client = open_client(rcfg)
    with pytest.raises(ValueError, match="needs the corpus folder"):
        open_collection(client, rcfg, create=True)
    open_collection(client, rcfg, create=True, corpus=write(tmp_path / "A", A))
    with caplog.at_level(logging.WARNING, logger="ragtune.store"):
        open_collection(client, rcfg, create=True, corpus=write(tmp_path / "B", B))
    assert "no longer exists" not in caplog.text


def test_a_collection_made_before_corpora_were_recorded_is_adopted_by_its_writer(tmp_path):
    from ragtune.store import (
        CORPUS_KEY,
        collection_name,
        corpus_path,
        index_metadata,
        open_client,
        open_collection,
    )

    rcfg = rcfg_for(tmp_path)
    a = write(tmp_path / "A", A)
    client = open_client(rcfg)
    client.create_collection(
        collection_name(rcfg, a), metadata=index_metadata(rcfg), embedding_function=None
    )
    coll = open_collection(client, rcfg, create=True, corpus=a)
    assert coll.metadata[CORPUS_KEY] == corpus_path(a)
    # a new collection records its corpus as it is made, not in a second step
    assert index_metadata(rcfg, a)[CORPUS_KEY] == corpus_path(a)


@pytest.fixture(scope="module")
def two_corpora_model(tmp_path_factory, tiny_lm_path):
    """A model folder trained on the test corpus, and a second corpus B in the same index."""
    from ragtune.ingest import ingest

    root = tmp_path_factory.mktemp("serve-corpus")
    model, rcfg = build_model_dir(root, tiny_lm_path, chunk_size=200)
    report = ingest(write(root / "B", B), rcfg, show_progress=False)
    return root, model, report.collection


def _edit_manifest(model: Path, edit) -> None:
    path = model / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_serving_refuses_an_index_of_another_corpus(two_corpora_model, tmp_path):
    from ragtune.rag import MismatchError, RagPipeline

    root, model, b_collection = two_corpora_model
    saved = (model / "manifest.json").read_text()
    cfg = ask_cfg(tmp_path, "generate.max_new_tokens=2")
    try:
        assert RagPipeline.from_model_dir(model, cfg).retriever.settings()["corpus"] == str(
            (root / "corpus").resolve()
        )
        _edit_manifest(model, lambda m: m["retriever"].update(collection=b_collection))
        with pytest.raises(MismatchError, match=r"retriever.corpus: model trained with .*/corpus"):
            RagPipeline.from_model_dir(model, cfg)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe = RagPipeline.from_model_dir(model, cfg, allow_mismatch=True)
        assert any("retriever.corpus" in str(w.message) for w in caught)
        assert pipe.retriever.settings()["collection"] == b_collection
        # a manifest without the corpus key is a mismatch too, not a match
        (model / "manifest.json").write_text(saved)
        _edit_manifest(model, lambda m: m["retriever"].pop("corpus"))
        with pytest.raises(MismatchError, match=r"retriever.corpus: missing from the manifest"):
            RagPipeline.from_model_dir(model, cfg)
    finally:
        (model / "manifest.json").write_text(saved)


REINDEX = """
import sys
from ragtune.config import RetrieverConfig
from ragtune.ingest import ingest
print(ingest(sys.argv[1], RetrieverConfig(**__import__("json").loads(sys.argv[2])),
             show_progress=False).summary())
"""


def test_a_reader_survives_a_reindex_of_its_own_index(two_corpora_model, tmp_path):
    """A server keeps answering (old or new state, never an error) while another process
    re-indexes the index it has open and deletes the chunks it had loaded."""
    from ragtune.rag import RagPipeline

    root, model, _ = two_corpora_model
    cfg = ask_cfg(tmp_path, "generate.max_new_tokens=2", "retriever.hybrid=true")
    pipe = RagPipeline.from_model_dir(model, cfg, explicit=["retriever.hybrid"])
    question = "When is the Lantern Tide festival held in Velmora?"
    before = pipe.answer(question)
    assert before.sources
    corpus = root / "corpus"
    original = {p: p.read_text() for p in corpus.rglob("*") if p.is_file()}
    try:
        for p in original:  # every chunk changes: the server's loaded ids are all deleted
            p.write_text("Rewritten. " + original[p].replace("town", "village"))
        settings = {"persist_dir": str(root / "index"), "chunk_size": 200, "chunk_overlap": 30}
        done = subprocess.run(
            [sys.executable, "-c", REINDEX, str(corpus), json.dumps(settings)],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert "-0 removed" not in done.stdout
        for _ in range(3):
            after = pipe.answer(question)
            assert all(isinstance(c.text, str) and c.text for c in after.chunks)
    finally:
        for p, text in original.items():
            p.write_text(text)
