"""Ingest's bookkeeping: what it embeds, commits, counts and forgets. Each test names one
promise of ``ragtune/ingest.py``'s module docstring and fails when that promise breaks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ragtune.ingest import CorpusError, Journal, ingest, state_dir
from ragtune.paths import PROJECT_ROOT
from tests.test_ingest import DOCS, ids_by_source, rcfg_for, write_corpus


def _journal_lines(rcfg, collection: str) -> list[dict]:
    path = state_dir(rcfg) / f"{collection}.journal.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _sentences(topic: str, n: int) -> str:
    """``n`` distinct sentences about ``topic``, one paragraph each (one chunk each at 120)."""
    return "\n\n".join(
        f"The {topic} record number {i} says the measured value was {i * 7} units on the east gauge."
        for i in range(n)
    )


def test_a_chunk_repeated_within_a_file_is_indexed_once(tmp_path):
    para = "The Knot Fair is held every spring in the harbour town of Alder, by the old rope walk."
    last = "Sailors from every port along the coast come to compete at tying the hardest knots."
    corpus = write_corpus(tmp_path / "corpus", {"fair.md": f"{para}\n\n{para}\n\n{last}"})
    rcfg = rcfg_for(tmp_path)
    report = ingest(corpus, rcfg, show_progress=False)
    from ragtune.retriever import Retriever

    texts = [c.text for c in Retriever.from_config(rcfg).find(limit=0)]
    assert report.ok and texts.count(para) == 1
    assert report.embedded == report.total_chunks == len(texts) == 2


def test_changing_one_paragraph_embeds_only_its_new_chunk(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    rcfg = rcfg_for(tmp_path)
    ingest(corpus, rcfg, show_progress=False)
    before = ids_by_source(rcfg)["towns/alder.md"]
    doc = corpus / "towns/alder.md"
    doc.write_text(DOCS["towns/alder.md"].replace("tying knots", "splicing ropes"))
    report = ingest(corpus, rcfg, show_progress=False)
    after = ids_by_source(rcfg)["towns/alder.md"]
    assert before & after, "the unchanged paragraphs keep their chunks"
    assert report.changed_files == 1 and report.unchanged_files == 2
    assert report.embedded == report.added_chunks == len(after - before) == 1
    assert report.removed_chunks == len(before - after) == 1


def test_the_journal_forgets_a_deleted_file_and_ignores_a_torn_line(tmp_path):
    path = tmp_path / "state" / "c.journal.jsonl"
    journal = Journal(path)
    journal.append(
        [
            {"source": "a.md", "sha256": "1"},
            {"source": "b.md", "sha256": "2"},
            {"source": "a.md", "deleted": True},
            {"source": "c.md", "sha256": "3"},
            {"source": "c.md", "deleted": True},
            {"source": "c.md", "sha256": "4"},  # deleted, then back
        ]
    )
    with open(path, "a") as f:
        f.write('{"source": "d.md", "sha2')  # a crash inside the last line
    assert journal.load() == {
        "b.md": {"source": "b.md", "sha256": "2"},
        "c.md": {"source": "c.md", "sha256": "4"},
    }


def test_a_deleted_file_is_counted_once_and_the_journal_keeps_one_line_per_live_file(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    rcfg = rcfg_for(tmp_path)
    first = ingest(corpus, rcfg, show_progress=False)
    (corpus / "towns/birch.txt").write_text("Birch now has a glass bell foundry.")
    (corpus / "science/comet.md").unlink()
    assert ingest(corpus, rcfg, show_progress=False).deleted_files == 1
    again = ingest(corpus, rcfg, show_progress=False)
    assert (again.deleted_files, again.unchanged_files, again.removed_chunks) == (0, 2, 0)
    lines = _journal_lines(rcfg, first.collection)
    assert [r["source"] for r in lines] == ["towns/alder.md", "towns/birch.txt"]
    assert not any(r.get("deleted") for r in lines)


def test_a_file_the_journal_alone_knows_leaves_the_journal(tmp_path):
    """A journal line for a file neither on disk nor in the index (e.g. its chunks were deleted
    by hand) is dropped, and the file counts as deleted."""
    corpus = write_corpus(tmp_path / "corpus")
    rcfg = rcfg_for(tmp_path)
    first = ingest(corpus, rcfg, show_progress=False)
    ghost = {"source": "ghost.md", "sha256": "0" * 64, "n": 1, "ids": "0" * 32}
    Journal(state_dir(rcfg) / f"{first.collection}.journal.jsonl").append([ghost])
    report = ingest(corpus, rcfg, show_progress=False)
    assert (report.deleted_files, report.unchanged_files) == (1, 3)
    assert "ghost.md" not in [r["source"] for r in _journal_lines(rcfg, first.collection)]


def test_a_file_that_becomes_unreadable_is_skipped_not_deleted(tmp_path):
    """Its chunks leave the index (they no longer say what the file says), but it is reported
    as skipped with the reason, not as a deleted file: whether its bytes are refused (binary)
    or the path itself (a symlink leaving the corpus)."""
    corpus = write_corpus(tmp_path / "corpus")
    rcfg = rcfg_for(tmp_path)
    ingest(corpus, rcfg, show_progress=False)
    (corpus / "towns/birch.txt").write_bytes(b"\x00\x01binary\x00" * 20)
    outside = tmp_path / "elsewhere.md"
    outside.write_text(DOCS["science/comet.md"])
    (corpus / "science/comet.md").unlink()
    (corpus / "science/comet.md").symlink_to(outside)
    report = ingest(corpus, rcfg, show_progress=False)
    assert report.deleted_files == 0 and not report.ok
    assert sorted(rel for rel, _ in report.skipped) == ["science/comet.md", "towns/birch.txt"]
    assert set(ids_by_source(rcfg)) == {"towns/alder.md"}


def test_a_lost_journal_costs_no_embedding(tmp_path):
    """Without its journal every file is re-read and counted as changed (its chunks are in the
    index), and only chunks the index lacks are embedded."""
    corpus = write_corpus(tmp_path / "corpus")
    rcfg = rcfg_for(tmp_path)
    first = ingest(corpus, rcfg, show_progress=False)
    (state_dir(rcfg) / f"{first.collection}.journal.jsonl").unlink()
    report = ingest(corpus, rcfg, show_progress=False)
    assert (report.new_files, report.changed_files, report.unchanged_files) == (0, 3, 0)
    assert report.embedded == report.added_chunks == report.removed_chunks == 0
    assert ingest(corpus, rcfg, show_progress=False).unchanged_files == 3


def test_files_are_committed_in_groups_not_all_at_the_end(tmp_path, monkeypatch):
    """A group closes once it holds ``retriever.batch_size * 8`` new chunks: a crash later
    loses only the files of the open group."""
    docs = {f"log{i}.md": _sentences(f"topic{i}", 9) for i in range(3)}
    corpus = write_corpus(tmp_path / "corpus", docs)
    rcfg = rcfg_for(tmp_path, batch_size=1)  # groups of 8 new chunks: one per file here
    commits: list[list[str]] = []
    append = Journal.append
    monkeypatch.setattr(
        Journal,
        "append",
        lambda self, recs: commits.append([r["source"] for r in recs]) or append(self, recs),
    )
    report = ingest(corpus, rcfg, show_progress=False)
    assert report.new_files == 3 and report.total_chunks == 27  # 9 paragraphs, 9 chunks a file
    assert [c for c in commits if c] == [["log0.md"], ["log1.md"], ["log2.md"]]


def test_a_corpus_that_is_a_file_is_refused_naming_the_setting(tmp_path):
    not_a_folder = tmp_path / "corpus.txt"
    not_a_folder.write_text("some text")
    with pytest.raises(CorpusError, match=r"not a folder \(data\.corpus\)"):
        ingest(not_a_folder, rcfg_for(tmp_path), show_progress=False)
    assert not (tmp_path / "index").exists() or not any((tmp_path / "index").iterdir())


INGEST = """
import sys
from ragtune.config import RetrieverConfig
from ragtune.ingest import ingest
r = ingest(sys.argv[1], RetrieverConfig(persist_dir=sys.argv[2], chunk_size=120, chunk_overlap=20),
           show_progress=False)
