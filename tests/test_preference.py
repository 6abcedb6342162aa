"""The preference step (train.preference): pairs from the built examples, SFT's token ids, and a
wider answer-vs-abstain margin where it matters, on the tiny model."""

from __future__ import annotations

import pytest
import torch

from ragtune.config import ConfigError, compose, validate
from ragtune.schema import PromptFields, get_schema
from ragtune.training.preference import (
    _tokenized_row,
    encode_pairs,
    loss_rise,
    preference_pairs,
)

SCHEMA = get_schema("alpaca_rag")
TOP = {"seed": int, "output_dir": str}
COLOURS = ["blue", "green", "red", "amber"]


def zorb_examples(tokenizer, n: int = 8) -> list[dict]:
    """Each question twice: with the sentence holding its answer (target: the colour) and with
    an unrelated one (the contrastive twin, target: abstain)."""
    out = []
    for i in range(n):
        colour = COLOURS[i % len(COLOURS)]
        q = f"What colour is the zorb {i}?"
        for kind, ctx, target in (
            ("oracle", f"The zorb {i} is {colour}.", colour),
            ("contrast_no_oracle", f"The blip {i} is tall.", SCHEMA.abstain),
        ):
            prompt, completion = SCHEMA.render_example(
                PromptFields(q, "", [ctx]), target, tokenizer
            )
            out.append({"prompt": prompt, "completion": completion, "kind": kind, "answer": colour})
    return out


def test_pairs_prefer_the_answer_only_where_the_context_holds_it():
    abstain = SCHEMA.abstain
    examples = [
        {"prompt": "p1", "kind": "oracle", "answer": "1871"},
        {"prompt": "p2", "kind": "contrast_no_oracle", "answer": "1871"},
        {"prompt": "p3", "kind": "ablated_no_answer", "answer": "1871"},
        {"prompt": "p4", "kind": "unanswerable", "answer": "", "plausible": "Rollo"},
        {"prompt": "p5", "kind": "unanswerable", "answer": "", "plausible": ""},
        {"prompt": "p6", "kind": "memory_no_oracle", "answer": "1871"},
        {"prompt": "p7", "kind": "closed", "answer": "1871"},
        {"prompt": "p8", "kind": "swapped_question", "answer": "1871"},
    ]
    got = [(p["prompt"], p["chosen"], p["rejected"]) for p in preference_pairs(examples, abstain)]
    assert got == [
        ("p1", "1871", abstain),
        ("p2", abstain, "1871"),
        ("p3", abstain, "1871"),
        ("p4", abstain, "Rollo"),
        ("p8", abstain, "1871"),
    ]


def test_pairs_carry_the_token_ids_sft_trains_on(tiny_tok):
    from ragtune.training.data import tokenize_examples

    examples = zorb_examples(tiny_tok, n=2)
    sft, _ = tokenize_examples(examples, tiny_tok, SCHEMA, 256)
    pairs, dropped = encode_pairs(preference_pairs(examples, SCHEMA.abstain), tiny_tok, SCHEMA, 256)
    assert dropped == 0 and len(pairs) == len(examples)
    for i, row in enumerate(pairs):
        t = _tokenized_row(row)
        assert t["chosen_input_ids"] == sft[i]["input_ids"]  # each example's target is chosen
        n_prompt = len(t["prompt_input_ids"])
        assert t["chosen_labels"][:n_prompt] == [-100] * n_prompt
        assert t["chosen_labels"][n_prompt:] == sft[i]["input_ids"][n_prompt:]
        assert t["rejected_labels"][n_prompt:][-1] == tiny_tok.eos_token_id


def test_a_long_pair_is_dropped_not_cut(tiny_tok):
    pairs = preference_pairs(zorb_examples(tiny_tok, n=1), SCHEMA.abstain)
    kept, dropped = encode_pairs(pairs, tiny_tok, SCHEMA, 8)
    assert len(kept) == 0 and dropped == 2


def test_an_unknown_loss_type_names_the_key():
    cfg = compose("sft", ["train.preference.loss_type=dpo", "output_dir=x"])
    with pytest.raises(ConfigError, match=r"train\.preference\.loss_type"):
        validate(cfg, top_level=TOP)


# --------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def tiny_tok(tiny_lm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_lm_path)


def _train(out, tiny_lm_path, examples, *extra: str):
    from ragtune.training.recipe import train

    cfg = compose(
        "sft",
        [
            f"output_dir={out}",
            f"model.name_or_path={tiny_lm_path}",
            "model.max_seq_length=256",
            "train.max_steps=6",
            "train.per_device_train_batch_size=4",
            "train.logging_steps=1",
            "train.learning_rate=1e-2",
            "train.warmup_steps=0",
            "train.lr_scheduler_type=constant",
            "train.save_method=lora",
            "train.report_to=none",
            *extra,
        ],
    )
    return train(validate(cfg, top_level=TOP), examples, SCHEMA, out)


