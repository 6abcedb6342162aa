"""Build a randomly initialised model of the exact Mistral-Nemo-12B shape (and a BGE-base one).

No 12B weights can reach the GPU machine, and weights do not change speed, so the GPU
benchmarks run on a model of the same shape with random weights:

    python bench/make_nemo_shape.py --out /tmp/nemo12b --tokenizer .gpu/smol_tok \
        [--embedder-out /tmp/bge-base-random --embedder-tokenizer .gpu/bert_tok]

Mistral-Nemo-Instruct-2407's config: hidden 5120, 40 layers, 32 heads, 8 KV heads, head_dim
128, intermediate 14336, vocab 131072, rope theta 1e6, no sliding window, untied LM head
(12.25B parameters, 24.5 GB in bf16). The tokenizer is SmolLM2's (ids < 49152): to keep greedy
tokens inside the tokenizer's range, the LM-head rows of ids >= len(tokenizer) are zeroed
(their logit is exactly 0, below the max of 49k random logits), so decoded text stays text.

``--embedder-out`` writes a sentence-transformers folder of BAAI/bge-base-en's shape (BERT
base: 768 wide, 12 layers, CLS pooling, normalised) with random weights and the BERT
uncased WordPiece tokenizer of the embedded MiniLM (same vocabulary as bge-base-en).

``--layers N`` / ``--small`` build narrower variants for a CPU smoke test of this script.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger("make_nemo_shape")

NEMO = {
    "hidden_size": 5120,
    "num_hidden_layers": 40,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 14336,
    "vocab_size": 131072,
    "max_position_embeddings": 1024000,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "sliding_window": None,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "initializer_range": 0.02,
}
SMALL = {  # CPU smoke test: same structure, tiny widths
    "hidden_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "intermediate_size": 512,
}
BGE_BASE = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
}


def default_tokenizer() -> str:
    from ragtune.models import DEFAULT_LM, resolve_model

    return resolve_model(DEFAULT_LM)


def build_lm(
    out: Path, tokenizer: str, device: str, dtype: str, small: bool, layers: int | None
) -> dict:
    """Random Nemo-shaped MistralForCausalLM + the given tokenizer, saved as safetensors."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, MistralConfig, MistralForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer)
    shape = dict(NEMO)
    if small:
        shape.update(SMALL)
    if layers:
        shape["num_hidden_layers"] = layers
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    config = MistralConfig(
        **shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=pad
    )
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
        dtype
    ]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)  # create in bf16 directly: 24.5 GB, not 49 GB
    try:
        with torch.device(device):
            model = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        model.lm_head.weight[len(tok) :].zero_()
    n_params = sum(p.numel() for p in model.parameters())
    t_init = time.perf_counter() - t0
    log.info("initialised %.2fB parameters on %s in %.1fs", n_params / 1e9, device, t_init)

    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    t1 = time.perf_counter()
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB")
    tok.save_pretrained(tmp)
    GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=pad
    ).save_pretrained(tmp)
    info = {
        "what": "random weights, Mistral-Nemo-12B shape (ragtune bench/make_nemo_shape.py)",
        "parameters": n_params,
        "dtype": dtype,
        "tokenizer": str(tokenizer),
        "tokenizer_vocab": len(tok),
        "lm_head_rows_zeroed_from": len(tok),
    }
    (tmp / "ragtune-random-shape.json").write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    t_save = time.perf_counter() - t1
    size = sum(f.stat().st_size for f in out.iterdir())
    log.info("saved %s (%.1f GB) in %.1fs", out, size / 1e9, t_save)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {**info, "init_s": round(t_init, 1), "save_s": round(t_save, 1), "bytes": size}


def build_embedder(out: Path, tokenizer: str, device: str, small: bool) -> dict:
    """A BGE-base-shaped sentence-transformers folder: BERT base, CLS pooling, normalised."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    shape = dict(BGE_BASE)
    if small:
        shape.update(
            {
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "intermediate_size": 128,
            }
        )
    tok = AutoTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(0)
    bert = BertModel(BertConfig(**shape), add_pooling_layer=False)
    with tempfile.TemporaryDirectory() as raw:
        bert.save_pretrained(raw, safe_serialization=True)
        tok.save_pretrained(raw)
        word = models.Transformer(raw, max_seq_length=512)
        dim_of = getattr(word, "get_embedding_dimension", None) or word.get_word_embedding_dimension
        pool = models.Pooling(dim_of(), pooling_mode="cls")
        st = SentenceTransformer(modules=[word, pool, models.Normalize()], device=device)
        if out.exists():
            shutil.rmtree(out)
        st.save(str(out))
    log.info("saved a random BGE-base-shaped embedder to %s", out)
    return {"embedder": str(out), "hidden": shape["hidden_size"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the LM")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: SmolLM2's)")
    ap.add_argument("--device", default=None, help="where to initialise (default: cuda if any)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--small", action="store_true", help="tiny widths (CPU smoke test)")
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers")
    ap.add_argument("--embedder-out", type=Path, default=None)
    ap.add_argument("--embedder-tokenizer", default=None, help="BERT uncased tokenizer folder")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = build_lm(
        args.out, args.tokenizer or default_tokenizer(), device, args.dtype, args.small, args.layers
    )
    if args.embedder_out:
        if not args.embedder_tokenizer:
            from ragtune.models import embedder_dir

            args.embedder_tokenizer = str(embedder_dir())
        report.update(
            build_embedder(args.embedder_out, args.embedder_tokenizer, device, args.small)
        )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
