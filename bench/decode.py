"""Batch-1 and batched greedy decode speed: HF ``generate`` (slow path) vs ragtune.fastdecode.

    python bench/decode.py --model /tmp/nemo12b --json $OUT/decode.json

Variants (``--variants``, run in this order, results appended as they finish):

- ``slow_bf16``        HF generate on the merged 16-bit model
- ``floor_bf16``       every Linear at M=1 in one CUDA graph: the weight-streaming floor
- ``fast_bf16``        FastDecoder (static cache, compiled step captured as one CUDA graph)
- ``fast_bf16_trees``  the same with torch.compile's own CUDA graphs (reduce-overhead)
- ``fast_int8``        a second copy quantized weight-only int8 with torchao
- ``fast_int4``        int4 copies of the projections through gemlite (q|k|v, gate|up fused,
                       LM head int4); suffixes: ``_g128`` (group 128, default 64),
                       ``_headbf16`` (LM head kept 16-bit)
- ``slow_bnb4`` / ``fast_bnb4`` / ``fast_bnb4raw``  the model in bitsandbytes NF4 (what a
                       merged_4bit folder loads as): HF generate; FastDecoder's default on it
                       (quantize="auto": int4 through gemlite, converted from the NF4
                       weights); FastDecoder on the NF4 modules themselves
The fastest batch-1 fast variant (or each of ``--batch-variant``) is then run batched at
``--batches`` concurrent requests (one left-padded batch), and ``--clients N`` runs N
concurrent streaming clients through ``ragtune.batching.StepBatcher`` (continuous batching).

int4 options (``fast_int4*`` / ``fast_bnb4``): ``--int4-configs`` (tuned batch-1 kernel settings:
auto | a file | off), ``--int4-dense-rows`` (prompts from this many rows dequantize for
cuBLAS; 0 = gemlite's int4 GEMM).

``--random`` builds the Mistral-Nemo-12B shape with random weights in GPU memory
(bench/make_nemo_shape.py's config; ``--model`` is then only the tokenizer folder): no
24.5 GB save and load.

For each: time to first token of a ``--prompt``-token RAG-like prompt (prefill + first token),
decode tokens/s over ``--new`` tokens (median of ``--repeats`` runs, after a warm-up run that
includes compilation), peak GPU memory, and for fast variants how many leading tokens agree
with the slow path of the same weights. Without CUDA it runs a tiny model on CPU (a smoke
test of this script, not a benchmark).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode_profile import gemv_floor, int4_floor, kernel_time  # noqa: E402
from ragtune.fastdecode import FastDecoder  # noqa: E402

log = logging.getLogger("bench.decode")

RAG_TEXT = (
    "### Instruction:\nAnswer the question using only the context. If the context does not "
    "contain the answer, say that you do not know.\n\n### Context:\n"
    "[1] The Kessa lighthouse was built in 1871 by the harbour board after two winters of "
    "wrecks on the northern shoals. Its lamp burned colza oil until 1903, when a paraffin "
    "vapour burner was fitted, and the keepers' log records every change of the light. "
    "[2] The harbour board's minutes name the engineer, Ida Varnholm, who also designed the "
    "breakwater and the tide gauge that still stands at the end of the east pier. "
    "[3] In 1958 the light was automated and the keepers left; the cottages became a museum. "
)


def gpu_mem() -> dict[str, float]:
    if not torch.cuda.is_available():
        return {}
    return {
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "now_gib": round(torch.cuda.memory_allocated() / 2**30, 2),
    }


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_prompt(tok: Any, n: int, salt: int = 0) -> list[int]:
    """Exactly ``n`` token ids of RAG-like text (question last)."""
    ids: list[int] = []
    text = RAG_TEXT
    while len(ids) < n:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        text += RAG_TEXT.replace("Kessa", f"Kessa-{salt}")
    q = tok(
        f"\n\n### Input:\nWho designed the breakwater? ({salt})\n\n### Response:\n",
        add_special_tokens=False,
    )["input_ids"]
    return ids[: n - len(q)] + q


def slow_generate(model: Any, ids: list[int], n: int, pad_id: int) -> tuple[list[int], float]:
    """HF generate, greedy, exactly ``n`` new tokens (no EOS stop); (tokens, seconds)."""
    x = torch.tensor([ids], device=model.device)
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=pad_id,
        )
    sync()
    return out[0, len(ids) :].tolist(), time.perf_counter() - t0


def bench_slow(name: str, model: Any, tok: Any, prompt: list[int], args: Any) -> dict:
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    slow_generate(model, prompt[:32], 4, pad)  # warm-up (cuBLAS handles, allocator)
    ttfts = [slow_generate(model, prompt, 1, pad)[1] for _ in range(args.repeats)]
    runs = [slow_generate(model, prompt, args.slow_new, pad) for _ in range(args.repeats)]
    total = statistics.median(r[1] for r in runs)
    ttft = statistics.median(ttfts)
    res = {
        "variant": name,
        "batch": 1,
        "prompt_tokens": len(prompt),
        "new_tokens": args.slow_new,
        "ttft_s": round(ttft, 4),
        "total_s": round(total, 3),
        "decode_tok_s": round((args.slow_new - 1) / max(total - ttft, 1e-9), 2),
        "end_to_end_tok_s": round(args.slow_new / total, 2),
        **gpu_mem(),
    }
    res["_tokens"] = runs[0][0]
    return res


def bench_fast(
    name: str, fd: FastDecoder, prompt: list[int], args: Any, ref: list[int] | None
) -> dict:
    t0 = time.perf_counter()
    fd.generate(prompt, args.new, eos_ids=[])  # warm-up: compiles and captures the graph
    warm = time.perf_counter() - t0
    stats, toks = [], []
    for _ in range(args.repeats):
        toks = fd.generate(prompt, args.new, eos_ids=[])
        stats.append(dict(fd.last_stats))
    med = sorted(stats, key=lambda s: s["decode_tok_s"])[len(stats) // 2]
    no_ahead = None
    if getattr(fd, "lookahead", False):  # the same graphs, the host waiting for each token
        fd.lookahead = False
        rates = []
        for _ in range(args.repeats):
            fd.generate(prompt, args.new, eos_ids=[])
            rates.append(fd.last_stats["decode_tok_s"])
        fd.lookahead = True
        no_ahead = round(sorted(rates)[len(rates) // 2], 1)
    # before/after in one process: the same decoder, compiled step, cache buckets and prompt
    # graphs, with the step's attention through the matmul path inside ragtune's op
    # (decode_attention.MODE = "off": cuBLAS Q.K^T and P.V and the softmax, eager ops inside
    # the op, in newly captured graphs) instead of the one Triton kernel a layer; or, with
    # --before-kernel, through an older kernel (bench/decode_attention_before.py) in its place
    old = None
    before = getattr(fd, "fused_attention", False) and args.before_kernel != "none"
    if before and fd.device.type == "cuda":
        from ragtune import decode_attention

        graphs, mode, launch = fd._graphs, decode_attention.MODE, decode_attention.launch
        fd._graphs = {}
        if args.before_kernel:
            from bench.decode_attention_before import launcher

            decode_attention.launch = launcher(args.before_kernel)
        else:
            decode_attention.MODE = "off"
        try:
            fd.generate(prompt, args.new, eos_ids=[])  # captures the bucket's step graph
            runs, old_toks = [], []
            for _ in range(args.repeats):
                old_toks = fd.generate(prompt, args.new, eos_ids=[])
                runs.append(dict(fd.last_stats))
            prof = kernel_time(fd, prompt) if args.profile else None
        finally:
            fd._graphs, decode_attention.MODE, decode_attention.launch = graphs, mode, launch
        old = {
            "what": f"kernel {args.before_kernel}" if args.before_kernel else "matmul attention",
            "decode_tok_s_runs": [round(s["decode_tok_s"], 1) for s in runs],
            "ttft_s_runs": [round(s["ttft_s"], 4) for s in runs],
            "profile": prof,
            # greedy tokens of the two paths: equal up to this index (float32 vs 16-bit scores)
            "same_tokens_first_n": next(
                (i for i, (a, b) in enumerate(zip(toks, old_toks, strict=False)) if a != b),
                min(len(toks), len(old_toks)),
            ),
        }
    agree = None
    if ref is not None:
        agree = next(
            (i for i, (a, b) in enumerate(zip(toks, ref, strict=False)) if a != b),
            min(len(toks), len(ref)),
        )
    return {
        "variant": name,
        "mode": fd.mode,
        "compiled": fd.compiled,
        "batch": 1,
        "prompt_tokens": len(prompt),
        "new_tokens": args.new,
        "warmup_s": round(warm, 1),
        "ttft_s": round(statistics.median(s["ttft_s"] for s in stats), 4),
        "total_s": round(med["total_s"], 3),
        "decode_tok_s": round(med["decode_tok_s"], 1),
        "decode_tok_s_runs": [round(s["decode_tok_s"], 1) for s in stats],
        "decode_tok_s_no_lookahead": no_ahead,
        "ttft_s_runs": [round(s["ttft_s"], 4) for s in stats],
        "kv_buckets": list(getattr(fd, "kv_buckets", ())),
        "prefill": getattr(fd, "prefill", None),
        "attention_before": old,
        "agree_with_slow_first_n": agree,
        "compared_tokens": len(ref) if ref is not None else None,
        **gpu_mem(),
    }


def bench_batched(name: str, fd: FastDecoder, tok: Any, args: Any, bsz: int) -> dict:
    # concurrent RAG requests of 75-100% of --prompt tokens (left-padded into one batch)
    prompts = [
        make_prompt(tok, int(args.prompt * (0.75 + 0.25 * ((i * 7) % bsz) / max(bsz - 1, 1))), i)
        for i in range(bsz)
    ]
    t0 = time.perf_counter()
    fd.generate_batch(prompts, args.batch_new, eos_ids=[])
    warm = time.perf_counter() - t0
    runs = []
    for _ in range(max(1, args.repeats - 1)):
        fd.generate_batch(prompts, args.batch_new, eos_ids=[])
        runs.append(dict(fd.last_stats))
    med = sorted(runs, key=lambda s: s["total_s"])[len(runs) // 2]
    return {
        "variant": name,
        "batch": bsz,
        "prompt_tokens_mean": round(sum(map(len, prompts)) / bsz),
        "new_tokens_each": args.batch_new,
        "warmup_s": round(warm, 1),
        "ttft_s": round(med["ttft_s"], 4),
        "total_s": round(med["total_s"], 3),
        "throughput_tok_s": round(bsz * args.batch_new / med["total_s"], 1),
        "decode_tok_s": round(med["decode_tok_s"], 1),
        "per_request_tok_s": round(med["decode_tok_s"] / bsz, 1),
        **gpu_mem(),
    }


def bench_clients(name: str, fd: FastDecoder, tok: Any, args: Any) -> dict:
    """``--clients`` concurrent streaming requests through the continuous batcher."""
    import threading

    from ragtune.batching import StepBatcher

    n = args.clients
    buckets = [int(b) for b in args.client_buckets.split(",") if b.strip()] or None
    batcher = StepBatcher(fd, max_batch=n, buckets=buckets)
    prompts = [
        make_prompt(tok, int(args.prompt * (0.75 + 0.25 * ((i * 7) % n) / max(n - 1, 1))), i)
        for i in range(n)
    ]

    def wave() -> tuple[float, list[dict]]:
        stats: list[dict] = [{} for _ in range(n)]

        def client(i: int) -> None:
            t0 = time.perf_counter()
            count = 0
            for _ in batcher.stream(prompts[i], args.client_new, eos_ids=[]):
                if count == 0:
                    stats[i]["ttft_s"] = time.perf_counter() - t0
                count += 1
            stats[i].update(latency_s=time.perf_counter() - t0, tokens=count)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - t0, stats

    try:
        t0 = time.perf_counter()
        wave()  # warm-up: compiles and captures the batcher's steps, autotunes the prefill
        warm = time.perf_counter() - t0
        steps0 = batcher.steps
        wall, stats = wave()
    finally:
        batcher.close()

    def pct(key: str, q: float) -> float:
        vals = sorted(s[key] for s in stats)
        return round(vals[min(len(vals) - 1, int(q * len(vals)))], 3)

    tokens = sum(s["tokens"] for s in stats)
    return {
        "variant": name,
        "batch": n,
        "clients": n,
        "new_tokens_each": args.client_new,
        "prompt_tokens_mean": round(sum(map(len, prompts)) / n),
        "warmup_s": round(warm, 1),
        "wall_s": round(wall, 3),
        "aggregate_tok_s": round(tokens / wall, 1),
        "decode_tok_s": round(tokens / wall, 1),
        "steps": batcher.steps - steps0,
        "latency_p50_s": pct("latency_s", 0.5),
        "latency_p95_s": pct("latency_s", 0.95),
        "ttft_p50_s": pct("ttft_s", 0.5),
        "ttft_p95_s": pct("ttft_s", 0.95),
        "ttft_s": pct("ttft_s", 0.5),
        "total_s": round(wall, 3),
        **gpu_mem(),
    }


def free(*objs: Any) -> None:
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def random_nemo(tokenizer_dir: str, layers: int | None = None) -> Any:
    """The Mistral-Nemo-12B shape, random bf16 weights, built on the GPU (as make_nemo_shape)."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    from bench.make_nemo_shape import NEMO

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = dict(NEMO)
    if layers:
        shape["num_hidden_layers"] = layers
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    cfg = MistralConfig(**shape, bos_token_id=tok.bos_token_id, eos_token_id=None, pad_token_id=pad)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if dev == "cuda" else torch.float32)
    try:
        with torch.device(dev):
            model = MistralForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        model.lm_head.weight[len(tok) :].zero_()
    model.generation_config.eos_token_id = None
    log.info("random Nemo-shaped model on %s in %.1fs", dev, time.perf_counter() - t0)
    return model.eval()


