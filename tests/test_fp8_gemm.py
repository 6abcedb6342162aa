"""Which FP8 kernel a projection's small inputs take (ragtune/fp8_gemm.py): the setting file, the
modes, the fallback to ``_scaled_mm``, and ``Fp8Linear``'s routing by row count. CPU only: the
op's CPU kernel emulates the Triton kernel's split arithmetic (tests/test_gpu.py runs the real
one)."""

from __future__ import annotations

import json

import pytest
import torch

from ragtune import fp8_gemm
from ragtune.fp8_gemm import Fp8GemmConfig, Fp8GemmError, choose, default_config, plan, read_table
from ragtune.fp8weights import Fp8Linear, quantize_rows

HOPPER, ADA = (9, 0), (8, 9)


def _write(tmp_path, entries) -> str:  # noqa: ANN001
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"gpu": "test", "small": entries}))
    return str(path)


def test_the_setting_file_picks_per_shape_and_false_keeps_scaled_mm(tmp_path, monkeypatch):
    monkeypatch.delenv(fp8_gemm.MODE_ENV, raising=False)
    cfg = {"block_n": 128, "block_k": 256, "split": 4, "num_warps": 4, "stages": 3}
    table = read_table(
        _write(
            tmp_path,
            [
                {"out": 6144, "in": 5120, "use": True, "config": cfg},
                {"out": 5120, "in": 4096, "use": False, "config": cfg},
            ],
        )
    )
    assert choose(6144, 5120, table, HOPPER) == [128, 256, 4, 4, 3]
    assert choose(5120, 4096, table, HOPPER) is None  # _scaled_mm measured faster
    # a shape the file does not list: the default setting on Hopper, _scaled_mm elsewhere
    assert choose(5120, 14336, table, HOPPER) == default_config(5120, 14336).as_list()
    assert choose(5120, 14336, table, ADA) is None
    monkeypatch.setenv(fp8_gemm.MODE_ENV, "on")
    assert choose(5120, 4096, table, ADA) == default_config(5120, 4096).as_list()
    monkeypatch.setenv(fp8_gemm.MODE_ENV, "off")
    assert choose(6144, 5120, table, HOPPER) is None
    monkeypatch.setenv(fp8_gemm.MODE_ENV, "fast")
    with pytest.raises(Fp8GemmError, match=fp8_gemm.MODE_ENV):
        choose(6144, 5120, table, HOPPER)


def test_a_setting_that_cannot_tile_its_shape_fails_when_the_file_is_read(tmp_path):
    bad = {"block_n": 64, "block_k": 256, "split": 8, "num_warps": 4, "stages": 3}
    with pytest.raises(Fp8GemmError, match="split x block_k"):
        read_table(_write(tmp_path, [{"out": 6144, "in": 5120, "config": bad}]))  # 5120 % 2048
    with pytest.raises(Fp8GemmError, match="block_n"):
        plan(6144 + 32, 5120, Fp8GemmConfig(block_n=64))
    with pytest.raises(Fp8GemmError, match="power of two"):
        plan(6144, 5120, Fp8GemmConfig(block_k=96))
    assert plan(6144, 5120, Fp8GemmConfig(block_n=64, block_k=128, split=8)) == 96


@pytest.mark.parametrize("shape", [(6144, 5120), (5120, 4096), (28672, 5120), (5120, 14336)])
def test_default_and_packaged_settings_tile_the_12b_shapes(shape):
    n, k = shape
    cfg = default_config(n, k)
    assert cfg is not None and plan(n, k, cfg) * cfg.split >= 132  # every SM has a program
    packaged = fp8_gemm.CONFIG_DIR / "nvidia_h200.json"
    if packaged.is_file():
        table = read_table(packaged)  # (raises if an entry cannot tile its shape)
        assert shape in table


def test_small_inputs_take_the_small_kernel_and_prompts_do_not(monkeypatch):
    """Inputs of <= SMALL_ROWS rows go through the op (its CPU kernel emulates the kernel's
    split sums), larger ones through the other path; both are the same product."""
    torch.manual_seed(3)
    w = torch.randn(256, 512) * 0.05
    lin = Fp8Linear(*quantize_rows(w), torch.bfloat16, "reference")
    assert lin.small is None  # on CPU nothing picks the kernel
    lin.small = Fp8GemmConfig(block_n=64, block_k=128, split=4).as_list()
    calls = []
    real = fp8_gemm.emulate

    def counting(*args):  # noqa: ANN002, ANN202
        calls.append(args[0].shape[0])
        return real(*args)

    monkeypatch.setattr(fp8_gemm, "emulate", counting)
    x = torch.randn(fp8_gemm.SMALL_ROWS + 1, 1, 512, dtype=torch.bfloat16)
    with torch.inference_mode():
        small = lin(x[: fp8_gemm.SMALL_ROWS])
        big = lin(x)
        alone = lin(x[5:6])
    assert calls == [fp8_gemm.SMALL_ROWS, 1]
    assert small.shape == (fp8_gemm.SMALL_ROWS, 1, 256) and small.dtype == torch.bfloat16
    err = (small.float() - big[: fp8_gemm.SMALL_ROWS].float()).norm() / big.float().norm()
    assert err < 1e-2  # the same e4m3 product, summed in another order
    assert torch.equal(alone[0], small[5])  # a row's result is its own
