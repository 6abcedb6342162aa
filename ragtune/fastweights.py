"""Int4 weight-only projections for the fast decode path (``FastDecoder(quantize="int4")``).

Why: at batch 1 a decode step reads every weight once, so its time is the bytes read; int4
with group scales is ~0.56 bytes a weight against 2 in bf16. The kernels are gemlite's Triton
kernels (A16W4: a split-K GEMV at batch 1, split-K / tiled GEMMs for batches and the prompt),
which read int4 weights near the memory bandwidth on Hopper, where torchao's tinygemm layout
ran slower than bf16 (docs/benchmarks.md).

- Source weights: a 16-bit ``nn.Linear`` or a bitsandbytes 4-bit one (what a
  ``save_method=merged_4bit`` folder loads as), dequantized one projection at a time, so no
  16-bit copy of the whole model is ever held.
- Projections that read the same input are fused into one matrix (q|k|v and gate|up): 4
  kernels a layer instead of 7, each big enough to stream at full bandwidth. Rows of a
  fused matrix are quantized exactly as they would be alone (groups run along the input).
- Quantization: round-to-nearest, asymmetric, one bf16 scale and integer zero point per
  ``group_size`` inputs: ``W ~= q * scale + shift`` with ``shift = -zero * scale`` rounded
  to the weight dtype, which is the form gemlite's kernels compute with (its ``fma_mode``).

``kernel="reference"`` computes the same dequantized weights with a plain matmul: slow, for
CPU tests of the decode path (the tokens are the int4 model's either way).

``kernel="dense"`` is no int4 at all: fused 16-bit copies of the source weights (a bitsandbytes
layer dequantized exactly as its own forward dequantizes it), for the continuous batcher
(``ragtune.batching``): at 32 rows a cuBLAS bf16 GEMM streams the weights at full bandwidth and
a 512-token prefill runs at bf16 matmul speed, where gemlite's int4 GEMMs took ~27 ms a step
and 58 ms a prompt on the H200 (docs/benchmarks.md). Same weights as the NF4 model's forward.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ragtune.errors import RagtuneError

log = logging.getLogger(__name__)

GROUP_SIZE = 64  # bitsandbytes NF4 blocks are 64 wide too: a group never spans two blocks
KERNELS = ("gemlite", "reference")
DENSE = "dense"  # fused 16-bit copies (DenseLinear), not int4


class Int4Error(RagtuneError):
    """The int4 path cannot run here (no gemlite, no GPU, an unsupported layer)."""


def is_bnb_4bit(module: torch.nn.Module) -> bool:
    """A bitsandbytes 4-bit Linear (its weight carries a quant_state)."""
    weight = getattr(module, "weight", None)
    return getattr(weight, "quant_state", None) is not None


def has_bnb_4bit(model: torch.nn.Module) -> bool:
    return any(is_bnb_4bit(m) for m in model.modules())


def dense_weight(linear: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight as a dense [out, in] tensor (bitsandbytes 4-bit dequantized)."""
    weight = linear.weight
    if is_bnb_4bit(linear):
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
    if type(weight.data) is not torch.Tensor and not isinstance(weight, torch.nn.Parameter):
        raise Int4Error(f"cannot read {type(linear).__name__}'s weight as a dense tensor")
    return weight.detach().to(dtype)


