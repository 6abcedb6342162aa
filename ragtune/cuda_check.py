"""Can a GPU kernel library run here? One answer for every optional kernel path."""

from __future__ import annotations

import importlib

import torch


def cuda_unavailable_for(module: str) -> str | None:
    """Why ``module``'s CUDA kernels cannot run here (no GPU, or it does not import), or None."""
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    try:
        importlib.import_module(module)
    except ImportError as e:
        return f"{module} does not import ({e})"
    return None
