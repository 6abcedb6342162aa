"""GPU checks (run on the device with ``pytest -m gpu tests/test_gpu.py``; skipped without CUDA).

- the Unsloth backend trains (LoRA weights change), merges (16-bit and 4-bit), and the merged
  folder reloads through ``ragtune.loading`` and generates;
- embeddings run in fp16 on the GPU and agree with float32 CPU embeddings;
- the fast decode path compiled with CUDA graphs gives the slow path's greedy tokens.

Unsloth patches transformers globally when imported, so its test runs in a subprocess and
the rest of this file sees plain transformers. On the device, where the embedded SmolLM2 is
not installed, ``RAGTUNE_GPU_TOKENIZER`` names a folder with its tokenizer files and
``RAGTUNE_GPU_BERT_TOKENIZER`` one with a BERT uncased tokenizer (bench/gpu_e2e.sh sets both).
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

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer_dir(request) -> str:
    path = os.environ.get("RAGTUNE_GPU_TOKENIZER")
    return path if path else request.getfixturevalue("lm_path")


@pytest.fixture(scope="module")
def small_lm(tmp_path_factory, tokenizer_dir) -> str:
    """A 2-layer Llama, 256 wide, untied random weights: Unsloth's kernels accept its shapes."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = tmp_path_factory.mktemp("small-lm")
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        tie_word_embeddings=False,
        initializer_range=0.2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)


