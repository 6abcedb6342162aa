"""A run whose loss blows up restarts from its last checkpoint before the spike, or is rewound to it.

A LoRA at a high learning rate can diverge mid-run: on the GPU, Qwen 1.5B at 5e-4 trained
270 steps at a loss of ~0.35, then one batch's gradient norm hit 918 and the loss went to 11.9
and never came back (final loss 1.49, answers that repeat one word; docs/benchmarks.md). Saved
as it was, that model abstained on 132 of 135 answerable test questions; the same run again
(GPU arithmetic differs run to run) did not break. The guard watches the logged loss: a loss
that is not finite, or ``train.divergence_factor`` times the median of the recent logged losses
for two logs in a row (noise measured at most 3.3x; one bad batch, 11x, was followed by 2.8x),
stops the run. Logs covering fewer than :data:`SPAN` optimizer steps (``train.logging_steps=1``)
are pooled first: one batch's loss swings 0.002-1.5 on the SQuAD recipe, its 5-step means far
less. Training then resumes from the newest complete checkpoint from before the spike
(``train.divergence_restarts`` times) with its learning-rate schedule scaled by
``train.divergence_lr_scale``: an exact resume replays the same batches at the same rate, and on
the H200 it broke again at the same step with the same loss (11.23, docs/benchmarks.md). If it
breaks again :func:`rewind` loads that checkpoint into the model, so what is saved is the model
as it was before it broke. ``train.divergence_factor=null`` turns the guard off.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ragtune.training import TrainError
from ragtune.training.checkpoints import CKPT_PREFIX, checkpoint_problem, checkpoint_step

log = logging.getLogger(__name__)

WINDOW = 10  # judged losses the median is taken over
MIN_HISTORY = 5  # judged losses before a ratio is judged (the first losses fall fast)
SPIKES_IN_A_ROW = 2
SPAN = 5  # optimizer steps a judged loss covers at least: the logging interval the noise was
# measured at; logged every step, the recipe's ordinary batches tripped the guard at step 52


@dataclass
class Divergence:
    """Where a run broke: the first bad log's step and loss, and the reference it broke from."""

    step: int
    loss: float
    reference: float  # median of the logged losses before it
    last_good_step: int
    restored_step: int | None = None  # the checkpoint saved in the end: the run stopped there
    restarted_from: int | None = None  # the checkpoint training resumed from: the run went on
    lr_scale: float | None = None  # the resumed run's learning rates / the checkpoint's
    restart_error: str | None = None  # why resuming from it failed (then it was restored)

    def to_dict(self) -> dict[str, Any]:
        """For the manifest: numbers that are not finite as "nan" / "inf" (JSON has no NaN)."""
        d = asdict(self)
        for key in ("loss", "reference"):  # no reference yet: a break before any judged loss
            d[key] = d[key] if math.isfinite(d[key]) else str(d[key])
        return d


class LossWatch:
    """Feeds on logged losses; :attr:`divergence` is set once the run has broken."""

    def __init__(self, factor: float) -> None:
        self.factor = float(factor)
        self.history: list[tuple[int, float]] = []  # (step, loss) of the good judged losses
        self.spikes: list[tuple[int, float, float]] = []  # (step, loss, reference) in a row
        self.divergence: Divergence | None = None
        self.pending: list[tuple[int, float, int]] = []  # (step, loss, steps it covers)
        self.logged: list[tuple[int, float]] = []  # (step, loss) of every finite log, as logged
        self.last_step = 0  # the step of the last log

    def add(self, step: int, loss: float) -> bool:
        """Record a logged loss; True when the run has just been judged diverged.

        A loss that is not finite is judged at once; finite ones once their logs cover
        :data:`SPAN` steps, as their mean weighted by the steps each log covers."""
        if self.divergence is not None:
            return False
        covers, self.last_step = max(step - self.last_step, 1), step
        if math.isfinite(loss):
            self.logged.append((step, loss))
            self.pending.append((step, loss, covers))
            if sum(n for _, _, n in self.pending) < SPAN:
                return False
            loss = sum(x * n for _, x, n in self.pending) / sum(n for _, _, n in self.pending)
            self.pending.clear()
        return self._judge(step, loss)

    def _judge(self, step: int, loss: float) -> bool:
        recent = [x for _, x in self.history[-WINDOW:]]
        reference = statistics.median(recent) if recent else math.nan
        bad = not math.isfinite(loss)
        if not bad and len(recent) >= MIN_HISTORY and loss > self.factor * reference:
            self.spikes.append((step, loss, reference))
            bad = len(self.spikes) >= SPIKES_IN_A_ROW
        elif not bad:
            self.spikes.clear()
            self.history.append((step, loss))
        if not bad:
            return False
        first = self.spikes[0] if self.spikes else (step, loss, reference)
        # finite logs not yet judged before a non-finite one count as good
        last_good = max([s for s, _ in self.history[-1:]] + [s for s, _, _ in self.pending] + [0])
        self.divergence = Divergence(first[0], first[1], first[2], last_good)
        return True

    def restart(self, step: int) -> None:
        """Training resumes from checkpoint ``step``: forget what was logged after it."""
        self.history = [(s, x) for s, x in self.history if s <= step]
        self.logged = [(s, x) for s, x in self.logged if s <= step]
        self.spikes.clear()
        self.pending.clear()
        self.last_step = step
        self.divergence = None


