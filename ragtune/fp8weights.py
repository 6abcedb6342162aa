"""FP8 (e4m3) projections for the continuous batcher (``FastDecoder(quantize="fp8")``).

Why: a 32-row decode step of the batcher is bound by the bytes it reads (24.5 GB of dense bf16
weights + 5.4 GB of KV at the Mistral-Nemo-12B shape: 8.5 ms on an H200), and its prompts are
bf16 GEMMs. FP8 weights halve the weight bytes, and Hopper's FP8 tensor cores run the prompts'
GEMMs at up to twice the bf16 rate (docs/benchmarks.md, issue 20.2).

- Weights: e4m3, one float32 scale per output channel (``amax / 448``), round-to-nearest. The
  source is a 16-bit ``nn.Linear`` or a bitsandbytes 4-bit one, dequantized one projection at a
  time (no 16-bit copy of the whole model is held). q|k|v and gate|up are fused into one matrix
  each; a row of a fused matrix is quantized exactly as it is alone (its scale is its own).
- Activations: e4m3 with one scale per token (per row of the input), computed on the fly.
  A row's product depends on that row alone, so a request's tokens do not depend on what else
  runs in the step (the batcher's invariance: the same weights and arithmetic at every size).
- Kernel for inputs of <= 32 rows (decode steps): ``ragtune.fp8_gemm``'s Triton kernel where it
  measured faster for the shape (``fp8_configs/<gpu>.json``), else, and for prompts,
  ``torch._scaled_mm`` with row-wise scales (PyTorch's CUTLASS FP8 GEMM, output bf16,
  the tensor cores' fast accumulation by default: ``GEMMS``; compute capability >= 8.9), which
  torch.compile and CUDA graphs keep as one call. Measured on the H200 at 12B: a 32-row step
  8.64 -> 7.45 ms (_scaled_mm alone) -> 6.51 ms (the small-M kernel for the step), a
  448-token prompt 29.5 -> 21.1 ms (docs/benchmarks.md).
  ``kernel="reference"`` computes the same quantized values in float32 (dequantized weights
  times the dequantized activations): the CPU path, for tests of the numerics and the batcher.

The tokens are the FP8 model's, not the source model's: e4m3 keeps 3 mantissa bits, so each
product carries a few percent of rounding (bench/serve_load.py reports how far answers move).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from ragtune import fp8_gemm
from ragtune.errors import RagtuneError
from ragtune.fastweights import DenseLinear, dense_weight, is_bnb_4bit

log = logging.getLogger(__name__)

FP8 = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0  # the largest finite e4m3fn value
KERNELS = ("auto", "scaled_mm", "reference")
# how torch._scaled_mm runs: row-wise scales in the GEMM's epilogue (PyTorch's CUTLASS kernel),
# or one scale of 1 (cuBLASLt) and the row and channel scales applied to its bf16 output; "_fast":
# the tensor cores' own accumulation, not promoted to float32 every 128 products
GEMMS = ("rowwise", "rowwise_fast", "tensor", "tensor_fast")
# H200, 12B shapes (bench/fp8_gemm.py): rowwise_fast took 1.04 s of projections a wave, against
# 1.22 (rowwise), 2.97-3.21 (tensor-wise) and 1.53 (bf16), at 0.2-0.4% error against the
# float64 product of the same e4m3 values (rowwise: 0.17%; the e4m3 rounding itself is ~3.5%)
DEFAULT_GEMM = "rowwise_fast"
GEMM_ENV = "RAGTUNE_FP8_GEMM"  # one of GEMMS: overrides DEFAULT_GEMM (bench/fp8_gemm.py)
# inputs of fewer rows than this run on 16-bit copies of the weights (kept beside the FP8 ones):
# FP8 for the prompts only, where a GPU's FP8 GEMM is no faster than bf16 at decode-step sizes
DENSE_BELOW = 0
DENSE_BELOW_ENV = "RAGTUNE_FP8_DENSE_BELOW"
MIN_CAPABILITY = (8, 9)  # Ada and Hopper have FP8 tensor cores


class Fp8Error(RagtuneError):
    """The FP8 path cannot run here (no FP8 GEMM on this device, an unsupported layer)."""


def fp8_unsupported(device: torch.device | str | None = None) -> str | None:
    """Why ``torch._scaled_mm`` cannot run FP8 GEMMs on ``device`` (default: CUDA), or None."""
    if FP8 is None or not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no float8_e4m3fn / _scaled_mm"
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda":
        return f"FP8 GEMMs need a CUDA GPU, not {dev.type}"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    cap = torch.cuda.get_device_capability(dev)
    if cap < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(dev)
        return f"{name} has compute capability {cap[0]}.{cap[1]}; FP8 GEMMs need 8.9 or later"
    return None


_compiled: dict[str, Any] = {}


def _fused(fn: Any, *args: torch.Tensor) -> Any:
    """``fn(*args)``; eager on CUDA (the prompts' captured graphs) compiled on its own, for any
    row count: one pass over the activations instead of ~7 eager kernels (~5 ms of a 448-token
    prompt at 12B, 4 projections x 40 layers). Inside the compiled decode step inductor fuses
    it with its neighbours instead."""
    if args[0].is_cuda and not torch.compiler.is_compiling():
        compiled = _compiled.get(fn.__name__)
        if compiled is None:
            compiled = _compiled[fn.__name__] = torch.compile(fn, dynamic=True)
        return compiled(*args)
    return fn(*args)


def _quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _fused(quantize_rows, x)


def _rescale(y: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    """A tensor-wise GEMM's bf16 output times each row's and each channel's scale."""
    return (y.float() * sx * sw).to(torch.bfloat16)


def gemm_setting() -> str:
    """The ``_scaled_mm`` variant new FP8 layers use (``RAGTUNE_FP8_GEMM``, else the default)."""
    gemm = os.environ.get(GEMM_ENV) or DEFAULT_GEMM
    if gemm not in GEMMS:
        raise Fp8Error(f"{GEMM_ENV} must be one of {GEMMS}, got {gemm!r}")
    return gemm


def dense_below() -> int:
    """Row count under which new FP8 layers use 16-bit copies (``RAGTUNE_FP8_DENSE_BELOW``)."""
    return int(os.environ.get(DENSE_BELOW_ENV) or DENSE_BELOW)


def scaled_mm(
    xq: torch.Tensor,
    sx: torch.Tensor,
    w: torch.Tensor,
    sw: torch.Tensor,
    gemm: str,
    one: torch.Tensor,
) -> torch.Tensor:
    """bf16 (xq * sx) @ (w * sw)^T on FP8 tensor cores: ``xq`` [M, K], ``w`` [N, K] e4m3,
    ``sx`` [M, 1], ``sw`` [1, N] float32; ``one``: a float32 1 on the device (tensor-wise)."""
    fast = gemm.endswith("_fast")
    if gemm.startswith("rowwise"):
        return torch._scaled_mm(
            xq, w.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16, use_fast_accum=fast
        )
    y = torch._scaled_mm(
        xq, w.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=fast
    )
    return _fused(_rescale, y, sx, sw)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, float32 scale [..., 1]) with one scale per row (last dimension):
    ``x ~= q * scale``. Used for weights (rows = output channels) and activations (tokens)."""
    xf = x.float()
    # clamp: an all-zero row gets a tiny scale and zero values, not 0/0
    scale = xf.abs().amax(-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


class Fp8Linear(torch.nn.Module):
    """y = x @ W^T with W in e4m3 (per-output-channel scales) and x quantized per token."""

    def __init__(
        self,
        q: torch.Tensor,
        scale: torch.Tensor,
        dtype: torch.dtype,
        kernel: str = "auto",
        dense: torch.Tensor | None = None,
    ) -> None:
        """``q`` [out, in] e4m3 and ``scale`` [out, 1] float32 (``quantize_rows`` of W);
        ``dtype``: the model's, which the output is returned in; ``dense``: W in ``dtype``,
        for inputs of fewer than ``RAGTUNE_FP8_DENSE_BELOW`` rows (none: FP8 for all)."""
        super().__init__()
        if kernel not in KERNELS:
            raise Fp8Error(f"fp8 kernel must be one of {KERNELS}, got {kernel!r}")
        self.out_features, self.in_features = q.shape
        self.dtype = dtype
        if kernel == "auto":
            kernel = "reference" if fp8_unsupported(q.device) else "scaled_mm"
        # FP8 GEMMs need both dimensions in multiples of 16
        if kernel == "scaled_mm" and (self.in_features % 16 or self.out_features % 16):
            log.warning(
                "fp8: %dx%d is not a multiple of 16; this projection runs the reference path",
                self.out_features,
                self.in_features,
            )
            kernel = "reference"
        self.kernel = kernel
        self.gemm = gemm_setting()
        self.register_buffer("one", torch.ones((), device=q.device), persistent=False)
        self.register_buffer("weight", q)  # [out, in]: its transpose is the column-major operand
        self.register_buffer("weight_scale", scale.reshape(1, -1).float().contiguous())  # [1, out]
        if kernel == "reference":  # float32 dequantized copy: no per-call conversion
            self.register_buffer("weight_ref", self.dequantized())
        self.dense_below = dense_below() if dense is not None else 0
        self.register_buffer("weight_dense", dense if self.dense_below else None)
        # inputs of <= SMALL_ROWS rows (decode steps): ragtune's small-M kernel where it is
        # the faster one for this shape (ragtune.fp8_gemm), else _scaled_mm too
        self.small: list[int] | None = None
        if kernel == "scaled_mm":
            self.small = fp8_gemm.setting_for(self.out_features, self.in_features, q.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        if x.numel() // self.in_features < self.dense_below:  # (a static shape: compiles)
            return torch.nn.functional.linear(x, self.weight_dense)
        xq, sx = _quantize_tokens(x.reshape(-1, self.in_features))
        if self.small is not None and xq.shape[0] <= fp8_gemm.SMALL_ROWS:
            y = torch.ops.ragtune.fp8_small_gemm(xq, sx, self.weight, self.weight_scale, self.small)
        elif self.kernel == "scaled_mm":
            y = scaled_mm(xq, sx, self.weight, self.weight_scale, self.gemm, self.one)
        else:  # the same quantized values, multiplied in float32, rounded as the GEMM rounds
            y = ((xq.float() * sx) @ self.weight_ref.t()).to(torch.bfloat16)
        return y.to(self.dtype).reshape(*lead, self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The weights this layer multiplies with, [out, in] float32."""
        return self.weight.float() * self.weight_scale.t()

    @classmethod
    def from_linears(
        cls, linears: Sequence[torch.nn.Module], dtype: torch.dtype, kernel: str = "auto"
    ) -> Fp8Linear:
        """One FP8 layer computing the concatenated outputs of ``linears`` (same input)."""
        if FP8 is None:
            raise Fp8Error(f"torch {torch.__version__} has no float8_e4m3fn")
        for lin in linears:
            if getattr(lin, "bias", None) is not None:
                raise Fp8Error(f"{type(lin).__name__} has a bias; the fp8 path has none")
        if dense_below():  # 16-bit copies for small inputs too
            dense = torch.cat([dense_weight(lin, dtype) for lin in linears])
            return cls(*quantize_rows(dense), dtype, kernel, dense)
        # dequantized and quantized one projection at a time: one 16-bit matrix at once
        parts = [quantize_rows(dense_weight(lin, dtype)) for lin in linears]
        q, scale = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        del parts
        return cls(q, scale, dtype, kernel)

    def extra_repr(self) -> str:
        gemm = f" ({self.gemm})" if self.kernel == "scaled_mm" else ""
        if self.small is not None:
            gemm += f", small-M kernel {self.small} to {fp8_gemm.SMALL_ROWS} rows"
        dense = f", 16-bit below {self.dense_below} rows" if self.dense_below else ""
        return f"in={self.in_features}, out={self.out_features}, kernel={self.kernel}{gemm}{dense}"


