"""The int4 projections of a 12B decode step alone: gemlite's one-row kernel settings on this GPU.

    python bench/int4_kernels.py --out tuned.json [--groups 64,128] [--budget-s 150] [--json log]

The batch-1 decode step of Mistral-Nemo-12B runs 161 int4 projections (per layer q|k|v
6144x5120, o 5120x4096, gate|up 28672x5120, down 5120x14336; 40 layers; LM head 131072x5120),
6.5 GB of int4 weights, scales and shifts at group 64: their time is the step's floor.

1. Sweep: for each shape and group size, candidate settings of gemlite's one-row kernels
   (GEMV_REVSPLITK, its default at one row, and GEMV) are timed on all instances of the shape
   back to back in one CUDA graph (as the decode step runs them; 0.4-5.9 GB per shape, far
   over the 60 MB L2). gemlite's own autotuning times one kernel alone and ships no H200
   configs. Candidates compile first in parallel worker processes (Triton's disk cache), so
   the timing loop only loads them.
2. The fastest per shape at group 64 is written to ``--out`` (ragtune's tuned-config format,
   ``ragtune/int4_configs/``); other groups to ``--out`` with ``_g<group>`` before ``.json``.
3. All 161 in one graph with the chosen settings: plain (a zeroed output tensor per call, as
   by default) and with gemlite's ring-buffer outputs (``ring``: one zeroed ring buffer per
   output width instead of a memset per call), against the device-to-device copy bandwidth.

    python bench/int4_kernels.py --table ragtune/int4_configs/nvidia_h200.json

times the 161 projections with a tuned table's settings only (no sweep), with gemlite's
native bf16 atomic adds (its default on Hopper) and with float32 atomics (then a conversion
per call), and the error of each against float32 products with the same int4 weights.

Prints RESULT lines (JSON) and a table last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(6144, 5120), (5120, 4096), (28672, 5120), (5120, 14336)]  # (out, in) per layer
HEAD = (131072, 5120)
TYPES = ("GEMV_REVSPLITK", "GEMV")
# (BLOCK_SIZE_N, num_warps): one program covers BLOCK_SIZE_N outputs of 1 or 2 K-blocks
TILES = [(128, 1), (128, 2), (256, 2), (256, 4), (512, 4), (512, 8), (1024, 4), (1024, 8)]


def candidates(mtype: str, group: int) -> list[dict[str, Any]]:
    """Settings to try. REVSPLITK reads two K-blocks a program, both inside one group
    (2*BK <= group); GEMV one (BK <= group). At most ~128 weights a thread in flight."""
    out = []
    blocks = [b for b in (8, 16, 32, 64, 128) if (2 * b if mtype == TYPES[0] else b) <= group]
    if mtype == "GEMV":
        blocks = [b for b in blocks if b >= 32]
    orders = (0,)  # A_load_order 1 (load A after B) moved no H100 setting by much
    for bn, warps in TILES:
        for bk in blocks:
            if bn * bk > 4096 * warps:
                continue
            for order in orders:
                out.append(
                    {
                        "BLOCK_SIZE_M": 1,
                        "BLOCK_SIZE_N": bn,
                        "BLOCK_SIZE_K": bk,
                        "A_load_order": order,
                        "dot_prod_mode": 0,
                        "num_warps": warps,
                        "num_stages": 1,
                        "num_ctas": 1,
                    }
                )
    return out


def use_config(mtype: str, n: int, k: int, group: int, cfg: dict[str, Any]) -> int:
    """Make gemlite run ``cfg`` for this shape at one row; returns the matmul-type index."""
    import gemlite.core as gcore

    sig = str((1, n, k, group, 8, gcore.DType.FP16.value * 100 + 4))
    gcore.GEMLITE_TRITON_CONFIG_CACHE.setdefault(mtype, {})[sig] = dict(cfg)
    for autotuner in gcore.GEMLITE_TRITON_MAPPING[mtype].kernel:
        autotuner.cache.clear()  # re-read the config cache on the next call
    return gcore.GEMLITE_MATMUL_TYPES_MAPPING[mtype]


def no_autotune_bench() -> None:
    """One config per shape: nothing to time inside gemlite (older Triton times it anyway)."""
    import gemlite.core as gcore

    for mtype in TYPES:
        for autotuner in gcore.GEMLITE_TRITON_MAPPING[mtype].kernel:
            autotuner._bench = lambda *a, config=None, **kw: [0.0, 0.0, 0.0]


def make_layer(n: int, k: int, group: int, seed: int) -> Any:
    """An int4 layer of random codes, scales and zero points (not zeros: METHOD.md)."""
    from ragtune.fastweights import Int4Linear

    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.uint8, generator=g)
    scale = (torch.rand(n, k // group, device="cuda", generator=g) * 1e-3 + 1e-4).bfloat16()
    zero = torch.randint(0, 16, (n, k // group), device="cuda", generator=g).bfloat16()
    return Int4Linear(q, scale, zero, group, "gemlite")


# --------------------------------------------------------------------------- workers
_WORKER: dict[Any, Any] = {}


def _worker_init() -> None:
    from ragtune import fastweights

    fastweights.set_tuned_configs(None)
    no_autotune_bench()


def _warm(task: tuple) -> tuple[tuple, str | None]:
    """Compile one candidate (a worker): one call on one instance of the shape."""
    from gemlite.core import forward_functional

    mtype, n, k, group, cfg = task
    try:
        if (n, k, group) not in _WORKER:
            _WORKER[(n, k, group)] = make_layer(n, k, group, 0)
        lin = _WORKER[(n, k, group)]
        idx = use_config(mtype, n, k, group, cfg)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            forward_functional(x, None, *lin._args, idx)
        torch.cuda.synchronize()
        return task, None
    except Exception as e:  # a setting that does not compile is skipped, not fatal
        return task, f"{type(e).__name__}: {e}"[:300]


def warm_all(tasks: list[tuple], workers: int) -> dict[str, str]:
    """Compile every candidate in ``workers`` processes; {task key: error} of the failures."""
    errors = {}
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_worker_init) as pool:
        for task, err in pool.imap_unordered(_warm, tasks, chunksize=4):
            if err:
                errors[json.dumps(task, sort_keys=True)] = err
    return errors


# --------------------------------------------------------------------------- timing
@contextlib.contextmanager
def kernel_cache(enabled: bool) -> Iterator[None]:
    """gemlite's ring-buffer outputs on (for a capture): calls of one output width take
    successive slots of one buffer, zeroed at the first use in the graph, instead of a zeroed
    tensor (a memset kernel) each. Safe in a graph whose calls per width fit the ring (256)."""
    from gemlite.triton_kernels.config import KERNEL_CACHE

    before = KERNEL_CACHE.ENABLE
    KERNEL_CACHE.ENABLE = enabled
    try:
        yield
    finally:
        KERNEL_CACHE.ENABLE = before


def graph_ms(calls: list, reps: int = 20, ring: bool = False) -> float:
    """Median ms of one CUDA-graph replay of ``calls`` (each a no-argument callable)."""
    with torch.inference_mode(), kernel_cache(ring):
        for _ in range(2):
            for c in calls:
                c()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for c in calls:
                c()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    del g
    return statistics.median(times)


def nbytes(lin: Any) -> int:
    return sum(t.numel() * t.element_size() for t in lin._args[0][:3])


def copy_bandwidth() -> float:
    """GB/s of a 4 GB device-to-device copy (bytes read + written)."""
    src = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * src.numel() * 10 / (time.perf_counter() - t0) / 1e9


def native_bf16_atomics(enabled: bool) -> None:
    """gemlite's one-row kernels add partial sums into a bf16 output (Hopper default) or into a
    float32 one converted afterwards."""
    from gemlite.triton_kernels import utils

    utils.GEMLITE_USE_NATIVE_ATOMIC_BFP16 = enabled


def table_run(path: Path, layers: int, emit: Any) -> None:
    """The 161 projections with a tuned table's settings: time and error, bf16 vs fp32 atomics."""
    from gemlite.core import forward_functional

    from ragtune import fastweights
    from ragtune.fastweights import dequantize_rtn, quantize_rtn

    table = fastweights.read_tuned(path)
    shapes = [*SHAPES, HEAD]
    mods: dict[tuple[int, int], list[Any]] = {}
    idx: dict[tuple[int, int], int] = {}
    for n, k in shapes:
        typ, cfg = table[(n, k, 64)]
        idx[(n, k)] = use_config(typ, n, k, 64, cfg)
        mods[(n, k)] = [make_layer(n, k, 64, s) for s in range(1 if (n, k) == HEAD else layers)]
    xs = {k: torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _, k in shapes}
    order = [(s, i) for i in range(layers) for s in SHAPES] + [(HEAD, 0)]
    size = sum(nbytes(mods[s][i]) for s, i in order)
    torch.manual_seed(1)
    for native in (True, False):
        native_bf16_atomics(native)
        for s in shapes:  # error of one projection per shape, real weights' statistics
            n, k = s
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            q, scale, zero = quantize_rtn(w, 64)
            lin = fastweights.Int4Linear(q, scale, zero, 64, "gemlite")
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            with torch.inference_mode():
                got = forward_functional(x, None, *lin._args, idx[s]).float()
            ref = x.float() @ dequantize_rtn(q, scale, zero, torch.bfloat16).float().T
            err = float((got - ref).norm() / ref.norm())
            emit(
                {
                    "what": "error",
                    "native_bf16_atomics": native,
                    "out": n,
                    "in": k,
                    "type": table[(*s, 64)][0],
                    "rel_err": round(err, 5),
                }
            )
            del w, q, lin
        calls = [
            (lambda m=mods[s][i], x=xs[s[1]], j=idx[s]: forward_functional(x, None, *m._args, j))
            for s, i in order
        ]
        ms = graph_ms(calls, reps=30)
        emit(
            {
                "what": "all_projections",
                "native_bf16_atomics": native,
                "kernels": len(calls),
                "weight_gb": round(size / 1e9, 3),
                "ms": round(ms, 3),
                "gb_per_s": round(size / ms / 1e6, 1),
                "tok_s_if_alone": round(1e3 / ms, 1),
            }
        )
    native_bf16_atomics(True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="tuned-config file (group 64)")
    ap.add_argument("--table", type=Path, default=None, help="no sweep: time this table")
    ap.add_argument("--groups", default="64,128")
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--workers", type=int, default=12, help="parallel compile processes")
    ap.add_argument(
        "--budget-s", type=float, default=150.0, help="after this, sweep only the first group"
    )
    ap.add_argument("--json", type=Path, default=None, help="append every result (JSON lines)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    import gemlite

    from ragtune import fastweights

    fastweights.set_tuned_configs(None)
    no_autotune_bench()
    from gemlite.core import forward_functional

    gpu = torch.cuda.get_device_name(0)

    def emit(r: dict) -> None:
        r = {"gpu": gpu, **r}
        print("RESULT " + json.dumps(r), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")

    if args.table:
        table_run(args.table, args.layers, emit)
        emit({"what": "done", "seconds": round(time.perf_counter() - t_start, 1)})
        return
    if args.out is None:
        ap.error("--out (or --table) is required")
    bw = copy_bandwidth()
    emit({"what": "copy_bandwidth", "gb_per_s": round(bw, 1)})
    groups = [int(g) for g in args.groups.split(",") if g.strip()]
    shapes = [*SHAPES, HEAD]
    tasks = [
        (mtype, n, k, g, cfg)
        for g in groups
        for (n, k) in shapes
        for mtype in TYPES
        for cfg in candidates(mtype, g)
    ]
    t0 = time.perf_counter()
    errors = warm_all(tasks, args.workers)
    emit(
        {
            "what": "compile",
            "candidates": len(tasks),
            "failed": len(errors),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    )
    for key, err in list(errors.items())[:5]:
        print("compile failed:", key, err, flush=True)

    best: dict[tuple[int, int, int], dict[str, Any]] = {}
    results: list[dict[str, Any]] = []
    layers: dict[tuple[int, int, int], list[Any]] = {}
    xs = {k: torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _, k in shapes}
    for g in groups:
        for n, k in shapes:
            if g != groups[0] and time.perf_counter() - t_start > args.budget_s:
                continue  # the first group is swept in full; the others while time is left
            count = 1 if (n, k) == HEAD else args.layers
            mods = [make_layer(n, k, g, seed) for seed in range(count)]
            layers[(n, k, g)] = mods
            size = sum(nbytes(m) for m in mods)
            for mtype in TYPES:
                for cfg in candidates(mtype, g):
                    if json.dumps((mtype, n, k, g, cfg), sort_keys=True) in errors:
                        continue
                    if g != groups[0] and time.perf_counter() - t_start > args.budget_s:
                        break  # the first group is swept in full; the others while time is left
                    idx = use_config(mtype, n, k, g, cfg)
                    calls = [
                        (lambda m=m, x=xs[k], i=idx: forward_functional(x, None, *m._args, i))
                        for m in mods
                    ]
                    try:
                        ms = graph_ms(calls)
                    except Exception as e:  # a failing candidate must not lose the others
                        print("failed:", mtype, n, k, g, cfg, e, flush=True)
                        continue
                    r = {
                        "what": "candidate",
                        "out": n,
                        "in": k,
                        "group": g,
                        "type": mtype,
                        "config": cfg,
                        "count": count,
                        "us_each": round(ms * 1e3 / count, 2),
                        "gb_per_s": round(size / ms / 1e6, 1),
                    }
                    emit(r)
                    results.append(r)
                    if (n, k, g) not in best or r["gb_per_s"] > best[(n, k, g)]["gb_per_s"]:
                        best[(n, k, g)] = r
            b = best.get((n, k, g))
            if b:
                print(
                    f"best {n}x{k} g{g}: {b['type']} {b['config']} {b['gb_per_s']} GB/s", flush=True
                )

    # the chosen settings as ragtune tuned-config files, one per group: the fastest whose
    # kernel reads >= 32 inputs per partial sum (gemlite adds partial sums into the bf16 output
    # with atomics: fewer adds, less rounding; within a few % of the fastest here)
    for g in groups:
        for n, k in shapes:
            wide = [r for r in results if (r["out"], r["in"], r["group"]) == (n, k, g)]
            wide = [
                r
                for r in wide
                if r["config"]["BLOCK_SIZE_K"] * (2 if r["type"] == TYPES[0] else 1) >= 32
            ]
            if wide:
                best[(n, k, g)] = max(wide, key=lambda r: r["gb_per_s"])
        entries = [
            {
                key: best[(n, k, g)][key]
                for key in ("out", "in", "group", "type", "config", "us_each", "gb_per_s")
            }
            for n, k in shapes
            if (n, k, g) in best
        ]
        path = args.out if g == 64 else args.out.with_name(f"{args.out.stem}_g{g}.json")
        data = {
            "gpu": gpu,
            "gemlite": gemlite.__version__,
            "torch": torch.__version__,
            "measured": time.strftime("%Y-%m-%d"),
            "how": "bench/int4_kernels.py: per shape the fastest setting reading >= 32 inputs "
            "per partial sum, all instances of a shape (40 layers; 1 LM head) back to back in "
            "one CUDA graph, batch 1, bf16",
            "m1": entries,
        }
        path.write_text(json.dumps(data, indent=1) + "\n")

    # the whole step's projections, in step order, with the chosen settings
    for g in groups:
        if not all((n, k, g) in best for n, k in shapes):
            continue
        calls, size = [], 0
        for i in range(args.layers):
            for n, k in SHAPES:
                b = best[(n, k, g)]
                idx = use_config(b["type"], n, k, g, b["config"])
                m = layers[(n, k, g)][i]
                size += nbytes(m)
                calls.append(lambda m=m, x=xs[k], i=idx: forward_functional(x, None, *m._args, i))
        b = best[(*HEAD, g)]
        idx = use_config(b["type"], *HEAD, g, b["config"])
        m = layers[(*HEAD, g)][0]
        size += nbytes(m)
        calls.append(lambda m=m, x=xs[HEAD[1]], i=idx: forward_functional(x, None, *m._args, i))
        for ring in (False, True):
            ms = graph_ms(calls, reps=30, ring=ring)
            emit(
                {
                    "what": "all_projections",
                    "group": g,
                    "ring_outputs": ring,
                    "kernels": len(calls),
                    "weight_gb": round(size / 1e9, 3),
                    "ms": round(ms, 3),
                    "gb_per_s": round(size / ms / 1e6, 1),
                    "of_copy_bw": round(size / ms / 1e6 / bw, 3),
                    "tok_s_if_alone": round(1e3 / ms, 1),
                }
            )
    emit({"what": "done", "seconds": round(time.perf_counter() - t_start, 1)})


if __name__ == "__main__":
    main()