def to_bnb4(model: Any) -> Any:
    """Replace the decoder's Linear layers by bitsandbytes NF4 ones (double quant), in place.

    What ``load_in_4bit`` with the merged_4bit folder's config gives, without a save + load:
    the LM head stays 16-bit, as bitsandbytes' loader leaves it.
    """
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not head:
                new = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=False,
                    compute_dtype=torch.bfloat16,
                    quant_type="nf4",
                    compress_statistics=True,
                    device="meta",
                )
                new.weight = bnb.nn.Params4bit(
                    child.weight.data,
                    requires_grad=False,
                    quant_type="nf4",
                    compress_statistics=True,
                ).to(child.weight.device)
                setattr(parent, name, new)
                del child
    torch.cuda.empty_cache()
    return model


def load(path: str, bnb4: bool = False) -> Any:
    from transformers import AutoModelForCausalLM

    kw: dict[str, Any] = {"dtype": torch.bfloat16 if torch.cuda.is_available() else torch.float32}
    if torch.cuda.is_available():
        kw["device_map"] = {"": 0}
    if bnb4:
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **kw).eval()
    model.generation_config.eos_token_id = None  # time exactly N tokens
    log.info("loaded %s%s in %.1fs", path, " (bnb 4-bit)" if bnb4 else "", time.perf_counter() - t0)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model folder (e.g. make_nemo_shape output)")
    ap.add_argument(
        "--variants",
        default="slow_bf16,floor_bf16,fast_bf16_trees,fast_bf16,fast_int8,slow_bnb4,fast_bnb4",
        help="slow_X | fast_X | fast_X_trees | floor_bf16, X in bf16 int8 int4 bnb4",
    )
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    ap.add_argument("--new", type=int, default=128, help="new tokens, fast paths")
    ap.add_argument("--slow-new", type=int, default=32, help="new tokens, slow paths")
    ap.add_argument("--batch-new", type=int, default=64, help="new tokens per batched request")
    ap.add_argument("--batches", default="8,32", help="concurrent requests")
    ap.add_argument(
        "--batch-variant",
        default="auto",
        help="fast variant(s) run batched, comma-separated; auto = fastest batch-1 fast variant",
    )
    ap.add_argument("--max-seq-len", type=int, default=2048, help="static cache, batch 1")
    ap.add_argument("--batch-max-seq-len", type=int, default=1024, help="static cache, batched")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--random", action="store_true", help="random Nemo-12B shape in GPU memory")
    ap.add_argument("--layers", type=int, default=None, help="with --random: fewer layers")
    ap.add_argument("--clients", type=int, default=0, help="concurrent streaming clients")
    ap.add_argument("--client-new", type=int, default=128, help="new tokens per client")
    ap.add_argument("--client-buckets", default="", help="batcher step sizes, e.g. 8,32")
    ap.add_argument("--profile", action="store_true", help="kernel time per step (fast variants)")
    ap.add_argument(
        "--attention-config",
        default=None,
        help="BLOCK_S x warps x MAX_CHUNKS of the decode-attention kernel, e.g. 64x4x16",
    )
    ap.add_argument(
        "--before-kernel",
        default=None,
        help="in-process 'before': an older decode-attention kernel file, or none (default: matmul)",
    )
    ap.add_argument("--int4-configs", default="auto", help="tuned int4 settings: auto|FILE|off")
    ap.add_argument("--int4-dense-rows", type=int, default=128, help="0: int4 GEMM prompts")
    ap.add_argument("--json", type=Path, default=None, help="append results (JSON lines)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from transformers import AutoTokenizer

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    cuda = torch.cuda.is_available()
    env = {
        "gpu": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "model": args.model,
        # programmatic dependent launch of the decode kernels (ragtune.pdl), read at each launch
        "pdl": os.environ.get("RAGTUNE_PDL", "auto"),
        "inductor_pdl": os.environ.get("TORCHINDUCTOR_ENABLE_PDL", "0"),
    }
    tok = AutoTokenizer.from_pretrained(args.model)
    from ragtune import fastweights

    fastweights.set_tuned_configs(None if args.int4_configs == "off" else args.int4_configs)
    if cuda:
        env["gpu_mem_total_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30)
    if args.attention_config:
        from ragtune import decode_attention

        cfg = (int(x) for x in args.attention_config.split("x"))
        decode_attention.BLOCK_S, decode_attention.NUM_WARPS, decode_attention.MAX_CHUNKS = cfg
        env["attention_config"] = args.attention_config
    prompt = make_prompt(tok, args.prompt)
    results: list[dict] = []
    models: dict[str, Any] = {}
    decoders: dict[str, FastDecoder] = {}
    refs: dict[str, list[int]] = {}

    def emit(r: dict) -> None:
        r = {**env, **r}
        results.append(r)
        line = {k: v for k, v in r.items() if not k.startswith("_")}
        print("RESULT " + json.dumps(line), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(line) + "\n")

    def attempt(name: str, fn: Any) -> Any:
        try:
            return fn()
        except Exception as e:  # one failing variant must not lose the others
            log.exception("%s failed", name)
            emit({"variant": name, "error": f"{type(e).__name__}: {e}"[:500]})
            return None

    def get_model(kind: str) -> Any:
        if kind == "int4":  # FastDecoder makes the int4 copies from the 16-bit model
            kind = "bf16"
        if kind not in models:
            if kind == "bnb4":  # the last ones: make room
                base = models.pop("bf16", None) if args.random else None
                for k in list(models):
                    del models[k]
                decoders.clear()
                free()
                if args.random:
                    base = base if base is not None else random_nemo(args.model, args.layers)
                    t0 = time.perf_counter()
                    models[kind] = to_bnb4(base)
                    log.info("NF4 conversion took %.1fs", time.perf_counter() - t0)
                    free()
                else:
                    models[kind] = load(args.model, bnb4=True)
            else:
                m = random_nemo(args.model, args.layers) if args.random else load(args.model)
                if kind == "int8":
                    from ragtune.fastdecode import quantize_weights

                    t0 = time.perf_counter()
                    quantize_weights(m, kind)
                    log.info("%s quantization took %.1fs", kind, time.perf_counter() - t0)
                models[kind] = m
        return models[kind]

    def decoder_kwargs(v: str) -> dict[str, Any]:
        """FastDecoder options named by a variant: fast_int4_g128_headbf16, fast_bnb4raw..."""
        parts = v.split("_")
        kw: dict[str, Any] = {"graph": "trees" if "trees" in parts else "manual"}
        if parts[1] == "int4":
            kw["quantize"] = "int4"
            kw["group_size"] = 128 if "g128" in parts else 64
            kw["quantize_head"] = "headbf16" not in parts
        elif parts[1] == "bnb4raw":
            kw["quantize"] = None
        if parts[1] in ("int4", "bnb4"):
            kw["int4_dense_rows"] = args.int4_dense_rows
        return kw

    def run_variant(v: str) -> None:
        parts = v.split("_")
        what, kind = parts[0], parts[1].replace("bnb4raw", "bnb4")
        if not cuda and kind in ("int8", "int4", "bnb4"):
            return
        model = attempt(f"load_{kind}", lambda k=kind: get_model(k))
        if model is None:
            return
        if what == "slow":
            r = attempt(v, lambda m=model, v=v: bench_slow(v, m, tok, prompt, args))
            if r:
                refs[kind] = r.pop("_tokens")
                emit(r)
        elif what == "floor" and cuda:
            r = attempt(v, lambda m=model: gemv_floor(m))
            if r:
                emit(r)
        elif what == "fast":
            before = torch.cuda.memory_allocated() if cuda else 0
            t0 = time.perf_counter()
            fd = attempt(
                v,
                lambda m=model, v=v: FastDecoder(
                    m, tok, max_seq_len=args.max_seq_len, **decoder_kwargs(v)
                ),
            )
            if fd is None:
                return
            setup = time.perf_counter() - t0
            extra = (torch.cuda.memory_allocated() - before) / 2**30 if cuda else 0.0
            r = attempt(v, lambda f=fd, v=v, k=kind: bench_fast(v, f, prompt, args, refs.get(k)))
            if r:
                r["graph"] = fd.graph
                r["quantize"] = fd.quantize
                r["setup_s"] = round(setup, 1)
                r["decoder_extra_gib"] = round(extra, 2)  # int4 copies + KV cache
                if args.profile and cuda:
                    r["profile"] = attempt(f"{v}_profile", lambda f=fd: kernel_time(f, prompt))
                    r["int4_floor"] = attempt(f"{v}_int4_floor", lambda f=fd: int4_floor(f))
                emit(r)
                decoders[v] = fd

    # batch 1 first, bnb4 last (making the NF4 model frees the 16-bit one); then batched
    for v in sorted(variants, key=lambda v: "bnb4" in v):
        run_variant(v)
    batch_variants = []
    for bv in [v.strip() for v in args.batch_variant.split(",") if v.strip()]:
        if bv == "auto":
            fast = [r for r in results if r["variant"] in decoders and r.get("batch") == 1]
            bv = max(fast, key=lambda r: r["decode_tok_s"])["variant"] if fast else ""
        if bv and bv not in batch_variants:
            batch_variants.append(bv)
    for best in batch_variants if (batches or args.clients) else []:
        kind = best.split("_")[1].replace("bnb4raw", "bnb4")
        model = attempt(f"load_{kind}", lambda k=kind: get_model(k))
        for b in batches if model is not None else []:
            fdb = decoders.get(f"{best}@batch")
            if fdb is None:
                fdb = attempt(
                    f"{best}_b{b}",
                    lambda m=model, v=best: FastDecoder(
                        m, tok, max_seq_len=args.batch_max_seq_len, **decoder_kwargs(v)
                    ),
                )
            r = fdb and attempt(
                f"{best}_b{b}", lambda b=b, f=fdb, v=best: bench_batched(v, f, tok, args, b)
            )
            if r:
                emit(r)
            if fdb is not None:
                decoders[f"{best}@batch"] = fdb  # one decoder (one set of int4 copies) for all
        if args.clients and model is not None:
            fdb = decoders.get(f"{best}@batch") or FastDecoder(
                model, tok, max_seq_len=args.batch_max_seq_len, **decoder_kwargs(best)
            )
            r = attempt(f"{best}_clients", lambda f=fdb, v=best: bench_clients(v, f, tok, args))
            if r:
                emit(r)
        decoders.pop(f"{best}@batch", None)
        free()
    print("\nvariant            batch  ttft_s  decode_tok/s  total_s  peak_GiB  note")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<18} error: {r['error'][:90]}")
            continue
        tput = r.get("throughput_tok_s")
        note = (
            f"throughput {tput} tok/s"
            if tput
            else (
                f"agrees {r['agree_with_slow_first_n']}/{r['compared_tokens']}"
                if r.get("compared_tokens")
                else ""
            )
        )
        if r.get("profile"):
            p = r["profile"]
            note += f" wall {p['wall_ms_per_step']} ms/step, kernels {p['kernel_ms_per_step']}"
        if r.get("attention_before"):
            o = r["attention_before"]
            note += f"; before ({o['what']}) {o['decode_tok_s_runs']} tok/s"
            if o.get("profile"):
                note += f", kernels {o['profile']['kernel_ms_per_step']} ms/step"
        if r.get("int4_floor"):
            fl = r["int4_floor"]
            note += f"; int4 linears alone {fl['ms_per_token']} ms ({fl['gb_per_s']} GB/s)"
        if r.get("clients"):
            note = (
                f"{r['clients']} clients: {r['aggregate_tok_s']} tok/s, latency p50/p95 "
                f"{r['latency_p50_s']}/{r['latency_p95_s']} s, ttft p50/p95 "
                f"{r['ttft_p50_s']}/{r['ttft_p95_s']} s"
            )
        if r.get("gb_per_s"):
            note = f"{r['ms_per_token']} ms, {r['gb_per_s']} GB/s over {r['weight_gb']} GB"
        print(
            f"{r['variant']:<18} {r['batch']:>5}  {r.get('ttft_s')!s:>6}  "
            f"{r['decode_tok_s']:>12}  {r.get('total_s')!s:>7}  {r.get('peak_gib', '-')!s:>8}  "
            f"{note}"
        )


if __name__ == "__main__":
    main()
