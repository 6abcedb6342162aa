"""ragtune's int4 GEMV (``ragtune/int4_gemv.py``) against gemlite's packaged one-row settings.

    python bench/int4_gemv.py --out nvidia_h200.json [--json log.jsonl] [--workers 12]

For each projection shape of the 12B decode step (per layer q|k|v 6144x5120, o 5120x4096,
gate|up 28672x5120, down 5120x14336, 40 layers; LM head 131072x5120), all instances back to
back in one CUDA graph (as the step runs them; 0.4-5.9 GB a shape, far over the L2):

1. gemlite's kernel with the packaged H200 setting (``ragtune/int4_configs``), as decoding
   runs it now;
2. each candidate setting of ragtune's kernel (compiled first in worker processes), after a
   check against float64 products with the same int4 weights (relative error < 1e-4, every
   output written: the output is poisoned with NaN first).

``--out``: the packaged file with a "gemv" list added (per shape the fastest setting and
whether it beat gemlite). Then all 161 projections in one graph: gemlite, ragtune's, and the
faster of the two per shape, against the device-to-device copy bandwidth. RESULT lines (JSON)
as it goes, a table last.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from int4_kernels import HEAD, SHAPES, copy_bandwidth, graph_ms, make_layer, nbytes, use_config  # noqa: E402

from ragtune.int4_gemv import GemvConfig, GemvError, launch, plan  # noqa: E402

PACKAGED = Path(__file__).resolve().parents[1] / "ragtune" / "int4_configs" / "nvidia_h200.json"


def candidates(
    n: int, k: int, group: int = 64, sms: int = 132, blocks: tuple[int, ...] = (0, 1)
) -> list[GemvConfig]:
    """Settings that tile the shape with at least a program an SM (split only where the
    outputs alone give fewer than two programs an SM). Per-word kernel: 16 or 32 bytes of
    words a lane a load, 8-16 group rows (the first sweep's best region); block kernel: 16-32
    words a lane a step; denormal kernel (2): 4-16 words a lane a load, any group rows (more
    outputs a lane spread the per-input work: x's load, conversion and sum)."""
    out = []
    for block in blocks:
        for bn in (32, 64, 128, 256, 512):
            for rows in (1, 2, 4, 8, 16):
                for warps in (2, 4, 8):
                    if block and warps == 2:
                        continue
                    per_lane = rows * bn * (8 if block == 1 else 1) // (32 * warps)
                    if block == 1 and (per_lane not in (16, 32) or rows > 8):
                        continue
                    if block == 0 and (per_lane not in (4, 8) or rows < 8):
                        continue
                    if block == 2 and per_lane not in (4, 8, 16):
                        continue
                    for split in (1, 2, 4, 5, 8) + (
                        (7, 10, 14, 16, 20, 28, 32) if block == 2 else ()
                    ):
                        cfg = GemvConfig(bn, rows, split, warps, 1, block)
                        try:
                            tiles, _ = plan(n, k, group, cfg)
                        except GemvError:
                            continue
                        progs = tiles * split
                        if progs < sms or (split > 1 and tiles >= 2 * sms) or progs > 16 * sms:
                            continue
                        out.append(cfg)
    return out


_LAYERS: dict[Any, Any] = {}


def _warm(task: tuple) -> tuple[tuple, str | None]:
    """Compile one candidate (a worker process): one call on a layer of the shape."""
    n, k, cfg = task
    try:
        if (n, k) not in _LAYERS:
            _LAYERS[(n, k)] = make_layer(n, k, 64, 0)
        lin = _LAYERS[(n, k)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        launch(x, *lin._packed, GemvConfig(*cfg))
        torch.cuda.synchronize()
        return task, None
    except Exception as e:  # a setting that does not compile is skipped, not fatal
        return task, f"{type(e).__name__}: {e}"[:400]


def _init() -> None:
    from ragtune import fastweights

    fastweights.set_tuned_configs("off")


def reference(lin: Any, x: torch.Tensor) -> torch.Tensor:
    """x @ W in float64, W the float32 weights q * scale + shift (the kernel's)."""
    from ragtune.fastweights import unpack_int4

    w = unpack_int4(*lin._packed, torch.float32)  # [in, out]
    return (x.double() @ w.double()).view(-1)


def try_candidate(
    cfg: GemvConfig,
    mods: list,
    x: torch.Tensor,
    ref: torch.Tensor,
    ref_bf16: torch.Tensor,
    size: int,
    count: int,
    bw: float,
    gl: dict,
) -> dict[str, Any]:
    """Check one setting on the first instance, then time it on all of them."""
    n = mods[0]._packed[0].shape[1]
    k = x.shape[-1]
    nan = float("nan")
    out = launch(
        x,
        *mods[0]._packed,
        cfg,
        out=torch.full((1, n), nan, dtype=x.dtype, device=x.device),
    )
    out2 = launch(x, *mods[0]._packed, cfg)  # the split counters were reset
    got = out.double().view(-1)
    err = float((got - ref_bf16).norm() / ref.norm())
    ok = bool(torch.isfinite(got).all()) and err < 1e-4 and torch.equal(out, out2)
    calls = [lambda m=m, c=cfg, x=x: launch(x, *m._packed, c) for m in mods]
    ms = graph_ms(calls)
    r = {
        "what": "gemv",
        "out": n,
        "in": k,
        "config": cfg.__dict__,
        "us_each": round(ms * 1e3 / count, 2),
        "gb_per_s": round(size / ms / 1e6, 1),
        "of_copy_bw": round(size / ms / 1e6 / bw, 3),
        "rel_err": round(err, 8),
        "ok": ok,
        "vs_gemlite": round(gl["us_each"] / (ms * 1e3 / count), 3),
    }
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument(
        "--kernels", default="0,1,2", help="which kernels: 0 per-word, 1 block, 2 denormal"
    )
    ap.add_argument("--compile-only", action="store_true", help="fill Triton's cache, then stop")
    ap.add_argument("--skip-compile", action="store_true", help="the cache is filled already")
    args = ap.parse_args()
    t_start = time.perf_counter()
    import int4_kernels
    from gemlite.core import forward_functional

    from ragtune import fastweights

    fastweights.set_tuned_configs("off")
    int4_kernels.no_autotune_bench()
    gpu = torch.cuda.get_device_name(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count

    def emit(r: dict) -> None:
        r = {"gpu": gpu, **r}
        print("RESULT " + json.dumps(r), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")

    bw = copy_bandwidth()
    emit({"what": "copy_bandwidth", "gb_per_s": round(bw, 1), "sms": sms})
    shapes = [*SHAPES, HEAD]
    blocks = tuple(int(b) for b in args.kernels.split(","))
    cands = {s: candidates(*s, sms=sms, blocks=blocks) for s in shapes}
    for e in json.loads(PACKAGED.read_text()).get("gemv", []):  # the packaged settings too
        seed = GemvConfig(**e["config"])
        if (e["out"], e["in"]) in cands and seed not in cands[(e["out"], e["in"])]:
            cands[(e["out"], e["in"])].append(seed)
    tasks = [(n, k, c.as_list()) for (n, k), cs in cands.items() for c in cs]
    t0 = time.perf_counter()
    errors: dict[str, str] = {}
    if not args.skip_compile:
        with mp.get_context("spawn").Pool(args.workers, initializer=_init) as pool:
            for task, err in pool.imap_unordered(_warm, tasks):
                if err:
                    errors[json.dumps(task)] = err
    emit(
        {
            "what": "compile",
            "candidates": len(tasks),
            "failed": len(errors),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    )
    for key, err in list(errors.items())[:3]:
        print("compile failed:", key, err, flush=True)
    if args.compile_only:
        return

    packaged = fastweights.read_tuned(PACKAGED)
    best: dict[tuple[int, int], dict[str, Any]] = {}
    layers: dict[tuple[int, int], list[Any]] = {}
    xs = {k: torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _, k in shapes}
    gl_idx: dict[tuple[int, int], int] = {}
    for n, k in shapes:
        count = 1 if (n, k) == HEAD else args.layers
        mods = [make_layer(n, k, 64, seed) for seed in range(count)]
        layers[(n, k)] = mods
        size = sum(nbytes(m) for m in mods)
        x = xs[k]
        ref = reference(mods[0], x)
        # the kernel rounds its float32 sums to bf16 once: compare with the rounded products
        ref_bf16 = ref.to(torch.bfloat16).double()
        mtype, gcfg = packaged[(n, k, 64)]
        gl_idx[(n, k)] = idx = use_config(mtype, n, k, 64, gcfg)
        calls = [lambda m=m, i=idx, x=x: forward_functional(x, None, *m._args, i) for m in mods]
        ms = graph_ms(calls)
        with torch.inference_mode():
            got = forward_functional(x, None, *mods[0]._args, idx).double().view(-1)
        gl = {
            "what": "gemlite",
            "out": n,
            "in": k,
            "type": mtype,
            "us_each": round(ms * 1e3 / count, 2),
            "gb_per_s": round(size / ms / 1e6, 1),
            "rel_err": round(float((got - ref).norm() / ref.norm()), 6),
        }
        emit(gl)
        for cfg in cands[(n, k)]:
            if json.dumps((n, k, cfg.as_list())) in errors:
                continue
            try:
                r = try_candidate(cfg, mods, x, ref, ref_bf16, size, count, bw, gl)
            except Exception as e:  # a failing setting must not lose the others
                print("failed:", n, k, cfg, e, flush=True)
                continue
            emit(r)
            if r["ok"] and ((n, k) not in best or r["us_each"] < best[(n, k)]["us_each"]):
                best[(n, k)] = {**r, "gemlite_us_each": gl["us_each"]}
        if (n, k) in best:
            b = best[(n, k)]
            print(f"best {n}x{k}: {b['config']} {b['us_each']} us vs gemlite {gl['us_each']}")
    data = json.loads(PACKAGED.read_text())
    data["gemv"] = [
        {
            "out": n,
            "in": k,
            "group": 64,
            "use": b["us_each"] < b["gemlite_us_each"],
            "config": b["config"],
            "us_each": b["us_each"],
            "gb_per_s": b["gb_per_s"],
            "gemlite_us_each": b["gemlite_us_each"],
        }
        for (n, k), b in best.items()
    ] + [  # no setting passed the check: gemlite's kernel for this shape
        {"out": n, "in": k, "group": 64, "use": False, "config": GemvConfig().__dict__}
        for n, k in shapes
        if (n, k) not in best
    ]
    data["gemv_how"] = (
        "bench/int4_gemv.py: per shape the fastest ragtune GEMV setting, all instances (40 "
        "layers; 1 LM head) back to back in one CUDA graph, batch 1, bf16; use = faster than "
        "gemlite's packaged setting timed the same way"
    )
    args.out.write_text(json.dumps(data, indent=1) + "\n")

    order = [(s, i) for i in range(args.layers) for s in SHAPES] + [(HEAD, 0)]
    size = sum(nbytes(layers[s][i]) for s, i in order)

    def gl_call(s: tuple[int, int], i: int) -> Any:
        m, x, j = layers[s][i], xs[s[1]], gl_idx[s]
        return lambda: forward_functional(x, None, *m._args, j)

    def our_call(s: tuple[int, int], i: int) -> Any:
        m, x, c = layers[s][i], xs[s[1]], GemvConfig(**best[s]["config"])
        return lambda: launch(x, *m._packed, c)

    variants = {
        "gemlite": [gl_call(s, i) for s, i in order],
        "ragtune_gemv": [our_call(s, i) if s in best else gl_call(s, i) for s, i in order],
        "faster_per_shape": [
            our_call(s, i)
            if s in best and best[s]["us_each"] < best[s]["gemlite_us_each"]
            else gl_call(s, i)
            for s, i in order
        ],
    }
    for name, calls in variants.items():
        for rep in range(2):
            ms = graph_ms(calls, reps=30)
            emit(
                {
                    "what": "all_projections",
                    "kernels": name,
                    "rep": rep,
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
