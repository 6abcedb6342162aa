"""Answer-or-abstain: the score, the threshold, AUROC, and the contrastive training pairs."""

from __future__ import annotations

import dataclasses
import hashlib
import math

import pytest

from ragtune.answerability import (
    abstain_first_token,
    answer_features,
    blocked_candidates,
    fit_logistic,
    fit_threshold,
    grounded,
    score_answers,
    split_by_source,
)
from ragtune.raft import BuildSettings, build_examples
from ragtune.roc import auroc, auroc_interval, roc_curve
from ragtune.schema import PromptFields, get_schema
from ragtune.types import Chunk, QARecord


# --------------------------------------------------------------------------- AUROC
def test_auroc_matches_reference_values():
    # reference: pairs (pos > neg) + 0.5 * ties, counted by hand
    assert auroc([0.9, 0.8, 0.3, 0.1], [1, 1, 0, 0]) == 1.0
    assert auroc([0.1, 0.3, 0.8, 0.9], [1, 1, 0, 0]) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.5], [1, 0, 1, 0]) == 0.5
    # 3 pos x 2 neg = 6 pairs: 0.8>0.7, 0.8>0.2, 0.4<0.7, 0.4>0.2, 0.7=0.7 (half), 0.7>0.2
    assert auroc([0.8, 0.4, 0.7, 0.7, 0.2], [1, 1, 1, 0, 0]) == pytest.approx(4.5 / 6)
    assert math.isnan(auroc([0.1, 0.2], [1, 1]))


def test_auroc_interval_narrows_with_more_questions():
    """The AUROC's bootstrap interval: around the estimate (scores drawn from N(1, 1) vs
    N(0, 1)), about half as wide for 4x the questions, a point for perfect separation, and
    none when a class has fewer than two questions."""
    import random

    rng = random.Random(1)

    def draw(n: int) -> tuple[list[float], list[int]]:
        scores = [rng.gauss(1, 1) for _ in range(n)] + [rng.gauss(0, 1) for _ in range(n)]
        return scores, [1] * n + [0] * n

    small, large = draw(50), draw(200)
    lo_s, hi_s = auroc_interval(*small, n_resamples=1000)
    lo_l, hi_l = auroc_interval(*large, n_resamples=1000)
    assert lo_s < auroc(*small) < hi_s
    assert lo_l < auroc(*large) < hi_l
    assert hi_l - lo_l < 0.7 * (hi_s - lo_s)
    assert hi_l - lo_l < 0.15
    assert auroc_interval([2.0, 3.0, 4.0, 0.0, 1.0], [1, 1, 1, 0, 0], n_resamples=200) == (1.0, 1.0)
    assert auroc_interval([0.9, 0.8, 0.1], [1, 1, 0]) is None


def test_roc_curve_ends_at_the_corners():
    pts = roc_curve([0.9, 0.8, 0.3, 0.1], [1, 0, 1, 0])
    assert pts[0] == (0.0, 0.0) and pts[-1] == (1.0, 1.0)
    assert pts[1] == (0.0, 0.5)
    # one negative (or one positive) is a whole class: the curve still reaches the corner
    assert roc_curve([0.9, 0.8, 0.1], [1, 1, 0]) == [(0.0, 0.0), (0.0, 0.5), (0.0, 1.0), (1.0, 1.0)]
    assert roc_curve([0.9, 0.8, 0.1], [1, 0, 0])[-1] == (1.0, 1.0)


def test_rows_auroc_scores_the_scored_rows_and_keeps_their_curve(tmp_path):
    """Evaluation rows without a score (an undecided mode) are left out; no scored row or one
    class only gives no AUROC; the kept curve is what roc.png draws, returned by plot_roc."""
    from ragtune.roc import plot_roc, rows_auroc

    rows = [
        {"answerability": 0.9, "answerable": True},
        {"answerability": None, "answerable": False},
        {"answerability": 0.2, "answerable": False},
        {"answerability": 0.6, "answerable": True},
        {"answerability": 0.7, "answerable": False},
    ]
    curves: dict = {}
    assert rows_auroc(rows, curves, "raft_rag") == 0.75
    assert curves == {"raft_rag": ([0.9, 0.2, 0.6, 0.7], [True, False, True, False])}
    assert rows_auroc([{"answerability": None, "answerable": True}], curves, "base") is None
    assert rows_auroc(rows[:1], curves, "one_class") is None and "base" not in curves
    png = tmp_path / "roc.png"
    assert plot_roc({"raft_rag": curves["raft_rag"]}, png) == png
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- threshold
def test_fit_threshold_picks_the_cut_that_maximises_overall():
    # answerable (True) score high, unanswerable low, one unanswerable at 0.65
    scores = [0.9, 0.8, 0.7, 0.65, 0.6, 0.2, 0.1]
    labels = [True, True, True, False, False, False, False]
    cut = fit_threshold(scores, labels)
    assert 0.65 < cut <= 0.7
    # a wrong answer is worth nothing: with F1 0 on the 0.7 question the best cut moves above it
    cut = fit_threshold(scores, labels, [1.0, 1.0, 0.0, 0, 0, 0, 0])
    assert 0.7 < cut <= 0.8
    # the cut sits halfway between the last answered score and the first abstained one
    assert fit_threshold([3.0, 1.0], [True, False]) == pytest.approx(2.0)


