"""Corpus ingest: a folder of documents into a persistent (or served) Chroma collection.

Design for crash safety and idempotence (issue 3.3 and 8.1):

- Chunk ids are derived from the source path and the chunk text, so re-upserting a chunk is a
  no-op and re-running never duplicates anything.
- Files are committed in small groups: embed, upsert the new chunks, delete the file's stale
  chunks, and only then append one line per file to a journal (``<collection>.journal.jsonl``
  next to the index). A SIGKILL at any point leaves committed files complete; a file whose
  journal line is missing is simply processed again (its chunks are already there, so nothing
  is embedded twice). A torn last journal line is ignored.
- The journal is never trusted alone: each run scans the collection's ids per source and
  reprocesses any file whose chunk count disagrees, so nothing is missing and nothing stale
  stays behind even if the index and the journal drift.
- One writer at a time: a file lock on the persist folder refuses a second ingest with a
  clear message (Chroma is thread-safe but not process-safe).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ragtune.errors import RagtuneError
from ragtune.loaders import LoadedDoc, SkipFile, discover, load_file, read_bytes
from ragtune.paths import outputs_root, resolve_path

os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
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
_META_KEYS = ("embedding_model", "normalize", "chunk_size", "chunk_overlap", "chunk_unit")


class IndexError_(RagtuneError):
    """Base of index problems a user can fix (kept private; see subclasses)."""


class IndexMismatchError(IndexError_):
    """The collection was built with other embedding or chunk settings."""


class IndexLockedError(IndexError_):
    """Another process is writing to the same index."""


class IndexNotFoundError(IndexError_):
    """The collection does not exist yet: run the ingest first."""


class CorpusError(IndexError_):
    """The corpus folder is missing or not a folder."""


# --------------------------------------------------------------------------- settings
def as_rcfg(rcfg: Any) -> Any:
    """A ``retriever`` node (DictConfig, dict or RetrieverConfig) as a RetrieverConfig."""
    from omegaconf import OmegaConf

    from ragtune.config import RetrieverConfig

    if isinstance(rcfg, RetrieverConfig):
        return rcfg
    if isinstance(rcfg, dict):
        rcfg = OmegaConf.create(rcfg)
    merged = OmegaConf.merge(OmegaConf.structured(RetrieverConfig), rcfg)
    return OmegaConf.to_object(merged)


def persist_path(rcfg: Any) -> Path:
    """The persist folder (``retriever.persist_dir``; empty = ``<outputs>/index``)."""
    return resolve_path(rcfg.persist_dir) if rcfg.persist_dir else outputs_root() / "index"


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-") or "x"


def collection_name(rcfg: Any) -> str:
    """``rcfg.collection`` or a name derived from every setting that changes the vectors.

    So a sweep over chunk_size or embedding model never writes into another run's index.
    """
    if rcfg.collection:
        return str(rcfg.collection)
    model = str(rcfg.embedding_model)
    base = _slug(model.rsplit("/", 1)[-1] if model.startswith((".", "/", "~")) else model)
    if model.startswith((".", "/", "~")):
        base += "-" + hashlib.sha1(model.encode()).hexdigest()[:6]
    unit = "t" if rcfg.chunk_unit == "tokens" else "c"
    norm = "n" if rcfg.normalize else "raw"
    return f"rt-{base[:60]}-{norm}-{unit}{rcfg.chunk_size}-o{rcfg.chunk_overlap}"


def index_metadata(rcfg: Any) -> dict[str, Any]:
    """What the collection records about how its vectors and chunks were made."""
    return {
        "ragtune_schema": SCHEMA_VERSION,
        **{f"ragtune_{k}": getattr(rcfg, k) for k in _META_KEYS},
    }


def check_metadata(name: str, meta: dict[str, Any] | None, rcfg: Any) -> None:
    """Raise :class:`IndexMismatchError` naming the key and both values on any difference."""
    meta = meta or {}
    if "ragtune_schema" not in meta:
        raise IndexMismatchError(
            f"Chroma collection '{name}' was not made by ragtune (no ragtune metadata); "
            "choose another retriever.collection"
        )
    for k in _META_KEYS:
        have, want = meta.get(f"ragtune_{k}"), getattr(rcfg, k)
        if have != want:
            raise IndexMismatchError(
                f"index collection '{name}' was built with retriever.{k}={have!r}, but the "
                f"config says retriever.{k}={want!r}; re-run python train/index.py with the "
                "same settings, or use another retriever.collection (or collection=null)"
            )


# --------------------------------------------------------------------------- chroma
def open_client(rcfg: Any) -> Any:
    """Chroma client: ``HttpClient`` for ``retriever.server=host:port``, else persistent."""
    import chromadb
    from chromadb.config import Settings

    settings = Settings(anonymized_telemetry=False, allow_reset=False)
    if rcfg.server:
        host, _, port = str(rcfg.server).rpartition(":")
        if not host or not port.isdigit():
            raise IndexError_(f"retriever.server must be host:port, got {rcfg.server!r}")
        try:
            return chromadb.HttpClient(host=host, port=int(port), settings=settings)
        except Exception as e:
            raise IndexError_(
                f"cannot reach the Chroma server at retriever.server={rcfg.server} ({e}); "
                "start it with: chroma run --host 127.0.0.1 --port PORT --path DIR"
            ) from None
    path = persist_path(rcfg)
    path.mkdir(parents=True, exist_ok=True)
    return chromadb.PersistentClient(path=str(path), settings=settings)


def open_collection(client: Any, rcfg: Any, *, create: bool) -> Any:
    """Open (or create) the collection and check that its settings match ``rcfg``."""
    name = collection_name(rcfg)
    existing = {c if isinstance(c, str) else c.name for c in client.list_collections()}
    if name not in existing:
        if not create:
            where = rcfg.server or str(persist_path(rcfg))
            raise IndexNotFoundError(
                f"no index collection '{name}' in {where}: run python train/index.py with the "
                "same retriever settings first"
            )
        coll = client.get_or_create_collection(
            name,
            configuration={"hnsw": {"space": "cosine"}},
            metadata=index_metadata(rcfg),
            embedding_function=None,
        )
    else:
        coll = client.get_collection(name, embedding_function=None)
    check_metadata(name, coll.metadata, rcfg)
    return coll


def scan_sources(coll: Any, page: int = 5000) -> dict[str, set[str]]:
    """source -> ids of every chunk in the collection (paged, ids and metadata only)."""
    out: dict[str, set[str]] = {}
    offset = 0
    while True:
        got = coll.get(include=["metadatas"], limit=page, offset=offset)
        ids = got["ids"]
        for i, meta in zip(ids, got["metadatas"] or [], strict=False):
            out.setdefault(str((meta or {}).get("source", "")), set()).add(i)
        if len(ids) < page:
            return out
        offset += page


# --------------------------------------------------------------------------- embeddings
_EMBEDDERS: dict[tuple[str, str], Any] = {}


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_embedder(name: str, device: str = "auto") -> Any:
    """A SentenceTransformer, cached per process (fp16 on CUDA)."""
    from ragtune.models import resolve_embedder

    dev = resolve_device(device)
    key = (name, dev)
    if key not in _EMBEDDERS:
        from sentence_transformers import SentenceTransformer

        path = resolve_embedder(name)
        log.info("loading embedding model %s on %s", path, dev)
        cuda = dev.startswith("cuda")
        try:
            model = SentenceTransformer(
                path,
                device=dev,
                # sdpa: 1.7x the eager attention's throughput for BGE-base on an H100
                model_kwargs={"attn_implementation": "sdpa"} if cuda else None,
            )
        except ValueError:  # an architecture without sdpa support: its default attention
            model = SentenceTransformer(path, device=dev)
        except OSError as e:
            raise RagtuneError(
                f"cannot load retriever.embedding_model={name!r} ({e}); "
                "use a local folder or a model in the Hugging Face cache"
            ) from None
        if cuda:
            model.half()
        _EMBEDDERS[key] = model
    return _EMBEDDERS[key]


def embed_texts(
    model: Any, texts: list[str], *, normalize: bool, batch_size: int, progress: bool = False
) -> np.ndarray:
    """Embed in batches; float32 rows, unit length when ``normalize``."""
    if not texts:
        dim = model.get_sentence_embedding_dimension() or 0
        return np.zeros((0, dim), dtype=np.float32)
    if str(model.device).startswith("cuda") and len(texts) > batch_size:  # ingest, not a query
        return _embed_pipelined(model, texts, normalize, batch_size, progress)
    vecs = model.encode(
        texts,
        batch_size=batch_size,
        normalize_embeddings=normalize,
        convert_to_numpy=True,
        show_progress_bar=progress,
    )
    return np.asarray(vecs, dtype=np.float32)


def _fast_tokenizer(model: Any) -> Callable[[list[str]], dict[str, Any]] | None:
    """Tokenize like ``model.tokenize`` through the Rust tokenizer alone, or None if unsure.

    ``SentenceTransformer.tokenize`` spends most of its time in Python (holding the GIL), so
    threads barely overlap; ``tokenizers.Tokenizer.encode_batch`` releases the GIL. Used only
    when the features are exactly ids / masks / type ids plus constants (BERT-like models such
    as MiniLM and BGE), checked against ``model.tokenize`` on a probe batch.
    """
    import torch

    try:
        from tokenizers import Tokenizer

        first = model[0]
        tok = first.tokenizer
        raw = Tokenizer.from_str(tok.backend_tokenizer.to_str())  # a private copy to configure
        raw.enable_truncation(int(first.max_seq_length))
        raw.enable_padding(pad_id=tok.pad_token_id, pad_token=tok.pad_token)
    except Exception:  # noqa: BLE001  (any other module layout: the library's own path)
        return None
    names = [
        n for n in ("input_ids", "token_type_ids", "attention_mask") if n in tok.model_input_names
    ]

    def tokenize(texts: list[str]) -> dict[str, Any]:
        encs = raw.encode_batch([t.strip() for t in texts])
        cols = {
            "input_ids": [e.ids for e in encs],
            "token_type_ids": [e.type_ids for e in encs],
            "attention_mask": [e.attention_mask for e in encs],
        }
        # np.array, not torch.tensor: ~10x faster on nested lists, and this holds the GIL
        return {**constants, **{n: torch.from_numpy(np.array(cols[n], np.int64)) for n in names}}

    probe = ["  Probe text, with  spaces. ", "a second, longer probe text " * 80]  # truncated
    want = model.tokenize(probe)
    constants = {k: v for k, v in want.items() if not torch.is_tensor(v)}
    got = tokenize(probe)
    same = set(got) == set(want) and all(
        torch.equal(got[k], want[k]) if torch.is_tensor(want[k]) else got[k] == want[k]
        for k in want
    )
    return tokenize if same else None


# Threads tokenizing ahead of the GPU. Few on purpose: each Rust ``encode_batch`` already runs
# on every core (see _rust_parallelism), and more Python threads only fight the GPU-feeding
# thread for the GIL (12 threads: no faster than 4 on the H100 host, docs/benchmarks.md).
TOKENIZE_WORKERS = 2


@contextlib.contextmanager
def _rust_parallelism() -> Iterator[None]:
    """Let the Rust tokenizer use all cores for a while (entry points turn it off).

    ``TOKENIZERS_PARALLELISM=false`` is set by our entry points so that forked processes do not
    inherit a busy thread pool; the tokenizer reads the variable at every call, so it can be
    lifted around the embedding loop and restored afterwards.
    """
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _embed_pipelined(
    model: Any, texts: list[str], normalize: bool, batch_size: int, progress: bool
) -> np.ndarray:
    """``SentenceTransformer.encode`` with tokenization on worker threads, ahead of the GPU.

    ``encode`` tokenizes each batch on the calling thread, then runs the model: on an H100 the
    tokenizer (~3,100 BGE-base chunks/s on one core) is the bottleneck, not the model
    (~7,000-8,800/s with sdpa). Here ``TOKENIZE_WORKERS`` threads tokenize the next batches
    (the Rust tokenizer on all cores) while the GPU embeds, and the results stay on the GPU
    until the end (one synchronisation). Longest texts first, as ``encode`` does, so a batch
    pads little; rows come back in input order.
    """
    import itertools
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from tqdm.auto import tqdm

    # checked once per model (a probe batch through both tokenizers), not on every call
    if not hasattr(model, "_ragtune_tokenize"):
        model._ragtune_tokenize = _fast_tokenizer(model) or model.tokenize
    tokenize = model._ragtune_tokenize
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    batches = (
        [texts[i] for i in order[s : s + batch_size]] for s in range(0, len(texts), batch_size)
    )
    out: list[Any] = []
    with (
        _rust_parallelism(),
        ThreadPoolExecutor(TOKENIZE_WORKERS) as pool,
        torch.inference_mode(),
        tqdm(total=len(texts), desc="embedding", unit="chunk", disable=not progress) as bar,
    ):
        pending = deque(
            pool.submit(tokenize, b) for b in itertools.islice(batches, TOKENIZE_WORKERS + 2)
        )
        while pending:
            features = pending.popleft().result()
            nxt = next(batches, None)
            if nxt is not None:
                pending.append(pool.submit(tokenize, nxt))
            features = {
                k: v.to(model.device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in features.items()
            }
            emb = model(features)["sentence_embedding"].float()
            if normalize:
                emb = torch.nn.functional.normalize(emb, dim=-1)
            out.append(emb)
            bar.update(emb.shape[0])
    vecs = torch.cat(out).cpu().numpy()
    result = np.empty_like(vecs)  # back to input order
    result[order] = vecs
    return result


# --------------------------------------------------------------------------- chunking
def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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


def state_dir(rcfg: Any) -> Path:
    base = persist_path(rcfg) / "ragtune"
    if rcfg.server:
        base = base / ("server-" + _slug(str(rcfg.server)))
    return base


def writer_lock(rcfg: Any) -> Any:
    """The one-writer lock of this index (persist folder, or per server)."""
    from filelock import FileLock

    d = state_dir(rcfg)
    d.mkdir(parents=True, exist_ok=True)
    return FileLock(str(d / "ingest.lock"), timeout=0)


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
    coll = open_collection(client, rcfg, create=True)
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
            rec: dict[str, Any] = {"source": w.rel, "sha256": w.sha, "n": len(w.chunks)}
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
            if entry and entry.get("sha256") == sha and entry.get("n") == len(old_ids):
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
