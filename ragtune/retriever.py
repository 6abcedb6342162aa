"""The one retriever shared by RAFT training and serving.

Query -> dense (and optionally BM25, fused by reciprocal rank) candidates -> de-duplication
(exact content hash; overlapping spans of one source; cosine above ``dedup_cosine``) ->
optional MMR -> top-k in a stable order (ties broken by id) -> fitted to a token budget of the
LM's tokenizer. Training and serving call the same methods with the same settings, which
:meth:`Retriever.settings` records in model manifests.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from langchain_core.vectorstores.utils import maximal_marginal_relevance
from pydantic import ConfigDict

from ragtune.budget import truncate_to
from ragtune.embedding import embed_texts, load_embedder
from ragtune.store import (
    CORPUS_KEY,
    as_rcfg,
    collection_name,
    content_hash,
    open_client,
    open_collection,
    persist_path,
)
from ragtune.types import Chunk

log = logging.getLogger(__name__)

RRF_K = 60  # the usual reciprocal-rank-fusion constant (Cormack et al. 2009)
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff\uac00-\ud7af]")
_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def bm25_tokens(text: str) -> list[str]:
    """Lower-cased words; CJK runs become character unigrams + bigrams (no spaces there)."""
    out: list[str] = []
    for word in _WORD.findall(text.lower()):
        if _CJK.search(word):
            run = [ch for ch in word]
            out.extend(run)
            out.extend(a + b for a, b in zip(run, run[1:], strict=False))
        else:
            out.append(word)
    return out


@dataclasses.dataclass
class _Cand:
    id: str
    text: str
    meta: dict[str, Any]
    score: float
    emb: np.ndarray | None = None


class Retriever:
    """Top-k chunks for a query from the index that ``python train/index.py`` built."""

    def __init__(
        self,
        rcfg: Any,
        collection: Any,
        model: Any,
        token_counter: Callable[[str], int] | None = None,
    ):
        self.rcfg = rcfg
        self.collection = collection
        self.model = model
        self.token_counter = token_counter
        self._corpus: list[tuple[str, str, dict[str, Any]]] | None = None
        self._bm25: Any = None
        self._warned_budget = False

    @classmethod
    def from_config(
        cls,
        rcfg: Any,
        *,
        corpus: Any = None,
        token_counter: Callable[[str], int] | None = None,
    ) -> Retriever:
        """Open the collection of ``corpus`` with these settings (it must exist and match
        them); without ``corpus``, the one collection with these settings."""
        rcfg = as_rcfg(rcfg)
        client = open_client(rcfg)
        coll = open_collection(client, rcfg, create=False, corpus=corpus)
        model = load_embedder(rcfg.embedding_model, rcfg.device)
        return cls(rcfg, coll, model, token_counter)

    def with_token_counter(self, token_counter: Callable[[str], int] | None) -> Retriever:
        """The same index and embedder, budgeting in another tokenizer's tokens."""
        other = copy.copy(self)
        other.token_counter = token_counter
        return other

    # ------------------------------------------------------------------ basics
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts`` as float32 rows (unit length when configured)."""
        return embed_texts(
            self.model,
            list(texts),
            normalize=self.rcfg.normalize,
            batch_size=self.rcfg.batch_size,
        )

    def settings(self) -> dict[str, Any]:
        """Everything that changes what a query returns: stamped into model manifests."""
        r = self.rcfg
        return {
            "embedding_model": r.embedding_model,
            "normalize": r.normalize,
            "chunk_size": r.chunk_size,
            "chunk_overlap": r.chunk_overlap,
            "chunk_unit": r.chunk_unit,
            "k": r.k,
            "fetch_k": r.fetch_k,
            "reader_rerank": r.reader_rerank,
            "ef_search": r.ef_search,
            "dedup_cosine": r.dedup_cosine,
            "dedup_overlap": r.dedup_overlap,
            "hybrid": r.hybrid,
            "mmr": r.mmr,
            "mmr_lambda": r.mmr_lambda,
            "context_tokens": r.context_tokens,
            "persist_dir": str(persist_path(r)),
            "collection": collection_name(r) if self.collection is None else self.collection.name,
            "server": r.server,
            "corpus": None if self.collection is None else self._corpus_folder(),
        }

    def _corpus_folder(self) -> str | None:
        return (self.collection.metadata or {}).get(CORPUS_KEY)

    def refresh(self) -> None:
        """Forget cached corpus text and BM25 statistics (after a re-ingest)."""
        self._corpus = None
        self._bm25 = None

    def _all(self) -> list[tuple[str, str, dict[str, Any]]]:
        if self._corpus is None:
            rows: list[tuple[str, str, dict[str, Any]]] = []
            offset, page = 0, 5000
            while True:
                got = self.collection.get(
                    include=["documents", "metadatas"], limit=page, offset=offset
                )
                rows.extend(
                    row
                    for row in zip(
                        got["ids"],
                        got["documents"],
                        [dict(m or {}) for m in got["metadatas"]],
                        strict=True,
                    )
                    if row[1] is not None
                )
                if len(got["ids"]) < page:
                    break
                offset += page
            rows.sort(key=lambda r: r[0])
            self._corpus = rows
        return self._corpus

    # ------------------------------------------------------------------ ranking
    def _dense(self, qvec: np.ndarray, n: int) -> list[_Cand]:
        total = self.collection.count()
        if total == 0:
            return []
        got = self.collection.query(
            query_embeddings=[qvec],
            n_results=min(n, total),
            include=["documents", "metadatas", "distances", "embeddings"],
        )
        cands = []
        for i, text, meta, dist, emb in zip(
            got["ids"][0],
            got["documents"][0],
            got["metadatas"][0],
            got["distances"][0],
            got["embeddings"][0],
            strict=True,
        ):
            if text is None:  # deleted by a re-index since this index was loaded
                continue
            cands.append(
                _Cand(i, text, dict(meta or {}), float(1.0 - dist), np.asarray(emb, np.float32))
            )
        return cands

    def _bm25_top(self, query: str, n: int) -> list[tuple[str, float]]:
        rows = self._all()
        if not rows:
            return []
        if self._bm25 is None:
            from rank_bm25 import BM25Okapi

            self._bm25 = BM25Okapi([bm25_tokens(t) or ["\x00"] for _, t, _ in rows])
        q = bm25_tokens(query)
        if not q:
            return []
        scores = self._bm25.get_scores(q)
        idx = np.argsort(-scores, kind="stable")[:n]
        return [(rows[i][0], float(scores[i])) for i in idx if scores[i] > 0]

    def _ranked(self, query: str, n: int) -> tuple[np.ndarray, list[_Cand]]:
        """Candidates best first: dense, or dense + BM25 fused by reciprocal rank."""
        qvec = self.embed([query])[0]
        dense = self._dense(qvec, n)
        dense.sort(key=lambda c: (-round(c.score, 6), c.id))
        if not self.rcfg.hybrid:
            return qvec, dense
        lexical = self._bm25_top(query, n)
        fused: dict[str, float] = {}
        for rank, c in enumerate(dense):
            fused[c.id] = fused.get(c.id, 0.0) + 1.0 / (RRF_K + rank + 1)
        for rank, (cid, _) in enumerate(lexical):
            fused[cid] = fused.get(cid, 0.0) + 1.0 / (RRF_K + rank + 1)
        by_id = {c.id: c for c in dense}
        missing = [cid for cid, _ in lexical if cid not in by_id]
        if missing:
            got = self.collection.get(ids=missing, include=["documents", "metadatas", "embeddings"])
            for cid, text, meta, emb in zip(
                got["ids"], got["documents"], got["metadatas"], got["embeddings"], strict=True
            ):
                if text is None:
                    continue
                e = np.asarray(emb, np.float32)
                by_id[cid] = _Cand(cid, text, dict(meta or {}), _cos(qvec, e), e)
        out = []
        for cid, s in fused.items():
            c = by_id.get(cid)
            if c is None:  # gone from the index since the BM25 statistics were built
                continue
            c.meta["dense_score"] = c.score
            out.append(dataclasses.replace(c, score=s))
        out.sort(key=lambda c: (-round(c.score, 9), c.id))
        return qvec, out

    def _dedup(self, cands: list[_Cand]) -> list[_Cand]:
        kept: list[_Cand] = []
        hashes: set[str] = set()
        # offsets count within one document: a file, or one record of a JSONL file
        spans: dict[tuple[str, Any], list[tuple[int, int]]] = {}
        cos_limit = self.rcfg.dedup_cosine
        for c in cands:
            h = c.meta.get("content_hash") or content_hash(c.text)
            if h in hashes:
                continue
            src = c.meta.get("source")
            doc = (src, c.meta.get("line"))
            start = int(c.meta.get("start", 0))
            end = start + len(c.text)
            if src is not None and any(
                _overlap(start, end, a, b) >= self.rcfg.dedup_overlap for a, b in spans.get(doc, [])
            ):
                continue
            if (
                cos_limit < 1.0
                and c.emb is not None
                and any(k.emb is not None and _cos(c.emb, k.emb) >= cos_limit for k in kept)
            ):
                continue
            kept.append(c)
            hashes.add(h)
            if src is not None:
                spans.setdefault(doc, []).append((start, end))
        return kept

    def _mmr(self, qvec: np.ndarray, cands: list[_Cand], k: int) -> list[_Cand]:
        """Relevant yet diverse: langchain-core's MMR over the ranked candidates (ties go to
        the better-ranked one, so the order stays stable)."""
        if not cands or any(c.emb is None for c in cands):
            return cands[:k]
        embs = np.stack([c.emb for c in cands])  # type: ignore[misc]
        idx = maximal_marginal_relevance(qvec, embs, lambda_mult=self.rcfg.mmr_lambda, k=k)
        return [cands[i] for i in idx]

    # ------------------------------------------------------------------ public API
    def candidates(self, query: str, n: int) -> list[Chunk]:
        """The top-``n`` de-duplicated ranked candidates (no MMR, no budget)."""
        fetch = max(self.rcfg.fetch_k, 2 * n)
        _, ranked = self._ranked(query, fetch)
        return [_to_chunk(c) for c in self._dedup(ranked)[:n]]

    def retrieve(
        self, query: str, k: int | None = None, budget_tokens: int | None = None
    ) -> list[Chunk]:
        """Top-``k`` chunks for ``query``, de-duplicated, then fitted to the token budget."""
        k = k or self.rcfg.k
        if k <= 0:
            return []
        qvec, ranked = self._ranked(query, max(self.rcfg.fetch_k, k))
        cands = self._dedup(ranked)
        chosen = self._mmr(qvec, cands, k) if self.rcfg.mmr else cands[:k]
        return self._budget([_to_chunk(c) for c in chosen], budget_tokens)

    def fit(self, chunks: list[Chunk], budget_tokens: int | None) -> list[Chunk]:
        """De-duplicate an ordered list (first wins) and fit it to the token budget."""
        cands = [
            _Cand(
                c.id,
                c.text,
                {
                    **c.metadata,
                    "source": c.source,
                    "start": c.start,
                    "content_hash": c.content_hash,
                },
                c.score or 0.0,
            )
            for c in chunks
        ]
        if self.rcfg.dedup_cosine < 1.0 and cands:
            ids = list(dict.fromkeys(c.id for c in cands))
            got = self.collection.get(ids=ids, include=["embeddings"])
            embs = {
                i: np.asarray(e, np.float32)
                for i, e in zip(got["ids"], got["embeddings"], strict=True)
            }
            missing = [c for c in cands if c.id not in embs]
            if missing:
                vecs = self.embed([c.text for c in missing])
                for c, v in zip(missing, vecs, strict=True):
                    embs[c.id] = v
            for c in cands:
                c.emb = embs[c.id]
        keep = {c.id for c in self._dedup(cands)}
        out, seen = [], set()
        for c in chunks:
            if c.id in keep and c.id not in seen:
                out.append(c)
                seen.add(c.id)
        return self._budget(out, budget_tokens)

    def sources(self) -> set[str]:
        """The documents in the index (corpus-relative paths)."""
        return {str(meta.get("source", "")) for _, _, meta in self._all()}

    def find(
        self, contains: str | None = None, source: str | None = None, limit: int = 50
    ) -> list[Chunk]:
        """Chunks whose text contains ``contains`` (case-insensitive) and/or from ``source``.

        Ordered by source, then start offset. Scans the cached corpus text, since Chroma's
        ``$contains`` is case-sensitive.
        """
        needle = contains.casefold() if contains else None
        out = []
        for cid, text, meta in self._all():
            if source is not None and meta.get("source") != source:
                continue
            if needle is not None and needle not in text.casefold():
                continue
            out.append(_to_chunk(_Cand(cid, text, meta, 0.0), score=None))
        out.sort(key=lambda c: (c.source, c.metadata.get("line", 0), c.start, c.id))
        return out[:limit] if limit else out

    # ------------------------------------------------------------------ token budget
    def _budget(self, chunks: list[Chunk], budget_tokens: int | None) -> list[Chunk]:
        if budget_tokens is None and self.rcfg.context_tokens > 0:
            budget_tokens = self.rcfg.context_tokens
        if budget_tokens is None:
            return chunks
        if self.token_counter is None:
            if not self._warned_budget:
                log.warning("a token budget was asked for but no token_counter given: ignored")
                self._warned_budget = True
            return chunks
        return fit_budget(chunks, budget_tokens, self.token_counter)

    # ------------------------------------------------------------------ LangChain
    def as_langchain(self, k: int | None = None, budget_tokens: int | None = None) -> Any:
        """This retriever as a LangChain ``BaseRetriever`` (Documents with metadata)."""
        return RagtuneLangChainRetriever(retriever=self, k=k, budget_tokens=budget_tokens)


def fit_budget(chunks: list[Chunk], budget_tokens: int, count: Callable[[str], int]) -> list[Chunk]:
    """Keep chunks in order while they fit; skip any that do not; truncate a lone first one.

    The first chunk is always represented: when it alone exceeds the budget it is cut to the
    longest prefix that fits (``metadata['truncated'] = True``).
    """
    if budget_tokens <= 0 or not chunks:
        return []
    out: list[Chunk] = []
    used = 0
    for c in chunks:
        n = count(c.text)
        if used + n <= budget_tokens:
            out.append(c)
            used += n
    if out and out[0].id == chunks[0].id:
        return out
    first = chunks[0]
    text = truncate_to(first.text, budget_tokens, count)
    if not text:
        return [c for c in out if c.id != first.id]
    cut = dataclasses.replace(
        first,
        text=text,
        content_hash=content_hash(text),
        metadata={**first.metadata, "truncated": True},
    )
    rest, used = [], count(text)
    for c in chunks[1:]:
        n = count(c.text)
        if used + n <= budget_tokens:
            rest.append(c)
            used += n
    return [cut, *rest]


def _overlap(a0: int, a1: int, b0: int, b1: int) -> float:
    inter = min(a1, b1) - max(a0, b0)
    if inter <= 0:
        return 0.0
    return inter / max(1, min(a1 - a0, b1 - b0))


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def _to_chunk(c: _Cand, score: float | None | str = "keep") -> Chunk:
    meta = dict(c.meta)
    source = str(meta.pop("source", ""))
    start = int(meta.pop("start", 0))
    h = str(meta.pop("content_hash", "") or content_hash(c.text))
    return Chunk(
        id=c.id,
        text=c.text,
        source=source,
        start=start,
        content_hash=h,
        score=c.score if score == "keep" else score,  # type: ignore[arg-type]
        metadata=meta,
    )


class RagtuneLangChainRetriever(BaseRetriever):
    """LangChain face of :class:`Retriever`: same ranking, dedup and budget."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    retriever: Any
    k: int | None = None
    budget_tokens: int | None = None

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        chunks = self.retriever.retrieve(query, k=self.k, budget_tokens=self.budget_tokens)
        return [
            Document(
                page_content=c.text,
                metadata={
                    **c.metadata,
                    "source": c.source,
                    "start": c.start,
                    "score": c.score,
                    "id": c.id,
                    "content_hash": c.content_hash,
                },
            )
            for c in chunks
        ]