def test_fit_threshold_extremes():
    assert fit_threshold([0.1, 0.2], [False, False]) == math.inf  # abstain on everything
    assert fit_threshold([0.1, 0.2], [True, True]) == -math.inf  # answer everything


def test_fit_threshold_does_not_split_ties():
    # answering only the answerable one of the tied pair would score 3/3, but a cut cannot
    # separate equal scores: answering both scores 2/3, abstaining on all 2/3 (kept: first best)
    cut = fit_threshold([0.5, 0.5, 0.1], [True, False, False])
    assert cut == math.inf


# --------------------------------------------------------------------------- features
def test_grounded_is_a_normalised_span_match():
    assert grounded("The Eiffel Tower", ["Paris has the eiffel tower, built 1889."]) == 1.0
    assert grounded("Eiffel", ["Paris has the eiffeltower."]) == 0.0
    assert grounded("1889", None) == 0.0
    # an answer that normalises to nothing (an article, punctuation) is supported by no text
    assert grounded("The.", ["the tower, the city"]) == 0.0


def test_split_by_source_holds_out_whole_documents():
    recs = [QARecord(f"q{i}", "a", source=f"doc{i % 4}") for i in range(20)]
    train, val = split_by_source(recs, 1, seed=0)
    assert len({r.source for r in val}) == 1
    assert not {r.source for r in val} & {r.source for r in train}
    assert len(train) + len(val) == 20
    with pytest.raises(ValueError):
        split_by_source(recs, 4)


def test_split_by_source_draws_sources_by_seed_and_always_trains_on_one():
    """Which documents are held out follows the seed (not their names' order); sourceless
    records always train; a share as large as everything still leaves one source training."""
    recs = [QARecord(f"q{i}", "a", source=f"doc{i % 6}") for i in range(30)]
    recs += [QARecord("no source", "a")]
    held = {frozenset(r.source for r in split_by_source(recs, 2, seed=s)[1]) for s in range(8)}
    assert len(held) > 1  # different seeds, different held-out documents
    train, val = split_by_source(recs, 2, seed=3)
    assert train[-1].instruction == "no source" and all(r.source for r in val)
    train, val = split_by_source(recs, seed=0, fraction=1.0)
    assert len({r.source for r in val}) == 5 and len({r.source for r in train if r.source}) == 1
    train, val = split_by_source(recs, seed=0, fraction=0.3)  # whole documents up to >= 30%
    assert len(val) >= 0.3 * len(recs) and len({r.source for r in val}) == 2


def test_logistic_weights_apply_to_raw_features():
    from ragtune.answerability import AnswerFeatures, combine

    feats = [AnswerFeatures(-1.0 * i, 2, -5.0, 0.1, float(i % 2), 0.5) for i in range(20)]
    labels = [i < 10 for i in range(20)]  # higher lp_answer (smaller i) = answerable
    w, b = fit_logistic(feats, labels, ("mean_lp", "grounded"))
    s = combine(feats, w, b)
    assert auroc(s, labels) > 0.95


def test_the_fitted_decision_does_not_depend_on_a_feature_s_units():
    """Features are standardised before the (L2-regularised) fit: a retrieval score in other
    units (x1000) gives the same scores, so no feature is favoured by its scale."""
    import random

    from ragtune.answerability import AnswerFeatures, combine

    rng = random.Random(0)
    labels = [i % 2 == 0 for i in range(60)]
    feats = [
        AnswerFeatures(-1.0, 2, -3.0, rng.uniform(0.05, 0.6 if y else 0.95), 1.0, rng.gauss(y, 1))
        for y in labels
    ]
    scaled = [dataclasses.replace(f, retrieval=1000 * f.retrieval) for f in feats]
    names = ("abstain_logodds", "retrieval")
    a = combine(feats, *fit_logistic(feats, labels, names))
    b = combine(scaled, *fit_logistic(scaled, labels, names))
    assert a == pytest.approx(b, abs=1e-6)


