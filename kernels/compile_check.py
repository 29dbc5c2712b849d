"""Compile every WKV6 kernel for a CUDA target without a GPU and report ptxas registers and spills.

The interpreter (TRITON_INTERPRET=1) checks the numbers but not that a kernel compiles for a real GPU; this does:

    TRITON_INTERPRET=0 python kernels/compile_check.py --head-size 64 --dtype bf16 --arch 90
"""
import argparse
import json
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from visualrwkv_kernels import wkv6 as W

IO_POINTERS = {"r_ptr", "k_ptr", "v_ptr", "do_ptr", "o_ptr"}   # in the input dtype; the rest (logw too) are fp32
MODES = {"fp32": 0, "bf16": 1, "fp16": 2}


def kernel_jobs(K, mode, int64):
    """(kernel, constexpr values, num_warps) exactly as WKV6Triton launches them."""
    base = dict(H=32, K=K, V=K, BT=W.CHUNK, INT64=int64, MODE=mode)
    BK = W._key_block(K)
    return [(W._fwd_segment_kernel, base, 4), (W._scan_kernel, dict(K=K, V=K, REVERSE=False, INT64=int64), 4),
            (W._fwd_kernel, dict(base, BK=BK, WRITE_FINAL=True), W._fwd_warps(K)),
            (W._bwd_dr_kernel, dict(base, BK=BK), 4), (W._bwd_segment_kernel, base, 4),
            (W._bwd_dkvw_kernel, dict(base, BK=BK, NEED_DS0=True), 4)]


def compile_kernel(fn, constexprs, num_warps, dtype, arch):
    """Compile one kernel to a cubin; returns its name, registers per thread, spill bytes and shared memory."""
    signature = {}
    for p in fn.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            signature[p.name] = f"*{dtype}" if p.name in IO_POINTERS else "*fp32"
        else:
            signature[p.name] = "i32"
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps))
    ptxas = get_ptxas(arch)
    with tempfile.TemporaryDirectory() as d:
        ptx = f"{d}/k.ptx"
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        log = subprocess.run([getattr(ptxas, "path", ptxas), "-v", f"--gpu-name=sm_{arch}a", ptx, "-o", f"{d}/k.cubin"],
                             capture_output=True, text=True, check=True).stderr
    return {"kernel": fn.__name__, "num_warps": num_warps,
            "registers": int(re.search(r"Used (\d+) registers", log).group(1)),
            "spill_bytes": int(re.search(r"(\d+) bytes spill stores", log).group(1)),
            "shared_bytes": compiled.metadata.shared}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--dtype", choices=list(MODES), default="bf16")
    p.add_argument("--arch", type=int, default=90, help="compute capability, 90 = H100")
    p.add_argument("--int64", action="store_true", help="the 64-bit offset variants")
    args = p.parse_args(argv)
    if W._interpreted():
        raise SystemExit("compile_check: run with TRITON_INTERPRET=0 (the kernels were defined for the interpreter)")
    for fn, constexprs, warps in kernel_jobs(args.head_size, MODES[args.dtype], args.int64):
        print(json.dumps(compile_kernel(fn, constexprs, warps, args.dtype, args.arch)))


if __name__ == "__main__":
    main()
