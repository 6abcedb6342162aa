"""One wrapper around every stage an entry point runs (after lightning-hydra-template's
``task_wrapper``): the entry script owns the task, this owns how it starts and ends.

:func:`run_stage` gives every stage the same edges:

- logs on stderr, so stdout holds only what the command prints (answers, tables, summaries);
- ``status.json`` in the stage's run folder (``output_dir``): ``running`` (rewritten every
  ``HEARTBEAT_S`` with pid, host and time, so a killed run reads as ``dead``), then ``ok`` with the
  metric and details, ``failed`` with the error, or ``interrupted`` (Ctrl-C);
- an error a user can act on (:class:`RagtuneError`): one line on stderr, exit status 2;
- Ctrl-C: one line, exit status 130, no traceback;
- in a multirun a failed run is recorded and returns NaN, so the sweep goes on.

Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ragtune.errors import RagtuneError
from ragtune.sweep import HEARTBEAT_S, is_multirun, write_status

log = logging.getLogger(__name__)

USER_ERROR_EXIT = 2
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as shells report it


@dataclass
class StageResult:
    """What a stage hands back: the metric a sweep optimises, details for ``status.json``."""

    metric: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


Task = Callable[[DictConfig], Any]


def configure_threads() -> None:
    """Process settings every stage wants before torch loads (the environment wins).

    OpenMP threads sleep instead of spinning while they wait: on a CPU shared with other
    work, spinning made decoding ~10x and training steps several times slower
    (docs/benchmarks.md).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def logs_to_stderr() -> None:
    """Point the console log handlers (Hydra's go to stdout) at stderr."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)


def run_stage(task: Task, cfg: DictConfig) -> float | None:
    """Run ``task(cfg)`` with the edges above; return its metric (NaN for a failed multirun job).

    ``task`` returns a :class:`StageResult`, a number (the metric) or anything else (no
    metric). Only a stage with a run folder (``cfg.output_dir``) gets ``status.json``, and
    under torchrun only rank 0 writes it.
    """
    configure_threads()
    logs_to_stderr()
    out = _status_dir(cfg)
    t0 = time.perf_counter()

    beat = _Heartbeat()

    def status(state: str, **extra: Any) -> None:
        if out is None:
            return
        if state != "running":
            beat.stop()  # the final status is never overwritten by a late heartbeat
        write_status(out, state, seconds=round(time.perf_counter() - t0, 2), **extra)

    status("running")
    if out is not None:
        beat.start(lambda: status("running"))
    try:
        result = task(cfg)
    except KeyboardInterrupt:
        status("interrupted")
        print("interrupted", file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED_EXIT) from None
    except SystemExit as e:
        if e.code not in (0, None):
            status("failed", error=f"exit status {e.code}")
        raise
    except Exception as e:
        user = isinstance(e, RagtuneError)
        error = f"{type(e).__name__}: {e}"
        status("failed", error=error, **({} if user else {"trace": traceback.format_exc()}))
        if is_multirun():  # recorded; the sweep goes on
            log.error("run failed: %s", error)
            return math.nan
        if user:
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(USER_ERROR_EXIT) from None
        raise
    outcome = as_result(result)
    status("ok", **{**outcome.details, "metric": outcome.metric})
    return outcome.metric


class _Heartbeat:
    """Rewrites ``running`` every ``HEARTBEAT_S`` so readers can tell a live run from a dead
    one (:func:`ragtune.sweep.read_status`)."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self, beat: Callable[[], None]) -> None:
        def loop() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                with self._lock:
                    if self._stop.is_set():
                        return
                    try:
                        beat()
                    except OSError as e:  # a full disk must not kill the stage
                        log.debug("status heartbeat failed: %s", e)

        self._thread = threading.Thread(target=loop, name="ragtune-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:  # a beat in progress finishes before the final status
            pass


def as_result(value: Any) -> StageResult:
    if isinstance(value, StageResult):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return StageResult(metric=float(value))
    return StageResult()


def _status_dir(cfg: DictConfig) -> Path | None:
    if int(os.environ.get("RANK", "0") or 0) != 0:  # torchrun: rank 0 reports for the run
        return None
    try:
        out = OmegaConf.select(cfg, "output_dir", default=None)
    except Exception:  # ${hydra:...} outside a Hydra run: no run folder
        return None
    return Path(str(out)) if out else None