def _separation(model_dir, examples) -> float:
    """Mean answer-vs-abstain margin (the decision's feature) of the gold answer where the
    context holds it, minus the same where it does not."""
    from ragtune.answerability import answer_features
    from ragtune.loading import load_model

    model, tok = load_model(str(model_dir), device="cpu")
    feats = answer_features(
        model, tok, SCHEMA, [e["prompt"] for e in examples], [e["answer"] for e in examples]
    )
    held = [f.margin for f, e in zip(feats, examples, strict=True) if e["kind"] == "oracle"]
    lacking = [f.margin for f, e in zip(feats, examples, strict=True) if e["kind"] != "oracle"]
    return sum(held) / len(held) - sum(lacking) / len(lacking)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_lm_path, tiny_tok):
    """The same seeded SFT three times: alone, followed by the preference step, and followed
    by a preference step that is undone (any loss rise at all passes undo_above=1e-9)."""
    examples = zorb_examples(tiny_tok)
    sft = _train(tmp_path_factory.mktemp("sft"), tiny_lm_path, examples)
    pref, undone = (
        _train(
            tmp_path_factory.mktemp(name),
            tiny_lm_path,
            examples,
            "train.preference.num_train_epochs=3",
            "train.preference.learning_rate=1e-2",
            f"train.preference.undo_above={limit}",
        )
        for name, limit in (("pref", 1.25), ("undone", 1e-9))
    )
    return examples, sft, pref, undone


def test_preference_step_widens_the_answer_vs_abstain_margin(runs):
    examples, sft, pref, _ = runs
    assert sft.preference is None
    assert pref.preference["undone"] is False and pref.preference["loss_rise"] < 1.25
    assert pref.preference["pairs"] == len(examples)
    assert pref.preference["by_kind"] == {"oracle": 8, "contrast_no_oracle": 8}
    assert pref.preference["steps"] == 12  # 16 pairs in batches of 4, 3 epochs
    assert sft.final_loss == pref.final_loss  # the same SFT: only the preference step differs
    assert pref.preference["first_loss"] > pref.preference["final_loss"]
    before, after = _separation(sft.model_dir, examples), _separation(pref.model_dir, examples)
    assert after > before + 0.5, (before, after)


def _lora(model_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "adapter_model.safetensors"))


def test_an_undone_preference_step_saves_the_lora_sft_left(runs):
    _, sft, pref, undone = runs
    assert undone.preference["undone"] is True
    assert undone.preference["steps"] == pref.preference["steps"]  # it did train, then undid it
    before, trained, kept = _lora(sft.model_dir), _lora(pref.model_dir), _lora(undone.model_dir)
    assert kept.keys() == before.keys()
    assert all(torch.equal(kept[k], before[k]) for k in before)
    assert not all(torch.equal(trained[k], before[k]) for k in before)


def test_loss_rise_compares_the_last_quarter_with_the_first():
    # the H200 seed-0 step that was undone: flat, then noisy and twice as high
    drifted = [0.7, 0.6, 0.65, 0.7, 0.9, 0.8, 1.0, 0.9, 1.8, 1.4, 1.3, 1.5]
    assert loss_rise(drifted) == pytest.approx(1.4 / 0.65)
    falling = [0.9, 0.5, 0.6, 0.7, 0.5, 0.4, 0.6, 0.5, 0.45, 0.4, 0.5, 0.42]
    assert loss_rise(falling) == pytest.approx(0.42 / 0.6)
    assert loss_rise([1.0] * 7) is None  # too few logs to judge
    assert loss_rise([1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 3.0]) == 3.0  # eight are enough
    assert loss_rise([0.0] * 8) is None


def test_no_pair_at_all_is_one_line_naming_the_setting(tmp_path, tiny_lm_path, tiny_tok):
    from ragtune.training import TrainError

    closed = [dict(e, kind="closed") for e in zorb_examples(tiny_tok, n=2)]
    with pytest.raises(TrainError, match=r"train\.preference\.num_train_epochs"):
        _train(tmp_path, tiny_lm_path, closed, "train.preference.num_train_epochs=1")


