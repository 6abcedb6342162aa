"""A diverged run is stopped and saved as it was before the spike, not after."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_sft import _cfg  # tests/ is on sys.path (no __init__.py)

from ragtune.manifest import read_manifest
from ragtune.training.divergence import LossWatch

# Logged losses (every 5 steps) of two real runs: Qwen2.5-Coder-1.5B, LoRA at 5e-4, bfloat16,
# the contrast recipe on SQuAD seeds 0 and 1 (H200, 2026-12-03, docs/benchmarks.md). Seed 0
# diverged (one update's gradient norm hit 918) and never recovered; seed 1 had one bad batch
# (5.05) and went on to score 65.5.
DIVERGED = [
    3.195, 1.174, 0.4152, 0.5081, 0.5758, 0.3408, 0.3382, 0.7364, 0.4598, 0.7094, 0.3878,
    0.3875, 0.4688, 0.4019, 0.3667, 0.3783, 0.2984, 0.4943, 0.4104, 0.3368, 0.322, 0.5909,
    0.4426, 0.4802, 0.9146, 0.2747, 0.4714, 0.3077, 0.4686, 0.5135, 0.4691, 0.4515, 0.32,
    0.5576, 0.3384, 0.4932, 0.3338, 0.4509, 0.2237, 0.4517, 0.2464, 0.4507, 0.3525, 0.3448,
    0.3788, 0.4507, 0.3971, 0.3574, 0.3357, 0.3336, 0.3948, 0.3543, 0.294, 3.255, 11.87,
    9.159, 6.968, 3.768, 3.028, 1.635, 2.266, 3.72, 3.773, 3.779, 2.833, 4.02,
]  # fmt: skip
RECOVERED = [
    2.519, 0.6441, 0.8944, 0.5567, 0.1906, 0.4618, 0.6299, 0.5176, 0.2726, 0.4976, 0.3858,
    0.4384, 0.2854, 0.3781, 0.459, 0.6448, 5.051, 1.275, 1.024, 0.9365, 0.7982, 0.6127,
    0.5466, 0.5776, 0.4935, 0.4674, 0.4584, 0.5435, 1.832, 0.5013, 0.4449, 0.5115, 0.5973,
    0.3959, 0.5001, 0.4084, 0.3854, 0.254, 0.576, 0.3451, 0.3842, 0.5097, 0.3894, 0.5052,
    0.4698, 0.3563, 0.7691, 0.6027, 0.4197, 0.2664, 0.2175, 0.2907, 0.1379, 0.4232, 0.3279,
    0.2922, 0.3059, 0.2548, 0.2841, 0.2282, 0.3551, 0.1477, 0.248, 0.2089, 0.2081, 0.1607,
    0.2194, 0.3169, 0.121, 0.2855, 0.2213, 0.1701, 0.1766, 0.1778, 0.1092, 0.1898, 0.2536,
    0.1998, 0.1589, 0.1035, 0.1908, 0.447, 0.1975, 0.1288, 0.1015, 0.2029, 0.1629, 0.07905,
    0.2086, 0.162, 0.1457, 0.1358, 0.1846, 0.2, 0.2458, 0.2354, 0.2167, 0.09552, 0.1541,
]  # fmt: skip


# The same recipe logged every step (Qwen 1.5B, seed 0, this CPU, 2026-12-04): one batch's loss
# swings 0.002-1.5 (a batch of eight "I dont know" targets against one with answers), and steps
# 52-53 tripped a guard that judged each log on its own.
EVERY_STEP = [
    2.004, 2.864, 4.005, 3.619, 2.639, 1.652, 0.9977, 0.6813, 1.067, 0.3213, 0.2781, 0.1027,
    0.01286, 1.489, 0.6722, 0.00249, 0.9797, 0.3961, 0.2642, 0.5525, 0.1937, 0.2412, 0.2545,
    0.7593, 0.9202, 0.1263, 0.2571, 0.5572, 1.32, 0.2524, 0.238, 0.4066, 0.3064, 0.4828, 0.2179,
    0.5698, 0.0351, 0.502, 0.6522, 0.6374, 0.1719, 0.1603, 0.1731, 0.1763, 0.1317, 0.009799,
    0.7675, 0.4518, 0.4083, 0.3029, 0.4221, 0.7589, 0.8725,
]  # fmt: skip


def _watch(losses: list[float], factor: float = 4.0, every: int = 5) -> LossWatch:
    watch = LossWatch(factor)
    for i, loss in enumerate(losses):
        if watch.add(every * (i + 1), loss):
            break
    return watch


def test_the_measured_blow_up_is_caught_where_it_began():
    d = _watch(DIVERGED).divergence
    assert d is not None
    # the first bad log (step 270, loss 3.255) and the last good one before it (step 265)
    assert (d.step, d.loss, d.last_good_step) == (270, 3.255, 265)
    assert d.reference == pytest.approx(0.356, abs=0.001)


def test_a_bad_batch_the_run_recovers_from_and_noise_do_not_stop_it():
    assert _watch(RECOVERED).divergence is None
    assert _watch(DIVERGED[:53]).divergence is None  # the seed-0 run before its spike


def test_a_run_logged_every_step_is_judged_on_five_step_means():
    assert _watch(EVERY_STEP, every=1).divergence is None
    # the measured blow-up, logged every step, is still caught where it began
    per_step = [x for x in DIVERGED for _ in range(5)]
    d = _watch(per_step, every=1).divergence
    assert d is not None and (d.step, d.last_good_step) == (270, 265)
    assert d.loss == pytest.approx(3.255)


def test_spikes_count_from_the_fifth_judged_loss_and_two_in_a_row_break_the_run():
    # five judged losses make a reference; a spike at the sixth already counts
    d = _watch([1.0] * 5 + [5.0, 5.0]).divergence
    assert d is not None and (d.step, d.loss, d.reference, d.last_good_step) == (30, 5.0, 1.0, 25)
    # with only four before them, the first high loss becomes history, and nothing breaks
    assert _watch([1.0] * 4 + [5.0, 5.0]).divergence is None
    # one spike between ordinary losses is forgiven (a bad batch)
    assert _watch([1.0] * 5 + [5.0, 1.0, 5.0, 1.0]).divergence is None


def test_a_restart_forgets_what_was_logged_after_its_checkpoint():
    watch = _watch([1.0, 1.1, 0.9, 1.0, 1.2, 1.0, 5.0])  # a spike at step 35
    assert watch.add(36, 3.0) is False and watch.pending  # one step: not judged yet
    assert watch.add(37, math.nan) is True and watch.divergence is not None
    watch.restart(20)  # resumed from checkpoint-20
    assert [s for s, _ in watch.history] == [5, 10, 15, 20]  # the checkpoint's own log kept
    assert [s for s, _ in watch.logged] == [5, 10, 15, 20]
    assert watch.spikes == [] and watch.pending == [] and watch.divergence is None
    # the next log covers the 5 steps since the checkpoint, so it is judged at once
    assert watch.add(25, 1.0) is False
    assert watch.history[-1] == (25, 1.0) and watch.pending == []


def test_scaling_the_learning_rate_scales_the_rest_of_the_schedule():
    from transformers import get_linear_schedule_with_warmup

    from ragtune.training.divergence import scale_learning_rate

    def schedule():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=10)
        for _ in range(3):
            opt.step()
            sched.step()
        return opt, sched

    ref_opt, ref = schedule()
    opt, sched = schedule()
    scale_learning_rate(opt, sched, 0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * ref_opt.param_groups[0]["lr"])
    assert opt.param_groups[0]["initial_lr"] == 0.5 and sched.get_last_lr() == [
        pytest.approx(0.5 * ref.get_last_lr()[0])
    ]
    for _ in range(4):  # every later step at half the rate
        for o, s in ((ref_opt, ref), (opt, sched)):
            o.step()
            s.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * ref_opt.param_groups[0]["lr"])
    plain = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)  # no schedule yet
    scale_learning_rate(plain, None, 0.5)
    assert plain.param_groups[0]["lr"] == 0.5 and "initial_lr" not in plain.param_groups[0]


def test_a_loss_that_is_not_finite_stops_at_once_at_any_logging_interval():
    d = _watch([2.0, 1.5, 1.2, math.nan], every=1).divergence
    assert d is not None and d.step == 4 and d.last_good_step == 3


def test_a_loss_that_is_not_finite_stops_at_once():
    d = _watch([2.0, 1.5, math.nan]).divergence
    assert d is not None and d.step == 15 and d.last_good_step == 10


# the SFT stage's tiny run, logging every step and saving every 4 (LoRA only)
RUN = (
    "train.max_steps=14",
    "train.learning_rate=1e-4",
    "train.logging_steps=1",
    "train.save_steps=4",
    "train.save_method=lora",
)


def _break_lora_after(step: int, times: int = 99) -> Any:
    """A callback that turns the LoRA weights to NaN after update ``step`` (the first ``times``
    times the run gets there), as an overflow would."""
    from transformers import TrainerCallback

    class BreakLora(TrainerCallback):
        broken = 0

        def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
            if state.global_step == step and self.broken < times:
                self.broken += 1
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        if "lora_" in name:
                            p.fill_(float("nan"))
            return control

    return BreakLora()


def _adapter(path: Any) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def _loss_logged_at(outputs: Any, step: int) -> float:
    ckpt = outputs / f"run/checkpoints/checkpoint-{step}/trainer_state.json"
    state = json.loads(ckpt.read_text())
    return next(h["loss"] for h in state["log_history"] if h.get("step") == step and "loss" in h)


@pytest.mark.parametrize("mode", ["breaks_again", "no_restart", "guard_off"])
def test_a_run_that_keeps_breaking_is_saved_from_the_checkpoint_before_it(
    outputs, tiny_lm_path, monkeypatch, mode
):
    """After update 8 the LoRA breaks (NaN, as an overflow leaves it): the loss logged at step 9
    is NaN. checkpoint-8 already holds the broken weights, so training resumes from checkpoint-4,
    breaks at update 8 again, and checkpoint-4 is what is saved (with no restart allowed: at the
    first break); without the guard the broken weights are saved. (The tiny model's loss cannot
    spike 4x while finite; the ratio rule is checked on the measured runs above.)"""
    from ragtune.training import checkpoints, run_sft

    real = checkpoints.callbacks
    monkeypatch.setattr(checkpoints, "callbacks", lambda d: [*real(d), _break_lora_after(8)])
    extra = {
        "breaks_again": (),
        "no_restart": ("train.divergence_restarts=0",),
        "guard_off": ("train.divergence_factor=null",),
    }[mode]
    result = run_sft(_cfg(outputs, tiny_lm_path, *RUN, *extra))

    manifest = read_manifest(result.model_dir)
    saved = _adapter(result.model_dir)
    broken = any(t.isnan().any() for t in saved.values())
    if mode == "guard_off":
        assert manifest["divergence"] is None is result.divergence
        assert manifest["train_steps"] == 14
        assert broken
        return
    ckpt4 = _adapter(outputs / "run/checkpoints/checkpoint-4")
    assert saved.keys() == ckpt4.keys()
    assert all(torch.equal(saved[k], ckpt4[k]) for k in saved) and not broken
    breaks = manifest["divergence"]
    assert result.divergence == breaks  # what train/sft.py's status.json reports
    expected = [(9, 8, 4, None), (9, 8, None, 4)] if mode == "breaks_again" else [(9, 8, None, 4)]
    got = [
        (d["step"], d["last_good_step"], d["restarted_from"], d["restored_step"]) for d in breaks
    ]
    assert got == expected
    assert all(d["loss"] == "nan" for d in breaks)
    assert manifest["train_steps"] == 9  # stopped at the (last) first NaN
    # the loss logged at step 4, the step restored, not the last one before the break
    assert manifest["final_loss"] == pytest.approx(_loss_logged_at(outputs, 4), rel=1e-3)
    assert (outputs / "latest").resolve() == result.model_dir.resolve()


def _record_learning_rates(into: list[tuple[int, float]]) -> Any:
    """A callback that appends (step, learning rate) for every logged step, resumes included."""
    from transformers import TrainerCallback

    class RecordRates(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if logs and "learning_rate" in logs:
                into.append((state.global_step, float(logs["learning_rate"])))
            return control

    return RecordRates()


@pytest.mark.parametrize("lr_scale", [1.0, 0.5])
def test_a_run_that_breaks_once_resumes_from_the_checkpoint_before_it(
    outputs, tiny_lm_path, monkeypatch, lr_scale
):
    """The LoRA breaks once after update 8: the run resumes from checkpoint-4 and trains to its
    last step. With ``train.divergence_lr_scale=1.0`` the resume is exact (the checkpoint carries
    the optimizer, scheduler, RNG and data position): it ends with the same weights as a run that
    never broke. At 0.5 (the default) every step after the checkpoint trains at half the unbroken
    run's rate, since an exact resume replays the same batches into the same spike (on the H200
    it broke again at the same step with the same loss)."""
    from ragtune.training import checkpoints, run_sft

    real = checkpoints.callbacks
    clean_rates: list[tuple[int, float]] = []
    monkeypatch.setattr(
        checkpoints, "callbacks", lambda d: [*real(d), _record_learning_rates(clean_rates)]
    )
    clean = run_sft(_cfg(outputs / "clean", tiny_lm_path, *RUN))
    rates: list[tuple[int, float]] = []
    monkeypatch.setattr(
        checkpoints,
        "callbacks",
        lambda d: [*real(d), _break_lora_after(8, times=1), _record_learning_rates(rates)],
    )
    result = run_sft(_cfg(outputs, tiny_lm_path, *RUN, f"train.divergence_lr_scale={lr_scale}"))

    manifest = read_manifest(result.model_dir)
    [d] = manifest["divergence"]
    assert (d["step"], d["restarted_from"], d["restored_step"]) == (9, 4, None)
    assert d["lr_scale"] == lr_scale
    assert manifest["train_steps"] == 14
    assert math.isfinite(manifest["final_loss"])
    # the rates before the break are the clean run's; after the resume, the clean run's scaled
    resumed_at = next(i for i in range(1, len(rates)) if rates[i][0] <= rates[i - 1][0])
    clean_at = dict(clean_rates)
    assert [s for s, _ in rates[resumed_at:]] == list(range(5, 15))
    assert all(lr == pytest.approx(clean_at[s]) for s, lr in rates[:resumed_at] if s <= 8)
    assert all(lr == pytest.approx(lr_scale * clean_at[s]) for s, lr in rates[resumed_at:])
    assert any(lr > 0 for _, lr in rates[resumed_at:])
    if lr_scale == 1.0:
        saved, unbroken = _adapter(result.model_dir), _adapter(clean.model_dir)
        assert saved.keys() == unbroken.keys()
        for k in saved:
            torch.testing.assert_close(saved[k], unbroken[k])
        assert manifest["final_loss"] == pytest.approx(clean.final_loss, rel=1e-4)


def test_a_resume_that_fails_still_saves_the_checkpoint_before_the_break(
    outputs, tiny_lm_path, monkeypatch
):
    """A backend that cannot resume in the same process must not cost the user the model: the
    checkpoint from before the spike is saved, and the manifest says why it did not go on."""
    from ragtune.training import checkpoints, recipe, run_sft

    real_callbacks, real_fit = checkpoints.callbacks, recipe._fit
    monkeypatch.setattr(
        checkpoints, "callbacks", lambda d: [*real_callbacks(d), _break_lora_after(8)]
    )

    def fit(sft, resume_from, cuda):  # noqa: ANN001, ANN202
        if resume_from is not None:
            raise RuntimeError("this backend cannot resume here")
        return real_fit(sft, resume_from, cuda)

    monkeypatch.setattr(recipe, "_fit", fit)
    result = run_sft(_cfg(outputs, tiny_lm_path, *RUN))

    [d] = read_manifest(result.model_dir)["divergence"]
    assert (d["restarted_from"], d["restored_step"]) == (4, 4)
    assert d["restart_error"] == "RuntimeError: this backend cannot resume here"
    saved, ckpt4 = _adapter(result.model_dir), _adapter(outputs / "run/checkpoints/checkpoint-4")
    assert all(torch.equal(saved[k], ckpt4[k]) for k in saved)


def test_a_run_that_breaks_before_its_first_checkpoint_says_what_to_change(
    outputs, tiny_lm_path, monkeypatch
):
    from ragtune.training import TrainError, checkpoints, run_sft

    real = checkpoints.callbacks
    monkeypatch.setattr(checkpoints, "callbacks", lambda d: [*real(d), _break_lora_after(6)])
    with pytest.raises(TrainError, match=r"train\.learning_rate.*train\.save_steps"):
        run_sft(_cfg(outputs, tiny_lm_path, *RUN, "train.save_steps=50"))
    assert not (outputs / "latest").exists()
