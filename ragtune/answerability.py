"""Whether a context supports an answer: a score per answer and a fitted threshold.

The model itself is asked, with one teacher-forced forward pass over the prompt followed by
each candidate: how likely is its answer, and how likely is the schema's abstain answer, for
this prompt. Features per answer (:class:`AnswerFeatures`):

- ``lp_answer`` / ``n_answer``: summed log-probability of the answer's tokens (plus EOS) and
  their number; ``lp_abstain``: the same for the abstain answer (plus EOS);
- ``p_abstain_first``: probability of the abstain answer's first token as the first token;
- ``grounded``: the normalised answer occurs in the normalised context (extractive support);
- ``retrieval``: the best retrieval score of the context (cosine; 0 when unknown);
- ``abstain_logodds``: ``p_abstain_first`` as log-odds;
- ``abstain_logodds_rotated``: ``abstain_logodds`` averaged over the context's rotations (each
  chunk first once), computed only when a pipeline is asked to (``rotate_context``, or a
  calibration that weighs it): a reading that does not hang on where the evidence sits;
- ``abstain_logodds_chunk``: the lowest abstain log-odds of the context's chunks, each read
  alone as the whole context (the chunk that most looks like it holds the answer), computed
  only when a pipeline is asked to (``read_chunks``, or a calibration that weighs it).

A score is a weighted sum of these: those ``raft.calibration_features`` names among
:data:`CHOICES` (by default ``abstain_logodds`` and ``retrieval``; :data:`FEATURES`, the six
weighed before session 25, where no names are given); :func:`fit_logistic` fits the weights
on a validation split as the log-odds that the question is answerable, and
:func:`expected_score_threshold` the cut where answering and abstaining are worth the same in
expectation (:func:`fit_threshold`, the cut that scores best on the validation questions
themselves, is kept for comparison). Higher score = answer; below the threshold the pipeline
abstains. Which features carry the signal is measured in docs/benchmarks.md ("Answer or
abstain").

:func:`blocked_candidates` keeps the abstain answer's first token out of the first decoding
step (``Generator.generate_batch(block_first_tokens=...)``), so that every question gets a
candidate answer to score, even one the model would abstain on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ragtune.metrics import normalize_answer
from ragtune.roc import auroc

FEATURES = ("margin", "mean_lp", "lp_abstain", "p_abstain_first", "grounded", "retrieval")
# what a mix may weigh (raft.calibration_features): the six above, and the first-token
# probability as log-odds (it saturates near 0 and 1, where a weight on the probability is flat)
CHOICES = (*FEATURES, "abstain_logodds", "abstain_logodds_rotated", "abstain_logodds_chunk")
# the features that cost extra forward passes (one prompt per further rotation / per chunk)
ROTATED = "abstain_logodds_rotated"
CHUNK = "abstain_logodds_chunk"
# The default score until a model's manifest carries fitted weights: the model's own
# log-odds of its answer against the abstain answer, per answer token.
DEFAULT_WEIGHTS: dict[str, float] = {"margin": 1.0}


@dataclass(frozen=True)
class AnswerFeatures:
    """What the model and the context say about one answer (see the module docstring)."""

    lp_answer: float
    n_answer: int
    lp_abstain: float
    p_abstain_first: float
    grounded: float
    retrieval: float = 0.0
    abstain_logodds_rotated: float | None = None  # None: not computed for this answer
    abstain_logodds_chunk: float | None = None  # None: not computed for this answer

    @property
    def mean_lp(self) -> float:
        return self.lp_answer / max(1, self.n_answer)

    @property
    def abstain_logodds(self) -> float:
        """``p_abstain_first`` as log-odds, clipped at 1e-6 from 0 and 1."""
        return logodds(self.p_abstain_first)

    @property
    def margin(self) -> float:
        """Log-odds of the answer against abstaining, length-normalised by the answer."""
        return (self.lp_answer - self.lp_abstain) / max(1, self.n_answer)

    def vector(self) -> list[float]:
        return [float(getattr(self, name)) for name in FEATURES]

    def to_dict(self) -> dict[str, float]:
        return {
            **asdict(self),
            "mean_lp": self.mean_lp,
            "margin": self.margin,
            "abstain_logodds": self.abstain_logodds,
        }


def logodds(p: float) -> float:
    """``log(p / (1 - p))`` with ``p`` clipped at 1e-6 from 0 and 1."""
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def rotations(chunks: Sequence[Any]) -> list[list[Any]]:
    """The context's other orders that :data:`ROTATED` reads: each further chunk first once,
    the rest following in order (``[b, c, a]``, ``[c, a, b]`` for ``[a, b, c]``)."""
    items = list(chunks)
    return [items[i:] + items[:i] for i in range(1, len(items))]


def grounded(answer: str, contexts: Sequence[str] | None) -> float:
    """1.0 when the SQuAD-normalised answer occurs in the normalised context, else 0.0."""
    ans = normalize_answer(answer)
    if not ans or not contexts:
        return 0.0
    text = normalize_answer(" ".join(contexts))
    return float(f" {ans} " in f" {text} ")


def answer_features(
    model: Any,
    tokenizer: Any,
    schema: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    contexts: Sequence[Sequence[str] | None] | None = None,
    retrieval_scores: Sequence[float] | None = None,
    batch_size: int = 16,
    views: Sequence[Sequence[str]] | None = None,
    chunk_views: Sequence[Sequence[str]] | None = None,
) -> list[AnswerFeatures]:
    """Features of each (prompt, answer): batched forward passes over prompt + answer and
    prompt + abstain answer (the prompt is encoded exactly as training encoded it).

    ``views``: per prompt, the same question rendered with its context in other orders
    (:func:`rotations`); their abstain first-token log-odds, averaged with the prompt's own,
    give ``abstain_logodds_rotated`` (otherwise None). A prompt without views averages itself.
    ``chunk_views``: per prompt, the same question rendered with each chunk of its context
    alone; the lowest of their abstain log-odds is ``abstain_logodds_chunk`` (otherwise None;
    a prompt without chunk views reads as itself).
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    for name, extra in (("views", views), ("chunk views", chunk_views)):
        if extra is not None and len(extra) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(extra)} sets of {name}")
    p_ids = [schema.encode_prompt(tokenizer, p) for p in prompts]
    a_ids = [_completion_ids(tokenizer, a) for a in answers]
    abstain = _completion_ids(tokenizer, schema.abstain)
    owner = [i for i, vs in enumerate(views or ()) for _ in vs]
    c_owner = [i for i, vs in enumerate(chunk_views or ()) for _ in vs]
    v_ids = [schema.encode_prompt(tokenizer, v) for vs in views or () for v in vs]
    v_ids += [schema.encode_prompt(tokenizer, v) for vs in chunk_views or () for v in vs]
    n = len(p_ids)  # one batched pass over every completion: on CPU ~1.5x faster than two
    lp, firsts = _logprobs(
        model,
        tokenizer,
        [*p_ids, *p_ids, *v_ids],
        [*a_ids, *[abstain] * n, *[abstain[:1]] * len(v_ids)],  # a view needs its first token only
        batch_size * 2,
        abstain[0],
    )
    lp_ans, lp_abs, first = lp[:n], lp[n : 2 * n], firsts[:n]
    read = [[logodds(p)] for p in first]
    for i, p in zip(owner, firsts[2 * n : 2 * n + len(owner)], strict=True):
        read[i].append(logodds(p))
    alone: list[list[float]] = [[] for _ in range(n)]
    for i, p in zip(c_owner, firsts[2 * n + len(owner) :], strict=True):
        alone[i].append(logodds(p))
    out = []
    for i, answer in enumerate(answers):
        ctx = contexts[i] if contexts is not None else None
        out.append(
            AnswerFeatures(
                lp_answer=lp_ans[i],
                n_answer=len(a_ids[i]),
                lp_abstain=lp_abs[i],
                p_abstain_first=first[i],
                grounded=grounded(answer, ctx),
                retrieval=float(retrieval_scores[i]) if retrieval_scores is not None else 0.0,
                abstain_logodds_rotated=None if views is None else sum(read[i]) / len(read[i]),
                abstain_logodds_chunk=None
                if chunk_views is None
                else min(alone[i], default=read[i][0]),
            )
        )
    return out


