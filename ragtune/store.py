"""The Chroma side of the index: client, collection, the settings it records, the writer lock.

A collection records how its vectors and chunks were made (embedding model, normalisation,
chunk settings); opening it with other settings raises :class:`IndexMismatchError` naming the
key and both values. Readers (the retriever) and the writer (``ingest``) both open it here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

from ragtune.errors import RagtuneError
from ragtune.paths import outputs_root, resolve_path

log = logging.getLogger(__name__)

os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

SCHEMA_VERSION = 1
_META_KEYS = ("embedding_model", "normalize", "chunk_size", "chunk_overlap", "chunk_unit")
CORPUS_KEY = "ragtune_corpus"  # the corpus folder a collection's chunks come from


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


def settings_name(rcfg: Any) -> str:
    """The part of a derived collection name that every setting changing the vectors makes."""
    model = str(rcfg.embedding_model)
    base = _slug(model.rsplit("/", 1)[-1] if model.startswith((".", "/", "~")) else model)
    if model.startswith((".", "/", "~")):
        base += "-" + hashlib.sha1(model.encode()).hexdigest()[:6]
    unit = "t" if rcfg.chunk_unit == "tokens" else "c"
    norm = "n" if rcfg.normalize else "raw"
    return f"rt-{base[:40]}-{norm}-{unit}{rcfg.chunk_size}-o{rcfg.chunk_overlap}"


def corpus_path(corpus: str | os.PathLike[str]) -> str:
    """The corpus folder as the index records it: absolute, symlinks resolved."""
    return str(resolve_path(str(corpus)).resolve())


def corpus_key(corpus: str | os.PathLike[str]) -> str:
    """A short, stable name part for one corpus folder: its name plus a hash of its path."""
    path = corpus_path(corpus)
    return f"{_slug(Path(path).name)[:20]}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


def collection_name(rcfg: Any, corpus: str | os.PathLike[str] | None = None) -> str:
    """``rcfg.collection``, or a name derived from the settings and the corpus folder.

    So a sweep over chunk_size or embedding model never writes into another run's index, and
    two corpora indexed with the same settings never share (or delete) each other's chunks.
    Without ``corpus`` this is the settings part alone (see :func:`find_collection`).
    """
    if rcfg.collection:
        return str(rcfg.collection)
    base = settings_name(rcfg)
    return f"{base}-{corpus_key(corpus)}" if corpus is not None else base


def index_metadata(rcfg: Any, corpus: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """What the collection records about how its vectors and chunks were made, and from what."""
    meta: dict[str, Any] = {
        "ragtune_schema": SCHEMA_VERSION,
        **{f"ragtune_{k}": getattr(rcfg, k) for k in _META_KEYS},
    }
    if corpus is not None:
        meta[CORPUS_KEY] = corpus_path(corpus)
    return meta


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


def _names(client: Any) -> set[str]:
    return {c if isinstance(c, str) else c.name for c in client.list_collections()}


def find_collection(client: Any, rcfg: Any) -> str:
    """For a reader that does not know the corpus: the one collection with these settings.

    Several (one per corpus) is an error asking for the corpus, never a silent pick.
    """
    base = settings_name(rcfg)
    found = sorted(n for n in _names(client) if n == base or n.startswith(base + "-"))
    if len(found) == 1:
        return found[0]
    if not found:
        return base  # open_collection reports it missing
    corpora = []
    for n in found:
        meta = client.get_collection(n, embedding_function=None).metadata or {}
        corpora.append(f"{n} ({meta.get(CORPUS_KEY, 'corpus not recorded')})")
    raise IndexMismatchError(
        f"{len(found)} corpora are indexed with these retriever settings: {', '.join(corpora)}; "
        "set data.corpus (or retriever.collection) to choose one"
    )


def open_collection(
    client: Any, rcfg: Any, *, create: bool, corpus: str | os.PathLike[str] | None = None
) -> Any:
    """Open (or create) the collection of ``corpus`` and check that its settings match ``rcfg``.

    The writer (``create=True``) must name its corpus: a collection already holding another
    corpus folder is refused (:class:`IndexMismatchError`), never overwritten. A reader without
    a corpus gets the one collection with these settings (:func:`find_collection`).
    """
    if corpus is None and not rcfg.collection:
        if create:
            raise ValueError("open_collection(create=True) needs the corpus folder")
        name = find_collection(client, rcfg)
    else:
        name = collection_name(rcfg, corpus)
    existing = _names(client)
    if name not in existing:
        if not create:
            where = rcfg.server or str(persist_path(rcfg))
            raise IndexNotFoundError(
                f"no index collection '{name}' in {where}: run python train/index.py with the "
                "same retriever settings and data.corpus first"
            )
        _note_moved_corpora(client, rcfg, existing)
        coll = client.get_or_create_collection(
            name,
            configuration={"hnsw": {"space": "cosine", "ef_search": rcfg.ef_search}},
            metadata=index_metadata(rcfg, corpus),
            embedding_function=None,
        )
    else:
        coll = client.get_collection(name, embedding_function=None)
    check_metadata(name, coll.metadata, rcfg)
    coll = _set_ef_search(client, coll, rcfg.ef_search)
    if create and corpus is not None:
        coll = _claim_corpus(client, coll, rcfg, corpus)
    return coll


def _set_ef_search(client: Any, coll: Any, ef_search: int) -> Any:
    """The collection searching with ``ef_search`` candidates (a search setting, not the data).

    Chroma keeps a loaded index's setting for the life of the process, so this takes effect
    where the collection is opened before its first query, as every ragtune stage does. An
    index this process may not write keeps its own setting, with a warning.
    """
    have = ((coll.configuration or {}).get("hnsw") or {}).get("ef_search")
    if have is None or have == ef_search:
        return coll
    try:
        coll.modify(configuration={"hnsw": {"ef_search": ef_search}})
    except Exception as e:  # a read-only copy of the index still answers
        log.warning(
            "index collection '%s' searches with ef_search=%s; setting retriever.ef_search=%s "
            "failed (%s)",
            coll.name,
            have,
            ef_search,
            str(e).splitlines()[0] if str(e) else type(e).__name__,
        )
        return coll
    return client.get_collection(coll.name, embedding_function=None)


def _claim_corpus(client: Any, coll: Any, rcfg: Any, corpus: str | os.PathLike[str]) -> Any:
    have = (coll.metadata or {}).get(CORPUS_KEY)
    want = corpus_path(corpus)
    if have == want:
        return coll
    if have is None:  # made before collections recorded their corpus: it is this one's now
        coll.modify(metadata={**(coll.metadata or {}), CORPUS_KEY: want})
        return client.get_collection(coll.name, embedding_function=None)
    moved = "" if Path(have).is_dir() else f" ({have} no longer exists: moved or renamed?)"
    raise IndexMismatchError(
        f"index collection '{coll.name}' holds the chunks of corpus {have}{moved}, not of "
        f"data.corpus={want}; indexing it here would delete them. Use another "
        "retriever.collection (or collection=null for one per corpus)"
    )


def _note_moved_corpora(client: Any, rcfg: Any, existing: set[str]) -> None:
    """A new corpus collection next to one whose corpus folder is gone: say so, delete nothing."""
    base = settings_name(rcfg)
    for n in sorted(existing):
        if not n.startswith(base + "-"):
            continue
        have = (client.get_collection(n, embedding_function=None).metadata or {}).get(CORPUS_KEY)
        if have and not Path(have).is_dir():
            log.warning(
                "index collection '%s' was built from %s, which no longer exists (moved or "
                "renamed?); it is kept as it is, and this corpus gets its own collection",
                n,
                have,
            )


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
