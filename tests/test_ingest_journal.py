"""The journal cannot vouch for text the index does not hold: a crash between a commit group's
upsert/delete and its journal line, then a revert of the file, is repaired by the next run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ragtune.config import RetrieverConfig
from ragtune.paths import PROJECT_ROOT

TEXT_A = "Version A: the Lantern Tide festival is held in October."
TEXT_B = "Version B: the Lantern Tide festival is held in March."


def _setup(tmp_path: Path) -> tuple[Path, Path, RetrieverConfig]:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    doc = corpus / "festival.md"
    doc.write_text(TEXT_A)
    return corpus, doc, RetrieverConfig(persist_dir=str(tmp_path / "index"), chunk_size=200)


def _texts(rcfg: RetrieverConfig, corpus: Path) -> list[str]:
    from ragtune.retriever import Retriever

    return [c.text for c in Retriever.from_config(rcfg, corpus=corpus).find(limit=0)]


def test_a_crash_before_the_journal_line_then_a_revert_is_repaired(tmp_path, monkeypatch):
    from ragtune.ingest import Journal, ingest

    corpus, doc, rcfg = _setup(tmp_path)
    ingest(corpus, rcfg, show_progress=False)
    doc.write_text(TEXT_B)

    class Crash(BaseException):
        pass

    def crash(self, recs):
        if recs:
            raise Crash  # the group's chunks are written and A's deleted; no journal line

    with monkeypatch.context() as m:
        m.setattr(Journal, "append", crash)
        with pytest.raises(Crash):
            ingest(corpus, rcfg, show_progress=False)
    assert _texts(rcfg, corpus) == [TEXT_B]
    doc.write_text(TEXT_A)  # the revert: the journal still says A
    report = ingest(corpus, rcfg, show_progress=False)
    assert (report.changed_files, report.unchanged_files) == (1, 0)
    assert _texts(rcfg, corpus) == [TEXT_A]
    assert ingest(corpus, rcfg, show_progress=False).unchanged_files == 1


KILLED_INDEX = """
import os, signal, sys
import ragtune.ingest as ingest_mod
from ragtune.config import RetrieverConfig

def die(self, recs):
    if recs:
        os.kill(os.getpid(), signal.SIGKILL)

ingest_mod.Journal.append = die
ingest_mod.ingest(sys.argv[1], RetrieverConfig(**__import__("json").loads(sys.argv[2])),
                  show_progress=False)
"""


@pytest.mark.slow
def test_sigkill_in_journal_append_then_revert_holds_a(tmp_path):
    """The issue's deterministic repro with a real SIGKILL of the indexing process."""
    from ragtune.ingest import ingest

    corpus, doc, rcfg = _setup(tmp_path)
    ingest(corpus, rcfg, show_progress=False)
    doc.write_text(TEXT_B)
    settings = {"persist_dir": rcfg.persist_dir, "chunk_size": rcfg.chunk_size}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_INDEX, str(corpus), json.dumps(settings)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    doc.write_text(TEXT_A)
    rerun = subprocess.run(
        [
            sys.executable,
            "train/index.py",
            f"data.corpus={corpus}",
            f"retriever.persist_dir={rcfg.persist_dir}",
            f"retriever.chunk_size={rcfg.chunk_size}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "1 changed, 0 unchanged" in rerun.stdout + rerun.stderr
    assert _texts(rcfg, corpus) == [TEXT_A]