def test_an_empty_mix_is_its_bias_not_the_default_score():
    from ragtune.answerability import AnswerFeatures, combine

    f = AnswerFeatures(-1.0, 1, -5.0, 0.1, 1.0, 0.3)  # margin 4: the default score
    assert combine([f], {}, 0.25) == [0.25] and combine([f]) == [pytest.approx(4.0)]


def test_margin_and_mean_lp_are_per_answer_token():
    """Long answers sum more log-probability; per token they compare with short ones."""
    from ragtune.answerability import AnswerFeatures

    f = AnswerFeatures(lp_answer=-6.0, n_answer=3, lp_abstain=-9.0, p_abstain_first=0.1, grounded=1)
    assert f.mean_lp == pytest.approx(-2.0)
    assert f.margin == pytest.approx(1.0)  # (-6 - -9) / 3


def test_combine_names_an_unknown_feature():
    from ragtune.answerability import AnswerFeatures, combine

    feats = [AnswerFeatures(-1.0, 1, -2.0, 0.5, 1.0)]
    with pytest.raises(ValueError, match="unknown answerability feature.*'margn'"):
        combine(feats, {"margn": 1.0})


def test_calibration_answers_at_the_threshold_and_abstains_below():
    from ragtune.answerability import AnswerFeatures, Calibration

    feats = [AnswerFeatures(-1.0, 1, -1.0, 0.5, 1.0, r) for r in (0.4, 0.5, 0.6)]
    cal = Calibration(threshold=0.5, weights={"retrieval": 1.0})
    assert cal.answers(feats) == [False, True, True]


def test_abstain_logodds_separates_where_the_probability_saturates():
    """Near 0 a weight on the probability barely moves the score; on the log-odds it does, so
    a mix of abstain_logodds ranks 1e-5 against 1e-3 as it ranks 0.3 against 0.7."""
    from ragtune.answerability import CHOICES, AnswerFeatures, combine
    from ragtune.config import AnswerFeature

    assert set(CHOICES) == {f.value for f in AnswerFeature}  # the config's choices are these
    ps = [1e-5, 1e-3, 0.3, 0.7, 1.0]
    feats = [AnswerFeatures(-1.0, 1, -2.0, p, 1.0, 0.5) for p in ps]
    logodds = [f.abstain_logodds for f in feats]
    assert logodds[:4] == pytest.approx([math.log(p / (1 - p)) for p in ps[:4]])
    assert logodds[4] == pytest.approx(math.log((1 - 1e-6) / 1e-6))  # clipped, finite
    labels = [True, True, False, False, False]  # answerable = the model rarely starts abstaining
    w, b = fit_logistic(feats, labels, ("abstain_logodds",))
    assert w["abstain_logodds"] < 0 and auroc(combine(feats, w, b), labels) == 1.0
    raw = combine(feats, {"p_abstain_first": -1.0})
    assert abs(raw[0] - raw[1]) < 1e-2  # the probability barely tells the two answerable apart
    scored = combine(feats, {"abstain_logodds": -1.0})
    assert scored[0] - scored[1] > 4  # the log-odds does