def abstain_readings(
    model: Any, tokenizer: Any, schema: Any, prompts: Sequence[str], batch_size: int = 16
) -> list[float]:
    """The abstain answer's first-token log-odds after each prompt: how surely the model would
    abstain (the reading a reranker orders chunks by, each rendered alone as the context)."""
    if not prompts:
        return []
    abstain = _completion_ids(tokenizer, schema.abstain)[:1]
    ids = [schema.encode_prompt(tokenizer, p) for p in prompts]
    _, firsts = _logprobs(model, tokenizer, ids, [abstain] * len(ids), batch_size, abstain[0])
    return [logodds(p) for p in firsts]


def combine(
    features: Sequence[AnswerFeatures], weights: dict[str, float] | None = None, bias: float = 0.0
) -> list[float]:
    """The score of each answer: ``bias + sum(weight * feature)``."""
    w = DEFAULT_WEIGHTS if weights is None else weights
    unknown = sorted(set(w) - set(CHOICES))
    if unknown:
        raise ValueError(f"unknown answerability feature(s) {unknown}; known: {CHOICES}")
    return [bias + sum(v * feature(f, k) for k, v in w.items()) for f in features]


def feature(f: AnswerFeatures, name: str) -> float:
    """One feature's value; a clear error for one the answer was scored without."""
    value = getattr(f, name)
    if value is None:
        raise ValueError(
            f"answerability feature {name!r} was not computed for this answer "
            "(a pipeline computes it with rotate_context=True / read_chunks=True, or when its "
            "calibration weighs it)"
        )
    return float(value)


