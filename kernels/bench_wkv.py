"""Benchmark the Triton WKV6 kernel against the chunked PyTorch form and flash-linear-attention's `chunk_rwkv6`.

On a CUDA machine: first checks correctness against a float32 naive recurrence on fresh random inputs (outputs, final
state, every gradient), then times forward and forward+backward in bf16 (median of `triton.testing.do_bench`) for
(B, T, H, K) = (8, 4096, 32, 64), (1, 24576, 32, 64), (16, 1024, 32, 64), next to the memory-bandwidth floor of the
forward (bytes of r, k, v (bf16) and logw (float32, as the model passes it) read and o (bf16) written, over a
device-to-device copy bandwidth measured in the same run).
Prints one table and writes JSON:

    python kernels/bench_wkv.py --out runs/bench_wkv.json
    python kernels/bench_wkv.py --cpu-smoke --out /tmp/bench.json   # tiny shapes under TRITON_INTERPRET=1, no GPU
"""
import argparse
import inspect
import json
import os
import statistics
import sys
import time

GPU_SHAPES = [(8, 4096, 32, 64), (1, 24576, 32, 64), (16, 1024, 32, 64)]
SMOKE_SHAPES = [(1, 40, 2, 16), (2, 17, 1, 32)]
# the chunked PyTorch form loops over chunks in Python, so on a GPU it is timed at the smallest shape only: the first
# H200 run timed every implementation at every shape and ran out of its 240 s in the timing phase (which row was slow
# is unknown, since rows were only printed at the end; each row now prints as it finishes, with its own seconds)
CHUNKED_GPU_SHAPES = [(16, 1024, 32, 64)]
TOL = {"float32": 1e-4, "bfloat16": 2e-2}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_wkv.json", help="where to write the JSON results")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    p.add_argument("--skip-chunked", action="store_true", help="leave out the chunked PyTorch form")
    p.add_argument("--skip-fla", action="store_true", help="leave out flash-linear-attention even if installed")
    p.add_argument("--seg-chunks", default="", help="extra Triton rows with fixed chunks per segment, e.g. 16,64")
    return p.parse_args(argv)


def random_inputs(B, T, H, K, dtype, device, seed, requires_grad=False):
    """r, k, v ~ N(0, 1) in `dtype`; logw = -exp(U(-6, 1)) in float32 whatever `dtype` (the model's contract: decays
    from ~1 down to e^-2.7 per step, never rounded to 16 bits); u ~ N(0, 1), state ~ N(0, 1)."""
    import torch
    g = torch.Generator(device=device).manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, K, device=device, generator=g).to(dtype) for _ in range(3))
    logw = -torch.empty(B, T, H, K, device=device).uniform_(-6.0, 1.0, generator=g).exp()
    u = torch.randn(H, K, device=device, generator=g)
    state = torch.randn(B, H, K, K, device=device, generator=g)
    xs = [r, k, v, logw, u, state]
    return [x.requires_grad_(requires_grad) for x in xs]


