"""ragtune::decode_attention (ragtune/decode_attention.py): the reference path, the chunking,
and the Triton kernel in Triton's interpreter on CPU tensors (skipped where Triton is not
installed; on a GPU: tests/test_gpu.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ragtune import decode_attention as da

ROOT = Path(__file__).resolve().parents[1]
# (rows, query heads, KV heads, head dim, slots attended, cache slots, dtype): GQA groups of
# 1-4, one and several chunks, ragged last blocks, a row whose first 70 slots are padding
CASES = [
    (1, 8, 2, 32, 200, 256, torch.float32),
    (2, 4, 2, 16, 100, 128, torch.float32),
    (3, 6, 2, 16, 5, 64, torch.float32),
    (1, 4, 4, 64, 1100, 1152, torch.float32),  # PER = 2: two blocks a program
    (1, 32, 8, 128, 768, 1024, torch.bfloat16),  # the 12B shape at its bucket
]


def inputs(b, h, hkv, d, n, s, dtype, seed=0):
    """q [b, h, d], views K/V [b, hkv, n, d] of a longer cache, seen [b, n] (slot 0 and the
    last always seen; row 1 left-padded)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, d, generator=g).to(dtype)
    kc = torch.randn(b, hkv, s, d, generator=g).to(dtype)
    vc = torch.randn(b, hkv, s, d, generator=g).to(dtype)
    seen = torch.rand(b, n, generator=g) < 0.8
    seen[:, -1] = True
    seen[:, 0] = True
    if b > 1:
        seen[1, : min(n - 1, 70)] = False
    return q, kc[:, :, :n], vc[:, :, :n], seen


def rope_tables(b, d, s, dtype, seed=0):
    """(cos, sin, pos): transformers-style tables over s positions, a position per row."""
    g = torch.Generator().manual_seed(seed)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    ang = torch.arange(s).float()[:, None] * inv[None, :]
    emb = torch.cat((ang, ang), -1)
    return emb.cos().to(dtype), emb.sin().to(dtype), torch.randint(0, s, (b,), generator=g)


def g_rows(case):
    """Rows the kernel's workspace keeps a KV head: its query heads rounded up to a power of 2."""
    g = case[1] // case[2]
    return 1 << (g - 1).bit_length()


def exact(q, k, v, seen, scale):
    """Float64 attention with K/V repeated per query head (transformers' repeat_kv)."""
    g = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(g, 1)
    vv = v.double().repeat_interleave(g, 1)
    s = torch.einsum("bhd,bhnd->bhn", q.double(), kk) * scale
    s = s.masked_fill(~seen[:, None, :], float("-inf"))
    return torch.einsum("bhn,bhnd->bhd", torch.softmax(s, -1), vv)


@pytest.mark.parametrize("case", CASES[:4])
def test_reference_is_grouped_query_attention(case):
    q, k, v, seen = inputs(*case)
    scale = case[3] ** -0.5
    got = da.reference(q, k, v, seen, scale).double()
    want = exact(q, k, v, seen, scale)
    assert float((got - want).norm() / want.norm()) < 1e-5


def test_reference_rope_is_the_decode_steps_rotation():
    """The q rotation the kernel takes over = DirectStack's (transformers') RoPE, in float32."""
    from ragtune.decodestep import _rotate_half

    q, _, _, _ = inputs(*CASES[1])
    cos, sin, pos = rope_tables(2, 16, 128, torch.float32)
    c, s = cos[pos][:, None, :], sin[pos][:, None, :]
    assert torch.equal(da.rotate(q, cos, sin, pos), q * c + _rotate_half(q) * s)


def test_the_op_on_cpu_is_the_reference():
    q, k, v, seen = inputs(*CASES[0])
    got = torch.ops.ragtune.decode_attention(q, k, v, seen, 0.25)
    assert torch.equal(got, da.reference(q, k, v, seen, 0.25))


@pytest.mark.parametrize("n", [1, 63, 64, 65, 768, 1024, 1100, 2048, 4096])
def test_chunking_covers_the_slots_without_empty_programs(n):
    for rows in (0, 8, 256, 4096):  # (row, KV head) pairs; 0: as at batch 1
        per, chunks = da.chunking(n, rows)
        assert 1 <= chunks <= da.MAX_CHUNKS
        assert per * chunks * da.BLOCK_S >= n  # every slot read
        assert (chunks - 1) * per * da.BLOCK_S < n  # the last program has a slot to read
        assert rows * chunks <= max(da.MANY_PROGRAMS, rows) or chunks == da.MAX_CHUNKS
    assert da.chunking(n, 0) == da.chunking(n)


def test_mode_off_or_a_bad_setting(monkeypatch):
    q, k, _, _ = inputs(*CASES[0])
    monkeypatch.setattr(da, "MODE", "off")
    assert da.kernel_unsupported(q, k) == f"{da.ENV}=off"
    monkeypatch.setattr(da, "MODE", "fast")
    with pytest.raises(ValueError, match=da.ENV):
        da.kernel_unsupported(q, k)


