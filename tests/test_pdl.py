"""ragtune.pdl: which launches go early, and that the decode step's launchers and compile ask
for it (the bitwise check of early launches runs on the GPU: tests/test_gpu.py)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from ragtune import decode_attention, int4_gemv, pdl

CUDA = torch.device("cuda", 0)


@pytest.fixture
def hopper(monkeypatch):
    monkeypatch.delenv(pdl.ENV, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


def test_auto_on_hopper_only_never_on_cpu_off_or_in_the_interpreter(hopper, monkeypatch):
    assert pdl.enabled(CUDA) and pdl.inductor_options(CUDA) == {"triton.enable_pdl": True}
    assert not pdl.enabled(torch.device("cpu")) and pdl.inductor_options(torch.device("cpu")) == {}
    monkeypatch.setenv(pdl.ENV, "off")
    assert not pdl.enabled(CUDA)
    monkeypatch.setenv(pdl.ENV, "auto")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not pdl.enabled(CUDA)  # griddepcontrol needs sm_90
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # PTX: the interpreter cannot run it
    assert not pdl.enabled(CUDA)


def test_a_bad_switch_is_one_line_naming_it(monkeypatch):
    monkeypatch.setenv(pdl.ENV, "yes")
    with pytest.raises(ValueError, match="RAGTUNE_PDL='yes'"):
        pdl.enabled(CUDA)


def test_early_launches_only_inside_a_compiled_decode_step(hopper):
    assert pdl.launch_options() == {}
    with pdl.decode_step(CUDA, compiled=False):  # alone among plain kernels: slower
        assert pdl.launch_options() == {}
    with pytest.raises(RuntimeError), pdl.decode_step(CUDA, compiled=True):
        assert pdl.launch_options() == {"PDL": True, "launch_pdl": True}
        raise RuntimeError
    assert pdl.launch_options() == {}


def test_inductors_option_exists():
    """A renamed inductor option would turn the decode step's PDL off without a word."""
    assert "triton.enable_pdl" in torch._inductor.list_options()


class _Recorder:
    """Stands in for a Triton kernel: records the launch's keyword arguments."""

    def __init__(self):
        self.kwargs: list[dict] = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.kwargs.append(kw)


def test_both_launchers_pass_the_decode_steps_options(hopper, monkeypatch):
    """Kernel modules stood in for (no Triton needed): what each launcher hands Triton."""
    import ragtune

    gemv, attention = _Recorder(), _Recorder()
    stand_ins = {
        "int4_gemv_kernel": SimpleNamespace(
            w4a16_gemv_kernel=None, w4a16_gemv_block_kernel=None, w4a16_gemv_denorm_kernel=gemv
        ),
        "decode_attention_kernel": SimpleNamespace(decode_attention_kernel=attention),
    }
    for name, module in stand_ins.items():
        monkeypatch.setitem(sys.modules, f"ragtune.{name}", module)
        monkeypatch.setattr(ragtune, name, module, raising=False)
    x = torch.randn(1, 128)
    packed = (torch.zeros(16, 64, dtype=torch.int32), torch.ones(2, 64), torch.zeros(2, 64))
    q, k, v = torch.randn(1, 4, 16), torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    seen = torch.ones(1, 64, dtype=torch.bool)
    for compiled in (False, True):
        with pdl.decode_step(CUDA, compiled):
            int4_gemv.launch(x, *packed, int4_gemv.GemvConfig(64, 2, 1, 4, 1, 2))
            decode_attention.launch(q, k, v, seen, 0.25)
    for calls in (gemv.kwargs, attention.kwargs):
        assert "launch_pdl" not in calls[0] and "PDL" not in calls[0]
        assert calls[1]["launch_pdl"] is True and calls[1]["PDL"] is True


def test_the_decoders_compiled_step_asks_inductor_for_pdl(tiny_lm_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragtune.fastdecode import FastDecoder

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_path, use_safetensors=True).eval()
    tok = AutoTokenizer.from_pretrained(tiny_lm_path)
    asked: list[dict] = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: asked.append(kw) or fn)
    monkeypatch.setattr(pdl, "enabled", lambda device: True)
    FastDecoder(model, tok, max_seq_len=32, compile=True)
    monkeypatch.setattr(pdl, "enabled", lambda device: False)
    FastDecoder(model, tok, max_seq_len=32, compile=True)
    assert [kw.get("options") for kw in asked] == [{"triton.enable_pdl": True}, {}]