UNSLOTH_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from safetensors.torch import load_file
    from ragtune.config import compose, validate
    from ragtune.schema import PromptFields, get_schema
    from ragtune.training.recipe import SFT_TOP_LEVEL
    from ragtune.training.recipe import train

    model, out, method = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    break_at = int(sys.argv[4]) if len(sys.argv) > 4 else 0  # NaN LoRA after this update
    undo_above = sys.argv[5] if len(sys.argv) > 5 else ""  # then a preference step, undone above
    extra = ["train.preference.num_train_epochs=1", f"train.preference.undo_above={undo_above}"]
    cfg = validate(compose("sft", [
        "conf=nemo_rag", f"model.name_or_path={model}", "model.max_seq_length=256",
        f"train.max_steps={12 if break_at else 4}", "train.save_steps=4",
        "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=1", "train.packing=false",
        "train.learning_rate=1e-3", "train.logging_steps=1", f"train.save_method={method}",
        f"output_dir={out}", *(extra if undo_above else []),
    ]), SFT_TOP_LEVEL)
    kept = {}
    if undo_above:  # whether the LoRA after the preference step is the one SFT left
        from ragtune.training import preference

        real_fit = preference.fit_preference

        def fit_and_compare(cfg, model, *args, **kwargs):
            sft = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
            result = real_fit(cfg, model, *args, **kwargs)
            kept["sft_lora"] = all(
                torch.equal(p, sft[n]) for n, p in model.named_parameters() if n in sft)
            return result

        preference.fit_preference = fit_and_compare
    if break_at:
        from transformers import TrainerCallback
        from ragtune.training import checkpoints

        class BreakLora(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step == break_at:
                    with torch.no_grad():
                        for name, p in model.named_parameters():
                            if "lora_" in name:
                                p.fill_(float("nan"))
                return control

        rates = []  # (step, learning rate) as logged, the resumed run's included

        class RecordRates(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "learning_rate" in logs:
                    rates.append((state.global_step, float(logs["learning_rate"])))
                return control

        real = checkpoints.callbacks
        checkpoints.callbacks = lambda d: [*real(d), BreakLora(), RecordRates()]
    schema = get_schema(cfg.prompt.name)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model)
    examples = []
    for i in range(16):
        p, c = schema.render_example(
            PromptFields(f"What is item {i}?", "", [f"Item {i} is a blue lamp number {i}."]),
            f"A blue lamp number {i}.", tok)
        examples.append(
            {"prompt": p, "completion": c, "kind": "oracle", "answer": f"A blue lamp number {i}."})
    r = train(cfg, examples, schema, out)
    info = {"backend": r.backend, "losses": r.losses, "steps": r.steps,
            "model_dir": str(r.model_dir), "peak": r.peak_memory_gb, "divergence": r.divergence,
            "preference": r.preference, **kept}
    if break_at:
        info["rates"] = rates
    if method == "lora":
        w = load_file(str(r.model_dir / "adapter_model.safetensors"))
        b = [k for k in w if "lora_B" in k]
        info["lora_B_tensors"] = len(b)
        info["lora_B_max_abs"] = max(float(w[k].float().abs().max()) for k in b)
        info["nan"] = any(bool(t.isnan().any()) for t in w.values())
        ckpt = out / "checkpoints/checkpoint-4/adapter_model.safetensors"
        if break_at and ckpt.exists():
            c = load_file(str(ckpt))
            info["equals_checkpoint_4"] = c.keys() == w.keys() and all(
                torch.equal(c[k], w[k]) for k in w)
    print("RESULT " + json.dumps(info))
    """
)


def _run_unsloth(
    model: str, out: Path, method: str, break_at: int = 0, undo_above: str = ""
) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    proc = subprocess.run(
        [sys.executable, "-c", UNSLOTH_SCRIPT, model, str(out), method, str(break_at), undo_above],
        capture_output=True,
        text=True,
        env=env,
        cwd=out.parent,
        timeout=900,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_unsloth_trains_lora_weights_change(small_lm, tmp_path):
    info = _run_unsloth(small_lm, tmp_path / "run-lora", "lora")
    assert info["backend"] == "unsloth"
    assert info["steps"] == 4
    assert all(x == x for x in info["losses"])  # no NaN
    # LoRA B starts at zero: any non-zero entry means the adapters were trained
    assert info["lora_B_tensors"] >= 7 * 2
    assert info["lora_B_max_abs"] > 0


def test_unsloth_run_that_breaks_is_saved_from_the_checkpoint_before_it(small_lm, tmp_path):
    """The divergence guard on the Unsloth backend (tests/test_divergence.py on CPU): the LoRA
    turns NaN after update 8, the guard stops at step 9, training resumes from checkpoint-4,
    breaks at update 8 again, and checkpoint-4's adapter is what is saved. The resumed run
    trains at train.divergence_lr_scale (0.5) times the first run's rate, step for step."""
    info = _run_unsloth(small_lm, tmp_path / "run-break", "lora", break_at=8)
    breaks = [(d["step"], d["restarted_from"], d["restored_step"]) for d in info["divergence"]]
    assert breaks == [(9, 4, None), (9, None, 4)], info["divergence"]
    assert info["divergence"][0]["lr_scale"] == 0.5
    assert info["steps"] == 9 and not info["nan"] and info["equals_checkpoint_4"]
    rates = info["rates"]
    resumed_at = next(i for i in range(1, len(rates)) if rates[i][0] <= rates[i - 1][0])
    first = dict(rates[:resumed_at])
    resumed = [(s, lr) for s, lr in rates[resumed_at:] if s <= 8]
    assert [s for s, _ in resumed] == [5, 6, 7, 8], rates
    assert all(lr == pytest.approx(0.5 * first[s]) and lr > 0 for s, lr in resumed), rates


@pytest.mark.parametrize(("undo_above", "undone"), [("1e-9", True), ("null", False)])
def test_unsloth_preference_step_is_undone_only_past_undo_above(
    small_lm, tmp_path, undo_above, undone
):
    """The preference step on the Unsloth backend trains the LoRA; an undone one (any loss rise
    passes 1e-9) leaves exactly the LoRA that SFT left."""
    info = _run_unsloth(small_lm, tmp_path / "run-pref", "lora", undo_above=undo_above)
    pref = info["preference"]
    assert info["backend"] == "unsloth" and pref["steps"] == 8  # 16 pairs in batches of 2
    assert pref["undone"] is undone and pref["loss_rise"] is not None
    assert info["sft_lora"] is undone


@pytest.mark.parametrize("method", ["merged_16bit", "merged_4bit"])
def test_unsloth_merges_reloads_generates(small_lm, tmp_path, method):
    info = _run_unsloth(small_lm, tmp_path / f"run-{method}", method)
    model_dir = Path(info["model_dir"])
    assert (model_dir / "config.json").exists()
    assert list(model_dir.glob("*.safetensors"))
    quant = json.loads((model_dir / "config.json").read_text()).get("quantization_config")
    assert bool(quant) == (method == "merged_4bit")
    script = textwrap.dedent(
        """
        import json, sys, torch
        from ragtune.loading import load_model
        model, tok = load_model(sys.argv[1])
        ids = tok("The lamp", return_tensors="pt").to(model.device)
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        print("RESULT " + json.dumps({"new": out.shape[1] - ids["input_ids"].shape[1],
                                      "device": str(model.device)}))
        """
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(model_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    got = json.loads(lines[-1][len("RESULT ") :])
    assert got["new"] == 8 and got["device"].startswith("cuda")


def test_embeddings_fp16_on_gpu(tmp_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers import models as st_models
    from transformers import AutoTokenizer, BertConfig, BertModel

    from ragtune.ingest import embed_texts, load_embedder

    tok_dir = os.environ.get("RAGTUNE_GPU_BERT_TOKENIZER")
    if not tok_dir:
        from ragtune.models import embedder_dir

        tok_dir = str(embedder_dir())
    raw = tmp_path / "raw"
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256
        ),
        add_pooling_layer=False,
    ).save_pretrained(raw)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(raw)
    word = st_models.Transformer(str(raw), max_seq_length=128)
    dim = word.auto_model.config.hidden_size
    st = SentenceTransformer(
        modules=[word, st_models.Pooling(dim, pooling_mode="cls"), st_models.Normalize()],
        device="cpu",
    )
    folder = tmp_path / "emb"
    st.save(str(folder))

    texts = ["The Kessa lighthouse was built in 1871.", "Ida Varnholm designed the pier."] * 4
    gpu = load_embedder(str(folder), "auto")
    assert next(gpu.parameters()).device.type == "cuda"
    assert next(gpu.parameters()).dtype == torch.float16
    v_gpu = embed_texts(gpu, texts, normalize=True, batch_size=4)
    v_cpu = SentenceTransformer(str(folder), device="cpu").encode(texts, normalize_embeddings=True)
    assert v_gpu.dtype.name == "float32" and v_gpu.shape == v_cpu.shape
    cos = (v_gpu * v_cpu).sum(axis=1)
    assert cos.min() > 0.99, cos


def _hf_greedy(model, ids: list[int], n: int, eos: int) -> list[int]:
    """HF generate's greedy continuation of one prompt on the GPU (the slow path's tokens)."""
    x = torch.tensor([ids], device="cuda")
    with torch.inference_mode():
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )
        return out[0, len(ids) :].tolist()


def _fp32_lm(tokenizer_dir: str):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        tie_word_embeddings=False,
        initializer_range=0.2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to("cuda").eval()
    return model, tok


@pytest.mark.parametrize("graph", ["manual", "trees"])
def test_fastdecode_compiled_equals_slow_path(tokenizer_dir, graph):
    from ragtune.fastdecode import FastDecoder

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")  # torchao's inductor settings raise it
    model, tok = _fp32_lm(tokenizer_dir)
    texts = ["### Context:\nThe harbour of Kessa has a lighthouse.", "Hello", "A " * 40]
    fd = FastDecoder(model, tok, max_seq_len=256, graph=graph)  # compiled by default on CUDA
    assert fd.compiled and fd.mode == "direct"
    eos = tok.eos_token_id
    for text in texts:
        ids = tok(text)["input_ids"]
        want = _hf_greedy(model, ids, 32, eos)
        assert fd.generate(ids, 32, [eos]) == want
    # batched, left-padded, compiled for batch 3
    prompts = [tok(t)["input_ids"] for t in texts]
    got = fd.generate_batch(prompts, 16, [eos])
    for p, g in zip(prompts, got, strict=True):
        assert fd.generate(p, 16, [eos]) == g
    assert fd.graph == graph  # the capture did not fall back


def test_fastdecode_cache_buckets_and_prompt_graphs_equal_slow_path(tokenizer_dir):
    """Compiled + CUDA graphs, float32: the step over 32-slot cache buckets (one graph each,
    one compilation) and the batch-1 prompt as a graph of its 64-token padded length give HF
    generate's tokens, across several buckets a request."""
    from torch._dynamo.utils import counters

    from ragtune.fastdecode import FastDecoder

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    model, tok = _fp32_lm(tokenizer_dir)
    fd = FastDecoder(model, tok, max_seq_len=256, kv_bucket=32)
    assert fd.prefill == "graph" and len(fd.kv_buckets) == 8
    eos = tok.eos_token_id
    texts = ["Hello", "### Context:\nThe harbour of Kessa has a lighthouse.", "A lamp " * 30]
    graphs_before = None
    for text in texts:
        ids = tok(text)["input_ids"]
        want = _hf_greedy(model, ids, 70, eos)
        assert fd.generate(ids, 70, [eos]) == want, text
        graphs_before = graphs_before or counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs_before  # no recompile per bucket
    assert len(fd._graphs) >= 3 and fd.graph == "manual"
    assert fd._prefillers["graph"].graphs  # captured, not fallen back to eager
    assert fd.warmup(100) > 0 and len(fd._graphs) == 8


def test_fastdecode_int8_runs(tokenizer_dir):
    """Weight-only int8 (torchao) changes the weights: it must run and give tokens."""
    from ragtune.fastdecode import FastDecoder

    model, tok = _fp32_lm(tokenizer_dir)
    fd = FastDecoder(model.to(torch.bfloat16), tok, max_seq_len=256, quantize="int8")
    out = fd.generate(tok("The lamp")["input_ids"], 16, [])
    assert len(out) == 16 and all(0 <= t < len(tok) + 1000 for t in out)
    assert fd.last_stats["decode_tok_s"] > 0

    # the decoder layers are quantized; the LM head stays bf16 (its conversion is unfused)
    def quantized(w: torch.Tensor) -> bool:  # torchao weights are tensor subclasses
        return type(w) not in (torch.Tensor, torch.nn.Parameter)

    assert quantized(model.model.layers[0].mlp.down_proj.weight)
    assert not quantized(model.get_output_embeddings().weight)


@pytest.mark.parametrize("rows", [1, 3, 77])
def test_gemlite_int4_matches_the_dequantized_weights(rows):
    """gemlite's kernel (GEMV at 1 row, GEMMs above) = x @ dequantized(W)^T, fused rows too."""
    from ragtune.fastweights import Int4Linear, dequantize_rtn, quantize_rtn

    torch.manual_seed(0)
    parts = [
        torch.nn.Linear(512, n, bias=False, device="cuda", dtype=torch.bfloat16)
        for n in (256, 128, 128)
    ]
    fused = Int4Linear.from_linears(parts, torch.bfloat16, group_size=64, kernel="gemlite")
    x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)
    ref = torch.cat(
        [
            x.float()
            @ dequantize_rtn(*quantize_rtn(p.weight.detach(), 64), torch.bfloat16).float().T
            for p in parts
        ],
        dim=-1,
    )
    with torch.inference_mode():
        got = fused(x).float()
    assert got.shape == (rows, 512)
    err = (got - ref).norm() / ref.norm()
    assert err < 1e-2, float(err)


