"""Retrieval-augmented SFT examples (RAFT-style), built with the retriever serving uses.

For each QA record the context comes from the same retriever, top-k, de-duplication and
token budget that will answer at serve time:

- answerable, oracle kept (a fraction ``P`` of them): the oracle chunk (the one holding the
  answer) plus ``k - 1`` hard distractors, the best-ranked retrieved chunks that do not hold
  the answer; the oracle's position is shuffled; target: the answer.
- answerable, oracle dropped (``1 - P``): ``k`` distractors only; target: the schema's
  abstain answer (or, with ``abstain_without_oracle: false``, RAFT's answer from memory).
- unanswerable: the retrieved top-k, which cannot hold the answer; target: abstain. With
  ``unanswerable_on_topic`` the chunks of the question's own document come first, so the
  context is the on-topic paragraph the question was written against (SQuAD v2's hard case).
- ``contrastive``: every answerable example that keeps its oracle gets a twin, the same
  question with the oracle removed (``k`` distractors), target: abstain. The pair differs only
  in whether the context holds the answer, which is the distinction abstention needs.
- ``ablated_twin``: a second twin, the oracle chunk itself with the sentence(s) holding the
  answer removed, among the same distractors, target: abstain. The on-topic paragraph one fact
  short is what SQuAD v2's unanswerable questions look like; the chunk-level twin differs in
  the whole chunk, this one only in the fact.
- ``swapped_twin``: a third twin, the same context with the *question* changed so that it no
  longer answers it (a name or number swapped, or a negation: ``ragtune.counterfactual``),
  target: abstain. The context still holds the original answer, the plausible bait a reader
  that only matches the question's type would give.

RAFT's reference code draws random distractors and never trains abstention; here the
distractors are the ones our retriever actually confuses with the oracle, and the model
learns to say the abstain answer exactly when the context lacks the answer.

``mode: closed`` builds the closed-book baseline: the same records with no context at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any, Protocol

from tqdm.auto import tqdm

from ragtune.budget import ANSWER_RESERVE
from ragtune.counterfactual import Counterfactual, NamePool, counterfactual
from ragtune.errors import RagtuneError
from ragtune.oracle import HOW, OracleFinder, OracleMatch
from ragtune.schema import PromptFields, PromptSchema
from ragtune.types import Chunk, QARecord

log = logging.getLogger(__name__)

UNSUPPORTED_SHOWN = 5  # record ids in the log line and the error
UNSUPPORTED_LISTED = 100  # record ids kept in stats.json
# a record's extra abstain examples
TWIN_KINDS = ("contrast_no_oracle", "ablated_no_answer", "swapped_question")


class RetrieverLike(Protocol):
    """The part of :class:`ragtune.retriever.Retriever` the builder needs."""

    def candidates(self, query: str, n: int) -> list[Chunk]: ...

    def find(
        self, contains: str | None = None, source: str | None = None, limit: int = 50
    ) -> list[Chunk]: ...

    def fit(self, chunks: list[Chunk], budget_tokens: int | None) -> list[Chunk]: ...


@dataclass(frozen=True)
class BuildSettings:
    """What shapes the examples; read from the ``raft``, ``retriever`` and ``model`` configs."""

    k: int = 3
    fetch_k: int = 20
    oracle_fraction: float = 0.8
    abstain_without_oracle: bool = True
    shuffle_oracle: bool = True
    unanswerable_fraction: float | None = None  # cap on the share of unanswerable records
    mode: str = "rag"
    max_seq_length: int = 1024
    context_tokens: int = 0  # 0 = derive from max_seq_length (schema.context_budget)
    seed: int = 42
    max_unsupported_fraction: float = 0.10  # above it, answers without support stop the build
    contrastive: bool = False  # oracle-kept examples also appear without the oracle -> abstain
    unanswerable_on_topic: bool = False  # unanswerable contexts lead with their own document
    ablated_twin: bool = False  # oracle-kept examples also appear with the answer sentence cut
    swapped_twin: bool = False  # ... and with the question changed so the context misses it

    @classmethod
    def from_config(cls, cfg: Any) -> BuildSettings:
        return cls(
            k=cfg.retriever.k,
            fetch_k=cfg.retriever.fetch_k,
            oracle_fraction=cfg.raft.oracle_fraction,
            abstain_without_oracle=cfg.raft.abstain_without_oracle,
            shuffle_oracle=cfg.raft.shuffle_oracle,
            unanswerable_fraction=cfg.raft.get("unanswerable_fraction"),
            mode=cfg.raft.mode,
            max_seq_length=cfg.model.max_seq_length,
            context_tokens=cfg.retriever.context_tokens,
            seed=cfg.seed,
            max_unsupported_fraction=cfg.raft.get("max_unsupported_fraction", 0.10),
            contrastive=bool(cfg.raft.get("contrastive", False)),
            unanswerable_on_topic=bool(cfg.raft.get("unanswerable_on_topic", False)),
            ablated_twin=bool(cfg.raft.get("ablated_twin", False)),
            swapped_twin=bool(cfg.raft.get("swapped_twin", False)),
        )


class UnsupportedAnswersError(RagtuneError):
    """Too many answerable records have no chunk supporting their answer."""


def cap_unanswerable(
    records: Sequence[QARecord], fraction: float | None, seed: int
) -> list[QARecord]:
    """At most ``fraction`` of the records unanswerable: a seeded sample of the rest is dropped.

    The abstention balance is a training lever: SQuAD v2 is about half unanswerable, and with
    the oracle-dropped answerable records the abstain answer becomes the majority target, which
    a small model learns as "always abstain". ``None`` keeps every record; order is kept.
    """
    if fraction is None:
        return list(records)
    unans = [i for i, r in enumerate(records) if not r.answerable]
    n_ans = len(records) - len(unans)
    # u / (n_ans + u) <= fraction  <=>  u <= fraction * n_ans / (1 - fraction)
    limit = len(unans) if fraction >= 1 else int(fraction * n_ans / (1 - fraction))
    if len(unans) <= limit:
        return list(records)
    rng = random.Random(f"{seed}:unanswerable")
    drop = set(rng.sample(unans, len(unans) - limit))
    return [r for i, r in enumerate(records) if i not in drop]


def _keep_oracle(records: Sequence[QARecord], fraction: float, seed: int) -> set[int]:
    """Exactly round(P * n) answerable records keep their oracle, chosen by the seed."""
    idx = [i for i, r in enumerate(records) if r.answerable]
    random.Random(f"{seed}:keep").shuffle(idx)
    return set(idx[: round(fraction * len(idx))])


def find_oracle(record: QARecord, candidates: list[Chunk], retriever: RetrieverLike) -> OracleMatch:
    """The chunk supporting the answer, how it was found and the score (``ragtune.oracle``).

    Within the record's ``source`` when it has one, else among the retrieved ``candidates``.
    """
    return _finder(retriever).find(record, candidates)


def _finder(retriever: RetrieverLike) -> OracleFinder:
    """The oracle search, semantic with the retriever's own embedder when it has one."""
    return OracleFinder(retriever, getattr(retriever, "embed", None))


