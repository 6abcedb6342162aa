"""Fast greedy decoding for a merged model on GPU: static KV cache + compiled decode step.

Why: HF ``generate`` spends most of a batch-1 decode step in Python (logits processors,
stopping criteria, a growing DynamicCache, hundreds of small kernel launches), far below what
the GPU's memory bandwidth allows. This module

- preallocates the KV cache (fixed shapes, fixed addresses),
- compiles one decode step (all layers + argmax) with ``torch.compile`` and captures it as a
  CUDA graph per cache bucket (``graph="manual"``, the default; ``"trees"`` = torch.compile's
  reduce-overhead CUDA graphs), so a token is one graph launch; a step attends over the
  smallest bucket of ``kv_bucket``-slot multiples that holds its slot (one compilation: the
  bucket is a symbolic size); on CUDA its rotations, K/V write and attention are one Triton
  kernel a layer (``ragtune.decode_attention``),
- runs a batch-1 prompt right-padded to a multiple of 64 tokens, one CUDA graph a padded length
  (``prefill="graph"``, the default with manual graphs: the first token does not wait on the
  host's eager launches), batches eagerly over the prompt's own slots; with int4 weights a
  prompt of ``int4_dense_rows`` rows or more runs through dequantized 16-bit copies of one
  projection at a time and cuBLAS (int4 GEMMs are slow at many rows),
- optionally holds the weights in fewer bits (the tokens are then the quantized model's):
  ``"int4"`` = int4 copies of the projections, q|k|v and gate|up fused, through ragtune's GEMV
  or gemlite's Triton kernels (``ragtune.fastweights``), from a 16-bit or a bitsandbytes 4-bit
  model; ``"int8"`` = torchao weight-only int8; ``"auto"`` (the default) = int4 for a
  bitsandbytes 4-bit model (what ``merged_4bit`` saves) when the kernels can run, else the
  model's own weights; ``"dense"`` = fused 16-bit copies (what the server's batcher uses on
  GPUs without FP8); ``"fp8"`` = e4m3 copies with per-channel scales (``ragtune.fp8weights``;
  the batcher's default on GPUs of compute capability >= 8.9; on CPU a float32 emulation).

The measurements behind each choice are in docs/benchmarks.md (issues 7 and 20).

Two ways to run the layers (``FastDecoder.mode``):

``direct`` (Llama / Mistral / Qwen2 shapes, e.g. SmolLM2 and Mistral-Nemo): the decoder stack
  of ``ragtune.decodestep`` (the model's own modules and weights, or int4 copies, with the same
  arithmetic as transformers' modeling code). It does not call the model's ``forward``, so it
  also works on a model Unsloth loaded (Unsloth replaces those forwards, globally, with its own
  inference code that has no static cache).
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

from ragtune import pdl
from ragtune.decodestep import DirectStack, GraphedStep, bucket_for, direct_supported, kv_buckets
from ragtune.errors import RagtuneError
from ragtune.fastweights import quantize_weights

log = logging.getLogger(__name__)

QUANTIZE_CHOICES = (None, "auto", "int4", "int8", "dense", "fp8")
GRAPH_CHOICES = ("manual", "trees", "none")
PREFILL_CHOICES = ("auto", "graph", "padded", "exact")
MODES = ("auto", "direct", "hf")


class FastDecodeError(RagtuneError):
    """A request the fast decoder cannot serve (too long, bad option)."""


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


__all__ = ["FastDecodeError", "FastDecoder", "quantize_weights"]


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
        int4_dense_rows: int = 128,
        fp8_kernel: str = "auto",
        kv_bucket: int = 256,
        prefill: str = "auto",
    ) -> None:
        if quantize not in QUANTIZE_CHOICES:
            raise FastDecodeError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
        if graph not in GRAPH_CHOICES:
            raise FastDecodeError(f"graph must be one of {GRAPH_CHOICES}, got {graph!r}")
        if mode not in MODES:
            raise FastDecodeError(f"mode must be one of {MODES}, got {mode!r}")
        if prefill not in PREFILL_CHOICES:
            raise FastDecodeError(f"prefill must be one of {PREFILL_CHOICES}, got {prefill!r}")
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
            # prompts of int4_dense_rows rows or more: dequantized 16-bit weights and cuBLAS
            int4 = {
                "group_size": group_size,
                "head": quantize_head,
                "kernel": int4_kernel,
                "dense_rows": int4_dense_rows,
            }
        elif quantize == "dense":
            from ragtune.fastweights import DENSE, is_bnb_4bit

            # a 16-bit LM head is used as it is: a copy would only cost memory
            int4 = {"head": is_bnb_4bit(model.get_output_embeddings()), "kernel": DENSE}
        self._direct = DirectStack(model, self.max_seq_len, int4) if self.mode == "direct" else None
        if quantize == "fp8" and self._direct is not None:
            from ragtune.fp8weights import convert_layers

            d = self._direct
            d.fused, head = convert_layers(d.layers, d.lm_head, d.dtype, fp8_kernel)
            d.lm_head = head or d.lm_head
        self._hf_caches: dict[int, Any] = {}
        self.compiled = self.device.type == "cuda" if compile is None else bool(compile)
        # CUDA graphs: "manual" captures the (compiled) step once per batch size; "trees" is
        # torch.compile's reduce-overhead mode; off on CPU
        self.graph = graph if self.device.type == "cuda" else "none"
        # queue step n+1 before reading token n (GPU): the host's EOS check and launches overlap
        # the GPU's work instead of leaving it idle between steps
        self.lookahead = self.device.type == "cuda"
        # the direct path's one-token steps attend through ragtune::decode_attention: one
        # Triton kernel a layer on CUDA (was two cuBLAS matmuls, the softmax and a memset),
        # the same matmul attention as before elsewhere (ragtune.decode_attention)
        self.fused_attention = self._direct is not None
        self._step_fn: Callable[..., torch.Tensor] = self._step
        self._graphs: dict[tuple[int, int], GraphedStep] = {}
        # the decode step attends over the smallest of these cache lengths that holds its slot
        # (the direct path; HF's StaticCache takes the whole cache's mask)
        self.kv_buckets = kv_buckets(self.max_seq_len, kv_bucket if self._direct else 0)
        # batch-1 prompts: right-padded to a few lengths, each a CUDA graph ("graph", the
        # default with manual graphs: the time to first token no longer waits on ~1,500 eager
        # launches from the host), or the same padding eagerly ("padded"), or exactly as long
        # as the prompt, eagerly ("exact"; always for batches and the hf path)
        if prefill == "auto":
            prefill = "graph" if self.graph == "manual" and self._direct else "exact"
        if prefill != "exact" and self._direct is None:
            raise FastDecodeError(
                f"prefill={prefill!r} needs the direct path (Llama/Mistral/Qwen2)"
            )
        if prefill == "graph" and self.device.type != "cuda":
            raise FastDecodeError("prefill='graph' needs CUDA; use 'padded' or 'exact'")
        self.prefill = prefill
        self._prefillers: dict[str, Any] = {}
        if self.compiled:
            # one graph per (decoder, batch size): allow more than dynamo's default of 8
            dyn = torch._dynamo.config
            dyn.recompile_limit = max(getattr(dyn, "recompile_limit", 8), 64)
            if self.graph == "trees":
                how: dict[str, Any] = {"mode": "reduce-overhead"}
            else:  # inductor's kernels launched early too (ragtune.pdl)
                how = {"options": pdl.inductor_options(self.device)}
            self._step_fn = torch.compile(self._step, dynamic=False, **how)
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
        if quantize in ("dense", "fp8") and self.mode != "direct":
            raise FastDecodeError(
                f"quantize={quantize!r} needs the direct path (Llama/Mistral/Qwen2)"
            )
        if quantize == "fp8" and self.device.type == "cuda":
            from ragtune.fp8weights import fp8_unsupported

            why = fp8_unsupported(self.device)
            if why:
                raise FastDecodeError(f"quantize='fp8': {why}; use quantize='dense'")
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
            # keep: [B, bucket]: attend over the cache's first `bucket` slots (the rest are
            # past this step's slot: masked anyway); a symbolic size when compiled
            n = keep.shape[1]
            seen = torch.arange(n, device=ids.device) <= slot
            mask = (keep & seen)[:, None, None, :]
            logits = self._direct.forward(
                ids, pos, slot, mask, state, kv_len=n, fused_attention=self.fused_attention
            )
        else:
            logits = self._hf_logits(ids, pos, keep.long() if state[1] else None, state[0])
        # float32 before argmax, as HF's greedy search does (exact for bf16/fp16 logits)
        return logits.argmax(dim=-1)

    def _decode_fn(self, bsz: int, state: Any, kv_len: int | None = None) -> Callable[..., Any]:
        """The step to call for this batch size and cache bucket: a captured CUDA graph where
        possible."""
        if self.graph != "manual" or self._direct is None:
            return self._step_fn
        seq = kv_len or self.max_seq_len
        g = self._graphs.get((bsz, seq))
        if g is None:
            try:
                dev = self.device
                # K/V written only at the bucket's last slot, which a request rewrites before
                # reading (it is past every slot written so far: buckets grow with the slot)
                example = (
                    torch.zeros((bsz, 1), dtype=torch.long, device=dev),
                    torch.zeros((bsz, 1), dtype=torch.long, device=dev),
                    torch.full((1,), seq - 1, dtype=torch.long, device=dev),
                    torch.ones((bsz, seq), dtype=torch.bool, device=dev),
                )
                # one compilation for every bucket: the cache length is a symbolic size
                dynamic = [(3, 1)] if self.compiled and len(self.kv_buckets) > 1 else []
                with pdl.decode_step(dev, self.compiled):  # early launches (ragtune.pdl)
                    g = GraphedStep(self._step_fn, example, state, dynamic)
            except Exception as e:  # capture is best effort: the compiled step still works
                log.warning("fastdecode: CUDA graph capture failed (%s); running uncaptured", e)
                self.graph = "none"
                return self._step_fn
            self._graphs[(bsz, seq)] = g
        return g

    def _prefill(self, ids: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor, padded: bool):
        """Run the prompt; return (first greedy ids [B], state for the decode steps)."""
        bsz, t = ids.shape
        if self._direct is not None:
            kv = self._direct.cache(bsz)
            slots = torch.arange(t, device=ids.device)
            causal = slots[None, :] <= slots[:, None]
            # slots past the prompt are masked anyway: attend over the prompt's t slots only
            mask = causal[None, :, :] & keep[:, None, :t]
            # padding queries see only themselves: finite values, never read by real tokens
            mask[:, slots, slots] = True
            logits = self._direct.forward(ids, pos, slots, mask[:, None], kv, kv_len=t)
            return logits.argmax(dim=-1), kv
        cache = self._hf_cache(bsz)
        attn = keep[:, :t].long() if padded else None
        return self._hf_logits(ids, pos, attn, cache).argmax(dim=-1), (cache, padded)

    def _prefill_padded(self, prompt: Sequence[int]) -> tuple[torch.Tensor, Any]:
        """A batch-1 prompt right-padded to a multiple of 64 tokens (``ragtune.batchprefill``;
        its padding writes slots the decode steps rewrite before reading them), one CUDA graph
        a padded length with ``prefill="graph"``: (first greedy id [1], the KV cache)."""
        from ragtune.batchprefill import Prefiller

        kv = self._direct.cache(1)
        pf = self._prefillers.get(self.prefill)
        if pf is None:
            pf = Prefiller(self._direct, kv, spare_row=0, graphs=self.prefill == "graph")
            self._prefillers[self.prefill] = pf
        return pf.run([prompt], [0]), kv

    def _launch(
        self,
        bsz: int,
        state: Any,
        nxt: torch.Tensor,
        next_pos: torch.Tensor,
        longest: int,
        steps: int,
        keep: torch.Tensor,
    ) -> torch.Tensor:
        """Queue decode step ``steps`` (input: the previous token, on the device)."""
        # a fill on the device: torch.tensor(list, device=cuda) would wait for the queued step
        slot = torch.full((1,), longest + steps, dtype=torch.long, device=self.device)
        n = bucket_for(self.kv_buckets, longest + steps)
        seen = keep[:, :n]
        if self.compiled and len(self.kv_buckets) > 1:  # uncaptured compiled step: see above
            torch._dynamo.maybe_mark_dynamic(seen, 1)
        fn = self._decode_fn(bsz, state, n)
        return fn(nxt.view(bsz, 1), next_pos + steps, slot, seen, state).clone()

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
    @torch.inference_mode()  # the KV cache is an inference tensor: warm-ups write it in place
    def warmup(self, prompt_tokens: int = 512) -> float:
        """Compile, autotune and capture the batch-1 path now; returns the seconds it took.

        The first request pays this otherwise (about 2 minutes at 12B on an H200); a server
        calls it once at start: it also captures the step of every cache bucket and the
        prompt graph of every padded length (batch 1).
        """
        t0 = time.perf_counter()
        n = max(1, min(prompt_tokens, self.max_seq_len - 3))
        self.generate([self.tokenizer.bos_token_id or 0] * n, 2, eos_ids=[])
        if self._direct is not None and self.graph == "manual":
            kv = self._direct.cache(1)
            for b in self.kv_buckets:  # a step graph per cache bucket (one compilation)
                self._decode_fn(1, kv, b)
        if self.prefill != "exact":  # a prompt graph per padded length (eager: one prompt)
            self._prefillers[self.prefill].warm()
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
        if bsz == 1 and self.prefill != "exact":
            nxt, state = self._prefill_padded(prompts[0])
        else:
            nxt, state = self._prefill(ids, pos, keep, padded)
        tokens: list[list[int]] = [[] for _ in range(bsz)]
        done = [False] * bsz
        check = self._stop_checker(stop_strings)
        full = [list(p) for p in prompts] if check is not None else None
        next_pos = torch.tensor(lens, dtype=torch.long, device=dev).unsqueeze(1)
        first_token_s: float | None = None
        steps = 0
        ahead = self.lookahead
        host_ids = torch.empty(bsz, dtype=torch.long, pin_memory=ahead and dev.type == "cuda")
        while True:
            if ahead:
                # launch the next step before reading this token, so the GPU works while the
                # host checks for EOS and launches (a step reads only the device-side token);
                # past the last token it is wasted: its K/V slot is rewritten before any read
                host_ids.copy_(nxt.view(bsz), non_blocking=True)
                copied = torch.cuda.Event() if dev.type == "cuda" else None
                if copied is not None:
                    copied.record()
                after = None
                if steps + 1 < max_new_tokens:
                    after = self._launch(bsz, state, nxt, next_pos, longest, steps, keep)
                if copied is not None:
                    copied.synchronize()
                host = host_ids.tolist()
            else:
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
            nxt = after if ahead else self._launch(bsz, state, nxt, next_pos, longest, steps, keep)
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