def _concurrently(answer, n: int, timeout: float = 300) -> list:
    """``answer(i)`` for i in range(n), each in its own thread, all started at once."""
    import threading

    got: list = [None] * n

    def client(i: int) -> None:
        got[i] = answer(i)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    return got


def _int4_reference(model, group_size: int = 64):
    """The model whose Linear weights are what the int4 kernels compute with (HF generate)."""
    import copy

    from ragtune.fastweights import dequantize_rtn, quantize_rtn

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.Linear):
                w = m.weight
                w.copy_(dequantize_rtn(*quantize_rtn(w, group_size), w.dtype))
    return ref


def _greedy_gaps(fd, ref, tok, texts, n: int = 16) -> list[float]:
    """How far each fast-path token is from greedy under ``ref``, as a share of the logit spread.

    ``ref`` scores prompt + fast tokens in one forward; at every step the chosen token's logit
    is compared with the best one: 0 where the fast path chose ``ref``'s argmax, a small
    number for a near-tie that bf16 rounding resolved the other way, about 1 for a wrong
    token. Greedy agreement alone fails on near-ties of a random model (a single flip changes
    every later token); this measures each step on the fast path's own context.
    """
    worst = []
    for text in texts:
        ids = tok(text)["input_ids"]
        got = fd.generate(ids, n, [])
        x = torch.tensor([ids + got], device="cuda")
        with torch.inference_mode():
            logits = ref(x).logits[0, len(ids) - 1 : len(ids) - 1 + n].float()
        best = logits.max(-1).values
        chosen = logits[torch.arange(n), torch.tensor(got, device="cuda")]
        spread = best - logits.mean(-1)
        worst.append(float(((best - chosen) / spread).max()))
    return worst


TEXTS = ["### Context:\nThe harbour of Kessa has a lighthouse.", "Hello", "A lamp " * 20]


def test_fastdecode_int4_equals_hf_generate_on_the_int4_weights(tokenizer_dir):
    """Compiled + CUDA graph, gemlite kernels, bf16: greedy under the same int4 weights.

    Every token is the reference model's argmax up to bf16 near-ties (see _greedy_gaps); a
    wrong layout or fusion picks tokens far from it.
    """
    from ragtune.fastdecode import FastDecoder

    model, tok = _fp32_lm(tokenizer_dir)
    model = model.to(torch.bfloat16)
    ref = _int4_reference(model)
    fd = FastDecoder(model, tok, max_seq_len=256, quantize="int4")
    assert fd.quantize == "int4" and fd.compiled and fd.graph == "manual"
    gaps = _greedy_gaps(fd, ref, tok, TEXTS)
    assert max(gaps) < 0.05, gaps
    got = fd.generate_batch([tok(t)["input_ids"] for t in TEXTS], 8, [])
    assert [len(g) for g in got] == [8, 8, 8] and fd.graph == "manual"


