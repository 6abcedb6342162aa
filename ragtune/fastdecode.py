"""Fast greedy decoding for a merged model on GPU: static KV cache + compiled decode step.

Why: HF ``generate`` spends most of a batch-1 decode step in Python (logits processors,
stopping criteria, a growing DynamicCache, hundreds of small kernel launches), so a 12B model
decodes at 8-20 tok/s on an H100 whose memory bandwidth allows ~130 tok/s in bf16 and ~450
tok/s in int4. This module

- preallocates the KV cache (fixed shapes, fixed addresses),
- compiles one decode step (all layers + argmax) with ``torch.compile`` and captures it once as
  a CUDA graph (``graph="manual"``, the default; ``"trees"`` = torch.compile's reduce-overhead
  CUDA graphs, ~8% slower at 12B), so a token is one graph launch,
- runs the prompt (prefill) eagerly, since its length varies,
- optionally holds the weights in fewer bits (fewer bytes read per token; the tokens are then
  the quantized model's): ``quantize="int4"`` = gemlite's Triton kernels over int4 copies of
  the projections, q|k|v and gate|up fused (``ragtune.fastweights``), from a 16-bit or a
  bitsandbytes 4-bit model; ``"int8"`` = torchao weight-only int8 of a 16-bit model;
  ``"auto"`` (the default) = int4 for a bitsandbytes 4-bit model (what ``merged_4bit`` saves)
  when gemlite's kernels can run, else the model's own weights.

Measured at the Mistral-Nemo-12B shape (docs/benchmarks.md): HF generate 13 tok/s on an H100,
this path 96 tok/s in bf16 and 114 tok/s with int8 there; the H200 figures for int4 are in the
same section. The one-token decode step attends with two plain matmuls (SDPA's flash kernel
took 1.8 ms of the ~10 ms token).

Two ways to run the layers (``FastDecoder.mode``):

``direct`` (Llama / Mistral / Qwen2 shapes, e.g. SmolLM2 and Mistral-Nemo): the decoder is
  computed here from the model's own modules and weights (embedding, norms' weights, the
  q/k/v/o and MLP Linear modules, which may be bitsandbytes 4-bit or torchao int4), with the
  same arithmetic as transformers' modeling code. It does not call the model's ``forward``, so
  it also works on a model Unsloth loaded (Unsloth replaces those forwards, globally, with its
  own inference code that has no static cache).
``hf`` (any other architecture): the model's ``forward`` with a ``transformers.StaticCache``.

On CPU compile is off by default (slow to build, little gain); the static-cache loop still
runs, which is what the CPU equality tests check against HF ``generate``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ragtune.errors import RagtuneError

log = logging.getLogger(__name__)

QUANTIZE_CHOICES = (None, "auto", "int4", "int8")
GRAPH_CHOICES = ("manual", "trees", "none")
MODES = ("auto", "direct", "hf")
_DIRECT_TYPES = ("llama", "mistral", "qwen2")
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")


class FastDecodeError(RagtuneError):
    """A request the fast decoder cannot serve (too long, bad option)."""


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def quantize_weights(model: torch.nn.Module, kind: str = "int8") -> torch.nn.Module:
    """Quantize every Linear but the LM head of a 16-bit CUDA model to int8 with torchao.

    Per-row int8 weight-only, in place; under torch.compile the int8->bf16 conversion fuses
    into the matmul at batch 1 (gpt-fast's recipe). The LM head stays 16-bit: its conversion
    is not fused (131072 x 5120 at 12B: a 1.3 ms conversion kernel per token, then a GEMM).
    """
    if kind != "int8":
        raise FastDecodeError(f"quantize_weights does int8 only, got {kind!r}")
    if _model_device(model).type != "cuda":
        raise FastDecodeError(f"quantize={kind!r} needs the model on a CUDA GPU")
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        raise FastDecodeError(
            f"quantize={kind!r} needs torchao (pip install torchao; it comes with unsloth)"
        ) from e
    if next(model.parameters()).dtype != torch.bfloat16:
        model.to(torch.bfloat16)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None

    try:  # torchao's own test (a Linear whose weight is not quantized yet)
        from torchao.quantization.quant_api import _is_linear as quantizable
    except ImportError:  # pragma: no cover - older/newer torchao

        def quantizable(module: torch.nn.Module, *_: Any) -> bool:
            return isinstance(module, torch.nn.Linear)

    def linear(module: torch.nn.Module, fqn: str) -> bool:
        return quantizable(module, fqn) and module is not head

    quantize_(model, Int8WeightOnlyConfig(version=2), filter_fn=linear)
    log.info("fastdecode: Linear layers in int8 weight-only (LM head kept 16-bit)")
    return model


class _GraphedStep:
    """A decode step captured once into a CUDA graph, replayed with new inputs.

    Unlike ``torch.compile(mode="reduce-overhead")`` (CUDA graph trees), a replay runs no
    Python guards and no per-call checks of the ~450 static inputs (weights, KV tensors):
    just a few small input copies and one graph launch per token.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], state: Any):
        self.inputs = [t.clone() for t in inputs]
        self.state = state
        dev = self.inputs[0].device
        # warm-up (compilation, autotuning, cuBLAS handles) off the main stream; callers pass
        # inputs that write K/V only where a request rewrites it before reading it
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(3):
                fn(*self.inputs, state)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn(*self.inputs, state)

    def __call__(self, *args: Any) -> torch.Tensor:
        for static, new in zip(self.inputs, args[: len(self.inputs)], strict=False):
            static.copy_(new)
        self.graph.replay()
        return self.out


