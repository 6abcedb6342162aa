"""FP8 weights for the continuous batcher (ragtune/fp8weights.py): the numerics of one
projection, and the batcher's promise (concurrent answers == one-at-a-time) with FP8 weights.

CPU: the reference kernel computes the FP8 GEMM's arithmetic (e4m3 weights with per-channel
scales, e4m3 activations with per-token scales, float32 products, a bf16 output) in float32.
"""

from __future__ import annotations

import threading

import pytest
import torch

from ragtune.config import ConfigError
from ragtune.fastdecode import FastDecoder
from ragtune.fp8weights import FP8_MAX, Fp8Linear, quantize_rows, reference_model


def test_weights_are_e4m3_with_one_scale_per_output_channel():
    torch.manual_seed(1)
    w = torch.randn(48, 80) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different size
    lin = torch.nn.Linear(80, 48, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    f = Fp8Linear.from_linears([lin], torch.float32, "reference")
    assert f.weight.dtype == torch.float8_e4m3fn and f.weight_scale.shape == (1, 48)
    # each row's largest weight is e4m3's largest value: the scale is the row's own
    assert torch.equal(f.weight.float().abs().amax(1), torch.full((48,), FP8_MAX))
    deq = f.dequantized()
    # round-to-nearest with 3 mantissa bits: within 1/16 of each weight (+ subnormal steps)
    step = f.weight_scale.t() * 2.0**-9
    assert ((deq - w).abs() <= w.abs() / 16 + step).all()
    assert not torch.equal(deq, w)


def test_a_row_is_quantized_and_multiplied_on_its_own():
    """Per-token activation scales: a row's output is the same alone or next to a row 1000x
    larger (a per-tensor scale would crush the small row); fused outputs equal separate ones."""
    torch.manual_seed(2)
    q, k = torch.nn.Linear(64, 32, bias=False), torch.nn.Linear(64, 16, bias=False)
    fused = Fp8Linear.from_linears([q, k], torch.float32, "reference")
    alone_q = Fp8Linear.from_linears([q], torch.float32, "reference")
    x = torch.randn(3, 64)
    big = torch.cat([x, 1000 * torch.randn(1, 64)])
    assert torch.equal(fused(big)[:3], fused(x))
    assert torch.equal(fused(x)[:, :32], alone_q(x))
    # the product of the quantized values, rounded to bf16 as the GEMM's output is
    xq, sx = quantize_rows(x)
    exact = (xq.double() * sx.double()) @ fused.dequantized().double().t()
    assert torch.allclose(fused(x).double(), exact, rtol=2**-8, atol=1e-6)
    # and a few percent from the float32 product: FP8, not the 16-bit weights
    full = torch.cat([x @ q.weight.t(), x @ k.weight.t()], dim=1)
    rel = float((fused(x) - full.detach()).norm() / full.detach().norm())
    assert 1e-3 < rel < 0.08, rel


def test_small_inputs_can_run_on_16_bit_copies(monkeypatch):
    """RAGTUNE_FP8_DENSE_BELOW=n: inputs of fewer than n rows (decode steps) multiply the
    16-bit weights, larger ones (prompts) the FP8 ones."""
    monkeypatch.setenv("RAGTUNE_FP8_DENSE_BELOW", "4")
    torch.manual_seed(3)
    lin = torch.nn.Linear(64, 32, bias=False)
    f = Fp8Linear.from_linears([lin], torch.float32, "reference")
    x = torch.randn(4, 64)
    assert torch.equal(f(x[:3]), lin(x[:3]).detach())
    monkeypatch.delenv("RAGTUNE_FP8_DENSE_BELOW")
    assert torch.equal(f(x), Fp8Linear.from_linears([lin], torch.float32, "reference")(x))


def test_fp8_batcher_gives_concurrent_requests_their_one_at_a_time_answers(
    batch_prompts, tiny_lm_f32
):
    """quantize="fp8" through the server's batcher (server.batch_weights=fp8, the invariant
    mode): concurrent greedy answers equal the FP8 decoder's own answers one at a time."""
    from ragtune.batchstream import batcher_for

    model, tok = tiny_lm_f32
    fd8 = FastDecoder(model, tok, max_seq_len=160, compile=False, quantize="fp8")
    assert fd8.quantize == "fp8" and isinstance(fd8._direct.fused[0].qkv, Fp8Linear)
    prompts = [tok(t)["input_ids"] for t in batch_prompts]
    budgets = [24, 9, 17, 30, 5]
    want = [fd8.generate(p, n, eos_ids=[]) for p, n in zip(prompts, budgets, strict=True)]
    batcher = batcher_for(model, tok, 160, max_batch=4, warmup=False, weights="fp8")
    assert batcher.decoder.quantize == "fp8"
    got: list[list[int] | None] = [None] * len(prompts)

    def client(i: int) -> None:
        got[i] = list(batcher.stream(prompts[i], budgets[i], eos_ids=[]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        batcher.close()
    assert got == want and batcher.most_rows >= 2


def test_fp8_decoder_computes_the_fp8_models_logits(batch_prompts, tiny_lm_f32):
    """The fused FP8 copies are the model's projections in the right order: the decoder's
    logits are the FP8 reference model's (HF forward, unfused layers) up to rounding, and far
    from the 16-bit model's (this wide-init model amplifies FP8's few percent per product)."""
    model, tok = tiny_lm_f32
    fd8 = FastDecoder(model, tok, max_seq_len=160, compile=False, quantize="fp8")
    ids = torch.tensor([tok(batch_prompts[0])["input_ids"]])
    with torch.inference_mode():
        got = _last_logits(fd8, ids)
        want = reference_model(model)(ids).logits[:, -1].float()
        own = model(ids).logits[:, -1].float()
    assert float((got - want).norm() / want.norm()) < 1e-4
    assert float((got - own).norm() / own.norm()) > 0.05


def _last_logits(fd: FastDecoder, ids: torch.Tensor) -> torch.Tensor:
    d, t = fd._direct, ids.shape[1]
    kv = d.cache(1)
    slots = torch.arange(t)
    mask = (slots[None, :] <= slots[:, None])[None, None]
    return d.forward(ids, slots[None], slots, mask, kv, kv_len=t)


def test_the_batchers_weights_follow_server_batch_weights(tiny_lm_f32, tmp_path):
    from ragtune.batchstream import batch_weights
    from ragtune.config import compose, validate
    from ragtune.server import SERVER_TOP_LEVEL

    model, _ = tiny_lm_f32
    assert batch_weights(model, "auto") is None  # CPU: no FP8 GEMMs; a 16-bit model as it is
    assert batch_weights(model, "dense") is None and batch_weights(model, "FP8") == "fp8"
    with pytest.raises(ValueError, match="server.batch_weights"):
        batch_weights(model, "int4")
    out = f"paths.outputs={tmp_path}"
    assert compose("server", [out]).server.batch_weights == "auto"
    with pytest.raises(ConfigError) as err:
        validate(compose("server", [out, "server.batch_weights=int4"]), SERVER_TOP_LEVEL)
    assert str(err.value).startswith("server.batch_weights:") and "\n" not in str(err.value)


def test_the_gpus_fp8_prompt_forward_compiles_once_for_every_length(tiny_lm_f32):
    """The batcher's compiled prompt forward (the default with compiled steps) through the FP8
    ops a GPU runs (``_scaled_mm`` with row-wise scales; here PyTorch's CPU kernel): only the
    length is symbolic, so one compilation serves every padded length (on the H200 a compile
    with every size symbolic did not end the server's warm-up in 218 s: docs/benchmarks.md)."""
    import copy

    from ragtune.batchprefill import Prefiller

    model, tok = tiny_lm_f32
    model = copy.deepcopy(model).to(torch.bfloat16)
    fd8 = FastDecoder(
        model, tok, max_seq_len=320, compile=False, quantize="fp8", fp8_kernel="scaled_mm"
    )
    qkv = fd8._direct.fused[0].qkv
    try:
        qkv(torch.randn(2, qkv.in_features, dtype=torch.bfloat16))
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"no _scaled_mm on this CPU build: {e}")
    kv = fd8._direct.cache(3)
    pre = Prefiller(fd8._direct, kv, spare_row=2, group=2, compiled=True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        for t in (64, 128, 256):
            prompt = [(7 * i + t) % 1000 + 5 for i in range(t - 3)]
            first = pre._packed(2, t, pre.pack([prompt], [0], 2, t), kv)
            assert first.shape == (2,)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1


def test_a_4bit_model_batches_on_dense_copies_of_its_weights(tiny_lm_f32, monkeypatch):
    """server.batch_weights for a bitsandbytes 4-bit model without FP8 GEMMs (here: CPU):
    dense 16-bit copies, whether asked for or chosen by auto; fp8 where asked for."""
    import ragtune.fastweights
    from ragtune.batchstream import batch_weights

    model, _ = tiny_lm_f32
    monkeypatch.setattr(ragtune.fastweights, "has_bnb_4bit", lambda m: m is model)
    assert batch_weights(model, "dense") == batch_weights(model, "auto") == "dense"
    assert batch_weights(model, "fp8") == "fp8"