def _train_tiny(tiny_lm_path, examples, steps=60):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_lm_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_path, dtype=torch.float32)
    schema = get_schema("alpaca_rag_short")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rows = []
    for prompt, completion in examples:
        p = schema.encode_prompt(tok, prompt)
        c = [*tok(completion, add_special_tokens=False)["input_ids"], tok.eos_token_id]
        rows.append((p + c, len(p)))
    for step in range(steps):
        ids, plen = rows[step % len(rows)]
        x = torch.tensor([ids])
        labels = x.clone()
        labels[0, :plen] = -100
        model(input_ids=x, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model, tok, schema


def test_score_separates_supported_from_unsupported_context(tiny_lm_path):
    """The tiny model, trained on a pair that differs only in whether the context holds the
    answer, scores the answer higher with the supporting context than without it."""
    from ragtune.schema import PromptFields

    schema = get_schema("alpaca_rag_short")
    q = "Who built the harbor?"
    with_ctx = schema.render_prompt(PromptFields(q, "", ["The harbor was built by Marlowe."]))
    without = schema.render_prompt(PromptFields(q, "", ["The garden is full of roses."]))
    model, tok, schema = _train_tiny(
        tiny_lm_path, [(with_ctx, "Marlowe"), (without, schema.abstain)]
    )
    s = score_answers(
        model,
        tok,
        [with_ctx, without],
        ["Marlowe", "Marlowe"],
        [["The harbor was built by Marlowe."], ["The garden is full of roses."]],
        schema=schema,
    )
    assert s[0] > s[1] + 1.0
    f = answer_features(model, tok, schema, [with_ctx, without], ["Marlowe", "Marlowe"], None)
    assert f[1].p_abstain_first > f[0].p_abstain_first
    assert f[0].n_answer == len(tok("Marlowe", add_special_tokens=False)["input_ids"]) + 1


def test_rotated_logodds_is_the_mean_over_the_context_s_orders(tiny_lm_path):
    """``abstain_logodds_rotated`` averages the first token's abstain log-odds over the prompt
    and its views, each read as if it were the prompt itself; the other features are the
    prompt's own, and without views the feature is not computed."""
    from ragtune.answerability import rotations

    schema = get_schema("alpaca_rag_short")
    chunks = ["The harbor was built by Marlowe.", "Roses grow here.", "The mill is old."]
    assert rotations(chunks) == [chunks[1:] + chunks[:1], chunks[2:] + chunks[:2]]
    assert rotations(chunks[:1]) == []

    def render(q, cs):
        return schema.render_prompt(PromptFields(q, "", cs))

    # trained a little, so that abstaining is neither certain nor impossible in any order
    model, tok, schema = _train_tiny(
        tiny_lm_path,
        [
            (render("Who built the harbor?", chunks), "Marlowe"),
            (render("Who built the harbor?", chunks[1:]), schema.abstain),
        ],
        steps=20,
    )

    qs, answers = ["Who built the harbor?", "What grows here?"], ["Marlowe", "Roses"]
    prompts = [render(q, chunks) for q in qs]
    views = [[render(qs[0], o) for o in rotations(chunks)], []]  # the second has none
    plain = answer_features(model, tok, schema, prompts, answers, None)
    rotated = answer_features(model, tok, schema, prompts, answers, None, views=views)
    assert {f.abstain_logodds_rotated for f in plain} == {None}
    # each order read alone, as the prompt (a batch of different lengths: padding must not leak)
    alone = [
        answer_features(model, tok, schema, [p], [answers[0]], None)[0].abstain_logodds
        for p in [prompts[0], *views[0]]
    ]
    assert max(alone) - min(alone) > 1e-4, "precondition: the orders read differently"
    assert rotated[0].abstain_logodds_rotated == pytest.approx(sum(alone) / 3, abs=1e-4)
    assert rotated[1].abstain_logodds_rotated == pytest.approx(rotated[1].abstain_logodds)
    for f, g in zip(plain, rotated, strict=True):  # the views change nothing else
        assert (f.lp_answer, f.lp_abstain, f.p_abstain_first) == pytest.approx(
            (g.lp_answer, g.lp_abstain, g.p_abstain_first), abs=1e-4
        )
    with pytest.raises(ValueError, match="2 prompts but 1 sets of views"):
        answer_features(model, tok, schema, prompts, answers, None, views=views[:1])


def test_chunk_logodds_is_the_most_answerable_chunk_read_alone(tiny_lm_path):
    """``abstain_logodds_chunk`` is the lowest abstain log-odds of the prompt's chunks, each
    rendered alone as the context and read as a prompt of its own (``abstain_readings``); a
    prompt without chunk views reads as itself; the other features stay the prompt's own."""
    from ragtune.answerability import abstain_readings

    schema = get_schema("alpaca_rag_short")
    chunks = ["The harbor was built by Marlowe.", "Roses grow here.", "The mill is old."]

    def render(q, cs):
        return schema.render_prompt(PromptFields(q, "", cs))

    model, tok, schema = _train_tiny(
        tiny_lm_path,
        [
            (render("Who built the harbor?", chunks[:1]), "Marlowe"),
            (render("Who built the harbor?", chunks[1:2]), schema.abstain),
        ],
        steps=20,
    )
    qs, answers = ["Who built the harbor?", "What grows here?"], ["Marlowe", "Roses"]
    prompts = [render(q, chunks) for q in qs]
    singles = [[render(qs[0], [c]) for c in chunks], []]  # the second has none
    plain = answer_features(model, tok, schema, prompts, answers, None)
    read = answer_features(model, tok, schema, prompts, answers, None, chunk_views=singles)
    assert {f.abstain_logodds_chunk for f in plain} == {None}
    alone = [  # each chunk alone, as the prompt itself (padding in a mixed batch must not leak)
        answer_features(model, tok, schema, [p], [answers[0]], None)[0].abstain_logodds
        for p in singles[0]
    ]
    assert max(alone) - min(alone) > 1e-3, "precondition: the chunks read differently"
    assert read[0].abstain_logodds_chunk == pytest.approx(min(alone), abs=1e-4)
    assert read[1].abstain_logodds_chunk == pytest.approx(read[1].abstain_logodds)
    assert abstain_readings(model, tok, schema, singles[0]) == pytest.approx(alone, abs=1e-4)
    assert abstain_readings(model, tok, schema, []) == []
    for f, g in zip(plain, read, strict=True):
        assert (f.lp_answer, f.lp_abstain, f.p_abstain_first) == pytest.approx(
            (g.lp_answer, g.lp_abstain, g.p_abstain_first), abs=1e-4
        )
    with pytest.raises(ValueError, match="2 prompts but 1 sets of chunk views"):
        answer_features(model, tok, schema, prompts, answers, None, chunk_views=singles[:1])


def test_a_feature_not_computed_is_named_not_read_as_zero():
    from ragtune.answerability import AnswerFeatures, combine

    feats = [AnswerFeatures(-1.0, 1, -2.0, 0.5, 1.0, 0.3)] * 4
    with pytest.raises(ValueError, match="'abstain_logodds_rotated' was not computed"):
        combine(feats, {"abstain_logodds_rotated": 1.0})
    with pytest.raises(ValueError, match="'abstain_logodds_rotated' was not computed"):
        fit_logistic(feats, [1, 0, 1, 0], ["abstain_logodds_rotated"])


def test_block_first_tokens_bans_only_the_first_step(tokenizer):
    import torch

    from ragtune.generate import BlockFirstTokens

    first = abstain_first_token(tokenizer, get_schema("alpaca_rag_short"))
    block = BlockFirstTokens([first], prompt_width=5)
    scores = torch.zeros((2, len(tokenizer)))
    out = block(torch.zeros((2, 5), dtype=torch.long), scores.clone())
    assert torch.isinf(out[:, first]).all() and out[:, first + 1].eq(0).all()
    later = block(torch.zeros((2, 6), dtype=torch.long), scores.clone())
    assert not torch.isinf(later).any()


def test_blocked_candidate_never_starts_with_the_banned_token(tiny_lm_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragtune.generate import Generator

    tok = AutoTokenizer.from_pretrained(tiny_lm_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_path)
    gen = Generator(model, tok, get_schema("alpaca_rag_short"), {"max_new_tokens": 3})
    prompt = gen.schema.render_prompt(PromptFields("Who keeps the harbor?", "", ["x"]), tok)
    free = gen.generate_batch([prompt])[0]
    assert free.token_ids, "precondition: the tiny model generates something"
    banned = gen.generate_batch([prompt], block_first_tokens=[free.token_ids[0]])[0]
    assert banned.token_ids[0] != free.token_ids[0]
    assert isinstance(blocked_candidates(gen, [prompt])[0], str)


# --------------------------------------------------------------------------- training pairs
class _Retriever:
    def __init__(self, chunks):
        self.chunks = chunks

    def candidates(self, query, n):
        q = set(query.lower().split())
        return sorted(self.chunks, key=lambda c: (-len(q & set(c.text.lower().split())), c.id))[:n]

    def find(self, contains=None, source=None, limit=50):
        return [
            c
            for c in self.chunks
            if (contains is None or contains.lower() in c.text.lower())
            and (source is None or c.source == source)
        ][:limit]

    def fit(self, chunks, budget_tokens):
        return list({c.id: c for c in chunks}.values())


def _c(i, text, source):
    return Chunk(f"c{i}", text, source, 0, hashlib.sha1(text.encode()).hexdigest())


def _harbor_and_mill():
    """An answerable record whose oracle chunk has a second sentence, and an unanswerable one."""
    chunks = [
        _c(0, "The harbor keeper was Marlowe. He lit the lamp each night.", "harbor.md"),
        _c(1, "The harbor has two piers.", "harbor.md"),
        _c(2, "The mill grinds corn.", "mill.md"),
    ]
    records = [
        QARecord("Who was the harbor keeper?", "Marlowe", source="harbor.md"),
        QARecord("What colour is the mill roof?", "", source="mill.md"),
    ]
    return chunks, records


def test_contrastive_construction_emits_the_pair(tokenizer):
    chunks, records = _harbor_and_mill()
    chunks += [
        _c(3, "The harbor light is red.", "harbor.md"),
        _c(4, "The mill wheel is old.", "mill.md"),
    ]
    schema = get_schema("alpaca_rag_short")
    settings = BuildSettings(
        k=2, fetch_k=5, oracle_fraction=1.0, contrastive=True, unanswerable_on_topic=True
    )
    ex, stats = build_examples(records, _Retriever(chunks), schema, tokenizer, settings, False)
    assert [e["kind"] for e in ex] == ["oracle", "contrast_no_oracle", "unanswerable"]
    oracle, twin, unans = ex
    assert oracle["instruction"] == twin["instruction"]
    assert "Marlowe" in oracle["prompt"] and oracle["target"] == "Marlowe"
    assert "Marlowe" not in twin["prompt"] and twin["target"] == schema.abstain
    assert all(s["source"] == "mill.md" for s in unans["sources"])  # its own document first
    assert stats["kinds"]["contrast_no_oracle"] == 1
    plain, _ = build_examples(
        records,
        _Retriever(chunks),
        schema,
        tokenizer,
        BuildSettings(k=2, oracle_fraction=1.0),
        False,
    )
    assert [e["kind"] for e in plain] == ["oracle", "unanswerable"]


def test_the_cut_is_where_answering_and_abstaining_are_worth_the_same():
    from ragtune.answerability import expected_score_threshold

    # candidates worth F1 0.8 on average over the answerable questions (unanswerable ones'
    # values do not count): answer when p * 0.8 >= 1 - p
    cut = expected_score_threshold([True, True, False], [1.0, 0.6, 0.9])
    p = 1.0 / (1.0 + math.exp(-cut))
    assert p * 0.8 == pytest.approx(1.0 - p)
    assert expected_score_threshold([True, False], [0.0, 1.0]) == math.inf  # worthless answers
    assert expected_score_threshold([False, False], [1.0, 1.0]) == math.inf


def test_the_shipped_decision_cuts_at_the_expected_score_not_the_best_validation_cut():
    """The best cut on these validation questions answers 8 of 40; the fitted log-odds put
    the break-even at -log(mean F1 0.5), which answers 14, and that is the cut that ships."""
    from ragtune.answerability import (
        AnswerFeatures,
        combine,
        fit_calibration,
        fit_logistic,
        fit_threshold,
    )

    answerable = [True, False, True, True, False, False, True, False, True, False] * 4
    feats = [
        AnswerFeatures(-1.0 - 0.1 * i - (1.5 if not y else 0.0), 2, -3.0, 0.2, 1.0, 0.5)
        for i, y in enumerate(answerable)
    ]
    f1 = [0.5 if y else 0.0 for y in answerable]
    cal = fit_calibration(feats, answerable, f1)
    assert cal.threshold == pytest.approx(-math.log(0.5))
    w, b = fit_logistic(feats, answerable)
    assert fit_threshold(combine(feats, w, b), answerable, f1) != pytest.approx(cal.threshold)


def test_calibration_fitted_on_validation_goes_into_the_manifest(tmp_path):
    import json

    from ragtune.answerability import (
        AnswerFeatures,
        Calibration,
        fit_calibration,
        read_calibration,
        write_calibration,
    )

    answerable = [i % 2 == 0 for i in range(40)]
    feats = [
        AnswerFeatures(-1.0 if y else -4.0, 2, -3.0 + 0.01 * i, 0.2, 1.0, 0.5)
        for i, y in enumerate(answerable)
    ]
    f1 = [1.0 if y else 0.0 for y in answerable]
    cal = fit_calibration(feats, answerable, f1, [f"doc{i % 3}" for i in range(40)])
    assert cal.auroc == 1.0 and cal.n_validation == 40
    assert cal.validation_sources == ("doc0", "doc1", "doc2")
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "model": {"x": 1}}))
    write_calibration(tmp_path, cal)
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["model"] == {"x": 1}  # other fields kept
    back = read_calibration(tmp_path)
    assert isinstance(back, Calibration) and back.threshold == pytest.approx(cal.threshold)
    assert back == cal  # weights, bias, AUROC, size and held-out documents: all of it comes back
    yes = AnswerFeatures(-1.0, 2, -3.0, 0.2, 1.0, 0.5)
    no = AnswerFeatures(-4.0, 2, -3.0, 0.2, 1.0, 0.5)
    assert back.answers([yes, no]) == [True, False]


