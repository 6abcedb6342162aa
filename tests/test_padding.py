"""Padded or padding-free batches: the estimate, the choice per backend, the config checks, and
that padding-free training computes the same loss as padded batches (no attention across the
flattened examples)."""

from __future__ import annotations

import shutil

import pytest
from omegaconf import OmegaConf

from ragtune.config import ConfigError, compose, validate
from ragtune.schema import PromptFields, get_schema
from ragtune.training.padding import (
    BLOCK_COMPILE_S,
    PADDED_MAX_WASTE,
    SAVED_S_PER_MICRO_BATCH,
    choose_padding_free,
    micro_batches,
    padding_waste,
)

SCHEMA = get_schema("alpaca_rag")
TOP = {"seed": int, "output_dir": str}


def tcfg(**kw):
    base = {
        "packing": False,
        "padding_free": "auto",
        "train_sampling_strategy": "random",
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": 10_000,
        "num_train_epochs": 1.0,
    }
    return OmegaConf.create({**base, **kw})


# --------------------------------------------------------------------------- the estimate
def test_padding_waste_counts_pad_tokens():
    assert padding_waste([512] * 10, 2) == 0.0
    assert padding_waste([100, 300], 2) == pytest.approx(1 - 400 / 600)
    assert padding_waste([100, 300, 50], 1) == 0.0  # batch 1 never pads
    assert padding_waste([], 2) == 0.0  # nothing to train on pads nothing


def test_grouping_by_length_pads_far_less_than_random_batches():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(300, 1500) for _ in range(2000)]  # RAG examples (issue 7)
    rand = padding_waste(lengths, 2)
    grouped = padding_waste(lengths, 2, "group_by_length", group=8)
    assert 0.15 < rand < 0.25  # each pair padded to its longer row
    assert grouped < 0.02 and grouped < rand / 10


def test_micro_batches_from_steps_or_epochs():
    assert micro_batches(tcfg(max_steps=5, gradient_accumulation_steps=4), 100) == 20
    assert (
        micro_batches(tcfg(max_steps=-1, per_device_train_batch_size=4, num_train_epochs=2.0), 10)
        == 6
    )  # ceil(10/4)*2
    # max_steps 0, like -1, leaves the count to the epochs (transformers: only > 0 overrides)
    epochs = tcfg(max_steps=0, per_device_train_batch_size=4, num_train_epochs=2.0)
    assert micro_batches(epochs, 10) == 6


def test_a_batch_without_labels_keeps_every_position():
    """Nothing to score (a generation or evaluation batch): the model's head runs as usual."""
    from ragtune.training.padding import completion_only_head

    inputs = {"input_ids": [[1, 2, 3]]}
    assert completion_only_head(inputs) == inputs


# --------------------------------------------------------------------------- the choice
def test_packing_is_padding_free_by_construction():
    free, why = choose_padding_free(tcfg(packing=True), "unsloth", [100, 900])
    assert free is False and "packed" in why  # TRL packs padding-free itself; not asked again


def test_hf_pads_unless_told():
    assert choose_padding_free(tcfg(), "hf", [100, 900])[0] is False
    assert choose_padding_free(tcfg(padding_free=True), "hf", [100, 900])[0] is True


def test_unsloth_auto_pads_full_rows_on_long_runs():
    free, why = choose_padding_free(tcfg(), "unsloth", [2048] * 100)
    assert free is False and "compiles" in why


def test_unsloth_auto_stays_padding_free_when_padding_would_cost_more():
    lengths = [300, 1500] * 50  # every random pair pads a lot
    free, why = choose_padding_free(tcfg(), "unsloth", lengths)
    assert free is True and "padding" in why and "group_by_length" in why
    assert padding_waste(lengths, 2) >= PADDED_MAX_WASTE


def test_grouping_by_length_lets_unsloth_pad_rag_examples():
    import random

    rng = random.Random(1)
    lengths = [rng.randint(300, 1500) for _ in range(4000)]
    assert choose_padding_free(tcfg(), "unsloth", lengths)[0] is True  # ~19% padding
    grouped = tcfg(train_sampling_strategy="group_by_length", gradient_accumulation_steps=4)
    free, why = choose_padding_free(grouped, "unsloth", lengths)
    assert free is False and "padded" in why


