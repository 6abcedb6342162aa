"""The decode step's attention kernel alone at the 12B shape (issue 20 item 1): 40 layers'
``decode_attention_write`` launches (each layer its own bf16 cache, as in the step, so the
cache comes from HBM, not L2) captured in one CUDA graph; microseconds a launch.

    python bench/decode_attention_micro.py [--before-kernel FILE] [--configs 64x4,128x8]

``--configs``: BLOCK_S x num_warps x MAX_CHUNKS settings of ``ragtune.decode_attention`` to time (the first
is the packaged one); ``--before-kernel``: main's kernel file (bench/decode_attention_before.py)
timed on the same inputs, and its outputs compared. Prints one line a setting and bucket;
``--json`` appends them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYERS, HEADS, KV_HEADS, DIM, SLOTS = 40, 32, 8, 128, 2048


def graph_us(launch, layers, q, kn, vn, seen, cos, sin, pos, n, reps=30) -> tuple[float, list]:  # noqa: ANN001
    """Microseconds a launch over ``layers`` (caches), the step graph's way; the outputs."""
    slot = pos.clone()
    scale = DIM**-0.5

    def step() -> list:
        return [
            launch(q, kn, vn, kc[:, :, :n], vc[:, :, :n], seen, scale, (cos, sin, pos), slot)
            for kc, vc in layers
        ]

    if not q.is_cuda:  # a smoke test of this script (TRITON_INTERPRET=1 on CPU): no timing
        return 0.0, step()
    step()  # compiles; the workspace is made outside the graph
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = step()
    g.replay()
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(reps):
        g.replay()
    t1.record()
    torch.cuda.synchronize()
    return t0.elapsed_time(t1) * 1000 / reps / len(layers), [o.clone() for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before-kernel", default=None, help="main's kernel file (before)")
    ap.add_argument(
        "--configs", default="64x4x16", help="BLOCK_S x warps x chunks, comma-separated"
    )
    ap.add_argument("--buckets", default="768,2048", help="slots attended")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--layers", type=int, default=LAYERS)
    args = ap.parse_args()
    from ragtune import decode_attention as da

    def through(launch):  # noqa: ANN001, ANN202
        # the op's argument order -> launch(q, k, v, seen, scale, rope, write)
        def call(q, kn, vn, k, v, seen, scale, rope, slot):  # noqa: ANN001, ANN202
            return launch(q, k, v, seen, scale, rope, (kn, vn, slot))

        return call

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    # (Triton 3.6's interpreter gets bf16 dots wrong, ragtune.decode_attention.launch: float32)
    bf = torch.bfloat16 if dev == "cuda" else torch.float32
    layers = [
        (
            torch.randn(1, KV_HEADS, SLOTS, DIM, device=dev, dtype=bf),
            torch.randn(1, KV_HEADS, SLOTS, DIM, device=dev, dtype=bf),
        )
        for _ in range(args.layers)
    ]
    wide = torch.randn(1, (HEADS + 2 * KV_HEADS) * DIM, device=dev, dtype=bf)
    q = wide[:, : HEADS * DIM].view(1, HEADS, DIM)  # views of the q|k|v output, as in the step
    kn = wide[:, HEADS * DIM : (HEADS + KV_HEADS) * DIM].view(1, KV_HEADS, DIM)
    vn = wide[:, (HEADS + KV_HEADS) * DIM :].view(1, KV_HEADS, DIM)
    inv = 1.0 / (10000 ** (torch.arange(0, DIM, 2, device=dev).float() / DIM))
    ang = torch.arange(4096, device=dev).float()[:, None] * inv[None, :]
    cos, sin = torch.cat((ang, ang), -1).cos().to(bf), torch.cat((ang, ang), -1).sin().to(bf)
    for n in (int(b) for b in args.buckets.split(",")):
        pos = torch.tensor([n - 3], device=dev)
        seen = torch.ones(1, n, dtype=torch.bool, device=dev)
        seen[:, :5] = False  # a little left padding
        timings = {}
        ref = None
        if args.before_kernel:
            from bench.decode_attention_before import launcher

            us, ref = graph_us(through(launcher(args.before_kernel)), layers, q, kn, vn, seen, cos, sin, pos, n)  # fmt: skip
            timings["before"] = round(us, 2)
        packaged = (da.BLOCK_S, da.NUM_WARPS, da.MAX_CHUNKS)
        for cfg in args.configs.split(","):
            da.BLOCK_S, da.NUM_WARPS, da.MAX_CHUNKS = (int(x) for x in cfg.split("x"))
            try:
                us, outs = graph_us(through(da.launch), layers, q, kn, vn, seen, cos, sin, pos, n)
                _, again = graph_us(through(da.launch), layers, q, kn, vn, seen, cos, sin, pos, n)
            finally:
                da.BLOCK_S, da.NUM_WARPS, da.MAX_CHUNKS = packaged
            timings[cfg] = round(us, 2)
            assert all(torch.equal(a, b) for a, b in zip(outs, again, strict=True)), cfg
            if ref is not None:  # the two kernels: float32 sums in other orders, bf16 out
                err = max(float((a.float() - b.float()).abs().max()) for a, b in zip(outs, ref, strict=True))  # fmt: skip
                timings[cfg + "_maxdiff_vs_before"] = round(err, 5)
        gpu = torch.cuda.get_device_name() if dev == "cuda" else "cpu (interpreter)"
        row = {"bucket": n, "us_per_launch": timings, "gpu": gpu}
        print(json.dumps(row), flush=True)
        if args.json:  # as each bucket ends (a timeout keeps what was measured)
            with args.json.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
