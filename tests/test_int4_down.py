"""down(SiLU(gate) * up) as one int4 GEMV (ragtune/int4_down.py, ``RAGTUNE_FUSED_DOWN=on``).

On CPU: the op's reference path and, where Triton is installed, the fused Triton kernel in
Triton's interpreter, both against a float64 product; the decoder's tokens with the switch
on are in tests/test_fastdecode.py, the kernel on the GPU (12B shape, CUDA graph) in
tests/test_gpu.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_int4_gemv import packed  # tests/ is on sys.path (no __init__.py)

from ragtune import int4_down
from ragtune.int4_gemv import GemvConfig, GemvError

ROOT = Path(__file__).resolve().parents[1]
# (out, in, setting of the denormal kernel): ragged tiles, splits, 1-4 group rows
CASES = [
    (200, 512, GemvConfig(64, 2, 2, block=2)),
    (96, 768, GemvConfig(32, 1, 4, block=2)),
    (130, 384, GemvConfig(64, 2, 3, block=2)),
    (384, 256, GemvConfig(128, 4, 1, block=2)),
]


def gate_up_row(k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A gate|up row [1, 1, 2k]: gate spread over SiLU's bend, up of either sign."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 1, 2 * k, generator=g) * 2).to(dtype)


def float64_down(gate_up: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """down(SiLU(gate) * up) in float64, [n]."""
    gate, up = gate_up.double().view(-1).chunk(2)
    return (gate * torch.sigmoid(gate) * up) @ dense.T


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().view(-1) - b).norm() / b.norm())


@pytest.mark.parametrize("n,k", [(200, 512), (130, 384)])
def test_the_ops_reference_path_equals_the_float64_product(n, k):
    """Off CUDA the op computes ``reference``: float32 inputs to float32 sums; bf16 ones with
    the activation and the weights rounded to bf16 as the reference kernel's F.linear."""
    w_q, scales, shifts, dense = packed(n, k)
    gu = gate_up_row(k, torch.float32)
    got = torch.ops.ragtune.int4_gemv_silu_mul(gu, w_q, scales, shifts, [])
    assert got.shape == (1, 1, n) and got.dtype == torch.float32
    # dense holds the bf16-rounded shift; the reference rounds nothing else in float32
    assert rel(got, float64_down(gu, dense)) < 1e-6
    gu16 = gu.bfloat16()
    got16 = torch.ops.ragtune.int4_gemv_silu_mul(gu16, w_q, scales, shifts, [])
    assert got16.dtype == torch.bfloat16
    # bf16: the activation, the weights and the output each rounded once (~2**-9 relative)
    assert rel(got16, float64_down(gu16, dense)) < 1e-2
    x = int4_down.silu_mul(gu16)  # the rounded activation itself
    gate, up = gu16.float().chunk(2, dim=-1)
    assert torch.equal(x, (torch.nn.functional.silu(gate) * up).bfloat16())


def test_the_switch_and_which_layers_take_the_fusion(monkeypatch):
    monkeypatch.delenv(int4_down.FUSED_DOWN_ENV, raising=False)
    denorm = GemvConfig(64, 16, 7, block=2).as_list()
    assert int4_down.fused_setting(denorm, "gemlite") is None  # off by default
    monkeypatch.setenv(int4_down.FUSED_DOWN_ENV, "on")  # staged
    assert int4_down.fused_setting(denorm, "gemlite") == [*denorm, 1]
    assert int4_down.fused_setting(GemvConfig(64, 4, 1, block=0).as_list(), "gemlite") is None
    assert int4_down.fused_setting(None, "gemlite") is None  # gemlite's one-row kernel
    assert int4_down.fused_setting(None, "reference") == []
    monkeypatch.setenv(int4_down.FUSED_DOWN_ENV, "inline")
    assert int4_down.fused_setting(denorm, "gemlite") == [*denorm, 0]
    monkeypatch.setenv(int4_down.FUSED_DOWN_ENV, "yes")
    with pytest.raises(GemvError, match=int4_down.FUSED_DOWN_ENV):
        int4_down.fused_setting(denorm, "gemlite")