def score_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    contexts: Sequence[Sequence[str] | None] | None = None,
    *,
    schema: Any,
    retrieval_scores: Sequence[float] | None = None,
    weights: dict[str, float] | None = None,
    bias: float = 0.0,
    batch_size: int = 16,
) -> list[float]:
    """Answer-or-abstain score of each answer (higher = the context supports answering)."""
    feats = answer_features(
        model, tokenizer, schema, prompts, answers, contexts, retrieval_scores, batch_size
    )
    return combine(feats, weights, bias)


# --------------------------------------------------------------------------- decisions
def split_by_source(
    records: Sequence[Any], n_sources: int = 1, seed: int = 0, *, fraction: float | None = None
) -> tuple[list, list]:
    """(train, validation): whole source documents held out for fitting the threshold, so
    the validation questions are about documents the model was not trained on (as at serve
    time). ``fraction``: hold out sources (in a seeded order) until at least that share of
    the records is held out, instead of ``n_sources``; at least one source always trains.
    Records without a source always train; order is kept."""
    import random

    sources = sorted({r.source for r in records if r.source})
    rng = random.Random(f"{seed}:validation")
    order = rng.sample(sources, len(sources)) if fraction is not None else []
    if fraction is not None:
        per = {s: sum(1 for r in records if r.source == s) for s in sources}
        n_sources, held_n = 0, 0
        while n_sources < len(order) - 1 and held_n < fraction * len(records):
            held_n += per[order[n_sources]]
            n_sources += 1
    if n_sources <= 0 or len(sources) <= n_sources:
        raise ValueError(
            f"need more than {n_sources} source document(s) to hold out, got {len(sources)}"
        )
    held = set(order[:n_sources] if order else rng.sample(sources, n_sources))
    train = [r for r in records if r.source not in held]
    val = [r for r in records if r.source in held]
    return train, val


def fit_threshold(
    scores: Sequence[float],
    answerable: Sequence[bool | int],
    answer_values: Sequence[float] | None = None,
) -> float:
    """The cut maximising the SQuAD v2 overall score: answer when ``score >= cut``.

    An answered answerable question earns its F1 (``answer_values``; 1.0 when not given), an
    abstained unanswerable one earns 1, everything else 0. Returns the midpoint between the
    best cut's score and the next lower one (-inf: answer all; +inf: abstain on all).
    """
    if not scores:
        raise ValueError("fit_threshold needs at least one score")
    values = list(answer_values) if answer_values is not None else [1.0] * len(scores)
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    total = float(sum(1 for y in answerable if not y))  # cut above all: abstain on everything
    best, best_k = total, 0
    for k, i in enumerate(order, start=1):  # answer the top k
        total += values[i] if answerable[i] else -1.0
        tied = k < len(order) and scores[order[k]] == scores[i]
        if not tied and total > best:
            best, best_k = total, k
    if best_k == 0:
        return math.inf
    if best_k == len(order):
        return -math.inf
    return (scores[order[best_k - 1]] + scores[order[best_k]]) / 2.0


