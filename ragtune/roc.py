"""How well a score separates two classes: AUROC, the ROC curve, and its picture.

Used to judge the answer-or-abstain score (:mod:`ragtune.answerability`) wherever answers are
scored: training's calibration folder, ``train/eval.py``'s ``results.md`` (with the AUROC's
bootstrap interval: a few hundred questions pin it down to about +-0.05) and ``roc.png``.
Positives are the answerable questions; a higher score means "answer".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def auroc(scores: Sequence[float], labels: Sequence[bool | int]) -> float:
    """Area under the ROC curve: the chance that a positive scores above a negative (ties
    count half). NaN when one class is missing."""
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
    pairs = sorted(zip(scores, labels, strict=True), key=lambda p: p[0])
    n_pos = sum(1 for _, y in pairs if y)
    n_neg = len(pairs) - n_pos
    if not n_pos or not n_neg:
        return float("nan")
    rank_sum, i = 0.0, 0
    while i < len(pairs):  # average ranks over ties (Mann-Whitney U)
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        avg_rank = (i + j + 1) / 2.0  # ranks are 1-based
        rank_sum += avg_rank * sum(1 for k in range(i, j) if pairs[k][1])
        i = j
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def auroc_interval(
    scores: Sequence[float],
    labels: Sequence[bool | int],
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile bootstrap 95% interval of :func:`auroc` (``scipy.stats.bootstrap``), the
    positives and negatives resampled apart so every resample keeps the class counts. None
    when a class has fewer than two members."""
    import warnings

    from scipy.stats import bootstrap

    pos = [float(s) for s, y in zip(scores, labels, strict=True) if y]
    neg = [float(s) for s, y in zip(scores, labels, strict=True) if not y]
    if len(pos) < 2 or len(neg) < 2:
        return None

    def stat(p: Sequence[float], n: Sequence[float]) -> float:
        return auroc([*p, *n], [1] * len(p) + [0] * len(n))

    with warnings.catch_warnings():  # every resample equal (perfect separation) is an answer
        warnings.simplefilter("ignore")
        ci = bootstrap(
            (pos, neg),
            stat,
            n_resamples=n_resamples,
            vectorized=False,
            method="percentile",
            rng=seed,
        ).confidence_interval
    return round(float(ci.low), 4), round(float(ci.high), 4)


def roc_curve(scores: Sequence[float], labels: Sequence[bool | int]) -> list[tuple[float, float]]:
    """(false positive rate, true positive rate) points from the highest cut to the lowest."""
    n_pos = sum(1 for y in labels if y)
    n_neg = len(labels) - n_pos
    pts, tp, fp = [(0.0, 0.0)], 0, 0
    ordered = sorted(zip(scores, labels, strict=True), key=lambda p: -p[0])
    for k, (s, y) in enumerate(ordered):
        tp, fp = tp + bool(y), fp + (not y)
        if k + 1 == len(ordered) or ordered[k + 1][0] != s:
            pts.append((fp / max(1, n_neg), tp / max(1, n_pos)))
    return pts


def rows_auroc(rows: Sequence[dict[str, Any]], curves: dict, name: str) -> float | None:
    """AUROC of evaluation rows' ``answerability`` scores, answerable vs unanswerable; the
    (scores, labels) go into ``curves[name]`` for :func:`plot_roc`. None: unscored, one class."""
    got = [(r["answerability"], r["answerable"]) for r in rows if r["answerability"] is not None]
    if not got:
        return None
    curves[name] = ([g[0] for g in got], [g[1] for g in got])
    value = auroc(*curves[name])
    return None if value != value else round(value, 4)  # NaN: one class only


def plot_roc(
    curves: dict[str, tuple[Sequence[float], Sequence[bool | int]]], path: str | Any
) -> Any:
    """One ROC curve per (scores, answerable labels), AUROC in the legend; saved as an image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, (scores, labels) in curves.items():
        pts = roc_curve(scores, labels)
        ax.plot(
            [p[0] for p in pts], [p[1] for p in pts], label=f"{name} ({auroc(scores, labels):.3f})"
        )
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("unanswerable questions answered (false positive rate)")
    ax.set_ylabel("answerable questions answered (true positive rate)")
    ax.set_title("Answer-or-abstain score: ROC (AUROC)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