def test_the_fused_kernel_in_tritons_interpreter():
    """The fused Triton kernel, run by Triton's interpreter on CPU tensors (skipped where Triton
    is not installed): float32 rows equal the float64 down(SiLU(gate) * up) to float32 sums;
    16-bit rows round the activation where the unfused step does (``silu_mul``): the output
    equals the unfused kernel's on ``silu_mul``'s vector bitwise and the float64 product of
    that vector to the output's rounding. float16, not bf16: the interpreter (numpy) rounds
    bf16 by truncation, the GPU to nearest (tests/test_gpu.py checks bf16). Every output
    written, split counters back at zero; the same for the staged kernel (the activation
    once a program through a scratch vector)."""
    pytest.importorskip("triton")
    script = textwrap.dedent(
        """
        import torch
        from ragtune import int4_down, int4_gemv
        from tests.test_int4_down import CASES, float64_down, gate_up_row, rel
        from tests.test_int4_gemv import packed
        for (n, k, cfg), staged in [(c, s) for c in CASES for s in (False, True)]:
            w_q, scales, shifts, dense = packed(n, k, seed=1)
            gu = gate_up_row(k, torch.float32, seed=2)
            out = torch.full((1, 1, n), float("nan"))
            for dtype in (torch.float32, torch.float16):  # stale scratch values would show
                int4_down.scratch(k, dtype, gu.device).fill_(float("nan"))
            int4_down.launch(gu, w_q, scales, shifts, cfg, staged, out=out)
            err = rel(out, float64_down(gu, dense))
            assert err < 1e-6, (n, k, cfg, err)
            gu16 = gu.half()
            int4_down.scratch(k, torch.float16, gu.device).fill_(float("nan"))
            got = int4_down.launch(gu16, w_q, scales, shifts, cfg, staged)
            x = int4_down.silu_mul(gu16)
            err16 = rel(got, x.double().view(-1) @ dense.T)
            assert err16 < 1e-3, (n, k, cfg, err16)  # the float16 output's rounding only
            unfused = int4_gemv.launch(x, w_q, scales, shifts, cfg)
            assert torch.equal(got, unfused), (n, k, cfg, rel(got, unfused.double().view(-1)))
            if cfg.split > 1:
                _, counters = int4_gemv.workspace(n, cfg, gu.device)
                assert int(counters.abs().sum()) == 0, counters
            print(n, k, staged, err, err16)
        print("ok")
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_the_default_kernel_keeps_its_name_and_parameters(tmp_path, monkeypatch):
    """One body serves the plain and the fused GEMV (the denormal kernel's ``ACT``): compiled
    for sm_90 on CPU (bench/int4_gemv_sass.py, Triton's bundled ptxas; skipped without Triton),
    ACT 0 keeps the kernel's name and its parameters (no scratch pointer), the fused ways get
    their own name (profiles tell ``down`` apart) and staged one pointer more. That ACT 0
    compiles to the same SASS as before is ``bench/int4_gemv_sass.py --dump`` (docs)."""
    pytest.importorskip("triton")
    import importlib.util

    # a fresh cache: Triton's cache key leaves out the name function (``_denorm_name``)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    spec = importlib.util.spec_from_file_location("sass", ROOT / "bench" / "int4_gemv_sass.py")
    assert spec and spec.loader
    sass = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sass)

    def entry(way: str) -> tuple[str, int]:
        ptx = sass.compile_sm90(f"w4a16_gemv_denorm_kernel{way}", 64, 2, 2, 4, 512)[1]
        name = ptx.split(".visible .entry ")[1].split("(")[0]
        return name, ptx.count(f"{name}_param_")  # declared, plus one per ld.param

    plain, inline, staged = entry(""), entry(":inline"), entry(":staged")
    assert plain[0] == "w4a16_gemv_denorm_kernel"
    assert inline[0] == staged[0] == "w4a16_gemv_silu_denorm_kernel"
    assert staged[1] > inline[1] == plain[1]
