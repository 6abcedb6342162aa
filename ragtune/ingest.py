"""Corpus ingest: a folder of documents into a persistent (or served) Chroma collection.

Design for crash safety and idempotence:

- Chunk ids are derived from the source path and the chunk text, so re-upserting a chunk is a
  no-op and re-running never duplicates anything.
- Files are committed in small groups: embed, upsert the new chunks, delete the file's stale
  chunks, and only then append one line per file to a journal (``<collection>.journal.jsonl``
  next to the index). A SIGKILL at any point leaves committed files complete; a file whose
  journal line is missing is simply processed again (its chunks are already there, so nothing
  is embedded twice). A torn last journal line is ignored.
- The journal is never trusted alone: a file is unchanged only when its sha256 matches the
  journal's AND the ids of its chunks in the collection hash to the journal's ``ids`` digest.
  Chunk ids hash the chunk text, so a crash between a group's upsert/delete and its journal
  line, followed by a revert of the file, cannot leave the other version's text behind: the
  index's ids disagree with the journal and the file is processed again.
- One writer at a time: a file lock on the persist folder refuses a second ingest with a
  clear message (Chroma is thread-safe but not process-safe).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragtune.embedding import embed_texts, load_embedder
from ragtune.loaders import LoadedDoc, SkipFile, discover, load_file, read_bytes
from ragtune.paths import resolve_path
from ragtune.store import (  # noqa: F401  (re-exported: callers import these from ingest)
    IndexError_,
    IndexLockedError,
    IndexMismatchError,
    IndexNotFoundError,
    as_rcfg,
    check_metadata,
    collection_name,
    content_hash,
    index_metadata,
    open_client,
    open_collection,
    persist_path,
    scan_sources,
    state_dir,
    writer_lock,
)

log = logging.getLogger(__name__)

SEPARATORS = [
    "\n\n",
    "\n",
    "。",
    "！",
    "？",
    ". ",
    "! ",
    "? ",
    "；",
    "; ",
    "、",
    "，",
    ", ",
    " ",
    "",
]


class CorpusError(IndexError_):
    """The corpus folder is missing or not a folder."""


# --------------------------------------------------------------------------- chunking
def chunk_id(source: str, text: str) -> str:
    """Deterministic id from source + content (so upserts are idempotent)."""
    return hashlib.sha256(f"{source}\x00{text}".encode()).hexdigest()[:32]


def make_splitter(rcfg: Any, tokenizer: Any | None = None) -> Any:
    """RecursiveCharacterTextSplitter that also splits Japanese at 。！？、 and line breaks."""
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    length: Callable[[str], int] = len
    if rcfg.chunk_unit == "tokens":
        if tokenizer is None:
            tokenizer = load_embedder(rcfg.embedding_model, rcfg.device).tokenizer

        def length(text: str) -> int:
            return len(tokenizer.encode(text, add_special_tokens=False))

    return RecursiveCharacterTextSplitter(
        separators=SEPARATORS,
        keep_separator="end",
        chunk_size=rcfg.chunk_size,
        chunk_overlap=rcfg.chunk_overlap,
        length_function=length,
        add_start_index=True,
        strip_whitespace=True,
    )


@dataclass
class ChunkRecord:
    id: str
    text: str
    metadata: dict[str, Any]


def chunk_docs(docs: Iterable[LoadedDoc], splitter: Any) -> list[ChunkRecord]:
    """Split documents into chunk records (exact duplicates within a file kept once)."""
    out: list[ChunkRecord] = []
    seen: set[str] = set()
    for doc in docs:
        for piece in splitter.create_documents([doc.text]):
            text = piece.page_content
            if not text.strip():
                continue
            cid = chunk_id(doc.source, text)
            if cid in seen:
                continue
            seen.add(cid)
            meta: dict[str, Any] = {
                "source": doc.source,
                "start": int(piece.metadata.get("start_index", 0)),
                "content_hash": content_hash(text),
            }
            for k, v in doc.metadata.items():
                if isinstance(v, str | int | float | bool) and k not in meta:
                    meta[k] = v
            out.append(ChunkRecord(cid, text, meta))
    return out


# --------------------------------------------------------------------------- journal
def ids_digest(ids: Iterable[str]) -> str:
    """One hash of a file's chunk ids. Ids hash the text, so this names the exact chunks."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:32]