@pytest.mark.parametrize("threshold", [math.inf, -math.inf])
def test_an_extreme_decision_survives_the_manifest_as_strict_json(tmp_path, threshold):
    """A fitted "abstain on (answer) every question" reaches serving intact: strict JSON (no
    Infinity token for other readers) and back to the same all-or-nothing decision."""
    import json

    from ragtune.answerability import AnswerFeatures, Calibration, read_calibration
    from ragtune.answerability import write_calibration as write

    cal = Calibration(threshold=threshold, weights={"margin": 1.0}, auroc=0.55, n_validation=50)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1}))
    write(tmp_path, cal)
    json.loads((tmp_path / "manifest.json").read_text(), parse_constant=pytest.fail)
    back = read_calibration(tmp_path)
    assert back is not None and back.threshold == threshold
    confident = AnswerFeatures(-0.01, 2, 9.0, 0.9, 1.0, 0.9)
    unsure = AnswerFeatures(-9.0, 2, -9.0, 0.0, 0.0, 0.0)
    assert back.answers([confident, unsure]) == [threshold < 0] * 2


def test_ablated_twin_is_the_oracle_chunk_without_its_answer_sentence(tokenizer):
    chunks, records = _harbor_and_mill()
    records = records[:1]
    schema = get_schema("alpaca_rag_short")
    settings = BuildSettings(k=2, fetch_k=5, oracle_fraction=1.0, ablated_twin=True)
    ex, stats = build_examples(records, _Retriever(chunks), schema, tokenizer, settings, False)
    assert [e["kind"] for e in ex] == ["oracle", "ablated_no_answer"]
    oracle, cut = ex
    assert "Marlowe" in oracle["prompt"] and "He lit the lamp" in oracle["prompt"]
    assert "Marlowe" not in cut["prompt"] and "He lit the lamp" in cut["prompt"]
    assert cut["target"] == schema.abstain and stats["kinds"]["ablated_no_answer"] == 1
    assert len(cut["sources"]) == len(oracle["sources"]) == 2  # the cut chunk + k - 1 others


