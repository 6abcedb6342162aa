"""A RAG-SFT QA set from the corpus alone: a local LM writes questions about sampled chunks.

What ``python train/gen_qa.py`` runs (RAFT's data generation, without an API model):

1. Sample chunks of the index (seeded). For each, the LM writes a question the chunk answers
   and its answer (prompt variant ``qa_gen``); for a share of them also a question about the
   chunk's subject that the chunk does not answer, with the answer it would expect
   (``qa_gen_unanswerable``). Both prompts are rendered by the one prompt schema.
2. Raw generations are appended to ``generated.jsonl`` as they come, keyed by job: a killed
   run started again skips what is there (no duplicates), and a run with more chunks extends it.
3. Filters (:mod:`ragtune.qa_filters`) keep only usable records and count what each removed.
   Answerable: the answer is supported by its chunk, the question retrieves that chunk in the
   top-k (round trip), no near-duplicate question, length and language limits. Unanswerable:
   on the corpus's subject (its document is retrieved) and no chunk of the corpus supports the
   expected answer; these get ``output: ""`` and ``answers: []``, which the RAFT builder trains
   as abstention.
4. ``qa.jsonl`` (Alpaca records, usable as ``data.qa_train``), ``rejected.jsonl``,
   ``report.json`` and ``preview.md`` are rewritten from ``generated.jsonl`` on every run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm.auto import tqdm

from ragtune.config import ConfigError, defaults_from
from ragtune.errors import RagtuneError
from ragtune.qa_filters import (
    NearDuplicates,
    SearchableRetriever,
    Support,
    answered_by_corpus,
    is_non_answer,
    language_ok,
    leaks_answer,
    length_ok,
    on_topic,
    round_trip,
    standalone,
)
from ragtune.schema import PromptFields, PromptSchema, get_schema
from ragtune.types import Chunk

log = logging.getLogger(__name__)

GENERATED = "generated.jsonl"
QA_FILE = "qa.jsonl"
ANSWERABLE, UNANSWERABLE = "answerable", "unanswerable"
# The order the filters run in; report.json lists what each removed in this order.
FILTERS = {
    ANSWERABLE: (
        *("unparsable", "length", "language", "not_standalone", "leaks_answer"),
        *("unsupported", "round_trip"),
    ),
    UNANSWERABLE: (
        *("unparsable", "length", "language", "not_standalone", "unverifiable", "leaks_answer"),
        *("off_topic", "answered_by_corpus"),
    ),
}
_LABEL = r"(?:\*\*|__)?\s*(?:\d+[.)]\s*)?\b"
_PAIR = re.compile(
    rf"(?is){_LABEL}(?:question|q|質問|問題)\s*(?:\*\*|__)?\s*[:：]\s*(?P<q>.+?)\s*\n?\s*"
    rf"{_LABEL}(?:answer|a|答え|回答)\s*(?:\*\*|__)?\s*[:：]\s*(?P<a>.*?)\s*"
    rf"(?=\n\s*{_LABEL}(?:question|q|質問|問題)\s*(?:\*\*|__)?\s*[:：]|\n\s*\n|$)"
)
_ANSWER_IS = re.compile(r"(?i)^\s*(?:the\s+)?answer\s+is\s*[:：]?\s*")  # "Answer: The answer is: X"
_BARE_ANSWER = re.compile(
    r"(?is)^(?P<q>[^\n]+?)\s*\n\s*(?:answer|a|答え|回答)\s*[:：]\s*(?P<a>.*)$"
)


class GenQAError(RagtuneError):
    """Generated QA that cannot be produced or resumed as asked; names the file or key."""


class TextGenerator(Protocol):
    """What generation needs from an LM: ragtune.generate.Generator, or a scripted fake."""

    tokenizer: Any

    def generate_batch(
        self, prompts: Sequence[str], batch_size: int = 8
    ) -> Sequence[Any]: ...  # objects with .text


@defaults_from("gen_qa:gen_qa")
class GenQASettings:
    """The ``gen_qa`` config group; defaults and docs live in conf/gen_qa.yaml."""

    out_dir: str
    num_chunks: int
    unanswerable_fraction: float
    unanswerable_oversample: float
    batch_size: int
    prompt: str
    unanswerable_prompt: str
    min_chunk_chars: int
    round_trip_k: int
    dedup_jaccard: float
    min_question_words: int
    max_question_words: int
    max_answer_words: int
    scripts: list[str]
    resume: bool
    num_preview: int

    @classmethod
    def from_config(cls, node: Any) -> GenQASettings:
        """Typed settings from the ``gen_qa`` node; a bad key or value is a ConfigError."""
        try:
            merged = OmegaConf.merge(OmegaConf.structured(cls), node or {})
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", "") or ""
            msg = str(getattr(e, "msg", None) or e).splitlines()[0]
            raise ConfigError(f"gen_qa.{key}: {msg}" if key else f"gen_qa: {msg}") from None
        s = cls(**OmegaConf.to_container(merged))  # type: ignore[arg-type]
        s.check()
        return s

    def check(self) -> None:
        def need(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"gen_qa.{key}: {msg}")

        need(self.num_chunks >= 0, "num_chunks", f"must be >= 0 (0 = all), got {self.num_chunks}")
        f = self.unanswerable_fraction
        need(0.0 <= f < 1.0, "unanswerable_fraction", f"must be in [0, 1), got {f}")
        need(self.unanswerable_oversample >= 1.0, "unanswerable_oversample", "must be >= 1")
        need(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        need(0.0 < self.dedup_jaccard <= 1.0, "dedup_jaccard", "must be in (0, 1]")
        need(self.round_trip_k >= 0, "round_trip_k", "must be >= 0 (0 = retriever.k)")
        need(
            0 < self.min_question_words <= self.max_question_words,
            "min_question_words",
            "must be > 0 and <= gen_qa.max_question_words",
        )
        need(self.max_answer_words > 0, "max_answer_words", "must be > 0")


@dataclass(frozen=True)
class Job:
    """One generation: a chunk and which kind of question to ask about it."""

    key: str
    kind: str
    chunk: Chunk


# --------------------------------------------------------------------------- parsing
def parse_pair(text: str) -> tuple[str, str] | None:
    """The first (question, answer) in a generation, or ``None`` when there is none.

    Accepts "Question: ...\\nAnswer: ...", Q:/A:, markdown bold or numbered labels, full-width
    colons and Japanese labels; a missing "Question:" label when the first line is followed by
    an "Answer:" line. Quotes around either part are removed.
    """
    m = _PAIR.search(text) or _BARE_ANSWER.search(text.strip())
    if m is None:
        return None
    q, a = _clean(m.group("q")), _clean(_ANSWER_IS.sub("", m.group("a").split("\n")[0]))
    return (q, a) if q else None


def _clean(s: str) -> str:
    s = " ".join(s.replace("**", "").split())
    return s.strip("\"'“”「」 ").strip()


# --------------------------------------------------------------------------- planning
def plan_jobs(chunks: Sequence[Chunk], s: GenQASettings, seed: int) -> list[Job]:
    """Seeded sample of chunks; an answerable job for each, an unanswerable one for a share.

    Unanswerable candidates are generated ``unanswerable_oversample`` times the number the
    target share needs, since verification rejects many; the share is capped afterwards.
    """
    eligible = sorted((c for c in chunks if len(c.text.strip()) >= s.min_chunk_chars), key=_id)
    random.Random(f"{seed}:chunks").shuffle(eligible)
    sampled = eligible[: s.num_chunks] if s.num_chunks else eligible
    f = s.unanswerable_fraction
    n_un = min(len(sampled), math.ceil(len(sampled) * f / (1 - f) * s.unanswerable_oversample))
    jobs: list[Job] = []
    for i, c in enumerate(sampled):
        jobs.append(Job(f"a:{c.id}", ANSWERABLE, c))
        if i < n_un:
            jobs.append(Job(f"u:{c.id}", UNANSWERABLE, c))
    return jobs


def _id(c: Chunk) -> str:
    return c.id


def render(job: Job, schemas: dict[str, PromptSchema], tokenizer: Any) -> str:
    """The generation prompt of a job, rendered by the one prompt schema."""
    schema = schemas[job.kind]
    return schema.render_prompt(PromptFields(schema.instruction, "", [job.chunk.text]), tokenizer)


# --------------------------------------------------------------------------- generation
def read_generated(path: Path) -> dict[str, dict[str, Any]]:
    """Generations already on disk by job key (first wins); a torn last line is cut off."""
    done: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return done
    good_end = 0
    with path.open("rb") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                break  # a run killed mid-write: everything from here is regenerated
            if not line.endswith(b"\n"):
                break
            good_end += len(line)
            done.setdefault(rec["job"], rec)
    if good_end < path.stat().st_size:
        with path.open("r+b") as f:
            f.truncate(good_end)
    return done


def generate(
    jobs: Sequence[Job],
    lm: TextGenerator | None,
    schemas: dict[str, PromptSchema],
    path: Path,
    *,
    batch_size: int = 8,
    seed: int = 42,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate every job not yet in ``path``, appending each batch as it finishes.

    Returns ``{"jobs_run": n, "seconds": s}`` for this call. ``lm`` may be ``None`` only when
    every job is already in ``path``.
    """
    done = read_generated(path)
    todo = [j for j in jobs if j.key not in done]
    if todo and lm is None:
        raise ValueError(f"{len(todo)} jobs left to generate and no LM given")
    t0 = time.perf_counter()
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="generating QA", unit="job")
    bar.disable = not progress
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out, bar:
        for b in range(0, len(todo), batch_size):
            batch = todo[b : b + batch_size]
            _seed_batch(seed, batch[0].key)
            assert lm is not None
            prompts = [render(j, schemas, lm.tokenizer) for j in batch]
            results = lm.generate_batch(prompts, batch_size=batch_size)
            lines = []
            for job, res in zip(batch, results, strict=True):
                pair = parse_pair(res.text)
                rec = {"job": job.key, "kind": job.kind, "chunk_id": job.chunk.id}
                rec |= {"source": job.chunk.source, "raw": res.text, "pair": pair}
                lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
            out.write("".join(lines))  # one write per batch: a kill tears at most one line
            out.flush()
            os.fsync(out.fileno())
            bar.update(len(batch))
    return {"jobs_run": len(todo), "seconds": round(time.perf_counter() - t0, 2)}


