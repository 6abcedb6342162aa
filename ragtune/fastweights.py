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

- Prompts (``dense_rows`` rows or more, default 128): each projection's int4 weights are
  dequantized into a 16-bit matrix (one projection at a time, freed after its matmul: the
  caching allocator hands the same block to the next) and multiplied by cuBLAS. gemlite's int4
  GEMM ran a 512-token prompt at ~215 TFLOP/s on the H200 (58 ms of a 72 ms time to first
  token); a bf16 matmul runs at ~770, and the dequantization is one pass over the weights.
  Same weights, same products up to accumulation order.
- Batch-1 kernel settings: gemlite ships tuned configs for the H100 but none for the H200, and
  its autotuning (~1 minute at 12B) times each kernel alone. ``int4_configs/<gpu>.json`` holds,
  per projection shape, the kernel (GEMV_REVSPLITK or GEMV) and the settings measured fastest
  back to back in a CUDA graph among those that read >= 32 inputs per partial sum
  (``bench/int4_kernels.py``; gemlite adds each partial sum into the bf16 output atomically,
  so fewer sums round less). They are handed to gemlite, which then skips its autotuning for
  those shapes (warm-up 46 s instead of 117 at 12B). ``RAGTUNE_INT4_CONFIGS`` names another
  file, or ``off``.

- One-row calls (the decode step) run ``ragtune.int4_gemv``'s Triton GEMV on the same packed
  tensors where it is faster than gemlite's (the tuned file's "gemv" list says per shape; it
  accumulates in float32, with no memset and no bf16 atomics); other row counts stay gemlite's.

