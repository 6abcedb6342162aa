"""The QA-generation stage end to end: what ``python train/gen_qa.py`` runs.

Validate the config, index the corpus (incrementally) and open the shared retriever, load the
configured LM (or take the one given: tests pass a scripted fake), generate what is missing,
filter, write. The pieces are in :mod:`ragtune.qa_gen` and :mod:`ragtune.qa_filters`.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ragtune.config import validate
from ragtune.paths import resolve_path
from ragtune.qa_filters import Support
from ragtune.qa_gen import (
    ANSWERABLE,
    FILTERS,
    GENERATED,
    QA_FILE,
    UNANSWERABLE,
    GenQAError,
    GenQASettings,
    Job,
    Selection,
    TextGenerator,
    atomic_write,
    check_resumable,
    generate,
    identity,
    load_schemas,
    plan_jobs,
    read_generated,
    select,
)
from ragtune.types import Chunk

log = logging.getLogger(__name__)

GEN_QA_TOP_LEVEL = {"seed": int, "output_dir": str, "gen_qa": dict}


@dataclass(frozen=True)
class GenQAResult:
    """Where the QA file went, the report written next to it, and its one-line summary."""

    qa_path: Path
    report: dict[str, Any]

    @property
    def summary(self) -> str:
        return summary_line(self.report, self.qa_path)


def run_gen_qa(
    cfg: DictConfig, lm: TextGenerator | None = None, *, progress: bool = True
) -> GenQAResult:
    """Generate, filter and write the QA set for ``data.corpus``; resumable (see qa_gen)."""
    from ragtune.ingest import ingest_corpus
    from ragtune.retriever import Retriever

    validate(cfg, GEN_QA_TOP_LEVEL)
    s = GenQASettings.from_config(cfg.gen_qa)
    schemas = load_schemas(s)
    out = resolve_path(s.out_dir or cfg.output_dir)
    log.info("index: %s", ingest_corpus(cfg))
    retriever = Retriever.from_config(cfg.retriever)
    chunks = retriever.find(limit=0)
    jobs = plan_jobs(chunks, s, cfg.seed)
    if not jobs:
        raise GenQAError(
            f"{cfg.data.corpus}: no chunk of at least gen_qa.min_chunk_chars="
            f"{s.min_chunk_chars} characters to ask about"
        )
    check_resumable(
        out, identity(cfg.model.name_or_path, schemas, cfg.generate, cfg.seed), s.resume
    )
    done = read_generated(out / GENERATED)
    if lm is None and any(j.key not in done for j in jobs):  # a finished run loads no LM
        lm = _load_lm(cfg, schemas)
    gen_stats = generate(
        jobs,
        lm,
        schemas,
        out / GENERATED,
        batch_size=s.batch_size,
        seed=cfg.seed,
        progress=progress,
    )
    support = Support(retriever, retriever.embed)
    k = s.round_trip_k or cfg.retriever.k
    selection = select(
        jobs,
        read_generated(out / GENERATED),
        retriever,
        support,
        s,
        k=k,
        fetch_k=cfg.retriever.fetch_k,
        seed=cfg.seed,
    )
    extra = {
        "corpus": str(cfg.data.corpus),
        "chunks_in_index": len(chunks),
        "chunks_sampled": sum(j.kind == "answerable" for j in jobs),
        "model": cfg.model.name_or_path,
        "prompts": {kind: f"{p.name}:{p.fingerprint}" for kind, p in schemas.items()},
        "support_check": support.how,
        "round_trip_k": k,
        "seed": cfg.seed,
    }
    rep = build_report(selection, jobs, gen_stats, extra)
    by_id = {c.id: c for c in chunks}
    qa = write_outputs(out, selection, by_id, rep, num_preview=s.num_preview, seed=cfg.seed)
    return GenQAResult(qa, rep)


# --------------------------------------------------------------------------- outputs
def write_outputs(
    out_dir: Path,
    selection: Selection,
    chunks: dict[str, Chunk],
    report: dict[str, Any],
    *,
    num_preview: int = 20,
    seed: int = 42,
) -> Path:
    """Write qa.jsonl, rejected.jsonl, report.json and preview.md; return the qa.jsonl path."""
    qa = out_dir / QA_FILE
    atomic_write(qa, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in selection.records))
    rej = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in selection.rejected)
    atomic_write(out_dir / "rejected.jsonl", rej)
    atomic_write(out_dir / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    atomic_write(out_dir / "preview.md", preview(selection.records, chunks, num_preview, seed))
    return qa


def preview(
    records: Sequence[dict[str, Any]], chunks: dict[str, Chunk], n: int = 20, seed: int = 42
) -> str:
    """Markdown of ``n`` random records (seeded), each with the chunk it was generated from."""
    picks = random.Random(f"{seed}:preview").sample(list(records), min(n, len(records)))
    parts = [f"# Generated QA: {len(picks)} of {len(records)} records\n"]
    for r in picks:
        chunk = chunks.get(r["chunk_id"])
        answer = r["output"] or f"(unanswerable; the LM expected: {r.get('plausible_answer', '')})"
        text = chunk.text if chunk else "(chunk no longer in the index)"
        parts.append(
            f"## {r['kind']}: {r['instruction']}\n\n**Answer:** {answer}\n\n"
            f"**Chunk** `{r['source']}`:\n\n```text\n{text}\n```\n"
        )
    return "\n".join(parts)


def build_report(
    selection: Selection, jobs: Sequence[Job], gen_stats: dict[str, Any], extra: dict[str, Any]
) -> dict[str, Any]:
    """Counts per filter (and their share of the candidates), kept records, speed."""
    kept = Counter(r["kind"] for r in selection.records)
    per_kind = {}
    for kind, names in FILTERS.items():
        n = selection.candidates[kind]
        removed = {f: selection.removed[kind][f] for f in (*names, "duplicate", "over_share")}
        removed = {f: c for f, c in removed.items() if c or f in names}
        per_kind[kind] = {
            "jobs": sum(j.kind == kind for j in jobs),
            "generated": n,
            "kept": kept[kind],
            "removed": removed,
            "removed_share": {f: round(c / n, 3) if n else 0.0 for f, c in removed.items()},
        }
    total = len(selection.records)
    minutes = gen_stats["seconds"] / 60
    return {
        "records": total,
        "answerable": kept[ANSWERABLE],
        "unanswerable": kept[UNANSWERABLE],
        "unanswerable_share": round(kept[UNANSWERABLE] / total, 3) if total else 0.0,
        "by_kind": per_kind,
        "generation": gen_stats
        | {"jobs_per_min": round(gen_stats["jobs_run"] / minutes, 1) if minutes else None},
        **extra,
    }


def summary_line(report: dict[str, Any], qa_path: Path) -> str:
    """One line for the entry point to print."""
    removed: Counter[str] = Counter()
    for kind in report["by_kind"].values():
        removed.update(kind["removed"])
    dropped = ", ".join(f"{k} {v}" for k, v in removed.items() if v) or "none"
    return (
        f"gen_qa: {report['records']} records ({report['answerable']} answerable, "
        f"{report['unanswerable']} unanswerable) -> {qa_path}; removed: {dropped}"
    )


def _load_lm(cfg: DictConfig, schemas: dict[str, Any]) -> TextGenerator:
    """The configured LM behind the shared Generator (batched, greedy unless configured)."""
    from ragtune.generate import Generator
    from ragtune.loading import load_model

    model, tokenizer = load_model(
        cfg.model.name_or_path,
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        max_seq_length=cfg.model.max_seq_length,
    )
    return Generator(
        model,
        tokenizer,
        schemas["answerable"],  # both variants share the headers that stop generation
        cfg.generate,
        max_seq_length=cfg.model.max_seq_length,
    )