def expected_score_threshold(
    answerable: Sequence[bool | int], answer_values: Sequence[float]
) -> float:
    """The cut on a log-odds score at which answering and abstaining score the same in
    expectation (SQuAD v2's overall): answering earns the answer's F1 if the question is
    answerable (``p * F1``), abstaining earns 1 if it is not (``1 - p``), so answer when
    ``log(p / (1 - p)) >= -log(F1)``, F1 being the candidates' mean over the answerable
    validation questions. +inf (abstain on everything) when those answers are worth nothing.

    Why not the best cut on the validation questions (:func:`fit_threshold`): that cut sits
    wherever one or two held-out articles' scores happen to fall; on unseen articles it scored
    up to 8.7 points of overall below this one and at most 1.0 above it, 1.4 below on
    average over 14 runs (docs/benchmarks.md, "Where to cut").
    """
    values = [float(v) for v, y in zip(answer_values, answerable, strict=True) if y]
    mean = sum(values) / len(values) if values else 0.0
    return math.inf if mean <= 0.0 else -math.log(min(1.0, mean))


def fit_logistic(
    features: Sequence[AnswerFeatures],
    labels: Sequence[bool | int],
    names: Sequence[str] = FEATURES,
    l2: float = 1.0,
) -> tuple[dict[str, float], float]:
    """Weights and bias of an L2-regularised logistic regression on standardised features
    (scikit-learn), expressed on the raw features so that :func:`combine` applies them."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    x = np.array([[feature(f, n) for n in names] for f in features], dtype=np.float64)
    y = np.array([int(bool(v)) for v in labels])
    mu, sd = x.mean(axis=0), x.std(axis=0)
    sd[sd == 0] = 1.0
    clf = LogisticRegression(C=1.0 / l2, max_iter=1000).fit((x - mu) / sd, y)
    w = clf.coef_[0] / sd
    bias = float(clf.intercept_[0] - (w * mu).sum())
    return {n: float(v) for n, v in zip(names, w, strict=True)}, bias


# --------------------------------------------------------------------------- manifest
MANIFEST_KEY = "answerability"


@dataclass(frozen=True)
class Calibration:
    """A fitted decision: answer when ``combine(features, weights, bias) >= threshold``."""

    threshold: float
    weights: dict[str, float]
    bias: float = 0.0
    auroc: float | None = None  # on the validation split it was fitted on
    n_validation: int = 0
    validation_sources: tuple[str, ...] = ()

    def answers(self, features: Sequence[AnswerFeatures]) -> list[bool]:
        """Whether each answer stands (True) or becomes the abstain answer (False)."""
        return [s >= self.threshold for s in combine(features, self.weights, self.bias)]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["validation_sources"] = list(self.validation_sources)
        if math.isinf(self.threshold):  # "inf" / "-inf": strict JSON has no Infinity
            d["threshold"] = str(self.threshold)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        return cls(
            threshold=float(d["threshold"]),
            weights={str(k): float(v) for k, v in d["weights"].items()},
            bias=float(d.get("bias", 0.0)),
            auroc=d.get("auroc"),
            n_validation=int(d.get("n_validation", 0)),
            validation_sources=tuple(d.get("validation_sources", ())),
        )


def read_calibration(model_dir: Any) -> Calibration | None:
    """The calibration in a model folder's manifest, or None when it has none."""
    from ragtune.manifest import read_manifest

    d = read_manifest(model_dir).get(MANIFEST_KEY)
    return Calibration.from_dict(d) if d else None


def write_calibration(model_dir: Any, calibration: Calibration) -> Any:
    """Add the calibration to ``manifest.json`` (atomically; other fields kept)."""
    import json
    import os
    import tempfile
    from pathlib import Path

    from ragtune.manifest import MANIFEST, read_manifest

    folder = Path(model_dir)
    data = {**read_manifest(folder), MANIFEST_KEY: calibration.to_dict()}
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", dir=folder)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, folder / MANIFEST)
    return folder / MANIFEST


# --------------------------------------------------------------------------- decoding
def abstain_first_token(tokenizer: Any, schema: Any) -> int:
    """The first token of the schema's abstain answer (as training encodes it)."""
    return _completion_ids(tokenizer, schema.abstain)[0]


def blocked_candidates(generator: Any, prompts: Sequence[str], batch_size: int = 8) -> list[str]:
    """The best non-abstaining answer for each prompt: greedy decoding with the abstain
    answer's first token banned at the first step."""
    first = abstain_first_token(generator.tokenizer, generator.schema)
    results = generator.generate_batch(prompts, batch_size, block_first_tokens=[first])
    return [r.text for r in results]


def is_abstained(schema: Any, text: str) -> bool:
    """Abstained: the schema's abstain answer, or an answer that normalises to nothing (the
    SQuAD v2 empty prediction); the pipeline and the metrics use this one rule."""
    return not normalize_answer(text) or schema.is_abstention(text)


