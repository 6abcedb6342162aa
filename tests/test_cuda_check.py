"""The optional GPU kernel paths say in one line why they cannot run."""

from __future__ import annotations

import torch

from ragtune.cuda_check import cuda_unavailable_for


def test_no_gpu_is_the_reason_on_a_cpu_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda_unavailable_for("json") == "no CUDA GPU"


def test_a_missing_kernel_library_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cuda_unavailable_for("json") is None
    reason = cuda_unavailable_for("ragtune_no_such_kernels")
    assert reason is not None and reason.startswith("ragtune_no_such_kernels does not import")