def test_fastdecode_serves_a_bnb_4bit_model_in_int4_by_default(tokenizer_dir, small_lm):
    """A merged_4bit folder loads as bitsandbytes NF4; the default fast path converts it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from ragtune.fastdecode import FastDecoder
    from ragtune.fastweights import dense_weight

    tok = AutoTokenizer.from_pretrained(small_lm)
    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        small_lm, quantization_config=q, dtype=torch.bfloat16, device_map={"": 0}
    ).eval()
    # the reference: the NF4 weights dequantized into a 16-bit copy, then the int4 rounding
    plain = AutoModelForCausalLM.from_pretrained(small_lm, dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        nf4 = dict(model.named_modules())
        for name, p in plain.named_modules():
            if isinstance(p, torch.nn.Linear):
                p.weight.copy_(dense_weight(nf4[name], torch.bfloat16))
    ref = _int4_reference(plain)
    fd = FastDecoder(model, tok, max_seq_len=256)
    assert fd.quantize == "int4"
    gaps = _greedy_gaps(fd, ref, tok, TEXTS)
    assert max(gaps) < 0.05, gaps


def test_gemlite_keeps_the_layout_the_prompt_path_unpacks():
    """The prompt path unpacks gemlite's own tensors: same words as pack_int4, same weights."""
    from ragtune.fastweights import Int4Linear, dequantize_rtn, pack_int4, quantize_rtn

    torch.manual_seed(0)
    w = torch.randn(384, 512, device="cuda", dtype=torch.bfloat16)
    q, scale, zero = quantize_rtn(w, 64)
    lin = Int4Linear(q, scale, zero, 64, "gemlite")
    assert torch.equal(lin._packed[0], pack_int4(q))
    assert torch.equal(lin.dense_weight().t(), dequantize_rtn(q, scale, zero, torch.bfloat16))


LONG = "The harbour of Kessa has a lighthouse built in 1871 by the harbour board. " * 3


def test_fastdecode_int4_prompt_path(tokenizer_dir):
    """Prompts through dequantized weights + cuBLAS (int4_dense_rows=16 here), decode steps
    through gemlite's kernels: every token still the int4 model's greedy one."""
    from ragtune.fastdecode import FastDecoder

    model, tok = _fp32_lm(tokenizer_dir)
    model = model.to(torch.bfloat16)
    ref = _int4_reference(model)
    fd = FastDecoder(model, tok, max_seq_len=256, quantize="int4", int4_dense_rows=16)
    assert len(tok(LONG)["input_ids"]) >= 16
    gaps = _greedy_gaps(fd, ref, tok, [*TEXTS, LONG])
    assert max(gaps) < 0.05, gaps
    assert fd.graph == "manual"


def test_tuned_int4_configs_reach_gemlite():
    """The tuned batch-1 settings for this GPU (RAGTUNE_INT4_CONFIGS, else the packaged file)
    are the ones gemlite runs, and compute x @ W^T.

    With float32 atomic adds the product is exact up to float32 sums; gemlite's default on
    Hopper adds each partial sum into the bf16 output, which costs a few percent (K/32 roundings
    in bf16: ~3% at K=4096), still far under a wrong layout's ~100%.
    """
    from gemlite.core import GEMLITE_MATMUL_TYPES_MAPPING, GEMLITE_TRITON_MAPPING
    from gemlite.triton_kernels import utils

    from ragtune.fastweights import Int4Linear, _tuned_table, dequantize_rtn, quantize_rtn

    table = _tuned_table(torch.device("cuda"))
    if not table:
        pytest.skip("no tuned int4 settings for this GPU")
    (n, k, g), (mtype, cfg) = min(table.items(), key=lambda kv: kv[0][0] * kv[0][1])
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    int4 = Int4Linear.from_linears([lin], torch.bfloat16, g, "gemlite")
    assert int4.m1_type == GEMLITE_MATMUL_TYPES_MAPPING[mtype]
    int4.gemv = None  # gemlite's one-row kernel here, not ragtune's (tested below)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    w = dequantize_rtn(*quantize_rtn(lin.weight.detach(), g), torch.bfloat16)
    ref = x.float() @ w.float().T
    errs = {}
    try:
        for native in (False, True):
            utils.GEMLITE_USE_NATIVE_ATOMIC_BFP16 = native
            with torch.inference_mode():
                got = int4(x).float()
            errs[native] = float((got - ref).norm() / ref.norm())
    finally:
        utils.GEMLITE_USE_NATIVE_ATOMIC_BFP16 = True
    print("relative error, fp32 / bf16 atomics:", errs)
    assert errs[False] < 1e-2 and errs[True] < 0.1, errs
    tuner = GEMLITE_TRITON_MAPPING[mtype].kernel[0]
    chosen = [c for key, c in tuner.cache.items() if tuple(key[1:3]) == (n, k)]
    assert chosen, list(tuner.cache)
    assert all(c.kwargs["BLOCK_SIZE_N"] == cfg["BLOCK_SIZE_N"] for c in chosen)
    assert all(c.kwargs["BLOCK_SIZE_K"] == cfg["BLOCK_SIZE_K"] for c in chosen)


GEMV_CASES = [  # (out, in, setting): a 12B shape with split-K, ragged tiles, 1-8 group rows
    (6144, 5120, (64, 4, 4, 4, 1)),
    (5120, 14336, (128, 8, 1, 8, 2)),
    (1000, 512, (64, 2, 2, 4, 1)),
    (384, 768, (128, 1, 3, 4, 1)),
    (6144, 5120, (64, 4, 5, 4, 1, 1)),  # the block kernel
    (1000, 512, (64, 2, 2, 4, 1, 1)),
    (6144, 5120, (256, 4, 4, 4, 1, 2)),  # the denormal kernel
    (5120, 14336, (128, 8, 1, 8, 1, 2)),
    (1000, 512, (64, 2, 2, 4, 1, 2)),
    (384, 768, (128, 1, 3, 4, 1, 2)),
]