def _interpret(script: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_the_kernel_in_tritons_interpreter():
    """The kernel equals float64 attention (float32: to float32 rounding; bf16: to the output's
    rounding), calls are bitwise repeatable, every (row, head) counter is back at zero."""
    pytest.importorskip("triton")
    _interpret(
        """
        import torch
        from ragtune import decode_attention as da
        from tests.test_decode_attention import CASES, exact, g_rows, inputs, rope_tables
        for i, case in enumerate(CASES):
            q, k, v, seen = inputs(*case, seed=1)
            scale = case[3] ** -0.5
            assert da.kernel_unsupported(q, k) is None
            out = torch.ops.ragtune.decode_attention(q, k, v, seen, scale)
            want = exact(q, k, v, seen, scale)
            err = float((out.double() - want).norm() / want.norm())
            assert err < (1e-6 if case[-1] == torch.float32 else 8e-3), (case, err)
            assert torch.equal(out, da.launch(q, k, v, seen, scale)), case
            ws = da._workspaces[(str(q.device), case[0] * case[2], g_rows(case), case[3], da.MAX_CHUNKS)]
            assert int(ws[2].abs().sum()) == 0, ws[2]
            # q rotated in the kernel; q a strided view (as the q|k|v output); case 3: two blocks
            # a program, the step's slot in its chunk's second block
            if i in (1, 3, 4):
                b, h, _, d = case[:4]
                wide = torch.randn(b, h * d + 64).to(case[-1])
                qv = wide[:, 32 : 32 + h * d].view(b, h, d)
                cos, sin, pos = rope_tables(b, d, 4096, case[-1], seed=i)
                out = torch.ops.ragtune.decode_attention(qv, k, v, seen, scale, cos, sin, pos)
                want = exact(da.rotate(qv, cos, sin, pos), k, v, seen, scale)
                err = float((out.double() - want).norm() / want.norm())
                assert err < (1e-6 if case[-1] == torch.float32 else 8e-3), (case, err)
                # this step's K/V written by the kernel: the slot's chunk is not the first
                kn = wide[:, : k.shape[1] * d].view(b, -1, d)
                vn = wide[:, 64 : 64 + k.shape[1] * d].view(b, -1, d)
                slot = torch.tensor([case[4] - 3])
                caches = [(k._base.clone(), v._base.clone()) for _ in range(2)]
                got = torch.ops.ragtune.decode_attention_write(
                    qv, kn, vn, *caches[0], slot, case[4], seen, scale, cos, sin, pos
                )
                da.MODE = "off"  # the reference: torch's rotation, index_copy_ and matmuls
                ref = torch.ops.ragtune.decode_attention_write(
                    qv, kn, vn, *caches[1], slot, case[4], seen, scale, cos, sin, pos
                )
                da.MODE = "auto"
                for a, r in zip(caches[0], caches[1]):
                    assert torch.allclose(a.float(), r.float(), rtol=1e-2, atol=1e-6)
                    assert not torch.equal(a, k._base)  # written
                assert torch.allclose(got.float(), ref.float(), rtol=2e-2, atol=2e-2), case
                want = exact(da.rotate(qv, cos, sin, pos), caches[1][0][:, :, : case[4]],
                             caches[1][1][:, :, : case[4]], seen, scale)
                err = float((got.double() - want).norm() / want.norm())
                assert err < (1e-6 if case[-1] == torch.float32 else 8e-3), (case, err)
        print("ok")
        """
    )


def test_fastdecode_through_the_kernel_keeps_hf_tokens(tiny_lm_path):
    """The fast decoder's steps through the kernel (interpreter, float32 tiny Llama): HF
    generate's tokens at batch 1, and the batched (left-padded) rows equal batch 1."""
    pytest.importorskip("triton")
    _interpret(
        f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from ragtune import decode_attention as da
        from ragtune.fastdecode import FastDecoder
        from tests.test_fastdecode import PROMPTS, slow
        model = AutoModelForCausalLM.from_pretrained({str(tiny_lm_path)!r}).eval()
        tok = AutoTokenizer.from_pretrained({str(tiny_lm_path)!r})
        fd = FastDecoder(model, tok, max_seq_len=160, kv_bucket=32)
        calls = []
        launch = da.launch
        da.launch = lambda *a: calls.append(a[1].shape[2]) or launch(*a)
        eos = tok.eos_token_id
        prompts = [tok(t)["input_ids"] for t in PROMPTS[:3]]
        for ids in prompts:
            assert fd.generate(ids, 10, [eos]) == slow(model, ids, 10, eos)
        assert calls and set(calls) >= {{32, 64}}, sorted(set(calls))  # kernel, two buckets
        got = fd.generate_batch(prompts[:2], 4, [eos])
        for ids, g in zip(prompts, got):
            assert g == fd.generate(ids, 4, [eos])
        print("ok")
        """
    )


def test_the_kernel_with_a_slot_per_row_in_tritons_interpreter():
    """The batcher's rows: each row writes its own slot and sees slots up to it. The kernel
    (interpreter) writes the caches as the reference path does and attends as float64 does; a
    row's output is bitwise the same alone as beside other rows, and NaN past a row's slot
    (slots it must not read) changes nothing; with many rows (here: few programs wanted) a
    program walks several blocks."""
    pytest.importorskip("triton")
    _interpret(
        """
        import torch
        from ragtune import decode_attention as da
        from tests.test_decode_attention import exact, rope_tables
        b, h, hkv, d, s = 3, 8, 2, 32, 256
        g = torch.Generator().manual_seed(7)
        kc, vc = (torch.randn(b, hkv, s, d, generator=g) for _ in range(2))
        q, kn, vn = (torch.randn(b, x, d, generator=g) for x in (h, hkv, hkv))
        cos, sin, _ = rope_tables(b, d, s, torch.float32)
        pos = torch.tensor([5, 130, 255])  # a slot per row: one, several and all chunks
        seen = torch.arange(s)[None, :] <= pos[:, None]
        scale = d**-0.5

        def step(rows, caches):
            return torch.ops.ragtune.decode_attention_write(
                q[rows], kn[rows], vn[rows], *caches, pos[rows], s, seen[rows], scale,
                cos, sin, pos[rows])

        for many in (512, 12):  # 4 chunks of 1 block a row and head; 2 chunks of 2 blocks
            da.MANY_PROGRAMS = many
            assert da.chunking(s, b * hkv) == ((1, 4) if many == 512 else (2, 2))
            caches = [(kc.clone(), vc.clone()) for _ in range(2)]
            got = step(slice(None), caches[0])
            da.MODE = "off"
            ref = step(slice(None), caches[1])
            da.MODE = "auto"
            for a, r in zip(caches[0], caches[1]):
                assert torch.allclose(a, r, rtol=1e-5, atol=1e-6)
                assert not torch.equal(a, kc) and not torch.equal(a, vc)
            want = exact(da.rotate(q, cos, sin, pos), *caches[1], seen, scale)
            err = float((got.double() - want).norm() / want.norm())
            assert err < 1e-6, (many, err)
            assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5)
            for r in range(b):  # alone: the row's own cache row, the same program for it
                if many == 512:  # (alone, one row and head pair wants more chunks)
                    alone = step(slice(r, r + 1), (kc[r : r + 1].clone(), vc[r : r + 1].clone()))
                    assert torch.equal(alone[0], got[r]), r
            dirty = (kc.clone(), vc.clone())
            for r in range(b):
                dirty[0][r, :, pos[r] + 1 :] = float("nan")
                dirty[1][r, :, pos[r] + 1 :] = float("nan")
            assert torch.equal(step(slice(None), dirty), got), many
        print("ok")
        """
    )


def test_the_batchers_rows_through_the_kernel_keep_one_at_a_time_tokens(tiny_lm_path):
    """The continuous batcher's steps through the kernel (``fused_attention``), a slot per row
    (interpreter, float32 tiny Llama, invariant mode: one step size): concurrent requests get the tokens the same
    batcher gives each alone and the fast decoder's (its own kernel calls, one shared slot)."""
    pytest.importorskip("triton")
    _interpret(
        f"""
        import threading
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from ragtune import decode_attention as da
        from ragtune.batching import StepBatcher
        from ragtune.fastdecode import FastDecoder
        from tests.test_fastdecode import PROMPTS
        model = AutoModelForCausalLM.from_pretrained({str(tiny_lm_path)!r}).eval()
        tok = AutoTokenizer.from_pretrained({str(tiny_lm_path)!r})
        fd = FastDecoder(model, tok, max_seq_len=128, compile=False)
        prompts = [tok(t)["input_ids"] for t in PROMPTS[:2]]
        want = [fd.generate(p, 5, []) for p in prompts]
        batcher = StepBatcher(fd, max_batch=2, buckets=(2,), fused_attention=True)
        per_row = []
        launch = da.launch
        da.launch = lambda *a, **k: per_row.append(a[6][2].numel() > 1) or launch(*a, **k)
        try:
            alone = [batcher.generate(p, 5, []) for p in prompts]
            got = [None] * len(prompts)
            def client(i):
                got[i] = batcher.generate(prompts[i], 5, [])
            threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=300)
        finally:
            batcher.close()
        assert any(per_row), "the batcher's steps ran the kernel with a slot per row"
        assert got == alone == want, (got, alone, want)
        print("ok")
        """
    )
