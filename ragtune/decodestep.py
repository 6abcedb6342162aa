"""The decoder stack of a Llama/Mistral/Qwen2 model as one step over its own KV tensors.

Why its own code: HF ``forward`` grows a cache and checks inputs on every call, and Unsloth
replaces the Mistral forwards (globally) with inference code that has no static cache. This
computes the same arithmetic as transformers' modeling code from the model's own modules
(embedding, norms' weights, q/k/v/o and MLP projections, which may be bitsandbytes 4-bit), or
from int4 copies with q|k|v and gate|up fused (``ragtune.fastweights``), over preallocated
K/V tensors: fixed shapes and addresses, so a step compiles once and replays as a CUDA graph
(:class:`GraphedStep`). Used by ``ragtune.fastdecode`` (one request or a left-padded batch)
and ``ragtune.batching`` (rows of a continuous batch, each at its own position).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

import ragtune.decode_attention  # noqa: F401  (registers ragtune::decode_attention)

_DIRECT_TYPES = ("llama", "mistral", "qwen2")
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")


class GraphedStep:
    """A decode step captured once into a CUDA graph, replayed with new inputs.

    Unlike ``torch.compile(mode="reduce-overhead")`` (CUDA graph trees), a replay runs no
    Python guards and no per-call checks of the ~450 static inputs (weights, KV tensors):
    just a few small input copies and one graph launch per token.
    """

    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        inputs: Sequence[torch.Tensor],
        state: Any,
        dynamic: Sequence[tuple[int, int]] = (),
    ):
        self.inputs = [t.clone() for t in inputs]
        # (input, dim) pairs a compiled ``fn`` should trace as symbolic sizes: one compilation
        # serves graphs of several sizes there (the decode step's cache-length buckets)
        for i, dim in dynamic:
            torch._dynamo.maybe_mark_dynamic(self.inputs[i], dim)
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


def kv_buckets(max_seq_len: int, step: int, most: int = 16) -> tuple[int, ...]:
    """Cache lengths a decode step attends over: multiples of ``step`` (widened so there are at
    most ``most``), the last one the whole cache; ``step`` <= 0: the whole cache only.

    Why: a step at slot p reads only slots [0, p], so attention over the smallest bucket
    above p reads a fraction of the cache (768 of 2,048 slots for a 512-token prompt and 128
    new tokens) instead of all of it, masked. One CUDA graph per bucket.
    """
    if step <= 0 or step >= max_seq_len:
        return (max_seq_len,)
    step *= -(-max_seq_len // (step * most))  # at most `most` buckets
    return (*range(step, max_seq_len, step), max_seq_len)


def bucket_for(buckets: Sequence[int], slot: int) -> int:
    """The smallest bucket that holds cache slot ``slot`` (buckets ascending)."""
    return next((b for b in buckets if b > slot), buckets[-1])


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


class DirectStack:
    """The decoder stack computed from the model's modules, over our own KV tensors."""

    def __init__(self, model: Any, max_seq_len: int, int4: dict[str, Any] | None = None) -> None:
        from transformers.activations import ACT2FN

        m = _unwrap(model)
        cfg = m.config
        self.embed = m.get_input_embeddings()
        self.lm_head = m.get_output_embeddings()
        dec = m.get_decoder()
        self.layers = list(dec.layers[: cfg.num_hidden_layers])
        # int4 (or dense 16-bit) copies of the projections, q|k|v and gate|up fused, else the
        # model's own modules
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
                int4.get("dense_rows", 0),
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
        last: torch.Tensor | None = None,  # [B]: each row's last real position (right padding)
        kv_len: int | None = None,  # attend over cache slots [0, kv_len) only (mask: [.., kv_len])
        fused_attention: bool = False,  # one-token steps: ragtune::decode_attention
    ) -> torch.Tensor:
        """Logits of the last position (or of ``last``), float32 [B, V]; writes K/V of ``slots``.

        ``kv_len``: a prompt written from slot 0 sees no slot past its own length, so its
        attention need not read (and mask) the rest of the cache: 4x less at 512 of 2,048.
        ``fused_attention``: a one-token step runs its rotations, K/V write and attention as
        one kernel a layer (``ragtune.decode_attention``: float32 scores and sums) instead of a
        rotation kernel, a write kernel, two matmuls and the softmax, whether its rows share one
        slot ([T] ``slots``) or each has its own ([B, 1]: the batcher's rows, which then read
        only their filled slots; ``StepBatcher(fused_attention=True)``, off by default: slower
        than the compiled matmul attention at 32 rows on the H200, docs/benchmarks.md);
        ``mask`` must then be [B, 1, 1, S] (one mask for every head).
        """
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
            if fused_attention and t == 1:
                # rotations, the cache write and attention in one kernel (ragtune.decode_attention)
                o = torch.ops.ragtune.decode_attention_write(
                    q.reshape(bsz, -1, self.head_dim),
                    k.reshape(bsz, -1, self.head_dim),
                    v.reshape(bsz, -1, self.head_dim),
                    ks[i],
                    vs[i],
                    slots.reshape(-1),  # [1] (shared) or [B] (a slot per row)
                    self.max_seq_len if kv_len is None else kv_len,
                    mask[:, 0, 0],
                    self.scaling[i],
                    self.cos,
                    self.sin,
                    pos.reshape(bsz),
                ).view(bsz, -1, 1, self.head_dim)
            else:
                q = (q * cos) + (_rotate_half(q) * sin)
                k = (k * cos) + (_rotate_half(k) * sin)
                if rows is None:
                    ks[i].index_copy_(2, slots, k)
                    vs[i].index_copy_(2, slots, v)
                else:  # each row at its own slot (rows of a continuous batch)
                    ks[i][rows, :, slots[:, 0]] = k[:, :, 0]
                    vs[i][rows, :, slots[:, 0]] = v[:, :, 0]
                kc, vc = (
                    (ks[i], vs[i])
                    if kv_len is None
                    else (ks[i][:, :, :kv_len], vs[i][:, :, :kv_len])
                )
                o = self._attend(q, kc, vc, mask, self.scaling[i])
            o = o.transpose(1, 2).reshape(bsz, t, -1)
            h = h + (att.o_proj(o) if self.fused is None else self.fused[i].o(o))
            x = _rms(h, layer.post_attention_layernorm.weight, eps_post)
            h = h + self._mlp(i, layer.mlp, x)
        h = h[:, -1:, :] if last is None else h[torch.arange(bsz, device=h.device), last, None]
        h = _rms(h, self.final_norm.weight, self.final_eps)
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
