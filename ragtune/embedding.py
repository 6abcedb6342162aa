"""Embedding: the sentence-transformers model (loaded once per process), batch embedding and
the device choice. Queries and ingest embed through the same functions, so a query vector is
made exactly as the index's vectors were.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ragtune.errors import RagtuneError

log = logging.getLogger(__name__)

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
