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
    cfg = validate(compose("sft", [
        "conf=nemo_rag", f"model.name_or_path={model}", "model.max_seq_length=256",
        "train.max_steps=4", "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=1", "train.packing=false",
        "train.learning_rate=1e-3", "train.logging_steps=1", f"train.save_method={method}",
        f"output_dir={out}",
    ]), SFT_TOP_LEVEL)
    schema = get_schema(cfg.prompt.name)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model)
    examples = []
    for i in range(16):
        p, c = schema.render_example(
            PromptFields(f"What is item {i}?", "", [f"Item {i} is a blue lamp number {i}."]),
            f"A blue lamp number {i}.", tok)
        examples.append({"prompt": p, "completion": c, "kind": "oracle"})
    r = train(cfg, examples, schema, out)
    info = {"backend": r.backend, "losses": r.losses, "steps": r.steps,
            "model_dir": str(r.model_dir), "peak": r.peak_memory_gb}
    if method == "lora":
        w = load_file(str(r.model_dir / "adapter_model.safetensors"))
        b = [k for k in w if "lora_B" in k]
        info["lora_B_tensors"] = len(b)
        info["lora_B_max_abs"] = max(float(w[k].float().abs().max()) for k in b)
    print("RESULT " + json.dumps(info))
    """
)


def _run_unsloth(model: str, out: Path, method: str) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    proc = subprocess.run(
        [sys.executable, "-c", UNSLOTH_SCRIPT, model, str(out), method],
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
        x = torch.tensor([ids], device="cuda")
        with torch.inference_mode():
            want = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=32,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=0,
            )[0, len(ids) :].tolist()
        assert fd.generate(ids, 32, [eos]) == want
    # batched, left-padded, compiled for batch 3
    prompts = [tok(t)["input_ids"] for t in texts]
    got = fd.generate_batch(prompts, 16, [eos])
    for p, g in zip(prompts, got, strict=True):
        assert fd.generate(p, 16, [eos]) == g
    assert fd.graph == graph  # the capture did not fall back


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_fastdecode_quantized_runs(tokenizer_dir, kind):
    """Weight-only quantization (torchao) changes the weights: it must run and give tokens."""
    from ragtune.fastdecode import FastDecoder

    model, tok = _fp32_lm(tokenizer_dir)
    fd = FastDecoder(model.to(torch.bfloat16), tok, max_seq_len=256, quantize=kind)
    out = fd.generate(tok("The lamp")["input_ids"], 16, [])
    assert len(out) == 16 and all(0 <= t < len(tok) + 1000 for t in out)
    assert fd.last_stats["decode_tok_s"] > 0

    # the decoder layers are quantized; with int8 the LM head stays bf16 (unfused otherwise)
    def quantized(w: torch.Tensor) -> bool:  # torchao weights are tensor subclasses
        return type(w) not in (torch.Tensor, torch.nn.Parameter)

    assert quantized(model.model.layers[0].mlp.down_proj.weight)
    assert quantized(model.get_output_embeddings().weight) == (kind == "int4")