# --------------------------------------------------------------------------- direct decoder
def _unwrap(model: Any) -> Any:
    """The *ForCausalLM under a PEFT wrapper, if any."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def direct_supported(model: Any) -> str | None:
    """Why the direct path cannot run this model, or None when it can."""
    m = _unwrap(model)
    cfg = getattr(m, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in _DIRECT_TYPES:
        return f"model_type {mtype!r} is not one of {_DIRECT_TYPES}"
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in _STATIC_ROPE:
        return f"rope_type {rope.get('rope_type')!r} changes with length"
    if getattr(cfg, "sliding_window", None) and (
        mtype == "mistral" or getattr(cfg, "use_sliding_window", False)
    ):
        return "sliding-window attention"
    try:
        dec = m.get_decoder()
        layer = dec.layers[0]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(layer.self_attn, name)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(layer.mlp, name)
        layer.input_layernorm.weight  # noqa: B018
        layer.post_attention_layernorm.weight  # noqa: B018
        dec.norm.weight  # noqa: B018
        m.get_output_embeddings()
    except (AttributeError, IndexError, TypeError) as e:
        return f"unexpected module layout ({e})"
    return None


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama/Mistral RMSNorm, operation for operation."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Direct:
    """The decoder stack computed from the model's modules, over our own KV tensors."""

    def __init__(self, model: Any, max_seq_len: int, int4: dict[str, Any] | None = None) -> None:
        from transformers.activations import ACT2FN

        m = _unwrap(model)
        cfg = m.config
        self.embed = m.get_input_embeddings()
        self.lm_head = m.get_output_embeddings()
        dec = m.get_decoder()
        self.layers = list(dec.layers[: cfg.num_hidden_layers])
        # int4 copies of the projections (q|k|v and gate|up fused), else the model's modules
        self.fused: list[Any] | None = None
        if int4 is not None:
            from ragtune.fastweights import convert_layers

            head = self.lm_head if int4.get("head", True) else None
            self.fused, new_head = convert_layers(
                self.layers,
                head,
                self.embed.weight.dtype,
                int4.get("group_size", 64),
                int4.get("kernel", "gemlite"),
            )
            self.lm_head = new_head or self.lm_head
        self.final_norm = dec.norm
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.act = ACT2FN[cfg.hidden_act]
        self.max_seq_len = max_seq_len
        self.eps = [
            (self._eps(L.input_layernorm, cfg), self._eps(L.post_attention_layernorm, cfg))
            for L in self.layers
        ]
        self.final_eps = self._eps(dec.norm, cfg)
        self.scaling = [
            float(getattr(L.self_attn, "scaling", self.head_dim**-0.5)) for L in self.layers
        ]
        self.dtype = self.embed.weight.dtype
        self.device = self.embed.weight.device
        self.cos, self.sin = self._rope_table(m, dec, cfg)
        self.caches: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    @staticmethod
    def _eps(norm: Any, cfg: Any) -> float:
        for attr in ("variance_epsilon", "eps"):
            if hasattr(norm, attr):
                return float(getattr(norm, attr))
        return float(cfg.rms_norm_eps)

    def _rope_table(self, m: Any, dec: Any, cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for every position, computed as transformers' rotary embedding does."""
        rot = getattr(dec, "rotary_emb", None)
        if rot is not None and hasattr(rot, "inv_freq") and hasattr(rot, "attention_scaling"):
            inv_freq, scale = rot.inv_freq.to(self.device), float(rot.attention_scaling)
        else:  # e.g. Unsloth replaced the rotary class: recompute from the config
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            rope = getattr(cfg, "rope_parameters", None) or {}
            rtype = rope.get("rope_type", "default")
            if rtype == "default":
                base = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
                dim = int(self.head_dim * float(getattr(cfg, "partial_rotary_factor", 1.0)))
                inv_freq = 1.0 / (
                    base
                    ** (
                        torch.arange(0, dim, 2, dtype=torch.int64).to(
                            device=self.device, dtype=torch.float
                        )
                        / dim
                    )
                )
                scale = 1.0
            else:
                inv_freq, scale = ROPE_INIT_FUNCTIONS[rtype](cfg, self.device)
        pos = torch.arange(self.max_seq_len, device=self.device, dtype=torch.float32)
        freqs = (inv_freq.float()[:, None] @ pos[None, :]).T  # as HF: a K=1 matmul, exact
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = (emb.cos() * scale).to(self.dtype), (emb.sin() * scale).to(self.dtype)
        torch._dynamo.mark_static_address(cos)
        torch._dynamo.mark_static_address(sin)
        return cos, sin

    def cache(self, batch_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        kv = self.caches.get(batch_size)
        if kv is None:
            shape = (batch_size, self.n_kv, self.max_seq_len, self.head_dim)
            ks = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
            vs = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
            for t in (*ks, *vs):
                torch._dynamo.mark_static_address(t)  # fixed addresses: CUDA graphs can replay
            kv = (ks, vs)
            self.caches[batch_size] = kv
        return kv

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Grouped-query attention without copying K/V per query head.

        The G query heads that share a KV head are folded into the query length
        ([B, Hkv, G*T, D] against [B, Hkv, S, D]), so the cache is read once per KV head;
        ``enable_gqa``/``repeat_kv`` would materialise G copies of the whole cache every step.
        Head h uses KV head h // G, as transformers' ``repeat_kv`` does.
        """
        bsz, n_heads, t, d = q.shape
        g = n_heads // self.n_kv
        if t == 1:
            # one query per head (the decode step): plain matmuls, softmax in float32. SDPA
            # picks a flash kernel built for long queries (cuDNN on an H100: 1.8 ms per token at
            # the 12B shape, against ~0.13 ms to read the 2,048-slot cache)
            qg = q.reshape(bsz, self.n_kv, g, d)
            scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [B, Hkv, G, S]
            scores = scores.masked_fill(~mask, float("-inf"))
            o = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)
            return o.reshape(bsz, n_heads, 1, d)
        if g == 1:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        qg = q.reshape(bsz, self.n_kv, g * t, d)
        mg = mask.unsqueeze(2).expand(bsz, 1, g, t, mask.shape[-1]).reshape(bsz, 1, g * t, -1)
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mg, scale=scale)
        return o.reshape(bsz, n_heads, t, d)

    def forward(
        self,
        ids: torch.Tensor,  # [B, T]
        pos: torch.Tensor,  # [B, T] rope positions
        slots: torch.Tensor,  # [T] cache slots written by these tokens, or [B, 1]: one per row
        mask: torch.Tensor,  # [B, 1, T, S] bool: which cache slots each query sees
        kv: tuple[list[torch.Tensor], list[torch.Tensor]],
    ) -> torch.Tensor:
        """Logits of the last position, float32 [B, V]; writes K/V of ``slots``."""
        bsz, t = ids.shape
        h = self.embed(ids)
        cos = self.cos[pos].unsqueeze(1)  # [B, 1, T, D]
        sin = self.sin[pos].unsqueeze(1)
        ks, vs = kv
        rows = torch.arange(bsz, device=ids.device) if slots.dim() == 2 else None
        for i, layer in enumerate(self.layers):
            att = layer.self_attn
            eps_in, eps_post = self.eps[i]
            x = _rms(h, layer.input_layernorm.weight, eps_in)
            q, k, v = self._qkv(i, att, x)
            q = q.view(bsz, t, -1, self.head_dim).transpose(1, 2)
            k = k.view(bsz, t, -1, self.head_dim).transpose(1, 2)
            v = v.view(bsz, t, -1, self.head_dim).transpose(1, 2)
            q = (q * cos) + (_rotate_half(q) * sin)
            k = (k * cos) + (_rotate_half(k) * sin)
            if rows is None:
                ks[i].index_copy_(2, slots, k)
                vs[i].index_copy_(2, slots, v)
            else:  # each row at its own slot (rows of a continuous batch)
                ks[i][rows, :, slots[:, 0]] = k[:, :, 0]
                vs[i][rows, :, slots[:, 0]] = v[:, :, 0]
            o = self._attend(q, ks[i], vs[i], mask, self.scaling[i])
            o = o.transpose(1, 2).reshape(bsz, t, -1)
            h = h + (att.o_proj(o) if self.fused is None else self.fused[i].o(o))
            x = _rms(h, layer.post_attention_layernorm.weight, eps_post)
            h = h + self._mlp(i, layer.mlp, x)
        h = _rms(h[:, -1:, :], self.final_norm.weight, self.final_eps)
        return self.lm_head(h)[:, -1, :].float()

    def _qkv(self, i: int, att: Any, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.fused is None:
            return att.q_proj(x), att.k_proj(x), att.v_proj(x)
        f = self.fused[i]
        return f.qkv(x).split(f.qkv_sizes, dim=-1)

    def _mlp(self, i: int, mlp: Any, x: torch.Tensor) -> torch.Tensor:
        if self.fused is None:
            return mlp.down_proj(self.act(mlp.gate_proj(x)) * mlp.up_proj(x))
        f = self.fused[i]
        gate, up = f.gate_up(x).split([f.inter, f.inter], dim=-1)
        return f.down(self.act(gate) * up)


# --------------------------------------------------------------------------- the decoder
class FastDecoder:
    """Greedy decoding with a static KV cache and a compiled, CUDA-graphed decode step.

    ``generate`` returns what ``model.generate(do_sample=False)`` returns after the prompt
    (including the EOS or the token that completes a stop string) on the same model; on CPU in
    float32 that is exact (tests/test_fastdecode.py), on GPU the compiled kernels round
    differently, so a near-tie can resolve the other way (docs/benchmarks.md).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        max_seq_len: int = 2048,
        compile: bool | None = None,
        quantize: str | None = "auto",
        mode: str = "auto",
        graph: str = "manual",
        group_size: int = 64,
        quantize_head: bool = True,
        int4_kernel: str = "gemlite",
    ) -> None:
        if quantize not in QUANTIZE_CHOICES:
            raise FastDecodeError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
        if graph not in GRAPH_CHOICES:
            raise FastDecodeError(f"graph must be one of {GRAPH_CHOICES}, got {graph!r}")
        if mode not in MODES:
            raise FastDecodeError(f"mode must be one of {MODES}, got {mode!r}")
        if max_seq_len < 2:
            raise FastDecodeError(f"max_seq_len must be >= 2, got {max_seq_len}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_seq_len = int(max_seq_len)
        self.device = _model_device(model)
        why_not = direct_supported(model)
        if mode == "direct" and why_not:
            raise FastDecodeError(f"mode=direct: {why_not}")
        self.mode = "hf" if mode == "hf" or why_not else "direct"
        quantize = self._choose_quantize(quantize, int4_kernel)
        if quantize == "int8":
            quantize_weights(self.model, quantize)
        self.quantize = quantize
        int4 = None
        if quantize == "int4":
            int4 = {"group_size": group_size, "head": quantize_head, "kernel": int4_kernel}
        self._direct = _Direct(model, self.max_seq_len, int4) if self.mode == "direct" else None
        self._hf_caches: dict[int, Any] = {}
        self.compiled = self.device.type == "cuda" if compile is None else bool(compile)
        # CUDA graphs: "manual" captures the (compiled) step once per batch size; "trees" is
        # torch.compile's reduce-overhead mode; off on CPU
        self.graph = graph if self.device.type == "cuda" else "none"
        self._step_fn: Callable[..., torch.Tensor] = self._step
        self._graphs: dict[int, _GraphedStep] = {}
        if self.compiled:
            # one graph per (decoder, batch size): allow more than dynamo's default of 8
            dyn = torch._dynamo.config
            dyn.recompile_limit = max(getattr(dyn, "recompile_limit", 8), 64)
            cmode = "reduce-overhead" if self.graph == "trees" else "default"
            self._step_fn = torch.compile(self._step, mode=cmode, dynamic=False)
        self.last_stats: dict[str, float] = {}
        log.info(
            "fastdecode: %s mode%s, static cache of %d tokens, compile=%s, graph=%s, "
            "quantize=%s, %s",
            self.mode,
            f" ({why_not})" if why_not and self.mode == "hf" else "",
            self.max_seq_len,
            self.compiled,
            self.graph,
            quantize,
            self.device,
        )

    # ------------------------------------------------------------------ internals
    def _choose_quantize(self, quantize: str | None, int4_kernel: str) -> str | None:
        """What ``quantize`` means for this model: auto = int4 for a bitsandbytes 4-bit model."""
        from ragtune.fastweights import has_bnb_4bit, int4_kernel_available

        bnb4 = has_bnb_4bit(self.model)
        gemlite_missing = int4_kernel_available() if int4_kernel == "gemlite" else None
        if quantize == "auto":
            if not bnb4:
                return None
            if gemlite_missing or self.mode != "direct":
                log.warning(
                    "fastdecode: serving the bitsandbytes 4-bit weights as they are (%s)",
                    gemlite_missing or "int4 needs the direct path",
                )
                return None
            return "int4"
        if quantize == "int4":
            if self.mode != "direct":
                raise FastDecodeError("quantize='int4' needs the direct path (Llama/Mistral/Qwen2)")
            if gemlite_missing:
                raise FastDecodeError(
                    f"quantize='int4' needs gemlite's kernels on a CUDA GPU ({gemlite_missing})"
                )
        if quantize == "int8" and bnb4:
            raise FastDecodeError("quantize='int8' needs a 16-bit model, not bitsandbytes 4-bit")
        return quantize

    def _hf_cache(self, batch_size: int) -> Any:
        from transformers import StaticCache

        cache = self._hf_caches.get(batch_size)
        if cache is None:
            cache = StaticCache(config=self.model.config, max_cache_len=self.max_seq_len)
            self._hf_caches[batch_size] = cache
        else:
            cache.reset()
        return cache

    def _hf_logits(
        self, ids: torch.Tensor, pos: torch.Tensor, attn: torch.Tensor | None, cache: Any
    ) -> torch.Tensor:
        out = self.model(
            input_ids=ids,
            position_ids=pos,
            attention_mask=attn,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :].float()

    def _step(
        self,
        ids: torch.Tensor,  # [B, 1]
        pos: torch.Tensor,  # [B, 1]
        slot: torch.Tensor,  # [1]
        keep: torch.Tensor,  # [B, S] bool: not padding
        state: Any,
    ) -> torch.Tensor:
        """One decode step for the whole batch: next greedy ids [B]."""
        if self._direct is not None:
            seen = torch.arange(self.max_seq_len, device=ids.device) <= slot
            mask = (keep & seen)[:, None, None, :]
            logits = self._direct.forward(ids, pos, slot, mask, state)
        else:
            logits = self._hf_logits(ids, pos, keep.long() if state[1] else None, state[0])
        # float32 before argmax, as HF's greedy search does (exact for bf16/fp16 logits)
        return logits.argmax(dim=-1)

    def _decode_fn(self, bsz: int, state: Any) -> Callable[..., torch.Tensor]:
        """The step to call for this batch size: a captured CUDA graph where possible."""
        if self.graph != "manual" or self._direct is None:
            return self._step_fn
        g = self._graphs.get(bsz)
        if g is None:
            try:
                dev, seq = self.device, self.max_seq_len
                # K/V written only at the last slot, which a request rewrites before reading
                example = (
                    torch.zeros((bsz, 1), dtype=torch.long, device=dev),
                    torch.zeros((bsz, 1), dtype=torch.long, device=dev),
                    torch.full((1,), seq - 1, dtype=torch.long, device=dev),
                    torch.ones((bsz, seq), dtype=torch.bool, device=dev),
                )
                g = _GraphedStep(self._step_fn, example, state)
            except Exception as e:  # capture is best effort: the compiled step still works
                log.warning("fastdecode: CUDA graph capture failed (%s); running uncaptured", e)
                self.graph = "none"
                return self._step_fn
            self._graphs[bsz] = g
        return g

    def _prefill(self, ids: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor, padded: bool):
        """Run the prompt; return (first greedy ids [B], state for the decode steps)."""
        bsz, t = ids.shape
        if self._direct is not None:
            kv = self._direct.cache(bsz)
            slots = torch.arange(t, device=ids.device)
            causal = torch.arange(self.max_seq_len, device=ids.device)[None, :] <= slots[:, None]
            mask = causal[None, :, :] & keep[:, None, :]
            # padding queries see only themselves: finite values, never read by real tokens
            mask[:, slots, slots] = True
            logits = self._direct.forward(ids, pos, slots, mask[:, None], kv)
            return logits.argmax(dim=-1), kv
        cache = self._hf_cache(bsz)
        attn = keep[:, :t].long() if padded else None
        return self._hf_logits(ids, pos, attn, cache).argmax(dim=-1), (cache, padded)

    def _stop_checker(self, stop_strings: Sequence[str] | None):
        """A function(tokens) -> bool: did the last token complete a new stop string?"""
        stops = [s for s in (stop_strings or []) if s]
        if not stops:
            return None
        window = max(len(s) for s in stops) + 4  # a token is >= 1 character; margin for bytes

        def hit(tokens: list[int]) -> bool:
            tail = tokens[-window:]
            now = self.tokenizer.decode(tail, skip_special_tokens=False)
            before = self.tokenizer.decode(tail[:-1], skip_special_tokens=False)
            return any(now.count(s) > before.count(s) for s in stops)

        return hit

    def _budget(self, longest_prompt: int, max_new_tokens: int) -> int:
        if longest_prompt < 1:
            raise FastDecodeError("empty prompt: give at least one input token")
        if longest_prompt >= self.max_seq_len:
            raise FastDecodeError(
                f"prompt of {longest_prompt} tokens does not fit the fast decoder's "
                f"max_seq_len={self.max_seq_len} (raise model.max_seq_length)"
            )
        room = self.max_seq_len - longest_prompt
        if max_new_tokens > room:
            log.warning(
                "fastdecode: max_new_tokens=%d cut to %d (max_seq_len=%d)",
                max_new_tokens,
                room,
                self.max_seq_len,
            )
        return min(max_new_tokens, room)

    # ------------------------------------------------------------------ public API
    def warmup(self, prompt_tokens: int = 512) -> float:
        """Compile, autotune and capture the batch-1 path now; returns the seconds it took.

        The first request pays this otherwise (about 2 minutes at 12B on an H200); a server
        calls it once at start. Prompts of other lengths may still autotune their prefill
        kernels once (int4), a second or so each.
        """
        t0 = time.perf_counter()
        n = max(1, min(prompt_tokens, self.max_seq_len - 3))
        self.generate([self.tokenizer.bos_token_id or 0] * n, 2, eos_ids=[])
        return time.perf_counter() - t0

    @torch.inference_mode()
    def generate(
        self,
        input_ids: Sequence[int],
        max_new_tokens: int,
        eos_ids: Sequence[int] | int | None = None,
        stop_strings: Sequence[str] | None = None,
    ) -> list[int]:
        """Greedy-decode up to ``max_new_tokens`` after ``input_ids``; return the new ids.

        Stops after an id in ``eos_ids`` (kept, as HF keeps it) or after the token that
        completes one of ``stop_strings`` (kept: the caller trims the text).
        """
        return self.generate_batch([list(input_ids)], max_new_tokens, eos_ids, stop_strings)[0]

    @torch.inference_mode()
    def generate_batch(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        eos_ids: Sequence[int] | int | None = None,
        stop_strings: Sequence[str] | None = None,
    ) -> list[list[int]]:
        """Greedy-decode several prompts together (left-padded); one list of new ids each.

        Rows that finish keep running (their extra tokens are dropped) until all are done.
        """
        if max_new_tokens < 1 or not prompts:
            return [[] for _ in prompts]
        eos = {eos_ids} if isinstance(eos_ids, int) else {int(e) for e in (eos_ids or [])}
        bsz = len(prompts)
        lens = [len(p) for p in prompts]
        longest = max(lens)
        max_new_tokens = self._budget(longest, max_new_tokens)
        dev = self.device
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = min(eos) if eos else 0

        ids = torch.full((bsz, longest), pad_id, dtype=torch.long)
        keep = torch.ones((bsz, self.max_seq_len), dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            keep[i, : longest - len(p)] = False
        ids, keep = ids.to(dev), keep.to(dev)
        padded = any(n != longest for n in lens)
        pos = (keep[:, :longest].long().cumsum(-1) - 1).clamp(min=0)

        t0 = time.perf_counter()
        nxt, state = self._prefill(ids, pos, keep, padded)
        tokens: list[list[int]] = [[] for _ in range(bsz)]
        done = [False] * bsz
        check = self._stop_checker(stop_strings)
        full = [list(p) for p in prompts] if check is not None else None
        next_pos = torch.tensor(lens, dtype=torch.long, device=dev).unsqueeze(1)
        first_token_s: float | None = None
        steps = 0
        while True:
            host = nxt.tolist()  # one sync per step: needed to stop at EOS
            if first_token_s is None:
                first_token_s = time.perf_counter() - t0
            for i, t in enumerate(host):
                if done[i]:
                    continue
                tokens[i].append(t)
                if full is not None:
                    full[i].append(t)
                if (
                    t in eos
                    or (check is not None and check(full[i]))
                    or len(tokens[i]) >= max_new_tokens
                ):
                    done[i] = True
            if all(done):
                break
            slot = torch.tensor([longest + steps], dtype=torch.long, device=dev)
            nxt = self._decode_fn(bsz, state)(
                nxt.view(bsz, 1), next_pos + steps, slot, keep, state
            ).clone()
            steps += 1
        total = time.perf_counter() - t0
        ttft = first_token_s or 0.0
        self.last_stats = {
            "batch": float(bsz),
            "prompt_tokens": float(sum(lens)),
            "new_tokens": float(sum(len(t) for t in tokens)),
            "steps": float(steps),
            "ttft_s": ttft,
            "total_s": total,
            "decode_tok_s": (steps * bsz) / max(total - ttft, 1e-9),
        }
        return tokens
