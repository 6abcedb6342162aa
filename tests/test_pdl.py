"""ragtune.pdl: which launches go early (the bitwise GPU check is in tests/test_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from ragtune import pdl


@pytest.mark.parametrize(
    "major,mode,want",
    [
        (9, "on", (2, 2)),
        (9, "gemv", (2, 0)),
        (9, "on-wait", (1, 1)),
        (9, "off", (0, 0)),
        (8, "on", (0, 0)),
    ],
)
def test_levels_need_hopper_and_the_switch(monkeypatch, major, mode, want):
    monkeypatch.setenv(pdl.ENV, mode)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    cuda = torch.device("cuda", 0)
    assert (pdl.level(cuda, "gemv"), pdl.level(cuda, "attention")) == want


def test_off_by_default_never_on_cpu_or_in_the_interpreter(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.delenv(pdl.ENV, raising=False)
    assert pdl.level(torch.device("cuda", 0), "gemv") == 0
    monkeypatch.setenv(pdl.ENV, "on")
    assert pdl.level(torch.device("cpu"), "gemv") == 0
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # griddepcontrol is PTX: no interpreter
    assert pdl.level(torch.device("cuda", 0), "gemv") == 0


def test_a_bad_switch_is_one_line_naming_it(monkeypatch):
    monkeypatch.setenv(pdl.ENV, "yes")
    with pytest.raises(ValueError, match="RAGTUNE_PDL='yes'"):
        pdl.level(torch.device("cpu"), "gemv")