def _seed_batch(seed: int, key: str) -> None:
    """Sampled decoding draws from a seed of the batch's first job: reruns draw the same."""
    import torch

    torch.manual_seed(zlib.crc32(f"{seed}:{key}".encode()))


# --------------------------------------------------------------------------- selection
@dataclass
class Selection:
    """Kept records (Alpaca dicts), rejected ones with the reason, and counts per filter."""

    records: list[dict[str, Any]]
    rejected: list[dict[str, Any]]
    removed: dict[str, Counter[str]]
    candidates: Counter[str]


def select(
    jobs: Sequence[Job],
    generated: dict[str, dict[str, Any]],
    retriever: SearchableRetriever,
    support: Support,
    s: GenQASettings,
    *,
    k: int,
    fetch_k: int,
    seed: int = 42,
) -> Selection:
    """Run the filters over every generated job, answerable ones first (see ``FILTERS``)."""
    removed = {kind: Counter() for kind in FILTERS}
    candidates: Counter[str] = Counter()
    rejected: list[dict[str, Any]] = []
    kept: dict[str, list[dict[str, Any]]] = {ANSWERABLE: [], UNANSWERABLE: []}
    dups = NearDuplicates(s.dedup_jaccard)
    for kind in (ANSWERABLE, UNANSWERABLE):
        for job in (j for j in jobs if j.kind == kind and j.key in generated):
            candidates[kind] += 1
            pair = generated[job.key].get("pair")
            reason = _reason(job, pair, retriever, support, s, k, fetch_k)
            if reason is None and not dups.add(pair[0]):
                reason = "duplicate"
            if reason is not None:
                removed[kind][reason] += 1
                rejected.append({"job": job.key, "reason": reason, "pair": pair})
                continue
            kept[kind].append(_record(job, *pair))
    over = _over_share(kept, s.unanswerable_fraction, seed)
    for rec in over:
        removed[UNANSWERABLE]["over_share"] += 1
        rejected.append({"job": rec["job"], "reason": "over_share", "pair": None})
    unanswerable = [r for r in kept[UNANSWERABLE] if r not in over]
    return Selection(kept[ANSWERABLE] + unanswerable, rejected, removed, candidates)


