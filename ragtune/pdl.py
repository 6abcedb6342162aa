"""Programmatic dependent launch (PDL) for ragtune's decode kernels (Hopper and later).

Why: a batch-1 decode step is ~300 kernels of a few microseconds, each waiting for the one
before to finish and for its own launch. Launched with PDL (``launch_pdl``, CUDA's
programmatic stream serialization), the int4 GEMV and the decode attention start while the
kernel before them still runs, touch only what no kernel of the step writes (the GEMV's
weights, earlier steps' KV cache), then wait (``griddepcontrol.wait``) for the kernel before
to complete before reading its output or writing anything. They also let the next kernel
launch at once (``griddepcontrol.launch_dependents``): q|k|v -> attention -> o run overlapped.
The results are bit for bit those of a plain launch (same arithmetic, same order).

``RAGTUNE_PDL`` (read at each launch: a CUDA graph keeps what was on when it was captured):
``off`` (default until measured: docs/benchmarks.md), ``on``, ``prefetch`` (``on``, and each GEMV
program sends its first step's weights to L2 before the wait).
"""

from __future__ import annotations

import os

import torch

ENV = "RAGTUNE_PDL"
LEVELS = {"off": 0, "on": 1, "prefetch": 2}


def level(device: torch.device) -> int:
    """0 (plain launches), 1 (PDL) or 2 (PDL with the GEMV's L2 prefetch) for kernels on
    ``device``: 0 off CUDA, below compute capability 9.0 and in Triton's interpreter."""
    mode = os.environ.get(ENV, "off").lower()
    if mode not in LEVELS:
        raise ValueError(f"{ENV}={mode!r}: use one of {', '.join(LEVELS)}")
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return 0
    return LEVELS[mode] if torch.cuda.get_device_capability(device)[0] >= 9 else 0