def rel_err(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def check_correctness(device, dtype_name, shape):
    """Triton kernel vs the float32 naive recurrence on fresh inputs: o, final state and all six gradients."""
    import torch
    from visualrwkv.wkv import wkv6_naive
    from visualrwkv_kernels import wkv6_triton
    dtype = getattr(torch, dtype_name)
    B, T, H, K = shape
    errs = {}
    outs = []
    for fn in (wkv6_triton, wkv6_naive):
        xs = random_inputs(B, T, H, K, dtype, device, seed=1234)
        if fn is wkv6_naive:  # the reference sees the same (rounded) inputs, in float32
            xs = [x.float() for x in xs]
        xs = [x.detach().requires_grad_() for x in xs]
        o, sT = fn(*xs)
        g = torch.Generator(device=device).manual_seed(99)
        do = torch.randn(o.shape, device=device, generator=g)
        dsT = torch.randn(sT.shape, device=device, generator=g)
        ((o.float() * do).sum() + (sT.float() * dsT).sum()).backward()
        outs.append([o, sT] + [x.grad for x in xs])
    for name, a, b in zip(("o", "state", "dr", "dk", "dv", "dlogw", "du", "dstate"), *outs):
        errs[name] = rel_err(a, b)
    ok = all(e <= TOL[dtype_name] for e in errs.values())
    return {"dtype": dtype_name, "shape": [B, T, H, K], "max_rel_err": max(errs.values()), "rel_errs": errs, "ok": ok}


def make_timer(device):
    """Median milliseconds of a callable: triton.testing.do_bench on CUDA, a wall-clock loop on the CPU."""
    if device == "cuda":
        from triton.testing import do_bench
        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu_timer(fn, reps=3):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return cpu_timer


def copy_bandwidth(device, timer):
    """Device-to-device copy bandwidth in bytes/s (read + write) of a large buffer, measured now."""
    import torch
    n = 2**28 if device == "cuda" else 2**24            # 1 GiB, or 64 MiB of fp32 (more than a CPU cache holds)
    src = torch.empty(n, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * n * 4 / (ms * 1e-3)


def load_fla():
    """flash-linear-attention's chunk_rwkv6 as fn(r, k, v, logw, u) -> (o, final state), or None if not importable."""
    try:
        from fla.ops.rwkv6 import chunk_rwkv6
    except Exception:
        return None
    extra = {"head_first": False} if "head_first" in inspect.signature(chunk_rwkv6).parameters else {}
    return lambda r, k, v, logw, u: chunk_rwkv6(r, k, v, logw, u, scale=1.0, output_final_state=True, **extra)


def time_impl(fn, xs, timer):
    """(forward ms, forward+backward ms) of fn on inputs xs; 'OOM' where memory runs out."""
    import torch
    r, k, v, logw, u = xs
    do = torch.randn_like(v)

    def fwd():
        with torch.no_grad():
            fn(r, k, v, logw, u)

    def fwd_bwd():
        o, _ = fn(r, k, v, logw, u)
        o.backward(do)
        for x in xs:
            x.grad = None
    result = []
    for f in (fwd, fwd_bwd):
        try:
            result.append(timer(f))
        except torch.cuda.OutOfMemoryError:
            result.append("OOM")
        except Exception as e:                          # a third-party kernel failing must not sink the table
            result.append(f"error: {type(e).__name__}")
            print(f"bench_wkv: {e!r}", file=sys.stderr)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result


def run(args):
    import torch
    from visualrwkv.wkv import wkv6
    from visualrwkv_kernels import wkv6_triton
    from visualrwkv_kernels.wkv6 import WKV6Triton
    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_wkv: no CUDA device; use --cpu-smoke for the interpreter path")
    timer = make_timer(device)
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (TRITON_INTERPRET=1)",
              "torch": torch.__version__, "triton": __import__("triton").__version__}
    # on a GPU the second shape has few heads and a long T, so it runs as several segments joined by the scan
    shapes = [(1, 37, 2, 16)] if args.cpu_smoke else [(2, 100, 2, 64), (1, 1000, 2, 64)]
    report["correctness"] = [check_correctness(device, d, s) for s in shapes for d in ("float32", "bfloat16")]
    for c in report["correctness"]:
        print(f"correctness {c['dtype']:>8} {tuple(c['shape'])}: max rel err {c['max_rel_err']:.2e} "
              f"({'ok' if c['ok'] else 'FAIL'})")
    bw = copy_bandwidth(device, timer)
    report["copy_bandwidth_GBps"] = bw / 1e9
    impls = {"triton": lambda r, k, v, logw, u: wkv6_triton(r, k, v, logw, u)}
    for n in filter(None, args.seg_chunks.split(",")):          # for tuning the segment heuristic
        impls[f"triton seg={n}"] = lambda r, k, v, logw, u, n=int(n): WKV6Triton.apply(r, k, v, logw, u, None, n)
    if not args.skip_chunked:
        impls["chunked"] = lambda r, k, v, logw, u: wkv6(r, k, v, logw, u, impl="chunked")
    fla = load_fla() if device == "cuda" and not args.skip_fla else None
    if fla is not None:
        impls["fla chunk_rwkv6"] = fla
    report["rows"] = rows = []
    for B, T, H, K in (SMOKE_SHAPES if args.cpu_smoke else GPU_SHAPES):
        xs = random_inputs(B, T, H, K, torch.bfloat16, device, seed=0, requires_grad=True)[:5]
        floor_bytes = B * T * H * K * (4 * 2 + 4)       # r, k, v read and o written in bf16, logw read in float32
        floor_ms = floor_bytes / bw * 1e3
        for name, fn in impls.items():
            if name == "chunked" and device == "cuda" and (B, T, H, K) not in CHUNKED_GPU_SHAPES: continue
            t0 = time.perf_counter()
            fwd_ms, fwd_bwd_ms = time_impl(fn, xs, timer)
            ratio = fwd_ms / floor_ms if isinstance(fwd_ms, float) else None
            rows.append({"shape": [B, T, H, K], "impl": name, "fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms,
                         "floor_fwd_ms": floor_ms, "fwd_over_floor": ratio})
            print(f"timed {format_row(rows[-1])}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    print_table(report)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, args.out)
    return report


def format_row(row):
    "One table line: shape, impl, forward and forward+backward ms, the floor and the forward's ratio to it."
    fmt = lambda x: f"{x:10.3f}" if isinstance(x, float) else f"{str(x):>10}"
    ratio = f"{row['fwd_over_floor']:10.1f}" if row["fwd_over_floor"] is not None else fmt("-")
    return (f"{str(tuple(row['shape'])):<22}{row['impl']:<18}{fmt(row['fwd_ms'])}  {fmt(row['fwd_bwd_ms'])}"
            f"{fmt(row['floor_fwd_ms'])}{ratio}")


def print_table(report):
    print(f"device: {report['device']}; copy bandwidth {report['copy_bandwidth_GBps']:.0f} GB/s; bf16")
    print(f"{'(B, T, H, K)':<22}{'impl':<18}{'fwd ms':>10}{'fwd+bwd ms':>12}{'floor ms':>10}{'fwd/floor':>10}")
    for row in report["rows"]:
        print(format_row(row))


def ensure_importable():
    """Make `visualrwkv` and `visualrwkv_kernels` importable from a bare checkout (no `pip install`), e.g. on a
    freshly started GPU machine: the repository root goes on sys.path and kernels/ is loaded under its package name."""
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if importlib.util.find_spec("visualrwkv") is None:
        sys.path.insert(0, root)
    if importlib.util.find_spec("visualrwkv_kernels") is None:
        spec = importlib.util.spec_from_file_location(
            "visualrwkv_kernels", os.path.join(root, "kernels", "__init__.py"),
            submodule_search_locations=[os.path.join(root, "kernels")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["visualrwkv_kernels"] = module
        spec.loader.exec_module(module)


def main(argv=None):
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"           # before triton is imported
    ensure_importable()
    report = run(args)
    if not all(c["ok"] for c in report["correctness"]):
        sys.exit("bench_wkv: correctness check FAILED (see the errors above)")


if __name__ == "__main__":
    main()