class Journal:
    """Append-only record of committed files; a torn last line (crash) is ignored."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def load(self) -> dict[str, dict[str, Any]]:
        state: dict[str, dict[str, Any]] = {}
        if not self.path.exists():
            return state
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    src = rec["source"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    log.info("ignoring a torn journal line in %s", self.path)
                    continue
                if rec.get("deleted"):
                    state.pop(src, None)
                else:
                    state[src] = rec
        return state

    def append(self, recs: list[dict[str, Any]]) -> None:
        if not recs:
            return
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def compact(self, state: dict[str, dict[str, Any]]) -> None:
        """Rewrite as one line per live file (temp file + rename: atomic)."""
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for src in sorted(state):
                f.write(json.dumps(state[src], ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


# --------------------------------------------------------------------------- ingest
@dataclass
class IngestReport:
    added_chunks: int = 0
    removed_chunks: int = 0
    unchanged_files: int = 0
    changed_files: int = 0
    new_files: int = 0
    deleted_files: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    embedded: int = 0
    seconds: float = 0.0
    collection: str = ""
    total_chunks: int = 0

    @property
    def ok(self) -> bool:
        return not self.skipped

    def summary(self) -> str:
        lines = [
            f"index collection {self.collection}: {self.total_chunks} chunks "
            f"(+{self.added_chunks} added, -{self.removed_chunks} removed, "
            f"{self.embedded} embedded) in {self.seconds:.1f}s",
            f"files: {self.new_files} new, {self.changed_files} changed, "
            f"{self.unchanged_files} unchanged, {self.deleted_files} deleted, "
            f"{len(self.skipped)} skipped",
        ]
        for rel, reason in self.skipped:
            lines.append(f"  skipped {rel}: {reason}")
        return "\n".join(lines)


@dataclass
class _Work:
    rel: str
    sha: str
    chunks: list[ChunkRecord]
    old_ids: set[str]
    kind: str  # new | changed
    warnings: list[str] = field(default_factory=list)


def ingest_corpus(
    cfg: Any, rcfg: Any = None, corpus: str | os.PathLike[str] | None = None
) -> IngestReport:
    """Index a stage's corpus: ``corpus`` (default ``data.corpus``) with ``rcfg`` (default
    ``cfg.retriever``), reading JSONL text from ``data.jsonl_text_field``. Every stage that
    ingests (index, train, eval, gen-qa, embed-ft) calls this, so they read a corpus alike."""
    return ingest(
        corpus if corpus is not None else cfg.data.corpus,
        cfg.retriever if rcfg is None else rcfg,
        jsonl_text_field=cfg.data.get("jsonl_text_field", "text"),
    )


def ingest(
    corpus_dir: str | os.PathLike[str],
    rcfg: Any,
    *,
    jsonl_text_field: str = "text",
    show_progress: bool = True,
) -> IngestReport:
    """Bring the index up to date with ``corpus_dir``; see the module docstring for how.

    Raises :class:`IndexLockedError` when another ingest holds the index, and
    :class:`IndexMismatchError` when the collection was built with other settings.
    """
    from filelock import Timeout
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    rcfg = as_rcfg(rcfg)
    root = resolve_path(corpus_dir)
    if not root.is_dir():
        raise CorpusError(f"corpus folder {root} does not exist or is not a folder (data.corpus)")
    lock = writer_lock(rcfg)
    try:
        lock.acquire()
    except Timeout:
        raise IndexLockedError(
            f"another process is writing to the index at {rcfg.server or persist_path(rcfg)} "
            f"(lock {lock.lock_file} is held); wait for it to finish, or use another "
            "retriever.persist_dir"
        ) from None
    try:
        return _ingest_locked(root, rcfg, jsonl_text_field, show_progress, t0, tqdm)
    finally:
        lock.release()


def _ingest_locked(
    root: Path, rcfg: Any, jsonl_text_field: str, show_progress: bool, t0: float, tqdm: Any
) -> IngestReport:
    client = open_client(rcfg)
    coll = open_collection(client, rcfg, create=True, corpus=root)
    report = IngestReport(collection=coll.name)
    journal = Journal(state_dir(rcfg) / f"{coll.name}.journal.jsonl")
    state = journal.load()
    existing = scan_sources(coll)
    files, skipped = discover(root)
    report.skipped.extend(skipped)
    for rel, reason in skipped:
        log.warning("skipped %s: %s", rel, reason)

    splitter = None
    model = None
    pending: list[_Work] = []
    pending_new = 0
    live: set[str] = set()
    try:
        max_batch = int(client.get_max_batch_size())
    except Exception:
        max_batch = 5000
    flush_at = rcfg.batch_size * 8  # new chunks per commit group (embedding batches * 8)
    embed_bar = tqdm(
        desc="embedding", unit="chunk", disable=not show_progress, position=1, leave=False
    )

    def flush() -> None:
        nonlocal model, pending, pending_new
        if not pending:
            return
        to_embed = [c for w in pending for c in w.chunks if c.id not in w.old_ids]
        if to_embed:
            if model is None:
                model = load_embedder(rcfg.embedding_model, rcfg.device)
            vecs = embed_texts(
                model,
                [c.text for c in to_embed],
                normalize=rcfg.normalize,
                batch_size=rcfg.batch_size,
            )
            for i in range(0, len(to_embed), max_batch):
                part = to_embed[i : i + max_batch]
                coll.upsert(
                    ids=[c.id for c in part],
                    embeddings=vecs[i : i + max_batch],
                    documents=[c.text for c in part],
                    metadatas=[c.metadata for c in part],
                )
            report.embedded += len(to_embed)
            report.added_chunks += len(to_embed)
            embed_bar.update(len(to_embed))
        recs = []
        for w in pending:
            stale = sorted(w.old_ids - {c.id for c in w.chunks})
            for i in range(0, len(stale), max_batch):
                coll.delete(ids=stale[i : i + max_batch])
            report.removed_chunks += len(stale)
            ids = {c.id for c in w.chunks}
            rec: dict[str, Any] = {
                "source": w.rel,
                "sha256": w.sha,
                "n": len(ids),
                "ids": ids_digest(ids),
            }
            if w.warnings:
                rec["warnings"] = w.warnings
            recs.append(rec)
            state[w.rel] = rec
            if w.kind == "new":
                report.new_files += 1
            else:
                report.changed_files += 1
        journal.append(recs)  # the commit point of these files
        pending, pending_new = [], 0

    bar = tqdm(files, desc="files", unit="file", disable=not show_progress, position=0)
    for rel, path in bar:
        bar.set_postfix_str(rel[-40:], refresh=False)
        try:
            data = read_bytes(path, rcfg.max_file_bytes)
            sha = hashlib.sha256(data).hexdigest()
            old_ids = existing.get(rel, set())
            entry = state.get(rel)
            if entry and entry.get("sha256") == sha and entry.get("ids") == ids_digest(old_ids):
                report.unchanged_files += 1
                live.add(rel)
                for w in entry.get("warnings", []):  # still true of the unchanged file
                    report.skipped.append((rel, w))
                    log.warning("%s: %s", rel, w)
                continue
            loaded = load_file(path, rel, data, jsonl_text_field=jsonl_text_field)
        except SkipFile as e:
            report.skipped.append((rel, e.reason))
            log.warning("skipped %s: %s", rel, e.reason)
            continue
        for w in loaded.warnings:
            report.skipped.append((rel, w))
            log.warning("%s: %s", rel, w)
        if splitter is None:
            tok = None
            if rcfg.chunk_unit == "tokens":
                model = model or load_embedder(rcfg.embedding_model, rcfg.device)
                tok = model.tokenizer
            splitter = make_splitter(rcfg, tok)
        chunks = chunk_docs(loaded.docs, splitter)
        live.add(rel)
        kind = "changed" if (entry or old_ids) else "new"
        pending.append(_Work(rel, sha, chunks, old_ids, kind, loaded.warnings))
        pending_new += sum(1 for c in chunks if c.id not in old_ids)
        if pending_new >= flush_at or len(pending) >= 256:
            flush()
    flush()
    bar.close()
    embed_bar.close()

    # Chunks of files that are gone (or now skipped) leave the index.
    gone = sorted((set(existing) | set(state)) - live)
    on_disk = {rel for rel, _ in files} | {rel for rel, _ in report.skipped}
    recs = []
    for rel in gone:
        ids = sorted(existing.get(rel, set()))
        for i in range(0, len(ids), max_batch):
            coll.delete(ids=ids[i : i + max_batch])
        report.removed_chunks += len(ids)
        if rel not in on_disk:
            report.deleted_files += 1
        state.pop(rel, None)
        recs.append({"source": rel, "deleted": True})
    journal.append(recs)
    journal.compact(state)
    report.total_chunks = coll.count()
    report.seconds = time.perf_counter() - t0
    log.info(
        "ingest done: %d chunks in %s (%d embedded)",
        report.total_chunks,
        coll.name,
        report.embedded,
    )
    return report
