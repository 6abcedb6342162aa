"""Plot the logged training loss of one or more train/sft.py logs, each resume as its own line.

    python bench/plot_loss.py runs21/contrast_swap2_s0/raft.log:"rerun (diverged)" \
        runs20/contrast_swap_s0/raft.log:"session 20" --max-step 200 --out docs/img/x.png

Reads the Trainer's logged dicts (``{'loss': ..., 'epoch': ...}``) from the log; a run that
resumed from a checkpoint logs the steps after it again, so a step that goes back starts a new
line. Steps are counted from ``logging_steps`` (``--every``, 5 in ragtune's train group). The
SFT's losses (the log up to the preference step or the recipe's "trained N steps"), or with
``--stage preference`` the preference step's (``--smooth 9``: a running median over 9 logs):

    python bench/plot_loss.py runs22/contrast_s0/raft.log:"seed 0" ... --stage preference \
        --smooth 9 --out docs/img/preference_drift.png

``--metric grad_norm`` plots the logged gradient norm (before clipping) instead, and ``--x epoch``
puts runs of different batch sizes on one axis (the same data order reaches the same example at
the same epoch):

    python bench/plot_loss.py b8.log:"batch 8" b16.log:"batch 16" --every 1 --metric grad_norm \
        --x epoch --out docs/img/x.png
"""

from __future__ import annotations

import argparse
import ast
import re
import statistics
from pathlib import Path

LOGGED = re.compile(r"\{'loss': [^}]*\}")
# where the SFT's logs end: the preference step starts, or the recipe reports the steps trained
SFT_DONE = re.compile(
    r"ragtune\.training\.(preference\]\[INFO\] - preference step|recipe\]\[INFO\] - trained )"
)


PREFERENCE_START = re.compile(
    r"ragtune\.training\.preference\]\[INFO\] - preference step: \d+ pairs"
)
PREFERENCE_DONE = re.compile(
    r"ragtune\.training\.preference\]\[INFO\] - preference step: \d+ steps"
)


def segments(
    log: Path, stage: str = "sft", metric: str = "loss"
) -> list[list[tuple[float, float]]]:
    """(epoch, ``metric``) per logged step of ``stage`` (sft or preference), split where the
    epoch goes back (a resume)."""
    runs: list[list[tuple[float, float]]] = [[]]
    text = log.read_text(errors="replace")
    if stage == "sft":
        text = SFT_DONE.split(text, maxsplit=1)[0]
    else:
        parts = PREFERENCE_START.split(text, maxsplit=1)
        text = PREFERENCE_DONE.split(parts[1], maxsplit=1)[0] if len(parts) == 2 else ""
    for match in LOGGED.finditer(text):
        logged = ast.literal_eval(match.group(0))
        if "epoch" not in logged:
            continue
        point = (float(logged["epoch"]), float(logged[metric]))
        if runs[-1] and point[0] <= runs[-1][-1][0]:
            runs.append([])
        runs[-1].append(point)
    return [run for run in runs if run]


def smoothed(run: list[tuple[float, float]], n: int) -> list[tuple[float, float]]:
    """The running median of the last ``n`` losses at each log (``n`` <= 1: as logged)."""
    return [
        (e, statistics.median(x for _, x in run[max(0, i - n + 1) : i + 1]))
        for i, (e, _) in enumerate(run)
    ]


def curves(
    runs: list[list[tuple[float, float]]],
    x: str = "step",
    every: int = 5,
    smooth: int = 1,
    max_x: float = 0,
) -> list[list[tuple[float, float]]]:
    """Each segment's (x, value) points as plotted: x in optimizer steps (the first log is at
    step ``every``, which gives the epochs per step) or in epochs; smoothed; up to ``max_x``."""
    per_x = runs[0][0][0] / every if x == "step" else 1.0
    out = []
    for run in runs:
        points = [(e / per_x, v) for e, v in smoothed(run, smooth)]
        if x == "step":
            points = [(round(s), v) for s, v in points]
        out.append([(s, v) for s, v in points if not max_x or s <= max_x])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", help="LOG[:label]")
    parser.add_argument("--every", type=int, default=5, help="train.logging_steps")
    parser.add_argument("--max-step", type=float, default=0, help="the last x (0: all)")
    parser.add_argument("--stage", choices=("sft", "preference"), default="sft")
    parser.add_argument("--smooth", type=int, default=1, help="running median over N logs")
    parser.add_argument("--metric", choices=("loss", "grad_norm"), default="loss")
    parser.add_argument("--x", choices=("step", "epoch"), default="step")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for spec in args.logs:
        path, _, label = spec.partition(":")
        runs = segments(Path(path), args.stage, args.metric)
        name = label or Path(path).parent.name
        for i, points in enumerate(curves(runs, args.x, args.every, args.smooth, args.max_step)):
            ax.plot(
                [s for s, _ in points],
                [x for _, x in points],
                "--" if i else "-",
                label=name if i == 0 else f"{name}, resumed",
            )
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step" if args.x == "step" else "epoch")
    what = "training loss" if args.metric == "loss" else "gradient norm (before clipping)"
    ax.set_ylabel(f"logged {what}" + f", running median of {args.smooth}" * (args.smooth > 1))
    # upper left, clear of the first logged loss and of the spikes
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.07, 1.0))
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