def test_the_default_preview_shows_one_example_of_every_kind(tokenizer, tmp_path):
    from ragtune.config import compose
    from ragtune.raft import save_dataset

    chunks, records = _harbor_and_mill()
    settings = BuildSettings(
        k=2, fetch_k=5, oracle_fraction=1.0, contrastive=True, ablated_twin=True
    )
    schema = get_schema("alpaca_rag_short")
    ex, stats = build_examples(records, _Retriever(chunks), schema, tokenizer, settings, False)
    # the twins repeat their record: the oracle stats (and the unsupported share) count records
    assert stats["oracle_how"] == {"exact": 1, "fuzzy": 0, "semantic": 0, "none": 0}
    save_dataset(ex, stats, tmp_path, compose("sft").raft.num_preview)
    preview = (tmp_path / "preview.md").read_text()
    for kind in ("oracle", "contrast_no_oracle", "ablated_no_answer", "unanswerable"):
        assert f"## {kind}: " in preview


def test_swapped_twin_asks_a_changed_question_of_the_oracle_example_s_very_context(tokenizer):
    chunks, records = _harbor_and_mill()
    chunks.append(_c(3, "Dunmore harbor has a red light.", "harbor.md"))
    records = [
        QARecord("Who was the harbor keeper?", "Marlowe", source="harbor.md"),
        QARecord("Where does Dunmore harbor shine?", "", source="harbor.md"),  # a name to swap in
    ]
    schema = get_schema("alpaca_rag_short")
    settings = BuildSettings(k=1, fetch_k=5, oracle_fraction=1.0, swapped_twin=True)
    ex, stats = build_examples(records, _Retriever(chunks), schema, tokenizer, settings, False)
    assert [e["kind"] for e in ex] == ["oracle", "swapped_question", "unanswerable"]
    oracle, swapped, _ = ex
    assert swapped["instruction"] == "Who wasn't the harbor keeper?"  # no name: negated
    assert swapped["sources"] == oracle["sources"] and "Marlowe" in swapped["prompt"]
    assert swapped["prompt"] == oracle["prompt"].replace("Who was ", "Who wasn't ")
    assert swapped["target"] == schema.abstain and swapped["answer"] == "Marlowe"
    assert stats["swapped_question"] == {"swap": 0, "negate": 1, "none": 0}
    assert stats["oracle_how"]["exact"] == 1  # the twin repeats its record: counted once
    plain = BuildSettings(k=1, oracle_fraction=1.0)
    off, stats = build_examples(records, _Retriever(chunks), schema, tokenizer, plain, False)
    assert [e["kind"] for e in off] == ["oracle", "unanswerable"]
    assert "swapped_question" not in stats