@dataclass(frozen=True)
class Assessment:
    """One answer judged: the answer to give, the candidate it was judged on, its score."""

    answer: str
    candidate: str
    score: float
    features: AnswerFeatures


def assess(
    generator: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    contexts: Sequence[Sequence[str] | None] | None = None,
    retrieval_scores: Sequence[float] | None = None,
    calibration: Calibration | None = None,
    batch_size: int = 8,
    views: Sequence[Sequence[str]] | None = None,
    chunk_views: Sequence[Sequence[str]] | None = None,
) -> list[Assessment]:
    """Score each generated answer and, with a calibration, apply its decision.

    An answer that abstained is replaced by its blocked candidate for scoring, so every
    question gets a score. Without a calibration the answers stay as generated (scores are
    still reported, for AUROC); with one, the candidate is given when its score reaches the
    threshold, else the abstain answer. ``views``, ``chunk_views``: see :func:`answer_features`.
    """
    schema = generator.schema
    cands = list(answers)
    redo = [i for i, a in enumerate(answers) if is_abstained(schema, a)]
    if redo:
        got = blocked_candidates(generator, [prompts[i] for i in redo], batch_size)
        for i, c in zip(redo, got, strict=True):
            cands[i] = c
    with generator.exclusive():  # a server's other threads wait, as for a generation
        feats = answer_features(
            generator.model,
            generator.tokenizer,
            schema,
            prompts,
            cands,
            contexts,
            retrieval_scores,
            batch_size,
            views=views,
            chunk_views=chunk_views,
        )
    if calibration is None:
        scores = combine(feats)
        final = list(answers)
    else:
        scores = combine(feats, calibration.weights, calibration.bias)
        final = [
            c if s >= calibration.threshold and not is_abstained(schema, c) else schema.abstain
            for c, s in zip(cands, scores, strict=True)
        ]
    return [Assessment(*row) for row in zip(final, cands, scores, feats, strict=True)]


def fit_calibration(
    features: Sequence[AnswerFeatures],
    answerable: Sequence[bool],
    candidate_f1: Sequence[float],
    sources: Sequence[str] = (),
    names: Sequence[str] = FEATURES,
) -> Calibration:
    """The shipped decision, fitted on a validation split: logistic weights over the features
    ``names`` (:func:`fit_logistic`: the log-odds of "answerable"), then the cut where answering
    is worth as much as abstaining (:func:`expected_score_threshold`)."""
    weights, bias = fit_logistic(features, answerable, names)
    scores = combine(features, weights, bias)
    return Calibration(
        threshold=expected_score_threshold(answerable, candidate_f1),
        weights=weights,
        bias=bias,
        auroc=auroc(scores, answerable),
        n_validation=len(scores),
        validation_sources=tuple(sorted(set(sources))),
    )


# --------------------------------------------------------------------------- internals
def _completion_ids(tokenizer: Any, text: str) -> list[int]:
    """A completion's ids as training encodes them: the text, then EOS."""
    ids = list(tokenizer(text.strip(), add_special_tokens=False)["input_ids"])
    return [*ids, tokenizer.eos_token_id]


def right_padded(rows: Sequence[Sequence[int]], pad: int) -> tuple[Any, Any]:
    """(input_ids, attention_mask) of token-id rows padded on the right into one batch."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(list(row))
        mask[r, : len(row)] = 1
    return ids, mask


def _logprobs(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    batch_size: int,
    first_token: int | None,
) -> tuple[list[float], list[float]]:
    """Summed log-probability of each completion after its prompt (right-padded batches),
    and the probability of ``first_token`` at the first completion position."""
    if hasattr(model, "completion_logprobs"):  # a remote engine (ragtune.remote.Engine)
        return model.completion_logprobs(prompts, completions, batch_size, first_token)
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums, firsts = [0.0] * len(prompts), [0.0] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(completions[i]))
    for b in range(0, len(order), max(1, batch_size)):
        idx = order[b : b + batch_size]
        ids, mask = right_padded([[*prompts[i], *completions[i]] for i in idx], pad)
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for r, i in enumerate(idx):  # log-softmax over the completion positions only
                start, n = len(prompts[i]), len(completions[i])
                logp = torch.log_softmax(logits[r, start - 1 : start - 1 + n].float(), dim=-1)
                tgt = torch.tensor(completions[i], device=logp.device)
                sums[i] = float(logp[torch.arange(n, device=logp.device), tgt].sum())
                if first_token is not None:
                    firsts[i] = float(logp[0, first_token].exp())
    return sums, firsts