def test_unsloth_auto_stays_padding_free_on_runs_too_short_to_repay_the_compile():
    needed = -(-BLOCK_COMPILE_S // SAVED_S_PER_MICRO_BATCH)
    free, why = choose_padding_free(tcfg(max_steps=int(needed) - 1), "unsloth", [2048] * 8)
    assert free is True and "too few" in why
    assert choose_padding_free(tcfg(max_steps=int(needed)), "unsloth", [2048] * 8)[0] is False


def test_explicit_choices_win():
    assert (
        choose_padding_free(tcfg(padding_free=False, max_steps=2), "unsloth", [9, 900])[0] is False
    )
    assert choose_padding_free(tcfg(padding_free=True), "unsloth", [2048] * 8)[0] is True


# --------------------------------------------------------------------------- the config
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.packing=true", "train.padding_free=false"], "train.padding_free: packed rows"),
        (["train.padding_free=sometimes"], "train.padding_free: must be auto, true or false"),
        (
            ["train.train_sampling_strategy=by_size"],
            "train.train_sampling_strategy: must be one of random, group_by_length",
        ),
    ],
)
def test_bad_padding_settings_are_named(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose("sft", [f"output_dir={tmp_path}", *overrides]), top_level=TOP)


def test_the_trainer_gets_the_choice_and_the_sampler(tmp_path, tiny_lm_path):
    from ragtune.training.trainer import sft_config as _sft_config

    cfg = make_cfg(tmp_path, tiny_lm_path, "train.train_sampling_strategy=group_by_length")
    precision = {"bf16": False, "fp16": False}
    args = _sft_config(cfg, tmp_path, precision, False, "hf", padding_free=True)
    assert args.padding_free is True and args.train_sampling_strategy == "group_by_length"
    assert args.max_length is None  # TRL cannot cut flattened rows; too-long ones are dropped
    padded = _sft_config(cfg, tmp_path, precision, False)
    assert padded.padding_free is False and padded.max_length == 256


# --------------------------------------------------------------------------- training
def make_cfg(out, model: str, *extra: str):
    overrides = [f"output_dir={out}", f"model.name_or_path={model}", "model.max_seq_length=256"]
    overrides += [
        "train.per_device_train_batch_size=2",
        "train.logging_steps=1",
        "train.learning_rate=1e-2",
    ]
    return validate(compose("sft", [*overrides, *extra]), top_level=TOP)


@pytest.fixture(scope="module")
def varied_examples(tiny_lm_path):
    """RAG examples of different lengths, so a padded batch of two has pad tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_path)
    out = []
    for i, colour in enumerate(["blue", "green", "red", "amber"]):
        context = "Note. " * (6 * i) + f"The zorb {i} is {colour}."
        fields = PromptFields(f"What colour is the zorb {i}?", "", [context])
        prompt, completion = SCHEMA.render_example(fields, colour.capitalize() + ".", tok)
        out.append({"prompt": prompt, "completion": completion, "kind": "oracle"})
    return out


def test_padding_free_training_matches_padded_losses(
    tmp_path, tiny_lm_path, varied_examples, monkeypatch
):
    """Same seed, same batches: flattening the examples into one row must not let them attend
    to each other (transformers' SDPA separates them by their position ids)."""
    from transformers import AutoTokenizer
    from trl.trainer import sft_trainer

    from ragtune.training.data import tokenize_examples
    from ragtune.training.recipe import train

    tok = AutoTokenizer.from_pretrained(tiny_lm_path)
    _, stats = tokenize_examples(varied_examples, tok, SCHEMA, 256)
    assert stats["max_tokens"] - stats["mean_tokens"] > 10  # padded batches do pad

    def losses(free: str) -> list[float]:
        out = tmp_path / free
        cfg = make_cfg(
            out, tiny_lm_path, "train.max_steps=2", "train.save_method=lora",
            f"train.padding_free={free}",
        )  # fmt: skip
        return train(cfg, varied_examples, SCHEMA, out).losses

    padded, free = losses("false"), losses("true")
    assert len(free) == 2
    # measured: equal, then 2e-7 apart; the bug below moves the first loss by 5e-2 (rel)
    assert free == pytest.approx(padded, rel=1e-5)

    # the bug this guards against: a flattened row without its position ids, so each example
    # attends to the ones before it. It must land far outside the tolerance above.
    real = sft_trainer.DataCollatorForLanguageModeling.torch_call

    def without_positions(self, examples):
        batch = real(self, examples)
        batch.pop("position_ids", None)
        return batch

    monkeypatch.setattr(
        sft_trainer.DataCollatorForLanguageModeling, "torch_call", without_positions
    )
    shutil.rmtree(tmp_path / "true")
    broken = losses("true")
    assert abs(broken[0] - padded[0]) > 1000 * 1e-5 * padded[0]


# --------------------------------------------------------------------------- the mask
def test_only_a_right_padding_mask_is_dropped():
    import torch

    from ragtune.training.padding import drop_redundant_mask

    ids = torch.ones(2, 4, dtype=torch.long)
    right = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])}
    assert "attention_mask" not in drop_redundant_mask(right)
    assert "input_ids" in drop_redundant_mask(right) and "attention_mask" in right  # a copy
    for mask in ([[1, 1, 1, 1], [0, 0, 1, 1]], [[1, 0, 1, 1], [1, 1, 1, 1]]):  # left pad, hole
        kept = {"input_ids": ids, "attention_mask": torch.tensor(mask)}
        assert drop_redundant_mask(kept) is kept
    packed = {**right, "position_ids": torch.tensor([[0, 1, 0, 1], [0, 1, 2, 3]])}
    assert drop_redundant_mask(packed) is packed
    assert drop_redundant_mask({"input_ids": ids}) == {"input_ids": ids}


