"""Sweep summary: a Hydra callback that collects every run of a multirun into one table + plot.

``python train/sft.py -m retriever.chunk_size=500,1000,2000 prompt=alpaca_rag,alpaca_rag_short``
runs each combination in its own folder (``<sweep dir>/<num>_<overrides>/``). Each run writes
``status.json`` (``ok`` with its metric and evaluation metrics, ``failed`` with the error,
``interrupted`` after Ctrl-C; ``running`` with a heartbeat while it runs, read as ``dead`` once
its process is gone). When the sweep ends, :class:`SweepSummary` reads every run
folder's overrides (``.hydra/overrides.yaml``) and status, and writes into the sweep folder:

- ``summary.csv`` and ``summary.md``: one row per run: status, swept settings, metrics;
- ``summary.png``: each metric against the swept settings (one line per combination of the
  other swept settings; failed runs left out of the plot, kept in the table).

A failed run does not stop the others: the stage wrapper records the failure in
``status.json`` and returns NaN (:func:`ragtune.stage.run_stage`), and ``on_job_end`` records
any exception that still escaped a job.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
SUMMARY_PNG = "summary.png"
# Metrics shown (in this order) when a run reports them; the first present is the headline.
METRICS = (
    "overall",
    "f1",
    "exact_match",
    "false_abstention_rate",
    "unanswerable_abstention_rate",
    "recall_at_k",
    "latency_s",
)
PERCENT_METRICS = set(METRICS) - {"latency_s"}
# Both kinds of abstention error: answering an unanswerable question (a low
# unanswerable_abstention_rate) and refusing an answerable one (false_abstention_rate).
PLOT_METRICS = (
    "overall",
    "f1",
    "false_abstention_rate",
    "unanswerable_abstention_rate",
    "recall_at_k",
)


# --------------------------------------------------------------------------- run status
HEARTBEAT_S = 30.0  # a running stage rewrites its status this often
STALE_S = 4 * HEARTBEAT_S  # no heartbeat for this long: the run is dead (killed, machine gone)


def write_status(out_dir: str | Path, status: str, **extra: Any) -> Path:
    """Write ``status.json`` atomically (``running`` | ``ok`` | ``failed`` | ``interrupted``,
    plus details), stamped with the writer's pid, host and time (the heartbeat)."""
    import socket
    import time

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = {"pid": os.getpid(), "host": socket.gethostname(), "heartbeat": round(time.time(), 1)}
    tmp = out / f".{STATUS_FILE}.{os.getpid()}.tmp"
    payload = {"status": status, **extra, **stamp}
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    os.replace(tmp, out / STATUS_FILE)
    return out / STATUS_FILE


def read_status(run_dir: str | Path) -> dict[str, Any]:
    """``status.json`` of a run; a ``running`` run whose process is gone (its pid is dead on
    this host, or its heartbeat stopped ``STALE_S`` ago) reads as ``dead``, with why."""
    path = Path(run_dir) / STATUS_FILE
    try:
        st = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(st, dict):
        return {}
    why = _dead_because(st) if st.get("status") == "running" else None
    if why:
        st = {**st, "status": "dead", "error": f"the run died without a final status: {why}"}
    return st