def _reason(
    job: Job,
    pair: Sequence[str] | None,
    retriever: SearchableRetriever,
    support: Support,
    s: GenQASettings,
    k: int,
    fetch_k: int,
) -> str | None:
    """The first filter a generated pair fails, or ``None`` when it is kept."""
    if not pair:
        return "unparsable"
    q, a = pair
    chunk = job.chunk
    if not length_ok(q, a, s, answerable=job.kind == ANSWERABLE):
        return "length"
    if not language_ok(q, chunk, s.scripts):
        return "language"
    if not standalone(q):
        return "not_standalone"
    if job.kind == ANSWERABLE:
        if leaks_answer(q, a):
            return "leaks_answer"
        if support.supporting(a, [chunk], q) is None:
            return "unsupported"
        if not round_trip(q, a, chunk, retriever, support, k):
            return "round_trip"
        return None
    if not a.strip() or is_non_answer(a):
        return "unverifiable"
    if leaks_answer(q, a):
        return "leaks_answer"
    if not on_topic(q, chunk, retriever, k):
        return "off_topic"
    if answered_by_corpus(q, a, chunk, retriever, support, fetch_k):
        return "answered_by_corpus"
    return None


def _record(job: Job, question: str, answer: str) -> dict[str, Any]:
    """The Alpaca record ``load_qa`` reads; unanswerable ones have no output and no answers."""
    rec: dict[str, Any] = {"instruction": question, "input": ""}
    if job.kind == ANSWERABLE:
        rec |= {"output": answer, "answers": [answer]}
    else:
        rec |= {"output": "", "answers": [], "is_impossible": True, "plausible_answer": answer}
    kind = "a" if job.kind == ANSWERABLE else "u"
    rec |= {"source": job.chunk.source, "id": f"gen-{kind}-{job.chunk.id}"}
    return rec | {"kind": job.kind, "chunk_id": job.chunk.id, "job": job.key}


