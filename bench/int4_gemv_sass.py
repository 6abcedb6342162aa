"""Instructions a weight in the loop of ragtune's int4 GEMV kernels, on CPU (no GPU needed).

    pip install --target /tmp/triton-cpu triton==3.6.0
    PYTHONPATH=$PWD:/tmp/triton-cpu python bench/int4_gemv_sass.py [--in 5120]
    PYTHONPATH=$PWD:/tmp/triton-cpu python bench/int4_gemv_sass.py --down  # fused SiLU * up

Compiles each kernel for sm_90 with Triton's bundled ptxas (``triton.compile`` with a
``GPUTarget``; pointers and N marked divisible by 16, as Triton specialises them at run time),
disassembles the cubin with the bundled ``nvdisasm`` and counts the instructions of the group
loop (between its label and the backward branch), per weight a thread handles a loop step,
and the whole kernel's instructions, MUFU ops and local-memory (spill) accesses.
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
# --down: the 12B down projection's setting (in 14336), unfused and fused with SiLU(gate) * up
# (ragtune/int4_down_kernel.py: staged is RAGTUNE_FUSED_DOWN=on, inline is =inline)
DOWN = [
    ("w4a16_gemv_denorm_kernel", 64, 16, 7, 4),
    ("w4a16_gemv_silu_denorm_kernel:staged", 64, 16, 7, 4),
    ("w4a16_gemv_silu_denorm_kernel:inline", 64, 16, 7, 4),
]


def loop_counts(kernel: str, bn: int, rows: int, split: int, warps: int, k: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ragtune import int4_down_kernel, int4_gemv_kernel

    kernel, _, way = kernel.partition(":")
    kernels = int4_down_kernel if way else int4_gemv_kernel
    names = ["x_ptr", "w_ptr", "s_ptr", "h_ptr", "out_ptr", "part_ptr", "cnt_ptr", "N"]
    types = ["*bf16", "*i32", "*bf16", "*bf16", "*bf16", "*fp32", "*i32", "i32"]
    if way:  # the fused kernel: gate|up and the scratch vector in place of x
        names, types = ["gu_ptr", "xs_ptr", *names[1:]], ["*bf16", *types]
    sig = dict(zip(names, types, strict=True))
    const = dict(
        GROUP=64, ITERS=k // 64 // split // rows, BLOCK_N=bn, ROWS=rows, SPLIT=split, EVEN_N=True
    )
    const["STAGES"] = 1
    if way:
        const["STAGED"] = way == "staged"
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

    def count(part: list[str]) -> collections.Counter:
        ops: collections.Counter = collections.Counter()
        for line in part:
            m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
            if m:
                ops[m.group(2).split(".")[0]] += 1
        return ops

    # the group loop: the last label a backward branch returns to, past the kernel's closing
    # branch-to-itself (none where ITERS is small enough to unroll: then the whole kernel counts)
    spans = []
    for j, line in enumerate(lines):
        if m := re.search(r"BRA `\((\.L_x_\d+)\)", line):
            i = next((i for i, x in enumerate(lines) if x.startswith(m.group(1) + ":")), j)
            if j - i > 2:
                spans.append((i, j))
    ops = count(lines[spans[-1][0] : spans[-1][1] + 1]) if spans else collections.Counter()
    whole = count(lines)
    weights = rows * bn * 64 // (32 * warps)  # a thread's weights a loop step
    total = sum(ops.values())
    return {
        "kernel": kernel + (f" ({way})" if way else ""),
        "setting": (bn, rows, split, warps),
        "loop": total or None,
        "per_weight": round(total / weights, 2) if total else None,
        "top": ops.most_common(6),
        "kernel_instructions": sum(whole.values()),
        "kernel_mufu": whole["MUFU"],
        "kernel_local_memory": whole["STL"] + whole["LDL"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--in", dest="k", type=int, default=5120)
    ap.add_argument("--down", action="store_true", help="the 12B down shape, fused or not")
    args = ap.parse_args()
    if args.down:
        args.k = 14336
    for kernel, bn, rows, split, warps in DOWN if args.down else SETTINGS:
        print(loop_counts(kernel, bn, rows, split, warps, args.k), flush=True)


if __name__ == "__main__":
    main()