def _dead_because(st: dict[str, Any]) -> str | None:
    import socket
    import time

    pid, beat = st.get("pid"), st.get("heartbeat")
    if isinstance(pid, int) and st.get("host") == socket.gethostname() and not _alive(pid):
        return f"process {pid} is gone (killed?)"
    if not isinstance(beat, int | float):
        return "no heartbeat recorded (written by an older ragtune, or killed)"
    age = time.time() - beat
    if age > STALE_S:
        return f"no heartbeat for {age:.0f}s (killed, or its machine is gone)"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_multirun() -> bool:
    """Whether the current Hydra job is part of a multirun (``-m``)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:
        return False


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and math.isnan(o):
        return None
    return str(o)


# --------------------------------------------------------------------------- callback
class SweepSummary(Callback):
    """Hydra callback: ``summary.csv``, ``summary.md``, ``summary.png`` when a multirun ends."""

    def __init__(self, metric: str = "overall") -> None:
        self.metric = metric

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """A job whose exception escaped the task function is recorded as failed."""
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        try:
            if config.hydra.mode != RunMode.MULTIRUN or job_return.status != JobStatus.FAILED:
                return
            out = Path(config.hydra.runtime.output_dir)
        except Exception:  # a config without the hydra node: nothing to record
            return
        if read_status(out).get("status") != "failed":
            err = job_return._return_value
            write_status(out, "failed", error=f"{type(err).__name__}: {err}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            result = summarize_sweep(sweep_dir, metric=self.metric)
        except Exception as e:  # never hide the runs' own results behind a summary bug
            log.error("sweep summary failed: %s: %s", type(e).__name__, e)
            return
        log.info(
            "sweep summary: %d runs (%d ok, %d failed) -> %s, %s, %s",
            len(result.rows),
            sum(r["status"] == "ok" for r in result.rows),
            sum(r["status"] != "ok" for r in result.rows),
            result.csv,
            result.markdown,
            result.plot,
        )
        print(result.table)


# --------------------------------------------------------------------------- summary
@dataclass
class SweepResult:
    rows: list[dict[str, Any]]
    swept: list[str]
    csv: Path
    markdown: Path
    plot: Path | None
    table: str


def collect_runs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One dict per run folder (one with ``.hydra/``): run, num, status, settings, metrics."""
    rows = []
    sweep = Path(sweep_dir)
    for run in _run_dirs(sweep):
        settings = _overrides(run)
        st = read_status(run)
        status = st.get("status") or _status_without_file(run)
        if status == "dead":  # killed: failed, with why in the error column
            status = "failed"
        metrics = dict(st.get("metrics") or {})
        if not metrics:
            metrics = _eval_metrics(run)
        name = run.relative_to(sweep).as_posix()
        row: dict[str, Any] = {"run": name, "num": _job_num(run, name), "status": status}
        row["settings"] = settings
        row["metric"] = _num(st.get("metric"))
        for m in METRICS:
            row[m] = _num(metrics.get(m))
        row["final_loss"] = _num(st.get("final_loss"))
        err = str(st.get("error") or "") or ("" if st else "no status.json: the run never started")
        row["error"] = (err.splitlines() or [""])[0][:300] if status != "ok" else ""
        rows.append(row)
    rows.sort(key=lambda r: (r["num"] if r["num"] is not None else 10**9, r["run"]))
    return rows


def summarize_sweep(sweep_dir: str | Path, metric: str = "overall") -> SweepResult:
    """Write summary.csv, summary.md and summary.png into ``sweep_dir``; return them."""
    sweep = Path(sweep_dir)
    rows = collect_runs(sweep)
    keys = list(dict.fromkeys(k for r in rows for k in r["settings"]))
    swept = [k for k in keys if len({_cell(r["settings"].get(k)) for r in rows}) > 1]
    metric_cols = [m for m in METRICS if any(r[m] is not None for r in rows)]
    extra = [c for c in ("metric", "final_loss") if any(r[c] is not None for r in rows)]
    columns = ["run", "status", *keys, *metric_cols, *extra, "error"]

    flat = [
        {
            **{k: r["settings"].get(k, "") for k in keys},
            **{c: r.get(c) for c in columns if c not in keys},
        }
        for r in rows
    ]
    csv_path = sweep / SUMMARY_CSV
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in flat:
            w.writerow({c: "" if r.get(c) is None else r.get(c) for c in columns})

    # The markdown shows what varies; settings shared by every run are listed once.
    fixed = {k: rows[0]["settings"].get(k) for k in keys if k not in swept} if rows else {}
    md_rows = [{**f, "run": r["num"]} for f, r in zip(flat, rows, strict=True)]
    table = _markdown(md_rows, ["run", "status", *swept, *metric_cols, *extra])
    best = _best(rows, metric)
    failed = [r for r in rows if r["status"] != "ok"]
    lines = [f"# Sweep summary: {sweep.name}", "", f"{len(rows)} runs, {len(failed)} failed.", ""]
    if fixed:
        lines += ["Same in every run: " + ", ".join(f"`{k}={v}`" for k, v in fixed.items()), ""]
    if best is not None:
        lines += [f"Best {metric}: **{best[metric]:.2f}** in run {best['num']}.", ""]
    elif any(r["status"] == "ok" for r in rows):
        lines += [
            f"No run reports the evaluation metric {metric!r}, so runs are not ranked (a lower "
            "training loss is not a better RAG model): sweep with train.eval_after=true.",
            "",
        ]
    lines += [table, ""]
    if failed:
        lines += ["## Failed runs", ""]
        lines += [f"- run {r['num']}: {r['error'] or r['status']}" for r in failed] + [""]
    lines += ["Run folders, every setting and full errors: summary.csv. Plot: summary.png.", ""]
    md_path = sweep / SUMMARY_MD
    md_path.write_text("\n".join(lines), encoding="utf-8")
    plot = _plot(rows, swept, sweep / SUMMARY_PNG)
    return SweepResult(rows, swept, csv_path, md_path, plot, table)