def _over_share(
    kept: dict[str, list[dict[str, Any]]], fraction: float, seed: int
) -> list[dict[str, Any]]:
    """Unanswerable records beyond ``fraction`` of the total: a seeded sample to drop."""
    unans, n_ans = kept[UNANSWERABLE], len(kept[ANSWERABLE])
    limit = int(fraction * n_ans / (1 - fraction))
    if len(unans) <= limit:
        return []
    return random.Random(f"{seed}:over_share").sample(unans, len(unans) - limit)


# --------------------------------------------------------------------------- resume guard
def check_resumable(out_dir: Path, identity: dict[str, Any], resume: bool) -> None:
    """Refuse to mix generations of another model, prompt or decoding into ``out_dir``.

    ``identity`` is what makes a generation what it is; it is written to ``generation.json``.
    With ``resume=false`` earlier generations there are discarded.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    ident, gen = out_dir / "generation.json", out_dir / GENERATED
    if not resume and gen.exists():
        gen.unlink()
    if gen.exists() and ident.exists():
        before = json.loads(ident.read_text())
        diff = [k for k in sorted(identity) if before.get(k) != identity[k]]
        if diff:
            k = diff[0]
            raise GenQAError(
                f"{gen} was generated with {k}={before.get(k)!r}, not {identity[k]!r}: "
                "use another gen_qa.out_dir, or gen_qa.resume=false to start over"
            )
    atomic_write(ident, json.dumps(identity, indent=2, ensure_ascii=False) + "\n")


def identity(model: str, schemas: dict[str, PromptSchema], gcfg: Any, seed: int) -> dict[str, Any]:
    """What the generated text depends on (a resumed run must match it)."""
    g = asdict(gcfg) if hasattr(gcfg, "__dataclass_fields__") else dict(gcfg)
    decoding = {k: g[k] for k in ("max_new_tokens", "temperature", "top_p", "repetition_penalty")}
    prompts = {kind: f"{s.name}:{s.fingerprint}" for kind, s in schemas.items()}
    sampled_seed = seed if decoding["temperature"] > 0 else None
    return {"model": model, "prompts": prompts, "decoding": decoding, "seed": sampled_seed}


def atomic_write(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def load_schemas(s: GenQASettings) -> dict[str, PromptSchema]:
    """The generation variants; each must carry an ``instruction`` (the task it sets)."""
    schemas = {ANSWERABLE: get_schema(s.prompt), UNANSWERABLE: get_schema(s.unanswerable_prompt)}
    for kind, schema in schemas.items():
        if not schema.instruction:
            key = "prompt" if kind == ANSWERABLE else "unanswerable_prompt"
            raise ConfigError(
                f"gen_qa.{key}: prompt variant '{schema.name}' has no 'instruction'; "
                "generation variants (prompts/qa_gen.yaml) set the task there"
            )
    return schemas
