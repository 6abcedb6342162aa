"""Instructions a weight in the loop of ragtune's int4 GEMV kernels, on CPU (no GPU needed).

    pip install --target /tmp/triton-cpu triton==3.6.0
    PYTHONPATH=$PWD:/tmp/triton-cpu python bench/int4_gemv_sass.py [--in 5120]
    PYTHONPATH=$PWD:/tmp/triton-cpu python bench/int4_gemv_sass.py --down  # fused SiLU * up
    PYTHONPATH=$PWD:/tmp/triton-cpu python bench/int4_gemv_sass.py --dump DIR [--src REPO]

Compiles each kernel for sm_90 with Triton's bundled ptxas (``triton.compile`` with a
``GPUTarget``; pointers and N marked divisible by 16, as Triton specialises them at run time),
disassembles the cubin with the bundled ``nvdisasm`` and counts the instructions of the group
loop (between its label and the backward branch), per weight a thread handles a loop step,
and the whole kernel's instructions, MUFU ops and local-memory (spill) accesses.
The GEMV is issue-bound on the H200 when this is high (docs/benchmarks.md, issue 20, gemv2).

``--dump DIR``: the denormal kernel's SASS (addresses dropped, encodings kept) and PTX
instructions (no debug lines or labels) at each packaged setting of
``ragtune/int4_configs/nvidia_h200.json``, one file each, with the kernels of ``--src`` (a
checkout, default this one): ``diff -r`` two dumps to show a change leaves the default
kernel's code as it was (docs/benchmarks.md).
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
# (the denormal kernel's ACT: staged, 2, is RAGTUNE_FUSED_DOWN=on, inline, 1, is =inline)
DOWN = [
    ("w4a16_gemv_denorm_kernel", 64, 16, 7, 4),
    ("w4a16_gemv_denorm_kernel:staged", 64, 16, 7, 4),
    ("w4a16_gemv_denorm_kernel:inline", 64, 16, 7, 4),
]
ACT = {"": 0, "inline": 1, "staged": 2}


def compile_sm90(
    kernel: str, bn: int, rows: int, split: int, warps: int, k: int, stages: int = 1
) -> tuple[list[str], str]:
    """(nvdisasm's SASS lines with encodings, PTX) of a kernel compiled for sm_90, N and the
    pointers divisible by 16 and the parameters left out bound to their defaults, as a launch
    from ``ragtune.int4_gemv.launch`` specialises them; ``kernel:inline`` / ``kernel:staged``:
    the denormal kernel with ACT 1 / 2 (gate|up in x_ptr, the scratch vector in xs_ptr)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ragtune import int4_gemv_kernel

    kernel, _, way = kernel.partition(":")
    fn = getattr(int4_gemv_kernel, kernel)
    names = ["x_ptr", "w_ptr", "s_ptr", "h_ptr", "out_ptr", "part_ptr", "cnt_ptr", "N"]
    types = ["*bf16", "*i32", "*bf16", "*bf16", "*bf16", "*fp32", "*i32", "i32"]
    if way == "staged":
        names, types = [*names, "xs_ptr"], [*types, "*bf16"]
    sig = dict(zip(names, types, strict=True))
    const = dict(
        GROUP=64, ITERS=k // 64 // split // rows, BLOCK_N=bn, ROWS=rows, SPLIT=split, EVEN_N=True
    )
    const["STAGES"] = stages
    if way:
        const["ACT"] = ACT[way]
    for p in fn.params:  # the ones a launch leaves out: their defaults (xs_ptr=None: constexpr)
        if p.name not in sig and p.name not in const:
            const[p.name] = p.default
    sig.update({c: "constexpr" for c in const})
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in names}
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages}
    )
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run(
            [str(nvdisasm), "-c", "-hex", f.name], capture_output=True, text=True, check=True
        )
    return sass.stdout.splitlines(), compiled.asm["ptx"]


def dump(out: Path) -> None:
    """The denormal kernel's code at each packaged setting, names and debug info left out."""
    import json

    root = Path(int4_gemv_kernel_file()).parents[1]
    table = json.loads((root / "ragtune" / "int4_configs" / "nvidia_h200.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    for e in table["gemv"]:
        c = e["config"]
        if c["block"] != 2 or e["out"] % c["block_n"] or e["group"] != 64:
            continue  # (all of them today: EVEN_N, group 64)
        sass, ptx = compile_sm90(
            "w4a16_gemv_denorm_kernel",
            *(c["block_n"], c["rows"], c["split"], c["num_warps"], e["in"], c["stages"]),
        )
        # SASS: the instruction and its encoding, not its address
        text = [re.sub(r"^\s*/\*[0-9a-f]{4,}\*/\s*", "", x).strip() for x in sass if "/*" in x]
        # PTX: instructions only (no .loc/.file, debug sections, labels of debug ranges)
        body = ptx.split(".section")[0].splitlines()
        body = [x.strip() for x in body if not re.match(r"\s*(\.loc|\.file|//|\$L__tmp)", x)]
        name = f"{e['out']}x{e['in']}"
        (out / f"{name}.sass").write_text("\n".join(text) + "\n")
        (out / f"{name}.ptx").write_text("\n".join(x for x in body if x) + "\n")
        print(name, c, len(text), "SASS lines from", root, flush=True)


def int4_gemv_kernel_file() -> str:
    from ragtune import int4_gemv_kernel

    return int4_gemv_kernel.__file__


def loop_counts(kernel: str, bn: int, rows: int, split: int, warps: int, k: int) -> dict:
    lines = compile_sm90(kernel, bn, rows, split, warps, k)[0]
    way = kernel.partition(":")[2]
    kernel = kernel.partition(":")[0]

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
    ap.add_argument("--dump", type=Path, help="write the packaged settings' code here")
    ap.add_argument("--src", type=Path, help="import ragtune from this checkout instead")
    args = ap.parse_args()
    if args.src:
        sys.path.insert(0, str(args.src.resolve()))
    if args.dump:
        dump(args.dump)
        return
    if args.down:
        args.k = 14336
    for kernel, bn, rows, split, warps in DOWN if args.down else SETTINGS:
        print(loop_counts(kernel, bn, rows, split, warps, args.k), flush=True)


if __name__ == "__main__":
    main()
