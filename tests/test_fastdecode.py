"""The fast decode path returns exactly the slow path's greedy tokens (CPU, tiny model).

The compiled (CUDA graph) variant is checked against the same slow path in tests/test_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DIFFERENT_ENDINGS

from ragtune.fastdecode import FastDecodeError, FastDecoder

# Different lengths, and no two end alike: a shared last token hides cache and mask bugs.
PROMPTS = [
    "### Instruction:\nWho built the lighthouse?\n\n### Context:\nThe harbour of Kessa",
    "Hi",
    "The quick brown fox jumps over the lazy dog. " * 6 + "Then the fox",
    *DIFFERENT_ENDINGS,
]


@pytest.fixture(scope="module")
def lm(tiny_lm_path):
    """The untied tiny Llama (conftest): varied tokens that depend on the whole context."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_path, use_safetensors=True).eval()
    return model, AutoTokenizer.from_pretrained(tiny_lm_path)


def slow(model, ids: list[int], n: int, eos, **kw) -> list[int]:
    """HF generate, greedy: the reference."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
            **kw,
        )
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("mode", ["direct", "hf"])
def test_batch1_equals_hf_generate(lm, mode):
    model, tok = lm
    fd = FastDecoder(model, tok, max_seq_len=128, compile=False, mode=mode)
    assert fd.mode == mode
    eos = tok.eos_token_id
    wants = []
    for text in PROMPTS:
        ids = tok(text)["input_ids"]
        wants.append(slow(model, ids, 24, eos))
        got = fd.generate(ids, max_new_tokens=24, eos_ids=[eos])
        assert got == wants[-1], text
    # the cache is reset between requests: the first prompt again gives the same tokens
    assert fd.generate(tok(PROMPTS[0])["input_ids"], 24, [eos]) == wants[0]
    assert fd.last_stats["new_tokens"] >= 1 and fd.last_stats["ttft_s"] > 0


def test_stops_at_eos_and_keeps_it(lm):
    model, tok = lm
    fd = FastDecoder(model, tok, max_seq_len=128, compile=False)
    ids = tok(PROMPTS[0])["input_ids"]
    free = fd.generate(ids, 30, eos_ids=[])
    assert len(free) == 30
    # pretend the 6th generated token is EOS: both paths stop there, keeping it
    stop_id = free[5]
    first = free.index(stop_id)
    got = fd.generate(ids, 30, eos_ids=stop_id)
    assert got == free[: first + 1]
    assert got == slow(model, ids, 30, stop_id)


def test_stop_strings_match_hf(lm):
    model, tok = lm
    fd = FastDecoder(model, tok, max_seq_len=128, compile=False)
    ids = tok(PROMPTS[2])["input_ids"]
    free = fd.generate(ids, 30, eos_ids=[])
    text = tok.decode(free[8:12])
    stop = text.strip()[:3] or text
    got = fd.generate(ids, 30, eos_ids=[], stop_strings=[stop])
    assert stop in tok.decode(got)
    assert stop not in tok.decode(got[:-1])
    assert 4 <= len(got) < len(free)  # the stop string came mid-generation and ended it
    assert got == free[: len(got)]
    want = slow(model, ids, 30, None, stop_strings=[stop], tokenizer=tok)
    assert got == want


@pytest.mark.parametrize("mode", ["direct", "hf"])
def test_batched_equals_hf_left_padded(lm, mode):
    model, tok = lm
    fd = FastDecoder(model, tok, max_seq_len=128, compile=False, mode=mode)
    prompts = [tok(t)["input_ids"] for t in PROMPTS]
    eos = tok.eos_token_id
    got = fd.generate_batch(prompts, 16, eos_ids=[eos])
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(
            **enc, max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=-100
        )
    for row, g in zip(out[:, enc["input_ids"].shape[1] :].tolist(), got, strict=True):
        want = [t for t in row if t != -100]
        assert g == want
    # rows differ, and each padded row equals its own batch-1 decode in float32
    assert len({tuple(g) for g in got}) == len(PROMPTS)
    assert [fd.generate(p, 16, [eos]) for p in prompts] == got


def test_lookahead_loop_keeps_the_tokens(lm):
    """The GPU's loop (step n+1 queued before token n is read; ``lookahead``), forced on CPU:
    HF's tokens at EOS, at the token budget, with a budget ending at the cache's last slot
    (the queued step must not run past it), and batched."""
    model, tok = lm
    fd = FastDecoder(model, tok, max_seq_len=64, compile=False)
    fd.lookahead = True
    ids = tok(PROMPTS[0])["input_ids"]
    free = slow(model, ids, 12, None)
    assert fd.generate(ids, 12, eos_ids=[]) == free
    stop = free[5]
    assert fd.generate(ids, 12, eos_ids=stop) == free[: free.index(stop) + 1]
    long = (ids * 8)[:59]  # 5 slots left: the budget of 9 is cut to 5
    launched = []
    launch = fd._launch
    fd._launch = lambda *a: launched.append(a[5]) or launch(*a)
    assert fd.generate(long, 9, eos_ids=[]) == slow(model, long, 5, None)
    assert launched == [0, 1, 2, 3]  # 5 tokens: the prompt's, then 4 steps, none queued past
    del fd._launch
    prompts = [tok(t)["input_ids"] for t in PROMPTS[:4]]
    plain = FastDecoder(model, tok, max_seq_len=64, compile=False)
    assert plain.lookahead is False  # CPU default
    eos = tok.eos_token_id
    assert fd.generate_batch(prompts, 8, [eos]) == plain.generate_batch(prompts, 8, [eos])


def test_cache_buckets_and_padded_prompt_keep_hf_tokens(lm):
    """The step attends over the smallest cache bucket holding its slot (8-slot buckets here,
    crossed several times a request), the batch-1 prompt runs right-padded to 64 tokens (the
    GPU's prompt graphs, eagerly): HF generate's tokens, batch 1 and batched."""
    model, tok = lm
    fd = FastDecoder(model, tok, max_seq_len=128, compile=False, kv_bucket=8, prefill="padded")
    assert fd.kv_buckets == tuple(range(8, 129, 8))
    seen = []  # (rows, tokens, attended cache length) of each forward
    forward = fd._direct.forward

    def spy(ids, pos, slots, mask, kv, last=None, kv_len=None, **kw):
        seen.append((ids.shape[0], ids.shape[1], kv_len or kv[0][0].shape[2]))
        return forward(ids, pos, slots, mask, kv, last, kv_len, **kw)

    fd._direct.forward = spy
    eos = tok.eos_token_id
    for text in PROMPTS:
        ids = tok(text)["input_ids"]
        seen.clear()
        got = fd.generate(ids, 30, eos_ids=[eos])
        assert got == slow(model, ids, 30, eos), text
        assert seen[0][:2] == (1, -(-len(ids) // 64) * 64)  # the padded prompt
        # each step: the bucket just above its slot
        slots = range(len(ids), len(ids) + len(seen) - 1)
        assert [s[2] for s in seen[1:]] == [(p // 8 + 1) * 8 for p in slots]
    first = fd.generate(ids, 30, eos_ids=[eos])
    assert fd.warmup(40) > 0  # warms the padded prompt path too, in inference mode
    assert fd.generate(ids, 30, eos_ids=[eos]) == first
    prompts = [tok(t)["input_ids"] for t in PROMPTS]
    whole = FastDecoder(model, tok, max_seq_len=128, compile=False, kv_bucket=0)
    assert whole.kv_buckets == (128,) and whole.prefill == "exact"
    assert fd.generate_batch(prompts, 16, [eos]) == whole.generate_batch(prompts, 16, [eos])
    with pytest.raises(FastDecodeError, match="prefill"):
        FastDecoder(model, tok, compile=False, prefill="graph")  # CUDA only


def test_limits(lm):
    model, tok = lm
    fd = FastDecoder(model, tok, max_seq_len=32, compile=False)
    with pytest.raises(FastDecodeError, match="max_seq_len=32"):
        fd.generate(list(range(5, 45)), 4, [])
    # new tokens are cut to what the static cache holds
    assert len(fd.generate(list(range(5, 25)), 50, [])) == 12
    first = fd.generate(list(range(5, 15)), 6, [])
    assert fd.warmup(prompt_tokens=100) > 0  # clipped to the cache; leaves no trace
    assert fd.generate(list(range(5, 15)), 6, []) == first
    with pytest.raises(FastDecodeError, match="quantize"):
        FastDecoder(model, tok, quantize="int3")
    with pytest.raises(FastDecodeError, match="CUDA"):
        FastDecoder(model, tok, quantize="int4")


def test_mistral_nemo_like_head_dim_and_recomputed_rope(tiny_lm_path):
    """Mistral with head_dim != hidden/heads (as Mistral-Nemo), rope recomputed from config.

    Unsloth replaces the rotary embedding class; the direct path then rebuilds the cos/sin
    table from the config, which must give the same tokens.
    """
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_lm_path)
    cfg = MistralConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        initializer_range=0.2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(1)
    model = MistralForCausalLM(cfg).eval()
    ids = tok(PROMPTS[0])["input_ids"]
    want = slow(model, ids, 16, tok.eos_token_id)
    fd = FastDecoder(model, tok, max_seq_len=96, compile=False)
    assert fd.mode == "direct"
    assert fd.generate(ids, 16, [tok.eos_token_id]) == want
    model.model.rotary_emb = torch.nn.Identity()  # what a replaced rotary class looks like
    fd = FastDecoder(model, tok, max_seq_len=96, compile=False)
    assert fd.generate(ids, 16, [tok.eos_token_id]) == want
    with pytest.raises(FastDecodeError, match="mode=direct"):
        model.config.sliding_window = 4096
        FastDecoder(model, tok, max_seq_len=96, compile=False, mode="direct")


# --------------------------------------------------------------------------- int4 weights
def test_int4_quantizer_bounds_and_roundtrip():
    from ragtune.fastweights import dequantize_rtn, quantize_rtn

    torch.manual_seed(0)
    w = torch.randn(48, 128) * torch.linspace(0.1, 3, 128)  # groups of very different ranges
    q, scale, zero = quantize_rtn(w, group_size=32)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scale.shape == (48, 4)
    assert torch.equal(zero, zero.round()) and float(zero.min()) >= 0 and float(zero.max()) <= 15
    back = dequantize_rtn(q, scale, zero, w.dtype)
    err = (back - w).abs().reshape(48, 4, 32).amax(-1)
    assert bool((err <= scale * 0.5 + 1e-5).all())  # round-to-nearest: half a step at most
    # a group's extremes are representable: the error is not a clipped range
    assert float((back - w).abs().max()) < float(scale.max())


def _fake_quantized(model, group_size: int):
    """A copy whose Linear weights are exactly what the int4 kernels multiply with."""
    import copy

    from ragtune.fastweights import dequantize_rtn, quantize_rtn

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.Linear):
                w = m.weight
                w.copy_(dequantize_rtn(*quantize_rtn(w, group_size), w.dtype))
    return ref


def test_int4_path_equals_hf_generate_on_the_same_int4_weights(lm):
    """quantize='int4' (q|k|v and gate|up fused, LM head too) = HF generate on the int4 model.

    The reference kernel computes with the dequantized int4 weights; gemlite's Triton kernels
    compute the same products on the GPU (tests/test_gpu.py).
    """
    model, tok = lm
    fd = FastDecoder(
        model,
        tok,
        max_seq_len=128,
        compile=False,
        quantize="int4",
        group_size=32,
        int4_kernel="reference",
    )
    assert fd.quantize == "int4" and len(fd._direct.fused) == model.config.num_hidden_layers
    ref = _fake_quantized(model, 32)
    eos = tok.eos_token_id
    for text in PROMPTS:
        ids = tok(text)["input_ids"]
        assert fd.generate(ids, 20, [eos]) == slow(ref, ids, 20, eos), text


def test_quantize_auto_keeps_a_16bit_model_as_it_is(lm):
    model, tok = lm
    fd = FastDecoder(model, tok, max_seq_len=64, compile=False)  # quantize="auto"
    assert fd.quantize is None and fd._direct.fused is None
    with pytest.raises(FastDecodeError, match="direct path"):
        FastDecoder(model, tok, compile=False, mode="hf", quantize="int4", int4_kernel="reference")


def test_pack_int4_is_gemlites_layout_and_unpacks_to_the_int4_weights():
    """The prompt path unpacks the int4 copy itself: it must read gemlite's layout (input k of
    a column at bits 4*(k % 8) of word k // 8, words [in/8, out]) back into exactly the
    weights the one-row kernels multiply with (tests/test_gpu.py checks gemlite's own tensors)."""
    from ragtune.fastweights import dequantize_rtn, pack_int4, quantize_rtn, unpack_int4

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        w = (torch.randn(48, 128) * torch.linspace(0.1, 3, 128)).to(dtype)
        q, scale, zero = quantize_rtn(w, group_size=32)
        words = pack_int4(q)
        assert words.dtype == torch.int32 and words.shape == (16, 48)
        for n, k in [(0, 0), (5, 7), (47, 127), (13, 64), (30, 9)]:
            assert (int(words[k // 8, n]) >> (4 * (k % 8))) & 15 == int(q[n, k])
        shift = (-zero.float() * scale.float()).to(dtype)
        dense = unpack_int4(words, scale.t().contiguous(), shift.t().contiguous(), dtype)
        assert dense.dtype == dtype and dense.shape == (128, 48)
        assert torch.equal(dense.t(), dequantize_rtn(q, scale, zero, dtype))


def test_int4_prompt_path_dequantizes_and_keeps_the_tokens(lm, monkeypatch):
    """Prompts of ``int4_dense_rows`` rows or more run through dequantized weights (cuBLAS on
    a GPU): the same logits as the int4 path, HF generate's tokens on the int4 weights, and
    only the prompt's projections dequantize (not the LM head's last row, not a decode step)."""
    from ragtune import fastweights

    model, tok = lm
    calls = []
    real = fastweights.unpack_int4
    monkeypatch.setattr(fastweights, "unpack_int4", lambda *a: calls.append(a[0].shape) or real(*a))
    kw = {"max_seq_len": 128, "compile": False, "quantize": "int4", "group_size": 32}
    dense = FastDecoder(model, tok, int4_kernel="reference", int4_dense_rows=2, **kw)
    plain = FastDecoder(model, tok, int4_kernel="reference", int4_dense_rows=0, **kw)
    ref = _fake_quantized(model, 32)
    eos = tok.eos_token_id
    layers = model.config.num_hidden_layers
    for text in PROMPTS:
        ids = tok(text)["input_ids"]
        calls.clear()
        got = dense.generate(ids, 20, [eos])
        assert got == slow(ref, ids, 20, eos) == plain.generate(ids, 20, [eos]), text
        # q|k|v, o, gate|up, down of every layer, once, for the prompt alone
        assert len(calls) == (4 * layers if len(ids) >= 2 else 0), text
    ids = torch.tensor([tok(PROMPTS[0])["input_ids"]])
    t = ids.shape[1]
    pos, slots = torch.arange(t)[None], torch.arange(t)
    mask = (slots[None, :] <= slots[:, None])[None, None]
    calls.clear()
    with torch.inference_mode():
        a = dense._direct.forward(ids, pos, slots, mask, dense._direct.cache(1), kv_len=t)
        b = plain._direct.forward(ids, pos, slots, mask, plain._direct.cache(1), kv_len=t)
    assert len(calls) == 4 * layers
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), float((a - b).abs().max())


def test_tuned_int4_config_files(tmp_path):
    """The batch-1 kernel settings measured for a GPU: file per GPU name, checked when read."""
    import json

    from ragtune.fastweights import Int4Error, config_file_for, read_tuned

    assert config_file_for("NVIDIA H200").name == "nvidia_h200.json"
    entry = {
        "out": 6144,
        "in": 5120,
        "group": 64,
        "type": "GEMV_REVSPLITK",
        "config": {
            "BLOCK_SIZE_M": 1,
            "BLOCK_SIZE_N": 256,
            "BLOCK_SIZE_K": 16,
            "A_load_order": 0,
            "dot_prod_mode": 0,
            "num_warps": 2,
            "num_stages": 1,
        },
    }
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"gpu": "NVIDIA H200", "m1": [entry]}))
    table = read_tuned(path)
    assert table == {(6144, 5120, 64): ("GEMV_REVSPLITK", entry["config"])}
    path.write_text(json.dumps({"m1": [{**entry, "type": "GEMM"}]}))
    with pytest.raises(Int4Error, match="GEMM"):
        read_tuned(path)
    path.write_text(json.dumps({"m1": [{**entry, "config": {"BLOCK_SIZE_N": 256}}]}))
    with pytest.raises(Int4Error, match="num_warps"):
        read_tuned(path)
    # the packaged H200 table covers every projection of the Mistral-Nemo-12B step (group 64),
    # each kernel reading >= 32 inputs per bf16 partial sum (gemlite adds them atomically)
    h200 = read_tuned(config_file_for("NVIDIA H200"))
    nemo = {(6144, 5120), (5120, 4096), (28672, 5120), (5120, 14336), (131072, 5120)}
    assert {(n, k) for n, k, g in h200 if g == 64} == nemo
    for typ, cfg in h200.values():
        assert cfg["BLOCK_SIZE_K"] * (2 if typ == "GEMV_REVSPLITK" else 1) >= 32, cfg