def test_blank_answers_give_no_pair_and_answers_are_stripped():
    abstain = SCHEMA.abstain
    examples = [
        {"prompt": "p1", "kind": "oracle", "answer": "  "},
        {"prompt": "p2", "kind": "contrast_no_oracle", "answer": ""},
        {"prompt": "p3", "kind": "abstain_no_oracle", "answer": None},
        {"prompt": "p4", "kind": "oracle", "answer": " 1871 "},
        {"prompt": "p5", "kind": "abstain_no_oracle", "answer": "1871\n"},
        {"prompt": "p6", "kind": "unanswerable", "answer": "", "plausible": " Rollo "},
    ]
    got = [(p["prompt"], p["chosen"], p["rejected"]) for p in preference_pairs(examples, abstain)]
    assert got == [("p4", "1871", abstain), ("p5", abstain, "1871"), ("p6", abstain, "Rollo")]


def test_a_pair_that_fits_exactly_is_kept(tiny_tok):
    """The longer side decides: prompt + the longer response must fit max_seq_length."""
    from ragtune.training.data import encode_completion

    (pair,) = preference_pairs(zorb_examples(tiny_tok, n=1)[:1], SCHEMA.abstain)
    sides = [
        encode_completion(tiny_tok, SCHEMA.render_completion(pair[k], tiny_tok))
        for k in ("chosen", "rejected")
    ]
    assert len(sides[0]) != len(sides[1])  # precondition: the two sides differ
    need = len(SCHEMA.encode_prompt(tiny_tok, pair["prompt"])) + max(map(len, sides))
    assert [len(encode_pairs([pair], tiny_tok, SCHEMA, n)[0]) for n in (need, need - 1)] == [1, 0]


def test_the_preference_step_trains_with_the_sft_keys(tmp_path):
    """CPOConfig gets train.preference's own keys and SFT's batch, schedule, optimiser, clip,
    seed and length: the step is tuned where SFT is."""
    from ragtune.training.preference import cpo_config

    cfg = compose(
        "sft",
        [
            f"output_dir={tmp_path}",
            "seed=7",
            "model.max_seq_length=300",
            "train.per_device_train_batch_size=3",
            "train.gradient_accumulation_steps=5",
            "train.max_grad_norm=0.3",
            "train.adam_beta2=0.95",
            "train.warmup_steps=2",
            "train.lr_scheduler_type=cosine",
            "train.report_to=none",
            "train.preference.num_train_epochs=2",
            "train.preference.learning_rate=3e-6",
            "train.preference.beta=0.5",
            "train.preference.simpo_gamma=0.7",
            "train.preference.cpo_alpha=0.2",
        ],
    )
    args = cpo_config(validate(cfg, top_level=TOP), tmp_path, {"bf16": False, "fp16": False}, False)
    got = {
        k: getattr(args, k)
        for k in (
            "num_train_epochs",
            "learning_rate",
            "beta",
            "simpo_gamma",
            "cpo_alpha",
            "loss_type",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "max_grad_norm",
            "adam_beta2",
            "warmup_steps",
            "seed",
            "data_seed",
            "max_length",
        )
    }
    assert got == {
        "num_train_epochs": 2,
        "learning_rate": 3e-6,
        "beta": 0.5,
        "simpo_gamma": 0.7,
        "cpo_alpha": 0.2,
        "loss_type": "simpo",
        "per_device_train_batch_size": 3,
        "gradient_accumulation_steps": 5,
        "max_grad_norm": 0.3,
        "adam_beta2": 0.95,
        "warmup_steps": 2,
        "seed": 7,
        "data_seed": 7,
        "max_length": 300,
    }
    assert args.lr_scheduler_type == "cosine" and args.save_strategy == "no"


def test_trl_experimental_notice_is_not_shown_to_users(tmp_path, monkeypatch):
    """CPO lives in trl.experimental, whose import warns on every run: ragtune silences it
    where it imports it (the class and the config), as the user did not choose that import."""
    import sys
    import warnings

    import trl

    from ragtune.training.preference import cpo_config, trainer_class

    monkeypatch.delenv("TRL_EXPERIMENTAL_SILENCE", raising=False)
    if "experimental" in vars(trl):  # the package attribute comes back with the modules
        monkeypatch.setattr(trl, "experimental", vars(trl)["experimental"])
    cfg = validate(compose("sft", [f"output_dir={tmp_path}"]), top_level=TOP)
    for make in (
        trainer_class,
        lambda: cpo_config(cfg, tmp_path, {"bf16": False, "fp16": False}, False),
    ):
        for name in [m for m in sys.modules if m.startswith("trl.experimental")]:
            monkeypatch.delitem(sys.modules, name)  # imported afresh, so its notice would fire
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            make()
        assert not [w for w in seen if "trl.experimental" in str(w.message)]
