"""Where the time of the fast decode path goes (used by bench/decode.py).

- ``gemv_floor`` / ``int4_floor``: every projection of the model (16-bit Linear layers, or the
  fast path's int4 copies) at one row, replayed as one CUDA graph: the weight-streaming floor
  of a batch-1 decode step with those kernels.
- ``kernel_time``: GPU time by kernel and by kind (gemlite, cuBLAS, inductor's fused ops,
  memsets, attention) of the prompt and of one decode step, from torch.profiler.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ragtune.fastdecode import FastDecoder


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def graph_seconds(mods: list, reps: int) -> float:
    """Seconds per replay of one CUDA graph calling every module once on a bf16 row (M=1)."""
    xs = {
        m.in_features: torch.randn(1, m.in_features, device="cuda", dtype=torch.bfloat16)
        for m in mods
    }
    with torch.inference_mode():
        for m in mods:
            m(xs[m.in_features])
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for m in mods:
                m(xs[m.in_features])
        g.replay()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            g.replay()
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def gemv_floor(model: Any, reps: int = 20) -> dict:
    """Time of every Linear of the model at batch 1 (M=1), replayed as one CUDA graph.

    The weight-streaming floor of a decode step with these kernels (cuBLAS for bf16): what
    the rest of the step (attention, norms, rope, sampling, launches) adds comes on top.
    """
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    nbytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    dt = graph_seconds(linears, reps)
    return {
        "variant": "floor_bf16_linears",
        "batch": 1,
        "linears": len(linears),
        "weight_gb": round(nbytes / 1e9, 2),
        "ms_per_token": round(dt * 1e3, 3),
        "decode_tok_s": round(1 / dt, 1),
        "gb_per_s": round(nbytes / dt / 1e9, 1),
        "ttft_s": None,
        "total_s": None,
    }


def int4_floor(fd: FastDecoder, reps: int = 20) -> dict | None:
    """The int4 projections alone at M=1 (gemlite), replayed as one CUDA graph."""
    direct = fd._direct
    if direct is None or not direct.fused:
        return None
    mods = [m for f in direct.fused for m in (f.qkv, f.o, f.gate_up, f.down)]
    if hasattr(direct.lm_head, "kernel"):
        mods.append(direct.lm_head)
    nbytes = sum(
        t.numel() * t.element_size() for m in mods for t in m._args[0][:3] if t is not None
    )
    dt = graph_seconds(mods, reps)
    return {
        "kernels": len(mods),
        "weight_gb": round(nbytes / 1e9, 2),
        "ms_per_token": round(dt * 1e3, 3),
        "tok_s": round(1 / dt, 1),
        "gb_per_s": round(nbytes / dt / 1e9, 1),
    }


def profile_kernels(fd: FastDecoder, prompt: list[int], n: int) -> dict[str, float]:
    """ms of GPU time per kernel name over one ``generate(prompt, n)`` (profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        fd.generate(prompt, n, eos_ids=[])
    sync()
    cuda = torch.autograd.DeviceType.CUDA
    return {
        e.key: e.self_device_time_total / 1e3 for e in prof.key_averages() if e.device_type == cuda
    }


def kind_of(kernel: str) -> str:
    """A coarse class of a kernel name, for where the time goes."""
    k = kernel.lower()
    for key, kind in (
        ("w4a16_gemv", "ragtune int4 GEMV"),
        (
            "gemv_int",
            "gemlite GEMV",
        ),  # gemlite's kernels: gemv_INT_*, gemm_INT_*, gemm_splitK_INT_*
        ("_int_kernel", "gemlite GEMM"),
        ("decode_attention", "ragtune decode attention"),
        ("rshift", "int4 -> 16-bit unpack (prompt path)"),
        # before "fill": inductor names its kernels by their ops (the masked softmax's
        # "..._masked_fill_..." is not a memset)
        ("triton_", "inductor/Triton (fused ops)"),
        ("fill", "memset/fill"),
        ("memset", "memset/fill"),
        ("fmha", "attention (SDPA)"),
        ("flash", "attention (SDPA)"),
        ("attention", "attention (SDPA)"),
        ("gemm", "cuBLAS matmul"),
        ("nvjet", "cuBLAS matmul"),
        ("xmma", "cuBLAS matmul"),
        ("at::native", "eager PyTorch ops"),
    ):
        if key in k:
            return kind
    return "other"


def by_kind(times: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in times.items():
        out[kind_of(k)] = out.get(kind_of(k), 0.0) + v
    return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def kernel_time(fd: FastDecoder, prompt: list[int], n: int = 24) -> dict:
    """GPU time of the prompt (prefill) and of one decode step, by kernel and by kind.

    A decode step = (profile of n tokens - profile of 1 token) / (n - 1): the prompt's
    kernels cancel out.
    """
    fd.generate(prompt, n, eos_ids=[])
    one = profile_kernels(fd, prompt, 1)
    many = profile_kernels(fd, prompt, n)
    steps = fd.last_stats["steps"] or 1
    wall = (fd.last_stats["total_s"] - fd.last_stats["ttft_s"]) / steps
    step = {k: (v - one.get(k, 0.0)) / steps for k, v in many.items()}
    top = sorted(step.items(), key=lambda kv: -kv[1])[:10]
    top_prefill = sorted(one.items(), key=lambda kv: -kv[1])[:10]
    return {
        "wall_ms_per_step": round(wall * 1e3, 3),
        "kernel_ms_per_step": round(sum(step.values()), 3),
        "step_by_kind_ms": by_kind(step),
        "top_step_kernels": [(k[:70], round(v, 4)) for k, v in top],
        "prefill_kernel_ms": round(sum(one.values()), 3),
        "prefill_by_kind_ms": by_kind(one),
        "top_prefill_kernels": [(k[:70], round(v, 3)) for k, v in top_prefill],
    }