def build_examples(
    records: Sequence[QARecord],
    retriever: RetrieverLike | None,
    schema: PromptSchema,
    tokenizer: Any,
    settings: BuildSettings,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Render every record into a training example; return (examples, stats).

    Deterministic for a given seed, records, index and settings.
    """
    if settings.mode == "rag" and retriever is None:
        raise ValueError("mode 'rag' needs a retriever")
    n_given = len(records)
    records = cap_unanswerable(records, settings.unanswerable_fraction, settings.seed)
    keep = _keep_oracle(records, settings.oracle_fraction, settings.seed)
    kinds: Counter[str] = Counter()
    changes: Counter[str] = Counter()  # how the swapped twins' questions were changed
    finder = _finder(retriever) if retriever is not None else None
    pool = None
    if settings.swapped_twin:
        pool = NamePool(
            [(r.instruction, r.source) for r in records], getattr(retriever, "embed", None)
        )
    unsupported: list[str] = []
    examples: list[dict[str, Any]] = []
    n_truncated = 0
    n_ctx: list[int] = []
    for i, rec in enumerate(tqdm(records, desc="building examples", disable=not progress)):
        rng = random.Random(f"{settings.seed}:{i}:{rec.instruction}")
        context: list[Chunk] | None = None
        oracle: Chunk | None = None
        match: OracleMatch | None = None
        twin: list[Chunk] | None = None  # the contrastive context: the oracle removed
        ablated: list[Chunk] | None = None  # the oracle with its answer sentence(s) cut
        swapped: Counterfactual | None = None  # the question changed: the context misses it
        if settings.mode == "closed":
            kind = "closed" if rec.answerable else "unanswerable"
            target = rec.output if rec.answerable else schema.abstain
        else:
            assert retriever is not None and finder is not None
            fields = PromptFields(rec.instruction, rec.input, [])
            budget = settings.context_tokens or schema.context_budget(
                tokenizer, fields, settings.max_seq_length, ANSWER_RESERVE
            )
            cands = retriever.candidates(rec.instruction, settings.fetch_k)
            if rec.answerable and not _abstains_on_purpose(rec, schema):
                match = finder.find(rec, cands)
                oracle = match.chunk
                if oracle is None:
                    unsupported.append(rec.id or _record_id(rec))
                holds = finder.supporting(rec, cands)
                distractors = [c for c, h in zip(cands, holds, strict=True) if not h]
            elif settings.unanswerable_on_topic and rec.source:
                # stable sort: the question's own document first, retrieval order within it
                distractors = sorted(cands, key=lambda c: c.source != rec.source)
            else:
                distractors = cands
            if oracle is not None and i in keep:
                chosen = retriever.fit([oracle, *distractors[: settings.k - 1]], budget)
                if not any(finder.supporting(rec, [c for c in chosen if c.id == oracle.id])):
                    n_truncated += 1  # the budget cut the answer out: treat as dropped
                    oracle = None
                else:
                    if settings.contrastive:
                        twin = retriever.fit(distractors[: settings.k], budget)
                    cut = finder.without_answer(rec, oracle) if settings.ablated_twin else None
                    if cut is not None:
                        ablated = retriever.fit([cut, *distractors[: settings.k - 1]], budget)
            else:
                oracle = None
                chosen = retriever.fit(distractors[: settings.k], budget)
            if settings.shuffle_oracle:
                rng.shuffle(chosen)
                for other in (twin, ablated):
                    if other is not None:
                        rng.shuffle(other)
            if pool is not None and oracle is not None:
                texts = [c.text for c in chosen]
                swapped = counterfactual(rec.instruction, texts, pool, rec.source, rng)
                changes[swapped.how if swapped else "none"] += 1
            context = chosen
            n_ctx.append(len(chosen))
            if not rec.answerable:
                kind, target = "unanswerable", schema.abstain
            elif oracle is not None:
                kind, target = "oracle", rec.output
            else:
                kind = (
                    "abstain_no_oracle" if settings.abstain_without_oracle else "memory_no_oracle"
                )
                target = schema.abstain if settings.abstain_without_oracle else rec.output
        pairs = [(kind, target, context, oracle, rec.instruction)]
        for twin_kind, twin_ctx in zip(TWIN_KINDS[:2], (twin, ablated), strict=True):
            if twin_ctx is not None:
                n_ctx.append(len(twin_ctx))
                pairs.append((twin_kind, schema.abstain, twin_ctx, None, rec.instruction))
        if swapped is not None:  # the oracle example's very context: a minimal pair
            n_ctx.append(len(chosen))
            pairs.append((TWIN_KINDS[2], schema.abstain, chosen, None, swapped.question))
        for kind, target, context, oracle, question in pairs:
            kinds[kind] += 1
            fields = PromptFields(
                question, rec.input, None if context is None else [c.text for c in context]
            )
            prompt, completion = schema.render_example(fields, target, tokenizer)
            examples.append(
                {
                    "prompt": prompt,
                    "completion": completion,
                    "kind": kind,
                    "id": rec.id or _record_id(rec),
                    "instruction": question,
                    "answer": rec.output,
                    "plausible": rec.plausible,
                    "target": target,
                    "oracle_id": oracle.id if oracle else None,
                    "oracle_how": match.how if match else None,
                    "oracle_score": round(match.score, 3) if match else None,
                    "sources": []
                    if context is None
                    else [{"source": c.source, "start": c.start, "id": c.id} for c in context],
                }
            )
    stats = _stats(examples, kinds, tokenizer, schema, settings, n_truncated, n_ctx)
    stats["unanswerable_dropped"] = n_given - len(records)
    if pool is not None:
        stats["swapped_question"] = {h: changes[h] for h in ("swap", "negate", "none")}
    stats.update(_oracle_stats(examples, unsupported))
    _check_unsupported(stats, settings.max_unsupported_fraction)
    return examples, stats


def _abstains_on_purpose(rec: QARecord, schema: PromptSchema) -> bool:
    """An answerable-looking record whose answer is the abstain answer itself."""
    return schema.is_abstention(rec.output)


def _oracle_stats(examples: list[dict[str, Any]], unsupported: list[str]) -> dict[str, Any]:
    """How each answer's oracle was found, and the records whose answer nothing supports."""
    # one count per record: a twin repeats its record's match
    how = Counter(
        e["oracle_how"] for e in examples if e.get("oracle_how") and e["kind"] not in TWIN_KINDS
    )
    searched = sum(how.values())
    if unsupported:
        log.warning(
            "%d of %d answerable records have no chunk supporting their answer, so they train "
            "as abstain targets: %s%s",
            len(unsupported),
            searched,
            ", ".join(unsupported[:UNSUPPORTED_SHOWN]),
            " ..." if len(unsupported) > UNSUPPORTED_SHOWN else "",
        )
    return {
        "oracle_how": {h: how[h] for h in HOW},
        "unsupported": {
            "count": len(unsupported),
            "share": len(unsupported) / searched if searched else 0.0,
            "records": unsupported[:UNSUPPORTED_LISTED],
        },
    }


def _check_unsupported(stats: dict[str, Any], limit: float) -> None:
    u = stats["unsupported"]
    if u["share"] > limit:
        shown = ", ".join(u["records"][:UNSUPPORTED_SHOWN])
        raise UnsupportedAnswersError(
            f"{u['count']} answerable QA records ({u['share']:.0%}) have no chunk supporting "
            f"their answer (e.g. {shown}) and would train as abstain targets; fix their "
            f"answers or sources, or set raft.max_unsupported_fraction={_ceil2(u['share'])} "
            f"(now {limit}) to go on"
        )


def _ceil2(x: float) -> float:
    return min(1.0, math.ceil(round(x * 100, 6)) / 100)


def _record_id(rec: QARecord) -> str:
    return hashlib.sha1(f"{rec.instruction}\x00{rec.input}".encode()).hexdigest()[:12]


def _stats(
    examples: list[dict[str, Any]],
    kinds: Counter[str],
    tokenizer: Any,
    schema: PromptSchema,
    settings: BuildSettings,
    n_truncated: int,
    n_ctx: list[int],
) -> dict[str, Any]:
    lengths = sorted(
        len(schema.encode_prompt(tokenizer, e["prompt"]))
        + len(tokenizer(e["completion"], add_special_tokens=False)["input_ids"])
        for e in examples
    )
    answerable = kinds["oracle"] + kinds["abstain_no_oracle"] + kinds["memory_no_oracle"]
    n = len(examples)

    def pct(p: float) -> int:
        return lengths[min(len(lengths) - 1, int(p * len(lengths)))] if lengths else 0

    return {
        "examples": n,
        "kinds": dict(kinds),
        "mode": settings.mode,
        "oracle_fraction_target": settings.oracle_fraction,
        "oracle_rate": kinds["oracle"] / answerable if answerable else 0.0,
        "abstain_rate": sum(e["target"] == schema.abstain for e in examples) / n if n else 0.0,
        "oracle_truncated_by_budget": n_truncated,
        "context_chunks_mean": mean(n_ctx) if n_ctx else 0.0,
        "tokens": {
            "min": lengths[0] if lengths else 0,
            "mean": mean(lengths) if lengths else 0.0,
            "p95": pct(0.95),
            "max": lengths[-1] if lengths else 0,
        },
        "over_max_seq_length": sum(x > settings.max_seq_length for x in lengths),
        "max_seq_length": settings.max_seq_length,
    }


def save_dataset(
    examples: list[dict[str, Any]], stats: dict[str, Any], out_dir: Path, num_preview: int = 6
) -> Path:
    """Write ``train.jsonl``, ``stats.json`` and ``preview.md`` (prompts a person can read)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "train.jsonl").open("w") as f:
        for e in examples:
            f.write(json.dumps(e, ensure_ascii=False) + "\n")
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    shown: list[str] = []
    by_kind: dict[str, dict[str, Any]] = {}
    for e in examples:
        by_kind.setdefault(e["kind"], e)
    picks = list(by_kind.values())[: max(num_preview, 0)]
    for e in picks:
        how = e.get("oracle_how")
        found = f"oracle found: {how} (score {e['oracle_score']:.2f})\n\n" if how else ""
        shown.append(
            f"## {e['kind']}: {e['instruction']}\n\n{found}"
            f"```text\n{e['prompt']}{e['completion']}\n```\n"
        )
    (out_dir / "preview.md").write_text("# Rendered training examples\n\n" + "\n".join(shown))
    return out_dir


def load_saved_dataset(out_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Read back what :func:`save_dataset` wrote: ``(examples, stats)``.

    Under torchrun the other ranks train on rank 0's examples through this instead of
    retrieving themselves, so every rank holds the same data built once.
    """
    out_dir = Path(out_dir)
    train, stats_file = out_dir / "train.jsonl", out_dir / "stats.json"
    if not train.is_file() or not stats_file.is_file():
        raise FileNotFoundError(f"{out_dir}: no saved dataset (train.jsonl + stats.json)")
    with train.open() as f:
        examples = [json.loads(line) for line in f if line.strip()]
    return examples, json.loads(stats_file.read_text())


def describe(stats: dict[str, Any]) -> str:
    """One line for the log."""
    t = stats["tokens"]
    return (
        f"{stats['examples']} examples {stats['kinds']}, oracle rate {stats['oracle_rate']:.2f} "
        f"(target {stats['oracle_fraction_target']:.2f}), abstain rate {stats['abstain_rate']:.2f}, "
        f"tokens mean {t['mean']:.0f} p95 {t['p95']} max {t['max']}"
        + (f", oracle found {stats['oracle_how']}" if "oracle_how" in stats else "")
    )