# --------------------------------------------------------------------------- assess
class _Generator:
    """What assess() reads from a generator: the schema, exclusive(), and a greedy decode
    with the abstain answer's first token banned (recorded, to see which prompts it got)."""

    def __init__(self, tokenizer, blocked: dict[str, str]):
        import contextlib

        self.schema = get_schema("alpaca_rag")
        self.tokenizer, self.model, self.blocked, self.asked = tokenizer, None, blocked, []
        self.exclusive = contextlib.nullcontext

    def generate_batch(self, prompts, batch_size, block_first_tokens):
        from types import SimpleNamespace

        assert block_first_tokens == [abstain_first_token(self.tokenizer, self.schema)]
        self.asked += list(prompts)
        return [SimpleNamespace(text=self.blocked[p]) for p in prompts]


@pytest.fixture()
def scored_by_retrieval(monkeypatch):
    """answer_features stand-in: each answer's features are fixed but for ``retrieval``, the
    retrieval score given for its prompt (so a calibration weighing it sets the score)."""
    from ragtune import answerability
    from ragtune.answerability import AnswerFeatures

    def features(
        model,
        tokenizer,
        schema,
        prompts,
        answers,
        contexts,
        retrieval,
        batch,
        views,
        chunk_views=None,
    ):
        return [AnswerFeatures(-1.0, 1, -1.0, 0.5, 0.0, float(r)) for r in retrieval]

    monkeypatch.setattr(answerability, "answer_features", features)