class Fp8Layer(torch.nn.Module):
    """One decoder layer's projections in FP8: q|k|v, o, gate|up, down (as ``FusedLayer``)."""

    def __init__(self, layer: Any, dtype: torch.dtype, kernel: str = "auto") -> None:
        super().__init__()
        att, mlp = layer.self_attn, layer.mlp
        self.qkv = Fp8Linear.from_linears([att.q_proj, att.k_proj, att.v_proj], dtype, kernel)
        self.o = Fp8Linear.from_linears([att.o_proj], dtype, kernel)
        self.gate_up = Fp8Linear.from_linears([mlp.gate_proj, mlp.up_proj], dtype, kernel)
        self.down = Fp8Linear.from_linears([mlp.down_proj], dtype, kernel)
        self.qkv_sizes = [_out(att.q_proj), _out(att.k_proj), _out(att.v_proj)]
        self.inter = _out(mlp.gate_proj)


def _out(linear: torch.nn.Module) -> int:
    n = getattr(linear, "out_features", None)
    return int(n) if n is not None else int(linear.weight.shape[0])


def convert_layers(
    layers: Sequence[Any], head: torch.nn.Module | None, dtype: torch.dtype, kernel: str = "auto"
) -> tuple[list[Fp8Layer], torch.nn.Module | None]:
    """FP8 copies of every layer's projections; a bitsandbytes 4-bit LM head becomes a 16-bit
    copy (the head stays 16-bit: its argmax picks the token, and it is ~5% of the bytes).

    Returns (layers, new head or None: keep the model's)."""
    fused = [Fp8Layer(layer, dtype, kernel) for layer in layers]
    new_head = None
    if head is not None and is_bnb_4bit(head):
        new_head = DenseLinear.from_linears([head], dtype)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log.info(
        "fastdecode: %d layers' projections in fp8 (e4m3, %s)",
        len(fused),
        fused[0].qkv.kernel if fused else kernel,
    )
    return fused, new_head


def reference_model(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with each projection but the LM head replaced by its own, unfused
    FP8 layer on the reference kernel: what ``quantize="fp8"`` computes, through the model's
    own forward (tests compare the fused, compiled path with it)."""
    import copy

    ref = copy.deepcopy(model)
    head = ref.get_output_embeddings()
    dtype = ref.get_input_embeddings().weight.dtype  # (a 4-bit model computes in it too)
    for parent in list(ref.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not head:
                setattr(parent, name, Fp8Linear.from_linears([child], dtype, "reference"))
    return ref