print(r.unchanged_files)
"""


def test_an_unchanged_corpus_is_unchanged_in_another_process(tmp_path):
    """The journal's digest of a file's chunk ids does not hang on set order, which differs
    between Python processes (string hashing is salted per process)."""
    corpus = write_corpus(tmp_path / "corpus")
    runs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "HF_HUB_OFFLINE": "1"}
        out = subprocess.run(
            [sys.executable, "-c", INGEST, str(corpus), str(tmp_path / "index")],
            capture_output=True,
            text=True,
            env=env,
            cwd=PROJECT_ROOT,
            check=True,
        )
        runs.append(int(out.stdout.split()[-1]))
    assert runs == [0, 3]


def test_an_unchanged_file_still_reports_its_warnings(tmp_path):
    """A file ingested with a warning (here a JSONL line without text) says so on every run,
    not only the run that read it: the journal keeps the warning with the file."""
    rows = ['{"text": "The comet Velisande returns every 83 years."}', '{"title": "no text"}']
    corpus = write_corpus(tmp_path / "corpus", {"notes.jsonl": "\n".join(rows) + "\n"})
    rcfg = rcfg_for(tmp_path)
    first = ingest(corpus, rcfg, show_progress=False)
    again = ingest(corpus, rcfg, show_progress=False)
    assert again.unchanged_files == 1 and again.embedded == 0
    assert first.skipped == again.skipped and len(again.skipped) == 1 and not again.ok
    assert "line 2: no 'text' field" in again.skipped[0][1]
