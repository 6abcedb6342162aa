"""Instructions a weight in the loop of ragtune's int4 GEMV kernels, on CPU (no GPU needed).

    pip install --target /tmp/triton-cpu triton==3.6.0
    PYTHONPATH=$PWD:/tmp/triton-cpu python bench/int4_gemv_sass.py [--in 5120]

Compiles each kernel for sm_90 with Triton's bundled ptxas (``triton.compile`` with a
``GPUTarget``; pointers and N marked divisible by 16, as Triton specialises them at run time),
disassembles the cubin with the bundled ``nvdisasm`` and counts the instructions of the group
loop (between its label and the backward branch), per weight a thread handles a loop step.
The GEMV is issue-bound on the H200 when this is high (docs/benchmarks.md, issue 20, gemv2).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS = [  # (kernel, block_n, rows, split, warps): the packaged settings, before and after
    ("w4a16_gemv_kernel", 128, 4, 4, 4),
    ("w4a16_gemv_block_kernel", 256, 2, 8, 4),
    ("w4a16_gemv_denorm_kernel", 128, 4, 4, 4),
    ("w4a16_gemv_denorm_kernel", 256, 4, 4, 4),
    ("w4a16_gemv_denorm_kernel", 128, 16, 1, 8),
]


def loop_counts(kernel: str, bn: int, rows: int, split: int, warps: int, k: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ragtune import int4_gemv_kernel as kernels

    names = ["x_ptr", "w_ptr", "s_ptr", "h_ptr", "out_ptr", "part_ptr", "cnt_ptr", "N"]
    types = ["*bf16", "*i32", "*bf16", "*bf16", "*bf16", "*fp32", "*i32", "i32"]
    sig = dict(zip(names, types, strict=True))
    const = dict(
        GROUP=64, ITERS=k // 64 // split // rows, BLOCK_N=bn, ROWS=rows, SPLIT=split, EVEN_N=True
    )
    const["STAGES"] = 1
    sig.update({c: "constexpr" for c in const})
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(names))}
    src = ASTSource(fn=getattr(kernels, kernel), signature=sig, constexprs=const, attrs=attrs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 1}
    )
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True)
    lines = sass.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(".L_x_0:"))
    end = next(i for i, line in enumerate(lines) if "BRA `(.L_x_0)" in line)
    ops: collections.Counter = collections.Counter()
    for line in lines[start : end + 1]:
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m:
            ops[m.group(2).split(".")[0]] += 1
    weights = rows * bn * 64 // (32 * warps)  # a thread's weights a loop step
    total = sum(ops.values())
    return {
        "kernel": kernel,
        "setting": (bn, rows, split, warps),
        "loop": total,
        "per_weight": round(total / weights, 2),
        "top": ops.most_common(6),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--in", dest="k", type=int, default=5120)
    args = ap.parse_args()
    for kernel, bn, rows, split, warps in SETTINGS:
        print(loop_counts(kernel, bn, rows, split, warps, args.k), flush=True)


if __name__ == "__main__":
    main()