def _run_dirs(sweep: Path) -> list[Path]:
    """Folders holding a ``.hydra/`` node. Searched below the top level too: an override
    value with a slash (a path) puts ``/`` into Hydra's ``override_dirname`` subfolder."""
    found = []
    stack = [sweep]
    while stack:
        d = stack.pop()
        for child in d.iterdir():
            if not child.is_dir() or child.name.startswith("."):
                continue
            if (child / ".hydra").is_dir():
                found.append(child)
            elif len(child.relative_to(sweep).parts) < 64:
                stack.append(child)
    return found


def _overrides(run: Path) -> dict[str, str]:
    path = run / ".hydra" / "overrides.yaml"
    try:
        items = yaml.safe_load(path.read_text()) or []
    except (OSError, yaml.YAMLError):
        return {}
    out = {}
    for item in items:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def _job_num(run: Path, name: str) -> int | None:
    try:
        cfg = yaml.safe_load((run / ".hydra" / "hydra.yaml").read_text())
        return int(cfg["hydra"]["job"]["num"])
    except Exception:
        head = name.split("_", 1)[0]
        return int(head) if head.isdigit() else None


def _status_without_file(run: Path) -> str:
    """Runs that wrote no status.json: an evaluation run with metrics is ok, else failed."""
    return "ok" if (run / "metrics.json").exists() else "failed"


def _eval_metrics(run: Path) -> dict[str, Any]:
    """The headline mode's metrics of an evaluation run folder (``metrics.json``)."""
    for path in (run / "metrics.json", run / "eval" / "metrics.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        modes = data.get("modes") or {}
        if modes:
            head = "raft_rag" if "raft_rag" in modes else next(iter(modes))
            return modes[head]
    return {}


def _num(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-3 or abs(v) >= 1e5 else f"{v:.2f}".rstrip("0").rstrip(".")
    return str(v).replace("|", "\\|")


def _markdown(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    out += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def _best(rows: Sequence[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    ok = [r for r in rows if r["status"] == "ok" and r.get(metric) is not None]
    return max(ok, key=lambda r: r[metric]) if ok else None


def _as_number(v: str) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _plot(rows: Sequence[dict[str, Any]], swept: Sequence[str], path: Path) -> Path | None:
    """Each metric against the swept settings; failed runs are left out."""
    ok = [r for r in rows if r["status"] == "ok"]
    metrics = [m for m in PLOT_METRICS if any(r[m] is not None for r in ok)]
    if not metrics and any(r["metric"] is not None for r in ok):
        metrics = ["metric"]
    if not ok or not metrics:
        log.warning("sweep summary: no finished run with metrics; no plot written")
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # x: the swept setting with the most numeric values (else the first swept, else the run)
    def numeric(k: str) -> int:
        return sum(_as_number(r["settings"].get(k, "")) is not None for r in ok)

    xkey = (
        max(swept, key=lambda k: (numeric(k) == len(ok), len({r["settings"].get(k) for r in ok})))
        if swept
        else None
    )
    others = [k for k in swept if k != xkey]

    def xval(r: dict[str, Any]) -> Any:
        return r["run"] if xkey is None else r["settings"].get(xkey, "")

    xs = list(dict.fromkeys(xval(r) for r in ok))
    is_num = xkey is not None and all(_as_number(x) is not None for x in xs)
    xs = sorted(xs, key=lambda x: _as_number(x) if is_num else xs.index(x))
    series: dict[str, list[dict[str, Any]]] = {}
    for r in ok:
        label = (
            ", ".join(f"{k.split('.')[-1]}={r['settings'].get(k, '')}" for k in others) or "runs"
        )
        series.setdefault(label, []).append(r)

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        for label, rs in series.items():
            pts = sorted(
                ((xval(r), r[m]) for r in rs if r[m] is not None),
                key=lambda p: _as_number(p[0]) if is_num else xs.index(p[0]),
            )
            if not pts:
                continue
            px = [_as_number(p[0]) if is_num else xs.index(p[0]) for p in pts]
            ax.plot(px, [p[1] for p in pts], marker="o", label=label)
        ax.set_title(m)
        if m in PERCENT_METRICS:
            ax.set_ylim(-3, 103)
        ax.set_xlabel(xkey or "run")
        if not is_num:
            ax.set_xticks(range(len(xs)), [str(x) for x in xs], rotation=30, ha="right", fontsize=7)
        elif len(xs) <= 8:
            ax.set_xticks([_as_number(x) for x in xs])
        ax.grid(alpha=0.3)
    if len(series) > 1 or others:
        axes[0][0].legend(fontsize=7)
    n_failed = len(rows) - len(ok)
    fig.suptitle(
        f"sweep: {len(ok)} runs" + (f" ({n_failed} failed, not shown)" if n_failed else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