@pytest.mark.parametrize("n,k,setting", GEMV_CASES)
def test_int4_gemv_equals_the_float64_product(n, k, setting):
    """ragtune's one-row int4 kernel = x @ (q * scale + shift) in float64, rounded to bf16.

    The kernel sums in float32 and rounds once to bf16, so against the rounded float64 product
    only the outputs whose float32 sum lands across a bf16 rounding boundary differ (one bf16
    step, ~0.4%): ~1e-4 relative over a vector (1.4e-4 seen on the H200 at 6144x5120, the
    bound is 1e-3); a wrong word, nibble, group or split is ~100% off, gemlite's bf16 atomic
    adds 1.4-2.6%. Every output is written (NaN before), repeated calls are
    bitwise equal (the split counters reset themselves).
    """
    from ragtune.fastweights import pack_int4, quantize_rtn, unpack_int4
    from ragtune.int4_gemv import GemvConfig, launch

    cfg = GemvConfig(*setting)
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    q, scale, zero = quantize_rtn(w, 64)
    shift = (-zero.float() * scale.float()).bfloat16()
    packed = (pack_int4(q), scale.t().contiguous(), shift.t().contiguous())  # gemlite's layout
    dense = unpack_int4(*packed, torch.float32).double()  # [in, out], the float32 weights
    for _ in range(3):  # fresh inputs each time
        x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)
        out = torch.full((1, 1, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        launch(x, *packed, cfg, out=out)
        ref = x.double().view(1, k) @ dense
        err = (out.double().view(1, n) - ref.to(torch.bfloat16).double()).norm() / ref.norm()
        assert torch.isfinite(out).all() and err < 1e-3, float(err)
        assert torch.equal(out, launch(x, *packed, cfg))


def test_int4_linear_runs_one_row_through_the_gemv_compiled_and_graphed():
    """Int4Linear sends one-row calls to ragtune's kernel (the op ``ragtune::int4_gemv``), also
    under torch.compile and CUDA graph capture, and more rows to gemlite's kernels."""
    from ragtune.fastweights import Int4Linear, dequantize_rtn, quantize_rtn
    from ragtune.int4_gemv import GemvConfig, launch

    torch.manual_seed(0)
    w = torch.randn(1536, 1024, device="cuda", dtype=torch.bfloat16) * 0.02
    q, scale, zero = quantize_rtn(w, 64)
    lin = Int4Linear(q, scale, zero, 64, "gemlite")
    assert lin.gemv is not None, "the default routes one-row calls to ragtune's GEMV"
    x = torch.randn(1, 1, 1024, device="cuda", dtype=torch.bfloat16)
    want = launch(x, *lin._packed, GemvConfig(*lin.gemv))
    with torch.inference_mode():
        assert torch.equal(lin(x), want)
        step = torch.compile(lambda t: lin(t) * 2, dynamic=False)
        static = x.clone()
        for _ in range(2):
            step(static)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step(static)
        x2 = torch.randn_like(x)
        static.copy_(x2)
        graph.replay()
        assert torch.equal(out, 2 * launch(x2, *lin._packed, GemvConfig(*lin.gemv)))
        rows = torch.randn(3, 1024, device="cuda", dtype=torch.bfloat16)  # gemlite's GEMM
        ref = rows.float() @ dequantize_rtn(q, scale, zero, torch.bfloat16).float().T
        assert float((lin(rows).float() - ref).norm() / ref.norm()) < 1e-2


def test_fastdecode_decode_attention_kernel_equals_float64_and_replays_in_a_graph():
    """ragtune::decode_attention's Triton kernel on the GPU (tests/test_decode_attention.py's
    cases, the 12B shape among them): float64 attention to float32 rounding (bf16: to the
    output's and the probabilities' rounding, < 1e-2), bitwise repeatable, counters reset, and the same output
    replayed in a CUDA graph with new inputs copied in."""
    from ragtune import decode_attention as da
    from tests.test_decode_attention import CASES, exact, inputs, rope_tables

    for case in CASES:
        q, k, v, seen = (t.cuda() for t in inputs(*case, seed=2))
        scale = case[3] ** -0.5
        assert da.kernel_unsupported(q, k) is None
        out = torch.ops.ragtune.decode_attention(q, k, v, seen, scale)
        err = float((out.double() - exact(q, k, v, seen, scale)).norm() / out.double().norm())
        assert err < (1e-5 if case[-1] == torch.float32 else 1e-2), (case, err)
        assert torch.equal(out, da.launch(q, k, v, seen, scale)), case
    ws = da._workspaces[("cuda:0", 8, 4, 128, da.MAX_CHUNKS)]  # 8 KV heads, 4 q heads each
    assert int(ws[2].abs().sum()) == 0
    static = [t.clone() for t in (q, k, v)]
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        got = da.launch(*static, seen, scale)
    q2, k2, v2, _ = (t.cuda() for t in inputs(*CASES[-1], seed=3))
    for s, t in zip(static, (q2, k2, v2), strict=True):
        s.copy_(t)
    g.replay()
    assert torch.equal(got, da.launch(q2, k2, v2, seen, scale))
    # the decode step's op: q and K rotated, K/V written at the slot, then attention; against
    # the reference (torch's rotation, index_copy_ and matmuls)
    wide = torch.randn(1, 6144, device="cuda", dtype=torch.bfloat16)
    qv, kn, vn = (wide[:, a:b].view(1, -1, 128) for a, b in ((0, 4096), (4096, 5120), (5120, 6144)))
    cos, sin, pos = (t.cuda() for t in rope_tables(1, 128, 2048, torch.bfloat16, seed=4))
    slot = torch.tensor([765], device="cuda")
    kv = torch.randn(2, 1, 8, 1024, 128, device="cuda", dtype=torch.bfloat16)
    caches = [(kv[0].clone(), kv[1].clone()) for _ in range(2)]
    outs = []
    for mode, (kc, vc) in zip(("auto", "off"), caches, strict=True):
        da.MODE = mode
        try:
            outs.append(
                torch.ops.ragtune.decode_attention_write(
                    qv, kn, vn, kc, vc, slot, 768, seen, scale, cos, sin, pos
                )
            )
        finally:
            da.MODE = "auto"
    for a, r in zip(*caches, strict=True):
        assert torch.allclose(a.float(), r.float(), rtol=1e-2, atol=1e-6)
    want = exact(
        da.rotate(qv, cos, sin, pos),
        caches[1][0][:, :, :768],
        caches[1][1][:, :, :768],
        seen,
        scale,
    )
    for out in outs:
        assert float((out.double() - want).norm() / want.norm()) < 1e-2


@pytest.mark.parametrize("group", [1, 4])
def test_batcher_compiled_equals_one_at_a_time(tokenizer_dir, group):
    """Continuous batching on the GPU (compiled, graphed steps; prompts as graphs, alone or in
    fixed groups of 4), float32: same tokens."""
    from ragtune.batching import StepBatcher
    from ragtune.fastdecode import FastDecoder

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    model, tok = _fp32_lm(tokenizer_dir)
    fd = FastDecoder(model, tok, max_seq_len=256)
    prompts = [tok(t)["input_ids"] for t in TEXTS * 2]
    budgets = [20, 7, 14, 30, 3, 11]
    want = [fd.generate(p, n, []) for p, n in zip(prompts, budgets, strict=True)]
    batcher = StepBatcher(fd, max_batch=4, buckets=(1, 4), prefill_tokens=1, prefill_group=group)
    try:
        got = _concurrently(lambda i: batcher.generate(prompts[i], budgets[i], []), len(prompts))
    finally:
        batcher.close()
    assert got == want
    # prompts ran as CUDA graphs (captured on first use while other rows decoded)
    assert batcher.prefiller.graphs and batcher.prefills == len(prompts)


def test_batcher_engine_never_syncs_the_stream(tokenizer_dir):
    """The engine loop launches each step from the last step's ids on the device and reads
    tokens through pinned copies and events: under sync debug mode "error", any stream or
    device synchronisation in it (a .tolist() of a CUDA tensor, a pageable copy) would fail
    the requests."""
    from ragtune.batching import StepBatcher
    from ragtune.fastdecode import FastDecoder

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    model, tok = _fp32_lm(tokenizer_dir)
    fd = FastDecoder(model, tok, max_seq_len=256)
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    want = [fd.generate(p, 12, []) for p in prompts]
    batcher = StepBatcher(fd, max_batch=4, buckets=(4,), warmup=True)
    batcher.ready.wait()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        reqs = [batcher.submit(p, 12, []) for p in prompts]
        got = [r.result(timeout=120) for r in reqs]
    finally:
        torch.cuda.set_sync_debug_mode(0)
        batcher.close()
    assert got == want


def test_server_batching_auto_on_the_cuda_fast_path(tokenizer_dir):
    """server.batching=auto on the CUDA fast path: concurrent greedy answers (compiled,
    graphed 16-row steps, the batch-invariant default), float32, equal the standard path's one
    at a time."""
    from ragtune.config import GenerateConfig
    from ragtune.generate import Generator
    from ragtune.schema import get_schema

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    model, tok = _fp32_lm(tokenizer_dir)
    schema = get_schema("alpaca_rag")
    prompts = [f"### Instruction:\n{t}\n\n### Response:\n" for t in TEXTS * 3]
    plain = Generator(model, tok, schema, GenerateConfig(max_new_tokens=16), max_seq_length=256)
    want = [plain.generate(p).token_ids for p in prompts]
    gen = Generator(
        model, tok, schema, GenerateConfig(max_new_tokens=16, fast=True), max_seq_length=256
    )
    assert gen.start_batching("auto", max_batch=16) and gen._fast is None
    try:
        got = _concurrently(lambda i: gen.generate(prompts[i]).token_ids, len(prompts), 600)
    finally:
        gen._batcher.close()
    assert got == want and gen.batching_stats()["most_rows"] >= 2


@pytest.mark.parametrize("rows", [1, 32, 448])
def test_fp8_scaled_mm_equals_the_reference_arithmetic(rows):
    """torch._scaled_mm (row-wise scales, Hopper) computes the FP8 reference's product (the
    same e4m3 values in float32) up to accumulation order and the bf16 output, eager and
    compiled + captured as a CUDA graph, at a 12B projection's shape (q|k|v of Nemo)."""
    from ragtune.fp8weights import Fp8Linear, fp8_unsupported, quantize_rows

    if fp8_unsupported():
        pytest.skip(fp8_unsupported())
    torch.manual_seed(rows)
    w = torch.randn(6144, 5120, device="cuda", dtype=torch.bfloat16) * 0.02
    q, scale = quantize_rows(w)
    fast = Fp8Linear(q, scale, torch.bfloat16, "scaled_mm")
    ref = Fp8Linear(q, scale, torch.bfloat16, "reference")
    assert fast.kernel == "scaled_mm"
    x = torch.randn(rows, 1, 5120, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        want = ref(x).float()
        got = fast(x).float()
        step = torch.compile(fast, dynamic=False)
        static = x.clone()
        for _ in range(2):
            step(static)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step(static)
        static.copy_(torch.randn_like(x))
        graph.replay()
        replayed, again = out.float(), ref(static).float()
    for a, b in ((got, want), (replayed, again)):
        err = float((a - b).norm() / b.norm())
        assert err < 1e-2, err
    assert got.shape == (rows, 1, 6144)


@pytest.mark.parametrize(
    "shape,setting",
    [
        ((6144, 5120), None),
        ((5120, 4096), (64, 256, 4, 4, 3)),
        ((28672, 5120), (128, 128, 1, 4, 4)),
    ],
)
def test_fp8_small_gemm_equals_the_float64_product(shape, setting, monkeypatch):
    """ragtune's small-M FP8 kernel (ragtune/fp8_gemm.py) at 12B projection shapes, 32 rows:
    within 1e-2 (relative norm) of the float64 product of the same e4m3 values and scales, and
    of _scaled_mm; a row's output is bitwise the same alone, among 31 other rows, and on a
    repeat (split partials added in a fixed order); compiled + CUDA-graphed in Fp8Linear.

    The bound: the bf16 output alone is ~1.6e-3 off (relative norm of the rounding), and
    Hopper's FP8 MMA accumulates without promotion (_scaled_mm's rowwise_fast: 0.2-0.4% at
    these shapes, docs/benchmarks.md); a wrong tile, split partial or scale gives >= 0.3."""
    from ragtune import fp8_gemm
    from ragtune.fp8weights import Fp8Linear, fp8_unsupported, quantize_rows, scaled_mm

    if fp8_unsupported() or fp8_gemm.small_gemm_unavailable():
        pytest.skip(fp8_unsupported() or fp8_gemm.small_gemm_unavailable())
    n, k = shape
    cfg = fp8_gemm.Fp8GemmConfig(*setting) if setting else fp8_gemm.default_config(n, k)
    torch.manual_seed(n)
    wq, sw = quantize_rows(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
    sw = sw.reshape(1, -1).contiguous()
    xq, sx = quantize_rows(torch.randn(32, k, device="cuda", dtype=torch.bfloat16))
    fp8_gemm.workspace(n, cfg, xq.device)
    op = torch.ops.ragtune.fp8_small_gemm
    y = op(xq, sx, wq, sw, cfg.as_list())
    ref = (xq.double() * sx.double()) @ (wq.double() * sw.double().t()).t()
    err = float((y.double() - ref).norm() / ref.norm())
    vendor = scaled_mm(xq, sx, wq, sw, "rowwise", torch.ones((), device="cuda")).double()
    print(f"small fp8 gemm {n}x{k} {cfg}: error vs float64 {err:.2e}")
    assert err < 1e-2 and float((y.double() - vendor).norm() / vendor.norm()) < 1e-2
    oq, os_ = quantize_rows(torch.randn(32, k, device="cuda", dtype=torch.bfloat16))
    oq, os_ = torch.cat([oq[:7], xq[7:8], oq[8:]]), torch.cat([os_[:7], sx[7:8], os_[8:]])
    among = op(oq, os_, wq, sw, cfg.as_list())  # row 7 among 31 other rows
    alone = op(xq[7:8], sx[7:8], wq, sw, cfg.as_list())
    assert torch.equal(among[7], y[7]) and torch.equal(alone[0], y[7])
    assert torch.equal(op(xq, sx, wq, sw, cfg.as_list()), y)
    # inside torch.compile + a CUDA graph, as the decode step runs it
    monkeypatch.setenv(fp8_gemm.MODE_ENV, "on")
    lin = Fp8Linear(wq, sw.t(), torch.bfloat16, "scaled_mm")
    assert lin.small is not None
    x = torch.randn(32, 1, k, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        step = torch.compile(lin, dynamic=False)
        for _ in range(2):
            step(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        xq2, sx2 = quantize_rows(x.reshape(32, k))
        want = (xq2.double() * sx2.double()) @ (wq.double() * sw.double().t()).t()
    assert float((out.reshape(32, n).double() - want).norm() / want.norm()) < 1e-2


def test_fastdecode_fp8_tokens_are_the_fp8_models(tokenizer_dir):
    """quantize="fp8", compiled + CUDA graph, bf16: every token is the FP8 reference model's
    argmax (HF forward over unfused FP8 layers) up to near-ties (_greedy_gaps); prints how many
    leading tokens agree with the 16-bit model's greedy answer.

    The bound is looser than bf16's 0.05: a rounding difference between the two paths (bf16
    kernels, the GEMM's accumulation) can move an activation across an e4m3 rounding boundary
    (a step of 1/16), so near-ties flip more often: the H200 gave at most 0.076 (row-wise
    scales) and 0.133 (row-wise, fast accumulation) on this random model; a wrong layout or
    fusion gives ~1 (tests/test_batching_fp8.py checks the fused path exactly on CPU)."""
    from ragtune.fastdecode import FastDecoder
    from ragtune.fp8weights import fp8_unsupported, reference_model

    if fp8_unsupported():
        pytest.skip(fp8_unsupported())
    model, tok = _fp32_lm(tokenizer_dir)
    model = model.to(torch.bfloat16)
    fd = FastDecoder(model, tok, max_seq_len=256, quantize="fp8")
    assert fd.compiled and fd._direct.fused[0].qkv.kernel == "scaled_mm"
    gaps = _greedy_gaps(fd, reference_model(model), tok, [*TEXTS, LONG])
    print("fp8 greedy gaps:", gaps)
    assert max(gaps) < 0.2, gaps
    assert fd.graph == "manual"
    dense = FastDecoder(model, tok, max_seq_len=256, quantize=None, compile=False)
    agree = []
    for text in [*TEXTS, LONG]:
        ids = tok(text)["input_ids"]
        a, b = fd.generate(ids, 32, []), dense.generate(ids, 32, [])
        agree.append(next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), 32))
    print("fp8 vs bf16: leading tokens equal of 32:", agree)


def test_batcher_fp8_concurrent_equals_one_at_a_time(tokenizer_dir):
    """The server's batcher on an FP8-capable GPU (server.batch_weights=auto, invariant mode:
    compiled, graphed 4-row steps, prompts alone as graphs), bf16 model: FP8 weights, and
    concurrent answers equal the same batcher's answers one at a time."""
    from ragtune.batchstream import batcher_for
    from ragtune.fp8weights import fp8_unsupported

    if fp8_unsupported():
        pytest.skip(fp8_unsupported())
    model, tok = _fp32_lm(tokenizer_dir)
    model = model.to(torch.bfloat16)
    batcher = batcher_for(model, tok, 256, max_batch=4)
    prompts = [tok(t)["input_ids"] for t in [*TEXTS, LONG] * 2]
    budgets = [20, 7, 14, 30, 3, 11, 25, 9]
    try:
        assert batcher.decoder.quantize == "fp8" and batcher.buckets == [4]
        want = [batcher.generate(p, n, []) for p, n in zip(prompts, budgets, strict=True)]
        got = _concurrently(lambda i: batcher.generate(prompts[i], budgets[i], []), len(prompts))
    finally:
        batcher.close()
    assert got == want and batcher.most_rows >= 2


def test_batcher_prefill_first_and_pairs_keep_one_at_a_time_answers(tokenizer_dir):
    """The FP8 batcher with prompts prefilled in fixed pairs (a lone prompt runs in the same
    2-row graph beside a dummy) and prefill-first admission (bench/serve_load.py's
    ``--group 2`` and ``-pf``): concurrent answers equal the same batcher's one at a time."""
    from ragtune.batchstream import batcher_for
    from ragtune.fp8weights import fp8_unsupported

    if fp8_unsupported():
        pytest.skip(fp8_unsupported())
    model, tok = _fp32_lm(tokenizer_dir)
    model = model.to(torch.bfloat16)
    batcher = batcher_for(model, tok, 256, max_batch=4)
    batcher.prefiller.group, batcher.prefill_first = 2, True
    prompts = [tok(t)["input_ids"] for t in [*TEXTS, LONG] * 2]
    budgets = [20, 7, 14, 30, 3, 11, 25, 9]
    try:
        want = [batcher.generate(p, n, []) for p, n in zip(prompts, budgets, strict=True)]
        got = _concurrently(lambda i: batcher.generate(prompts[i], budgets[i], []), len(prompts))
    finally:
        batcher.close()
    assert got == want and batcher.most_rows >= 2
    assert any(n == 2 for n, _ in batcher.prefiller.graphs)  # the prompts ran in pair graphs


def test_batcher_compiled_prefill_rows_are_bitwise_their_lone_ones(tokenizer_dir, monkeypatch):
    """The FP8 batcher with its prompts' forward compiled (the default; set explicitly here:
    inductor, one compilation with a symbolic length) in fixed pairs: a prompt's first id and
    its last layer's K/V are bitwise the same in row 1, in row 0 and beside a dummy (the
    invariance the server promises) at three padded lengths, every padded length has its
    graph, and concurrent answers equal the same batcher's one at a time."""
    from ragtune.batchprefill import COMPILE_ENV
    from ragtune.batchstream import batcher_for
    from ragtune.fp8weights import fp8_unsupported

    if fp8_unsupported():
        pytest.skip(fp8_unsupported())
    monkeypatch.setenv(COMPILE_ENV, "on")
    model, tok = _fp32_lm(tokenizer_dir)
    model = model.to(torch.bfloat16)
    batcher = batcher_for(model, tok, 256, max_batch=4)
    pre = batcher.prefiller
    prompts = [tok(t)["input_ids"] for t in [*TEXTS, LONG] * 2]
    budgets = [20, 7, 14, 30, 3, 11, 25, 9]
    try:
        lengths = sorted({pre.padded(n) for n in range(1, pre.max_seq_len)})
        assert pre.compiled and pre.group == 2 and sorted(t for _, t in pre.graphs) == lengths
        g = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            for t in (64, 128, 192):
                a, b = torch.randint(100, 30000, (2, t), generator=g).cuda()
                dummy = torch.zeros_like(b)  # as Prefiller.pack fills a missing row
                last = torch.tensor([t - 1, t - 1], device="cuda")
                got = []
                for rows, j in (((a, b), 1), ((b, a), 0), ((b, dummy), 0)):
                    first, ks, vs = pre._compiled(torch.stack(rows), last)
                    got.append((first[j], ks[-1][j], vs[-1][j]))
                for other in got[1:]:
                    assert all(torch.equal(x, y) for x, y in zip(got[0], other, strict=True)), t
        want = [batcher.generate(p, n, []) for p, n in zip(prompts, budgets, strict=True)]
        got = _concurrently(lambda i: batcher.generate(prompts[i], budgets[i], []), len(prompts))
    finally:
        batcher.close()
    assert got == want and batcher.most_rows >= 2 and pre.compiled


def test_pdl_launches_give_the_plain_launches_bits(tokenizer_dir, monkeypatch):
    """ragtune.pdl: the int4 GEMV and the decode attention launched early give the plain
    launches' outputs bit for bit: a captured q|k|v GEMV -> attention (K/V written) -> o GEMV
    chain at the 12B shapes and H200 settings, replayed with new inputs (a kernel reading its
    input before the wait reads the previous replay's); and the int4 decoder's greedy tokens
    with RAGTUNE_PDL=auto (its compiled step's inductor kernels early too) equal =off's."""
    from ragtune import decode_attention, int4_gemv, pdl  # noqa: F401 (their ops)
    from ragtune.fastdecode import FastDecoder
    from ragtune.fastweights import pack_int4, quantize_rtn
    from tests.test_decode_attention import rope_tables

    def packed(n: int, k: int):
        q, scale, zero = quantize_rtn(torch.randn(n, k, device="cuda") * 0.02, 64)
        shift = (-zero.float() * scale.float()).bfloat16()
        return pack_int4(q), scale.bfloat16().t().contiguous(), shift.t().contiguous()

    torch.manual_seed(0)
    qkv_w, o_w = packed(6144, 5120), packed(5120, 4096)
    qkv_cfg, o_cfg = [128, 16, 5, 4, 1, 2], [32, 16, 4, 4, 1, 2]  # int4_configs/nvidia_h200.json
    cos, sin, pos = (t.cuda() for t in rope_tables(1, 128, 2048, torch.bfloat16, seed=4))
    slot, seen = torch.tensor([700], device="cuda"), torch.ones(1, 768, dtype=torch.bool).cuda()
    cache = torch.randn(2, 1, 8, 1024, 128, device="cuda", dtype=torch.bfloat16)
    xs = [torch.randn(1, 5120, device="cuda", dtype=torch.bfloat16) for _ in range(4)]

    def chain(x, kc, vc):
        h = torch.ops.ragtune.int4_gemv(x * 2, *qkv_w, qkv_cfg)  # an elementwise kernel first
        qv, kn, vn = (
            h[:, a:b].view(1, -1, 128) for a, b in ((0, 4096), (4096, 5120), (5120, 6144))
        )
        att = torch.ops.ragtune.decode_attention_write(
            qv, kn, vn, kc, vc, slot, 768, seen, 128**-0.5, cos, sin, pos
        )
        return torch.ops.ragtune.int4_gemv(att.view(1, 4096), *o_w, o_cfg)

    assert pdl.enabled(torch.device("cuda")), "an sm_90 GPU launches the decode step early"
    runs = []
    for early in (False, True):
        static, kc, vc = xs[0].clone(), cache[0].clone(), cache[1].clone()
        graph = torch.cuda.CUDAGraph()
        with pdl.decode_step(torch.device("cuda"), compiled=early):
            assert bool(pdl.launch_options()) == early
            chain(static, kc, vc)  # kernels compiled, workspaces made: outside the capture
            with torch.cuda.graph(graph):
                out = chain(static, kc, vc)
        got = []
        for x in xs:
            static.copy_(x)
            graph.replay()
            got.append((out.clone(), kc.clone(), vc.clone()))
        runs.append(got)
    for plain, early in zip(*runs, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(plain, early, strict=True))
    assert not torch.equal(runs[0][0][0], runs[0][1][0])  # the inputs did change

    model, tok = _fp32_lm(tokenizer_dir)
    model = model.to(torch.bfloat16)
    tokens = {}
    for mode in ("off", "auto"):
        monkeypatch.setenv(pdl.ENV, mode)
        fd = FastDecoder(model, tok, max_seq_len=256, quantize="int4")
        tokens[mode] = [fd.generate(tok(t)["input_ids"], 24, []) for t in TEXTS]
    assert tokens["off"] == tokens["auto"]