``kernel="reference"`` computes the same dequantized weights with a plain matmul: slow, for
CPU tests of the decode path (the tokens are the int4 model's either way). It also holds the
packed layout gemlite keeps (``pack_int4``), so the prompt path runs the same unpacking code
on CPU as on the GPU.

``kernel="dense"`` is no int4 at all: fused 16-bit copies of the source weights (a bitsandbytes
layer dequantized exactly as its own forward dequantizes it), for the continuous batcher
(``ragtune.batching``): at 32 rows a cuBLAS bf16 GEMM streams the weights at full bandwidth and
a 512-token prefill runs at bf16 matmul speed, where gemlite's int4 GEMMs took ~27 ms a step
and 58 ms a prompt on the H200 (docs/benchmarks.md). Same weights as the NF4 model's forward.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ragtune.cuda_check import cuda_unavailable_for
from ragtune.errors import RagtuneError

log = logging.getLogger(__name__)

GROUP_SIZE = 64  # bitsandbytes NF4 blocks are 64 wide too: a group never spans two blocks
KERNELS = ("gemlite", "reference")
DENSE = "dense"  # fused 16-bit copies (DenseLinear), not int4
# rows (batch x tokens) from which a projection dequantizes to 16 bits for cuBLAS: one pass
# over the weights (~7 ms at 12B on an H200) beats gemlite's GEMM from about here up
DENSE_ROWS = 128
CONFIG_DIR = Path(__file__).with_name("int4_configs")
CONFIG_ENV = "RAGTUNE_INT4_CONFIGS"
M1_TYPES = ("GEMV_REVSPLITK", "GEMV")  # gemlite's one-row kernels a tuned file may name


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


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[out, in] values 0..15 -> [in/8, out] int32 words, gemlite's layout (32-bit packing over
    the input dimension): input k of a column sits at bits 4*(k % 8) of word k // 8."""
    n, k = q.shape
    if k % 8:
        raise Int4Error(f"in_features {k} is not a multiple of 8")
    q32 = q.to(torch.int32).reshape(n, k // 8, 8)
    words = q32[..., 0].clone()
    for i in range(1, 8):
        words |= q32[..., i] << (4 * i)
    return words.t().contiguous()


def unpack_int4(
    w_q: torch.Tensor, scales: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The dense [in, out] weights of packed int4 (``pack_int4``), [in/g, out] scales and shifts.

    The arithmetic of ``dequantize_rtn`` (float32, one rounding to ``dtype``), so the prompt
    path multiplies with exactly the weights the one-row kernels use.
    """
    k8, n = w_q.shape
    groups = scales.shape[0]
    bits = torch.arange(0, 32, 4, dtype=torch.int32, device=w_q.device)
    q = (w_q[:, None, :] >> bits[None, :, None]) & 15  # [in/8, 8, out]
    q = q.reshape(groups, k8 * 8 // groups, n).float()
    w = q * scales.float()[:, None, :] + shift.float()[:, None, :]
    return w.reshape(k8 * 8, n).to(dtype)


_compiled_unpack: Any = None


def _dense_weight_of(packed: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``unpack_int4``, compiled on CUDA: one fused kernel (int4 in, 16-bit out) instead of
    ~6 eager passes over int32/float32 temporaries four to eight times the output's size."""
    global _compiled_unpack
    if packed[0].is_cuda and not torch.compiler.is_compiling():
        if _compiled_unpack is None:
            _compiled_unpack = torch.compile(unpack_int4, dynamic=False)
        return _compiled_unpack(*packed, dtype)
    return unpack_int4(*packed, dtype)


# --------------------------------------------------------------------------- tuned kernels
_tuned: dict[tuple[int, int, int], tuple[str, dict[str, Any]]] | None = None
_gemv_table: dict[tuple[int, int, int], Any] = {}  # the file's "gemv" list (ragtune.int4_gemv)
_tuned_source: str | None = "auto"


def config_file_for(device_name: str) -> Path:
    """``int4_configs/nvidia_h200.json`` for "NVIDIA H200"."""
    return CONFIG_DIR / (re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_") + ".json")


def read_tuned(path: str | Path) -> dict[tuple[int, int, int], tuple[str, dict[str, Any]]]:
    """{(out, in, group): (gemlite matmul type, kernel config)} of a tuned-config file."""
    data = json.loads(Path(path).read_text())
    table = {}
    for e in data["m1"]:
        if e["type"] not in M1_TYPES:
            raise Int4Error(f"{path}: kernel type {e['type']!r} is not one of {M1_TYPES}")
        cfg = dict(e["config"])
        missing = {"BLOCK_SIZE_N", "BLOCK_SIZE_K", "num_warps", "num_stages"} - set(cfg)
        if missing:
            raise Int4Error(f"{path}: config for {e['out']}x{e['in']} lacks {sorted(missing)}")
        table[(int(e["out"]), int(e["in"]), int(e["group"]))] = (e["type"], cfg)
    return table


def set_tuned_configs(source: str | None) -> None:
    """Which batch-1 kernel settings later int4 layers use: "auto" (``RAGTUNE_INT4_CONFIGS``,
    else the packaged file for this GPU, if any), a file, or None (gemlite's autotuning)."""
    global _tuned, _tuned_source
    _tuned, _tuned_source = None, source


def _tuned_table(device: torch.device) -> dict[tuple[int, int, int], tuple[str, dict[str, Any]]]:
    """The table in use, read and handed to gemlite's config cache once per process."""
    global _tuned
    if _tuned is not None:
        return _tuned
    source = _tuned_source
    if source == "auto":
        source = os.environ.get(CONFIG_ENV) or str(
            config_file_for(torch.cuda.get_device_name(device))
        )
    _tuned = {}
    _gemv_table.clear()
    if source and source != "off" and Path(source).is_file():
        from ragtune.int4_gemv import read_table

        _tuned = read_tuned(source)
        _gemv_table.update(read_table(source))
        import gemlite.core as gcore

        # gemlite keys its cache by (rows, out, in, group, values per int32, dtype id); bf16
        # inputs share fp16's id (forward_functional), so one entry serves both
        type_id = gcore.DType.FP16.value * 100 + 4
        for (n, k, g), (mtype, cfg) in _tuned.items():
            sig = str((1, n, k, g, 8, type_id))
            gcore.GEMLITE_TRITON_CONFIG_CACHE.setdefault(mtype, {})[sig] = dict(cfg)
        log.info(
            "fastdecode: int4 batch-1 kernel settings from %s (%d shapes)", source, len(_tuned)
        )
    return _tuned


class Int4Linear(torch.nn.Module):
    """y = x @ W^T with W held in int4 (one or several fused source Linears, no bias)."""

    def __init__(
        self,
        q: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        group_size: int,
        kernel: str,
        dense_rows: int = DENSE_ROWS,
    ) -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise Int4Error(f"int4 kernel must be one of {KERNELS}, got {kernel!r}")
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        self.kernel = kernel
        self.dtype = scale.dtype
        self.dense_rows = int(dense_rows)  # 0: never dequantize
        self.m1_type = -1  # gemlite's choice of one-row kernel, unless a tuned file names one
        self.gemv: list[int] | None = None  # ragtune's one-row kernel's setting, if it runs
        if kernel == "reference":
            self.register_buffer("weight", dequantize_rtn(q, scale, zero, scale.dtype))
            shift = (-zero.float() * scale.float()).to(scale.dtype)
            # what gemlite keeps: [in/8, out] words, [in/g, out] scales and shifts
            self._packed = (pack_int4(q), scale.t().contiguous(), shift.t().contiguous())
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
        self._packed = tuple(self._args[0][:3])  # W_q [in/8, out], scales, shifts [in/g, out]
        self._forward = forward_functional
        tuned = _tuned_table(q.device).get((self.out_features, self.in_features, group_size))
        if tuned is not None:
            from gemlite.core import GEMLITE_MATMUL_TYPES_MAPPING

            self.m1_type = GEMLITE_MATMUL_TYPES_MAPPING[tuned[0]]
        # one-row calls: ragtune's int4 GEMV where it is the faster kernel (ragtune.int4_gemv)
        from ragtune import int4_gemv

        shape = (self.out_features, self.in_features, group_size)
        self.gemv = int4_gemv.choose(*shape, _gemv_table)
        if self.gemv is not None:
            int4_gemv.workspace(shape[0], int4_gemv.GemvConfig(*self.gemv), q.device)

    def dense_weight(self) -> torch.Tensor:
        """The weights as a dense [in, out] matrix, unpacked from the int4 copy."""
        return _dense_weight_of(self._packed, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if 0 < self.dense_rows <= rows:  # a prompt: dequantize, then one cuBLAS matmul
            return torch.matmul(x, self.dense_weight())
        if self.kernel == "reference":
            return F.linear(x, self.weight)
        if rows == 1 and self.gemv is not None:
            return torch.ops.ragtune.int4_gemv(x, *self._packed, self.gemv)
        targs, margs = self._args
        return self._forward(x, None, targs, margs, self.m1_type if rows == 1 else -1)

    @classmethod
    def from_linears(
        cls,
        linears: Sequence[torch.nn.Module],
        dtype: torch.dtype = torch.bfloat16,
        group_size: int = GROUP_SIZE,
        kernel: str = "gemlite",
        dense_rows: int = DENSE_ROWS,
    ) -> Int4Linear:
        """One int4 layer computing the concatenated outputs of ``linears`` (same input)."""
        for lin in linears:
            if getattr(lin, "bias", None) is not None:
                raise Int4Error(f"{type(lin).__name__} has a bias; the int4 path has none")
        parts = [quantize_rtn(dense_weight(lin, dtype), group_size) for lin in linears]
        q, scale, zero = (torch.cat(t) for t in zip(*parts, strict=True))
        del parts
        return cls(q, scale, zero, group_size, kernel, dense_rows)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, group={self.group_size}, "
            f"kernel={self.kernel}, dense_rows={self.dense_rows}"
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

    def __init__(
        self,
        layer: Any,
        dtype: torch.dtype,
        group_size: int,
        kernel: str,
        dense_rows: int = DENSE_ROWS,
    ) -> None:
        super().__init__()
        att, mlp = layer.self_attn, layer.mlp
        make: Any = DenseLinear.from_linears if kernel == DENSE else Int4Linear.from_linears
        args = (dtype, group_size, kernel, dense_rows)
        self.qkv = make([att.q_proj, att.k_proj, att.v_proj], *args)
        self.o = make([att.o_proj], *args)
        self.gate_up = make([mlp.gate_proj, mlp.up_proj], *args)
        self.down = make([mlp.down_proj], *args)
        self.qkv_sizes = [_out(att.q_proj), _out(att.k_proj), _out(att.v_proj)]
        self.inter = _out(mlp.gate_proj)


def _out(linear: torch.nn.Module) -> int:
    n = getattr(linear, "out_features", None)
    return int(n) if n is not None else int(linear.weight.shape[0])


def int4_kernel_available() -> str | None:
    """Why gemlite's kernels cannot run here, or None when they can."""
    return cuda_unavailable_for("gemlite")


def convert_layers(
    layers: Sequence[Any],
    head: torch.nn.Module | None,
    dtype: torch.dtype,
    group_size: int = GROUP_SIZE,
    kernel: str = "gemlite",
    dense_rows: int = DENSE_ROWS,
) -> tuple[list[FusedLayer], torch.nn.Module | None]:
    """Int4 (or, ``kernel="dense"``, fused 16-bit) copies of every layer's projections, and of
    the LM head if given (int4 layers dequantize for ``dense_rows`` rows or more)."""
    fused = []
    for layer in layers:
        fused.append(FusedLayer(layer, dtype, group_size, kernel, dense_rows))
    make: Any = DenseLinear.from_linears if kernel == DENSE else Int4Linear.from_linears
    new_head = make([head], dtype, group_size, kernel, dense_rows) if head else None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log.info(
        "fastdecode: %d layers' projections fused, %s%s",
        len(fused),
        "dense 16-bit" if kernel == DENSE else f"int4 (group {group_size}, {kernel} kernels)",
        ", LM head too" if new_head is not None else "",
    )
    return fused, new_head


def quantize_weights(model: torch.nn.Module, kind: str = "int8") -> torch.nn.Module:
    """Quantize every Linear but the LM head of a 16-bit CUDA model to int8 with torchao.

    Per-row int8 weight-only, in place; under torch.compile the int8->bf16 conversion fuses
    into the matmul at batch 1 (gpt-fast's recipe). The LM head stays 16-bit: its conversion
    is not fused (131072 x 5120 at 12B: a 1.3 ms conversion kernel per token, then a GEMM).
    """
    from ragtune.fastdecode import FastDecodeError  # its error type; imported late (cycle)

    if kind != "int8":
        raise FastDecodeError(f"quantize_weights does int8 only, got {kind!r}")
    if next(model.parameters()).device.type != "cuda":
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
