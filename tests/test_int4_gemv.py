"""ragtune's batch-1 int4 GEMV (ragtune/int4_gemv.py): layout, tiling, split-K, routing (CPU).

The kernel itself runs on a GPU (tests/test_gpu.py) or, where Triton is installed, in Triton's
interpreter on CPU tensors (last test). Without Triton, ``emulate`` (the kernel's tiles, splits,
group rows, word offsets and float tricks in PyTorch) checks the same indexing on gemlite's
packed layout, so a change of ``pack_int4`` or of the tiling breaks a test here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ragtune import int4_gemv
from ragtune.fastweights import pack_int4, quantize_rtn
from ragtune.int4_gemv import GemvConfig, GemvError, default_config, emulate, plan

ROOT = Path(__file__).resolve().parents[1]
# (out, in, setting): ragged tiles, every split, 1-4 group rows, one program per tile or many
CASES = [
    (200, 512, GemvConfig(64, 2, 2)),
    (384, 256, GemvConfig(128, 4, 1)),
    (96, 768, GemvConfig(32, 1, 4)),
    (130, 384, GemvConfig(64, 2, 3)),
    (200, 512, GemvConfig(64, 2, 2, block=1)),  # the block kernel: the same cases
    (96, 768, GemvConfig(32, 1, 4, block=1)),
    (130, 384, GemvConfig(64, 2, 3, block=1)),
    (200, 512, GemvConfig(64, 2, 2, block=2)),  # the denormal kernel: the same cases
    (96, 768, GemvConfig(32, 1, 4, block=2)),
    (130, 384, GemvConfig(64, 2, 3, block=2)),
    (384, 256, GemvConfig(128, 4, 1, block=2)),
    (130, 1024, GemvConfig(64, 1, 16, block=2)),  # more splits than 8 (MAX_SPLIT)
]


def packed(n: int, k: int, seed: int = 0):
    """gemlite's tensors for random weights: [k/8, n] words, [k/64, n] scales and shifts, and
    the float64 weights [n, k] they stand for (q * scale + shift, shift rounded to bf16)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.02).bfloat16()
    q, scale, zero = quantize_rtn(w, 64)
    shift = (-zero.float() * scale.float()).bfloat16()
    dense = q.double().view(n, k // 64, 64) * scale.double()[..., None] + shift.double()[..., None]
    return pack_int4(q), scale.t().contiguous(), shift.t().contiguous(), dense.view(n, k)


@pytest.mark.parametrize("n,k,cfg", CASES)
def test_emulated_kernel_equals_the_int4_product(n, k, cfg):
    w_q, scales, shifts, dense = packed(n, k)
    x = torch.randn(1, 1, k)
    got = emulate(x, w_q, scales, shifts, cfg).double().view(-1)
    ref = x.double().view(-1) @ dense.T
    assert got.shape == (n,)
    # float32 sums against float64: a wrong word, nibble, group or split is ~100% off
    assert float((got - ref).norm() / ref.norm()) < 1e-6


def test_plan_names_what_does_not_tile():
    assert plan(6144, 5120, 64, GemvConfig(128, 4, 4)) == (48, 20)
    with pytest.raises(GemvError, match="split 3"):
        plan(5120, 4096, 64, GemvConfig(128, 4, 3))  # 64 groups
    with pytest.raises(GemvError, match="rows 8"):
        plan(5120, 5120, 64, GemvConfig(128, 8, 4))  # 20 groups a split
    with pytest.raises(GemvError, match="power of two"):
        plan(5120, 5120, 64, GemvConfig(96, 4, 1))
    with pytest.raises(GemvError, match="multiple of the group"):
        plan(5120, 5100, 64, GemvConfig(128, 4, 1))


@pytest.mark.parametrize(
    "n,k", [(6144, 5120), (5120, 4096), (28672, 5120), (5120, 14336), (131072, 5120), (512, 256)]
)
def test_default_setting_tiles_the_12b_and_test_shapes(n, k):
    cfg = default_config(n, k, 64, sms=132)
    tiles, _ = plan(n, k, 64, cfg)  # raises if it does not tile
    assert tiles * cfg.split >= 132 or n < 132 * 64  # a 12B projection fills the H200


def test_the_tuned_file_routes_each_shape(tmp_path, monkeypatch):
    """The file's "gemv" list: a setting where this kernel won, gemlite where it lost;
    RAGTUNE_INT4_GEMV overrides; a setting that cannot tile fails when the file is read."""
    monkeypatch.setattr(int4_gemv, "gemv_unavailable", lambda: None)
    entry = {"out": 5120, "in": 4096, "group": 64, "config": {"block_n": 64, "rows": 2}}
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"gemv": [entry, {**entry, "out": 6144, "use": False}]}))
    table = int4_gemv.read_table(path)
    monkeypatch.delenv(int4_gemv.GEMV_ENV, raising=False)
    assert int4_gemv.choose(5120, 4096, 64, table) == [64, 2, 1, 4, 1, 0]
    assert int4_gemv.choose(6144, 4096, 64, table) is None  # gemlite measured faster
    assert int4_gemv.choose(512, 256, 64, table) == default_config(512, 256, 64).as_list()
    monkeypatch.setenv(int4_gemv.GEMV_ENV, "on")
    assert int4_gemv.choose(6144, 4096, 64, table) == default_config(6144, 4096, 64).as_list()
    monkeypatch.setenv(int4_gemv.GEMV_ENV, "off")
    assert int4_gemv.choose(5120, 4096, 64, table) is None
    monkeypatch.setenv(int4_gemv.GEMV_ENV, "fast")
    with pytest.raises(GemvError, match="RAGTUNE_INT4_GEMV"):
        int4_gemv.choose(5120, 4096, 64, table)
    path.write_text(json.dumps({"gemv": [{**entry, "config": {"block_n": 64, "rows": 128}}]}))
    with pytest.raises(GemvError, match="rows 128"):
        int4_gemv.read_table(path)


def test_the_packaged_file_lists_valid_settings():
    from ragtune.fastweights import CONFIG_DIR

    for path in CONFIG_DIR.glob("*.json"):
        int4_gemv.read_table(path)  # raises on a setting that cannot tile its shape


def test_the_kernel_in_tritons_interpreter():
    """The Triton kernel itself, run by Triton's interpreter on CPU tensors (skipped where
    Triton is not installed): equal to the float64 product, every output written, split
    counters back at zero (the next call needs no memset), calls bitwise repeatable."""
    pytest.importorskip("triton")
    script = textwrap.dedent(
        """
        import torch
        from ragtune import int4_gemv
        from tests.test_int4_gemv import CASES, packed
        for n, k, cfg in CASES:
            w_q, scales, shifts, dense = packed(n, k, seed=1)
            x = torch.randn(1, 1, k)
            out = torch.full((1, 1, n), float("nan"))
            int4_gemv.launch(x, w_q, scales, shifts, cfg, out=out)
            ref = x.double().view(-1) @ dense.T
            err = float((out.double().view(-1) - ref).norm() / ref.norm())
            assert err < 1e-6, (n, k, cfg, err)
            again = int4_gemv.launch(x, w_q, scales, shifts, cfg)
            assert torch.equal(out, again), (n, k, cfg)
            if cfg.split > 1:
                _, counters = int4_gemv.workspace(n, cfg, x.device)
                assert int(counters.abs().sum()) == 0, counters
        print("ok")
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