def test_assess_scores_the_candidate_of_an_abstained_answer(tokenizer, scored_by_retrieval):
    """An abstained answer (the schema's, or one that normalises to nothing) is scored on its
    blocked candidate; without a calibration every answer stays as generated."""
    from ragtune.answerability import assess, is_abstained

    gen = _Generator(tokenizer, {"p2": "Kilmory", "p3": "Cross"})
    abstain = gen.schema.abstain
    got = assess(gen, ["p1", "p2", "p3"], ["Paris", abstain, " . "], None, [1.0, 2.0, 3.0])
    assert is_abstained(gen.schema, " . ") and not is_abstained(gen.schema, "Paris")
    assert gen.asked == ["p2", "p3"]  # only the abstained ones are decoded again
    assert [a.candidate for a in got] == ["Paris", "Kilmory", "Cross"]
    assert [a.answer for a in got] == ["Paris", abstain, " . "]
    assert [a.score for a in got] == [0.0, 0.0, 0.0]  # the default score: margin, 0 here


def test_assess_applies_the_calibration(tokenizer, scored_by_retrieval):
    """With a calibration its weights and bias make the score; the candidate is given at or
    above the threshold, the abstain answer below it or when the candidate is empty."""
    from ragtune.answerability import Calibration, assess

    gen = _Generator(tokenizer, {"p4": ""})
    abstain = gen.schema.abstain
    cal = Calibration(threshold=1.0, weights={"retrieval": 2.0}, bias=-1.0)
    answers = ["Oslo", "Rome", "Bern", abstain]
    got = assess(gen, ["p1", "p2", "p3", "p4"], answers, None, [0.9, 1.0, 2.0, 5.0], cal)
    assert [a.score for a in got] == pytest.approx([0.8, 1.0, 3.0, 9.0])
    assert [a.answer for a in got] == [abstain, "Rome", "Bern", abstain]


def test_fit_calibration_weighs_only_the_named_features():
    from ragtune.answerability import AnswerFeatures, fit_calibration

    answerable = [i % 2 == 0 for i in range(20)]
    feats = [
        AnswerFeatures(-1.0 * i, 2, -3.0, 0.2, 1.0, float(y)) for i, y in enumerate(answerable)
    ]
    cal = fit_calibration(feats, answerable, [1.0] * 20, names=("retrieval",))
    assert set(cal.weights) == {"retrieval"} and cal.auroc == 1.0


def test_a_completion_is_encoded_as_training_encodes_it(tokenizer):
    """The scored answer's ids: the stripped text without special tokens, then EOS."""
    from ragtune.answerability import _completion_ids

    ids = tokenizer("Kilmory Cross", add_special_tokens=False)["input_ids"]
    assert _completion_ids(tokenizer, " Kilmory Cross\n") == [*ids, tokenizer.eos_token_id]