def test_the_loss_of_a_right_padded_batch_needs_no_mask(tiny_lm_path):
    """Why the mask can go: real tokens never attend to the pads after them, pads have no label."""
    import torch
    from transformers import AutoModelForCausalLM

    from ragtune.training.padding import drop_redundant_mask

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_path).eval()
    ids = torch.randint(5, 100, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ids[1, 7:] = 0  # pad id
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with torch.no_grad():
        masked = model(**batch, use_cache=False).loss
        unmasked = model(**drop_redundant_mask(batch), use_cache=False).loss
    assert "attention_mask" not in drop_redundant_mask(batch)
    assert unmasked == pytest.approx(float(masked), rel=1e-5)


@pytest.mark.parametrize("drop", [True, False, None])  # None: not told, the class's default
def test_the_trainer_drops_the_mask_only_when_told(tmp_path, tiny_lm_path, varied_examples, drop):
    """train() tells it for Unsloth only: TRL's fused GPU loss (hf backend) reads the mask."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragtune.training.data import tokenize_examples
    from ragtune.training.trainer import sft_config as _sft_config
    from ragtune.training.trainer import trainer_class as _trainer_class

    tok = AutoTokenizer.from_pretrained(tiny_lm_path)
    ds, _ = tokenize_examples(varied_examples, tok, SCHEMA, 256)
    cfg = make_cfg(tmp_path, tiny_lm_path, "train.max_steps=1")
    seen: list[set] = []

    class Recording(_trainer_class()):
        def compute_loss(self, model, inputs, *a, **k):  # noqa: ANN001
            seen.append(set(inputs))
            return super().compute_loss(model, inputs, *a, **k)

    args = _sft_config(cfg, tmp_path / "ck", {"bf16": False, "fp16": False}, False)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_path)
    trainer = Recording(model=model, args=args, train_dataset=ds, processing_class=tok)
    if drop is not None:
        trainer.drop_padding_mask = drop
    trainer.train()
    assert seen and all(("attention_mask" in keys) is not bool(drop) for keys in seen)


# --------------------------------------------------------------------------- the optimizer
def test_the_optimizer_is_explicit(tmp_path, tiny_lm_path):
    """Unsloth's SFTConfig defaults to adamw_8bit; ragtune always says which one it wants."""
    from ragtune.training.trainer import sft_config as _sft_config

    precision = {"bf16": False, "fp16": False}
    cfg = make_cfg(tmp_path, tiny_lm_path)
    assert _sft_config(cfg, tmp_path, precision, False).optim == "adamw_torch_fused"
    cfg = make_cfg(tmp_path, tiny_lm_path, "train.optim=adamw_torch")
    assert _sft_config(cfg, tmp_path, precision, False).optim == "adamw_torch"


@pytest.mark.parametrize(
    ("optim", "message"),
    [("adamw_fast", "not an optimizer transformers knows"), ("adamw_8bit", "needs a CUDA GPU")],
)
def test_a_bad_optimizer_is_named_before_the_model_loads(
    tmp_path, tiny_lm_path, optim, message, no_model_loads
):
    import torch

    from ragtune.training import TrainError
    from ragtune.training.recipe import train

    if optim == "adamw_8bit" and torch.cuda.is_available():
        pytest.skip("checks the CPU behaviour")
    cfg = make_cfg(tmp_path, tiny_lm_path, f"train.optim={optim}")
    with pytest.raises(TrainError, match=f"train.optim={optim!r}|train.optim={optim}") as e:
        train(cfg, [{"prompt": "p", "completion": "c"}], SCHEMA, tmp_path)
    assert message in str(e.value)
    assert no_model_loads == []