def scale_learning_rate(optimizer: Any, lr_scheduler: Any, scale: float) -> None:
    """Scale the optimizer's current learning rates and the rest of the scheduler's schedule.

    transformers' schedules are LambdaLRs (rate = base rate x a factor of the step), so scaling
    the base rates scales every later step; ``_last_lr`` is what the Trainer logs."""
    for group in optimizer.param_groups:
        group["lr"] *= scale
        if "initial_lr" in group:
            group["initial_lr"] *= scale
    sched = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps it
    for name in ("base_lrs", "_last_lr"):
        if getattr(sched, name, None) is not None:
            setattr(sched, name, [lr * scale for lr in getattr(sched, name)])


def callback(factor: float | None) -> Any:
    """A TrainerCallback that stops training when :class:`LossWatch` says so; None when off.

    Its ``lr_scale``, when set, scales the learning rates of the next run (a resume) at its first
    step: after the Trainer has loaded the checkpoint's optimizer and scheduler."""
    if factor is None:
        return None
    from transformers import TrainerCallback

    class StopOnDivergence(TrainerCallback):
        def __init__(self) -> None:
            self.watch = LossWatch(factor)
            self.lr_scale: float | None = None

        def on_step_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):  # noqa: ANN001
            if self.lr_scale is not None:
                scale_learning_rate(optimizer, lr_scheduler, self.lr_scale)
                self.lr_scale = None
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if logs and "loss" in logs and self.watch.add(state.global_step, float(logs["loss"])):
                d = self.watch.divergence
                log.warning(
                    "training diverged at step %d: loss %.4g against a recent median of %.4g",
                    d.step,
                    d.loss,
                    d.reference,
                )
                control.should_training_stop = True
            return control

    return StopOnDivergence()


def checkpoint_before(
    checkpoints: Path, divergence: Divergence, cfg: Any, *, sharded: bool = False
) -> Path:
    """The newest complete checkpoint saved before the last good log's step.

    Strictly before: a log's loss was computed on the weights *before* its step's update, and
    ``checkpoint-N`` holds them *after* update N, which may be the update that broke the run.

    Raises a TrainError naming the settings when there is none to go back to, or when the
    weights are sharded (FSDP), whose checkpoints this does not load.
    """
    if sharded:
        raise TrainError(
            f"training diverged at step {divergence.step} (loss {divergence.loss:.4g}) under "
            f"FSDP: lower train.learning_rate (now {cfg.train.learning_rate}) and start again"
        )
    candidates = sorted(
        (
            p
            for p in Path(checkpoints).glob(f"{CKPT_PREFIX}*")
            if 0 <= checkpoint_step(p) < divergence.last_good_step
        ),
        key=checkpoint_step,
        reverse=True,
    )
    for ckpt in candidates:
        if checkpoint_problem(ckpt) is None and (ckpt / "adapter_model.safetensors").exists():
            return ckpt
    raise TrainError(
        f"training diverged at step {divergence.step} (loss {divergence.loss:.4g}, recent median "
        f"{divergence.reference:.4g}) and no checkpoint precedes it: lower train.learning_rate "
        f"(now {cfg.train.learning_rate}) or train.save_steps (now {cfg.train.save_steps}); "
        "train.divergence_factor=null keeps the diverged weights"
    )


def rewind(model: Any, checkpoint: Path, divergence: Divergence, cfg: Any) -> Divergence:
    """Load ``checkpoint``'s LoRA weights (from :func:`checkpoint_before`) into ``model``."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(checkpoint / "adapter_model.safetensors")))
    divergence.restored_step = checkpoint_step(checkpoint)
    log.warning(
        "restored %s, saved before the loss spike; train.learning_rate=%s is likely "
        "too high for this run to reach its last step",
        checkpoint.name,
        cfg.train.learning_rate,
    )
    return divergence
