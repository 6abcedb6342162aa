"""Programmatic dependent launch (PDL) for the batch-1 decode step (Hopper and later).

Why: a 12B decode step is ~300 kernels of a few microseconds each, and each waits for the one
before to finish before it is even launched. With PDL (CUDA's programmatic stream
serialization) a kernel is launched while the one before it still runs, does what needs no
input (its launch, address arithmetic; the decode attention also reads earlier steps' KV
cache), then waits (``griddepcontrol.wait``) for the kernel before to complete, and lets the
next kernel launch at once (``griddepcontrol.launch_dependents``). Results are bit for bit
those of plain launches. It pays only when every kernel of the step takes part: ragtune's int4
GEMV and decode attention alone, among inductor's plain kernels, were slower (H200:
docs/benchmarks.md, issue 20, "programmatic dependent launch"); with inductor's own PDL
(``triton.enable_pdl``) in the same step they were faster.

``RAGTUNE_PDL``: ``auto`` (default: on for ``FastDecoder``'s decode step on a GPU of compute
capability >= 9.0: its compiled kernels and the ragtune kernels captured in its CUDA graph)
or ``off``. Prompts and the continuous batcher's steps launch plainly either way.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from typing import Any

import torch

ENV = "RAGTUNE_PDL"
MODES = ("auto", "off")
# set while the decode step's kernels are launched (warm-up and CUDA graph capture)
_in_step: contextvars.ContextVar[bool] = contextvars.ContextVar("ragtune_pdl", default=False)


def enabled(device: torch.device) -> bool:
    """Whether the decode step on ``device`` launches with PDL (never off CUDA, below compute
    capability 9.0, or in Triton's interpreter)."""
    mode = os.environ.get(ENV, "auto").lower()
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r}: use one of {', '.join(MODES)}")
    if mode == "off" or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


@contextlib.contextmanager
def decode_step(device: torch.device, compiled: bool) -> Iterator[None]:
    """ragtune's kernels launched (or captured) inside go early where ``enabled(device)`` and
    the step is ``compiled`` with ``inductor_options`` (alone they cost more than they save)."""
    token = _in_step.set(compiled and enabled(device))
    try:
        yield
    finally:
        _in_step.reset(token)


def launch_options() -> dict[str, Any]:
    """Extra Triton launch arguments for a ragtune kernel launched now: the kernels' ``PDL``
    switch and Triton's ``launch_pdl`` inside ``decode_step``, nothing outside."""
    return {"PDL": True, "launch_pdl": True} if _in_step.get() else {}


def inductor_options(device: torch.device) -> dict[str, Any]:
    """``torch.compile`` options for the decode step: inductor's kernels with PDL as well."""
    return {"triton.enable_pdl": True} if enabled(device) else {}
