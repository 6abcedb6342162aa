"""Programmatic dependent launch (PDL) for ragtune's decode kernels (Hopper and later).

Why: a batch-1 decode step is ~300 kernels of a few microseconds, each waiting for the one
before to finish and for its own launch. Launched with PDL (``launch_pdl``, CUDA's
programmatic stream serialization), the int4 GEMV and the decode attention start while the
kernel before them still runs, touch only what no kernel of the step writes (the attention:
earlier steps' KV cache), then wait (``griddepcontrol.wait``) for the kernel before to
complete before reading its output or writing anything; at level 2 they also let the next
kernel launch at once (``griddepcontrol.launch_dependents``).
The results are bit for bit those of a plain launch (same arithmetic, same order).

``RAGTUNE_PDL`` (read at each launch: a CUDA graph keeps what was on when it was captured):
``off`` (default until measured: docs/benchmarks.md); ``on`` (both kernels, each letting the
next launch at once); ``gemv`` (the GEMV alone); ``on-wait`` / ``gemv-wait`` (launched early,
but the next kernel launches only when this one ends).
"""

from __future__ import annotations

import os

import torch

ENV = "RAGTUNE_PDL"
KERNELS = ("gemv", "attention")
# mode -> (GEMV level, attention level); a level is the kernels' PDL constexpr: 0 a plain
# launch, 1 launched early (waits before reading), 2 that and the next kernel launched at once
MODES = {
    "off": (0, 0),
    "on": (2, 2),
    "gemv": (2, 0),
    "on-wait": (1, 1),
    "gemv-wait": (1, 0),
}


def level(device: torch.device, kernel: str) -> int:
    """The PDL level (0, 1, 2) for ``kernel`` ("gemv" or "attention") launched on ``device``:
    0 off CUDA, below compute capability 9.0 and in Triton's interpreter."""
    mode = os.environ.get(ENV, "off").lower()
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r}: use one of {', '.join(MODES)}")
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return 0
    if torch.cuda.get_device_capability(device)[0] < 9:
        return 0
    return MODES[mode][KERNELS.index(kernel)]
