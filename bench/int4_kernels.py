"""The int4 projections of a 12B decode step alone: gemlite settings against bf16 cuBLAS.

    python bench/int4_kernels.py [--rows 1,32,512] [--variants g64,g128,g64_max,...]

Builds the fused projections the fast path uses at the Mistral-Nemo-12B shape (per layer
q|k|v 6144x5120, o 5120x4096, gate|up 28672x5120, down 5120x14336; 40 layers; LM head
131072x5120) from random weights, and times all 161 of them for ``--rows`` input rows
(a CUDA graph replay for <= 64 rows, eager above). bf16 = the same shapes as plain
``nn.Linear`` (cuBLAS). Variants: ``g64`` / ``g128`` (group size), ``_max`` (gemlite's
exhaustive autotune), ``_gemv`` / ``_splitk`` (force GEMV / GEMV_SPLITK at one row instead
of gemlite's default GEMV_REVSPLITK). No model, no torch.compile: a minute, not ten.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(6144, 5120), (5120, 4096), (28672, 5120), (5120, 14336)]  # (out, in) per layer
HEAD = (131072, 5120)


def modules(kind: str, layers: int) -> list[torch.nn.Module]:
    from ragtune.fastweights import Int4Linear

    group = 128 if "g128" in kind else 64
    mods: list[torch.nn.Module] = []
    torch.manual_seed(0)
    for shape in SHAPES * layers + [HEAD]:
        lin = torch.nn.Linear(shape[1], shape[0], bias=False, device="cuda", dtype=torch.bfloat16)
        if kind == "bf16":
            mods.append(lin)
        else:
            mods.append(Int4Linear.from_linears([lin], torch.bfloat16, group, "gemlite"))
            del lin
    return mods


def timed(mods: list[torch.nn.Module], rows: int, matmul_type: int, reps: int = 10) -> float:
    from gemlite.core import forward_functional

    xs = {
        m.in_features: torch.randn(rows, m.in_features, device="cuda", dtype=torch.bfloat16)
        for m in mods
    }

    def run() -> None:
        for m in mods:
            x = xs[m.in_features]
            if matmul_type >= 0 and hasattr(m, "_args"):
                forward_functional(x, None, *m._args, matmul_type)
            else:
                m(x)

    with torch.inference_mode():
        run()
        run()
        torch.cuda.synchronize()
        if rows <= 64:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                run()
            call = g.replay
        else:
            call = run
        call()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            call()
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,32,512")
    ap.add_argument("--variants", default="g64,bf16,g128,g64_splitk,g64_gemv,g64_max")
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import gemlite
    from gemlite.core import GEMLITE_MATMUL_TYPES_MAPPING as TYPES

    rows_list = [int(r) for r in args.rows.split(",")]
    for kind in args.variants.split(","):
        if kind.endswith("_max"):
            gemlite.set_autotune("max")
        t0 = time.perf_counter()
        mods = modules(kind, args.layers)
        build = time.perf_counter() - t0
        nbytes = sum(
            sum(t.numel() * t.element_size() for t in m._args[0][:3] if t is not None)
            if hasattr(m, "_args")
            else m.weight.numel() * 2
            for m in mods
        )
        flops_per_row = 2 * sum(m.in_features * m.out_features for m in mods)
        forced = {"_gemv": TYPES["GEMV"], "_splitk": TYPES["GEMV_SPLITK"]}
        mtype = next((v for k, v in forced.items() if kind.endswith(k)), -1)
        for rows in rows_list if mtype < 0 else [1]:
            t0 = time.perf_counter()
            dt = timed(mods, rows, mtype)
            r = {
                "variant": kind,
                "rows": rows,
                "ms": round(dt * 1e3, 3),
                "gb_per_s": round(nbytes / dt / 1e9, 1),
                "tflop_s": round(flops_per_row * rows / dt / 1e12, 1),
                "weight_gb": round(nbytes / 1e9, 2),
                "build_s": round(build, 1),
                "first_call_s": round(time.perf_counter() - t0 - dt * 10, 1),
                "gpu": torch.cuda.get_device_name(0),
            }
            print("RESULT " + json.dumps(r), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
        if mtype < 0 and 1 in rows_list and kind in ("g64", "bf16"):
            # where the batch-1 time goes: each projection shape alone (all its instances)
            for shape in [*SHAPES, HEAD]:
                sub = [m for m in mods if (m.out_features, m.in_features) == shape]
                sub_bytes = (
                    nbytes * sum(m.in_features * m.out_features for m in sub) / (flops_per_row / 2)
                )
                dt = timed(sub, 1, -1)
                r = {
                    "variant": kind,
                    "rows": 1,
                    "shape": list(shape),
                    "count": len(sub),
                    "us_each": round(dt * 1e6 / len(sub), 1),
                    "gb_per_s": round(sub_bytes / dt / 1e9, 1),
                }
                print("RESULT " + json.dumps(r), flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(r) + "\n")
        del mods
        torch.cuda.empty_cache()
        if kind.endswith("_max"):
            gemlite.set_autotune("fast")


if __name__ == "__main__":
    main()
