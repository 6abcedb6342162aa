"""The Chroma side of the index: client, collection, the settings it records, the writer lock.

A collection records how its vectors and chunks were made (embedding model, normalisation,
chunk settings); opening it with other settings raises :class:`IndexMismatchError` naming the
key and both values. Readers (the retriever) and the writer (``ingest``) both open it here.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from ragtune.errors import RagtuneError
from ragtune.paths import outputs_root, resolve_path

os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

SCHEMA_VERSION = 1
_META_KEYS = ("embedding_model", "normalize", "chunk_size", "chunk_overlap", "chunk_unit")


class IndexError_(RagtuneError):
    """Base of index problems a user can fix (kept private; see subclasses)."""


class IndexMismatchError(IndexError_):
    """The collection was built with other embedding or chunk settings."""


class IndexLockedError(IndexError_):
    """Another process is writing to the same index."""


class IndexNotFoundError(IndexError_):
    """The collection does not exist yet: run the ingest first."""


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
def parse_server(server: str) -> tuple[str, int, bool]:
    """``host:port`` or a URL as ``chroma run`` prints it (``http://host:port``) ->
    (host, port, ssl). A URL without a port takes its scheme's (80 / 443)."""
    from urllib.parse import urlsplit

    text = str(server).strip().rstrip("/")
    url = urlsplit(text if "://" in text else f"http://{text}")
    try:
        port = url.port
    except ValueError:
        port = None
    if (
        url.scheme not in ("http", "https")
        or not url.hostname
        or url.path
        or (port is None and "://" not in text)
    ):
        raise IndexError_(
            f"retriever.server must be host:port or http(s)://host:port, got {server!r}"
        )
    ssl = url.scheme == "https"
    return url.hostname, port or (443 if ssl else 80), ssl


def open_client(rcfg: Any) -> Any:
    """Chroma client: ``HttpClient`` for ``retriever.server`` (``host:port`` or
    ``http://host:port``), else persistent."""
    import chromadb
    from chromadb.config import Settings

    settings = Settings(anonymized_telemetry=False, allow_reset=False)
    if rcfg.server:
        host, port, ssl = parse_server(rcfg.server)
        try:
            return chromadb.HttpClient(host=host, port=port, ssl=ssl, settings=settings)
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


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def state_dir(rcfg: Any) -> Path:
    base = persist_path(rcfg) / "ragtune"
    if rcfg.server:
        host, port, _ = parse_server(rcfg.server)  # one lock however the URL is written
        base = base / ("server-" + _slug(f"{host}:{port}"))
    return base


def writer_lock(rcfg: Any) -> Any:
    """The one-writer lock of this index (persist folder, or per server)."""
    from filelock import FileLock

    d = state_dir(rcfg)
    d.mkdir(parents=True, exist_ok=True)
    return FileLock(str(d / "ingest.lock"), timeout=0)