def quantize_rtn(
    w: torch.Tensor, group_size: int = GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 in [0, 15], scale, zero) per group of ``group_size`` inputs, round-to-nearest.

    ``scale`` has ``w``'s dtype, ``zero`` is integer-valued (same dtype), both [out, in/g].
    """
    n, k = w.shape
    if k % group_size:
        raise Int4Error(f"in_features {k} is not a multiple of group_size {group_size}")
    g = w.float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8).to(w.dtype)  # the stored scale, rounded
    s = scale.float()
    zero = torch.round(-lo / s).clamp(0, 15)
    q = (torch.round(g / s[..., None]) + zero[..., None]).clamp(0, 15).to(torch.uint8)
    return q.reshape(n, k), scale, zero.to(w.dtype)


def dequantize_rtn(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The weights the int4 kernels multiply with: ``q * scale + shift`` (shift in ``dtype``)."""
    n, k = q.shape
    groups = scale.shape[-1]
    shift = (-zero.float() * scale.float()).to(dtype).float()
    w = q.float().reshape(n, groups, k // groups) * scale.float()[..., None] + shift[..., None]
    return w.reshape(n, k).to(dtype)


class Int4Linear(torch.nn.Module):
    """y = x @ W^T with W held in int4 (one or several fused source Linears, no bias)."""

    def __init__(
        self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, kernel: str
    ) -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise Int4Error(f"int4 kernel must be one of {KERNELS}, got {kernel!r}")
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        self.kernel = kernel
        self.dtype = scale.dtype
        if kernel == "reference":
            self.register_buffer("weight", dequantize_rtn(q, scale, zero, scale.dtype))
            return
        try:
            from gemlite.core import forward_functional
            from gemlite.helper import A16Wn
        except ImportError as e:
            raise Int4Error(
                "quantize=int4 needs gemlite's Triton kernels (pip install gemlite)"
            ) from e
        layer = A16Wn(device=q.device, dtype=scale.dtype).from_weights(
            q, scale, zero, W_nbits=4, group_size=group_size
        )
        self._gemlite = layer  # keeps the packed tensors alive
        # the kernel's arguments, built once: gemlite's module makes a new scalar tensor on
        # every call, a host-to-device copy per projection in eager code
        self._args = (layer.get_tensor_args(), layer.get_meta_args())
        self._forward = forward_functional

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "reference":
            return F.linear(x, self.weight)
        targs, margs = self._args
        return self._forward(x, None, targs, margs)

    @classmethod
    def from_linears(
        cls,
        linears: Sequence[torch.nn.Module],
        dtype: torch.dtype = torch.bfloat16,
        group_size: int = GROUP_SIZE,
        kernel: str = "gemlite",
    ) -> Int4Linear:
        """One int4 layer computing the concatenated outputs of ``linears`` (same input)."""
        for lin in linears:
            if getattr(lin, "bias", None) is not None:
                raise Int4Error(f"{type(lin).__name__} has a bias; the int4 path has none")
        parts = [quantize_rtn(dense_weight(lin, dtype), group_size) for lin in linears]
        q, scale, zero = (torch.cat(t) for t in zip(*parts, strict=True))
        del parts
        return cls(q, scale, zero, group_size, kernel)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, group={self.group_size}, "
            f"kernel={self.kernel}"
        )


class DenseLinear(torch.nn.Module):
    """y = x @ W^T with W the concatenated dense weights of one or several Linears (no bias)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    @classmethod
    def from_linears(
        cls, linears: Sequence[torch.nn.Module], dtype: torch.dtype = torch.bfloat16, *_: Any
    ) -> DenseLinear:
        for lin in linears:
            if getattr(lin, "bias", None) is not None:
                raise Int4Error(f"{type(lin).__name__} has a bias; the fused path has none")
        return cls(torch.cat([dense_weight(lin, dtype) for lin in linears]))


class FusedLayer(torch.nn.Module):
    """One decoder layer's projections fused: q|k|v, o, gate|up, down (int4, or dense)."""

    def __init__(self, layer: Any, dtype: torch.dtype, group_size: int, kernel: str) -> None:
        super().__init__()
        att, mlp = layer.self_attn, layer.mlp
        make: Any = DenseLinear.from_linears if kernel == DENSE else Int4Linear.from_linears
        self.qkv = make([att.q_proj, att.k_proj, att.v_proj], dtype, group_size, kernel)
        self.o = make([att.o_proj], dtype, group_size, kernel)
        self.gate_up = make([mlp.gate_proj, mlp.up_proj], dtype, group_size, kernel)
        self.down = make([mlp.down_proj], dtype, group_size, kernel)
        self.qkv_sizes = [_out(att.q_proj), _out(att.k_proj), _out(att.v_proj)]
        self.inter = _out(mlp.gate_proj)


def _out(linear: torch.nn.Module) -> int:
    n = getattr(linear, "out_features", None)
    return int(n) if n is not None else int(linear.weight.shape[0])


def int4_kernel_available() -> str | None:
    """Why gemlite's kernels cannot run here, or None when they can."""
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    try:
        import gemlite  # noqa: F401
    except ImportError as e:
        return f"gemlite does not import ({e})"
    return None


def convert_layers(
    layers: Sequence[Any],
    head: torch.nn.Module | None,
    dtype: torch.dtype,
    group_size: int = GROUP_SIZE,
    kernel: str = "gemlite",
) -> tuple[list[FusedLayer], torch.nn.Module | None]:
    """Int4 (or, ``kernel="dense"``, fused 16-bit) copies of every layer's projections, and of
    the LM head if given."""
    fused = []
    for layer in layers:
        fused.append(FusedLayer(layer, dtype, group_size, kernel))
    make: Any = DenseLinear.from_linears if kernel == DENSE else Int4Linear.from_linears
    new_head = make([head], dtype, group_size, kernel) if head else None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log.info(
        "fastdecode: %d layers' projections fused, %s%s",
        len(fused),
        "dense 16-bit" if kernel == DENSE else f"int4 (group {group_size}, {kernel} kernels)",
        ", LM head too" if new_head is not None else "",
    )
    return fused, new_head
