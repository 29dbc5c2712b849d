"""GPU self-check: the Triton WKV kernel against a float64 recurrence, its benchmark, bf16 DeepSpeed training at the
1.6B shape, and the efficiency benchmark, in one command on a fresh CUDA machine.

    python scripts/gpu_check.py                        # every part; results in runs/gpu_check/
    python scripts/gpu_check.py --parts a,c --out DIR  # only the parts named; the others' files are left as they are
    python scripts/gpu_check.py --cpu --out DIR        # tiny shapes on the CPU (Triton interpreter, DeepSpeed on gloo)

Parts, with the time each took on one H200 (torch 2.11, triton 3.6; the first run, 2026-11-28; compilation included):

    a  wkv_kernel  130 s   wkv6_triton in fp32 and bf16 (float32 logw) vs wkv6_naive in float64: o, final state and
                           all six gradients, odd T up to 4097, one and many segments; wkv6's default dispatch
    b  bench_wkv   > 240 s kernels/bench_wkv.py: this kernel, fla's chunk_rwkv6, the chunked PyTorch form, the floor.
                           That run passed its correctness gate and then ran out of time while timing (rows were
                           printed only at the end); the chunked form is now timed at the smallest shape only and each
                           row prints as it finishes. Not yet measured again
    c  train_1b6    34 s   VisualRWKV 1.6B (ViT-L/14-336 + 24 x 2048 RWKV-6, random weights) in bf16 through DeepSpeed
                           ZeRO-2 as scripts/train.py runs it: tokens/s, MFU, peak memory, step-1 loss and logits
                           against the chunked WKV
    d  efficiency   57 s   scripts/bench_efficiency.py --preset gpu (Fig. 1's decoding latency and memory, RWKV in RNN
                           mode vs a Llama of the same size)

Together about 8 minutes with b's time limit, over the 4 minutes wished for: b and d are whole benchmarks of their own.
`--budget` (default 540 s) caps the run so one 600 s device command also has time to install the wheels and pack the
results; a part that would start with under 10 s left, or runs past its own timeout, is a FAIL. The first run's
results are kept in results/gpu_check_h200/.

Each part runs in its own process, so an exception, a crash (a CUDA error poisons its process's context) or a timeout
is reported as FAIL and the next part still runs. Each writes <out>/<letter>_<name>.json (status, its numbers, the
traceback or output tail if it failed, the device and the versions of torch, triton, deepspeed, open_clip, fla,
transformers); a and b draw PNGs beside it, b and d keep their scripts' own output under <out>. One table at the end;
the exit code is 1 if any part failed. `--cpu` runs every part that can run without a GPU at tiny sizes (what is left
for the GPU: bf16 tensor-core dots, CUDA memory counters, NCCL, the timings and the 1.6B shape).

On the GPU machine (no network, torch and triton preinstalled): run `bash scripts/gpu_wheels.sh` here, carry `.whl`,
and run this one line in the repository root. It installs the wheels into /tmp/site; this project is not installed
there but imported from the checkout (kernels/bench_wkv.py's `ensure_importable`, as bench_efficiency.py does too):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 || exit; python3 scripts/gpu_check.py 2>&1 | tee $OUT/gpu_check.log; rc=${PIPESTATUS[0]}; tar -czf $OUT/gpu_check.tgz -C runs gpu_check; exit $rc
"""
import argparse
import collections
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VERSIONED = ("torch", "triton", "deepspeed", "open_clip_torch", "fla-core", "flash-linear-attention", "transformers")
# bf16 dense tensor-core peaks (TFLOP/s, no sparsity) from NVIDIA's data sheets, matched in torch's device name
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 80GB HBM3", 989.0), ("H100 SXM", 989.0), ("H100 PCIe", 756.0))


# ------------------------------------------------------------------------------------------------------- part a
DECAYS = {"mild": (-6.0, -1.0), "strong": (-6.0, math.log(30.0))}   # logw = -exp(U(lo, hi)): down to -0.37 or -30
GRADS = ("o", "state", "dr", "dk", "dv", "dlogw", "du", "dstate")


def kernel_cases(cpu):
    """Part a's shapes (B, T, H, K) with forced chunks per segment (None: the kernel's own choice) and forced int64.

    On a GPU, `_segment_chunks` cuts T into segments when B*H is small: (1, 1000, 2, 32) runs as 8 segments,
    (1, 4097, 2, 64) as 33 and (4, 1000, 32, 64) as 3; T <= 128 stays one segment. Heads are 2 or 32 (H is a
    constexpr: each value compiles its own kernels, and 32 is the 1.6B model's). On the CPU segments are forced."""
    if cpu:
        shapes = [((1, 1, 2, 16), None, False), ((2, 15, 1, 32), None, False), ((1, 40, 2, 16), 1, False)]
        return shapes + [((1, 23, 2, 16), 1, True)]
    shapes = [((1, 1, 2, 64), None, False), ((2, 15, 2, 32), None, False), ((2, 100, 2, 64), None, False),
              ((1, 1000, 2, 32), None, False), ((1, 4097, 2, 64), None, False), ((8, 100, 32, 64), None, False),
              ((4, 1000, 32, 64), None, False)]
    return shapes + [((1, 300, 2, 64), None, True)]


def kernel_inputs(shape, dtype, decay, with_state, device, seed):
    """r, k, v ~ N(0, 1) in dtype; logw float32 (the kernel's contract); u, state ~ N(0, 1) float32 (state or None)."""
    import torch
    B, T, H, K = shape
    g = torch.Generator(device=device).manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, K, device=device, generator=g).to(dtype) for _ in range(3))
    lo, hi = DECAYS[decay]
    logw = -torch.empty(B, T, H, K, device=device).uniform_(lo, hi, generator=g).exp()
    u = torch.randn(H, K, device=device, generator=g)
    state = torch.randn(B, H, K, K, device=device, generator=g) if with_state else None
    return [r, k, v, logw, u, state]


def outputs_and_grads(fn, xs, seed):
    """[o, final state, dr, dk, dv, dlogw, du, dstate or None] of fn under the loss sum(o * do) + sum(sT * dsT)."""
    import torch
    leaves = [None if x is None else x.detach().requires_grad_() for x in xs]
    o, sT = fn(*leaves)
    g = torch.Generator(device=o.device).manual_seed(seed)
    do = torch.randn(o.shape, device=o.device, generator=g).to(torch.float64)
    dsT = torch.randn(sT.shape, device=o.device, generator=g).to(torch.float64)
    ((o.double() * do).sum() + (sT.double() * dsT).sum()).backward()
    return [o, sT] + [None if x is None else x.grad for x in leaves]


def max_rel(got, want, scale=None):
    """max |got - want| / scale in float64; scale defaults to max |want| (the absolute error where the scale is 0)."""
    diff = (got.double() - want.double()).abs().max().item()
    scale = scale or want.double().abs().max().item()
    return diff / scale if scale > 0 else diff


def check_kernel_case(shape, seg_chunks, int64, dtype, decay, with_state, device, seed):
    """One case of part a: the kernel vs wkv6_naive in float64 on the same (rounded) inputs."""
    import torch
    from visualrwkv.wkv import wkv6_naive
    from visualrwkv_kernels import wkv6_triton
    from visualrwkv_kernels.bench_wkv import TOL
    from visualrwkv_kernels.wkv6 import CHUNK, WKV6Triton, _segment_chunks, _sm_count
    B, T, H, K = shape
    xs = kernel_inputs(shape, dtype, decay, with_state, device, seed)
    if seg_chunks is None and not int64:
        kernel = wkv6_triton                                             # the public entry point
    else:
        kernel = lambda *a: WKV6Triton.apply(*a, seg_chunks, int64)
    got = outputs_and_grads(kernel, xs, seed + 1)
    want = outputs_and_grads(wkv6_naive, [None if x is None else x.double() for x in xs], seed + 1)
    # dlogw is formed as a difference of running sums of k * dk-sized terms (kernels/README.md, Backward): its error
    # is measured against the larger of its own scale and theirs (at T = 1 from a zero state the true dlogw is 0)
    scales = {"dlogw": max(want[5].abs().max().item(), (xs[1].double() * want[3]).abs().max().item())}
    errs = {n: max_rel(a, b, scales.get(n)) for n, a, b in zip(GRADS, got, want) if b is not None}
    chunks = seg_chunks or _segment_chunks(B, H, T, _sm_count(torch.device(device)))   # as the kernel picks
    name = str(dtype).removeprefix("torch.")
    return {"shape": list(shape), "dtype": name, "decay": decay, "initial_state": with_state, "int64": int64,
            "segments": max(math.ceil(T / (chunks * CHUNK)), 1), "max_rel": errs,
            "worst": max(errs.values()), "tol": TOL[name], "ok": max(errs.values()) <= TOL[name]}


def check_dispatch(device):
    """wkv6 with no `impl` equals (bitwise) the implementation it should pick, and every impl matches float64."""
    import torch
    from visualrwkv.wkv import IMPLS, wkv6, wkv6_naive
    from visualrwkv_kernels.bench_wkv import TOL
    expected = {"cuda": {1: "naive", 37: "triton"}, "cpu": {1: "naive"}}[device]
    rows = []
    for T in (1, 37):
        xs = kernel_inputs((2, T, 2, 16 if device == "cpu" else 64), torch.bfloat16, "mild", True, device, seed=7 + T)
        with torch.no_grad():
            default = wkv6(*xs)
            outs = {impl: wkv6(*xs, impl=impl) for impl in IMPLS}
            want = wkv6_naive(*[x.double() for x in xs])
        same = [impl for impl, out in outs.items() if all(torch.equal(a, b) for a, b in zip(out, default))]
        errs = {impl: max(max_rel(a, b) for a, b in zip(out, want)) for impl, out in outs.items()}
        ok = (expected.get(T) in same if T in expected else True) and max(errs.values()) <= TOL["bfloat16"]
        rows.append({"T": T, "default_equals": same, "expected": expected.get(T), "max_rel_vs_float64": errs, "ok": ok})
    return rows


def plot_kernel_errors(cases, path):
    """Worst max-relative error per tensor against T, one panel per dtype, with the tolerance."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, dtype in zip(axes, ("float32", "bfloat16")):
        mine = [c for c in cases if c["dtype"] == dtype]
        Ts = sorted({c["shape"][1] for c in mine})
        for name in GRADS:
            ys = [max([c["max_rel"][name] for c in mine if c["shape"][1] == T and name in c["max_rel"]] or [math.nan])
                  for T in Ts]
            ax.plot(Ts, [max(y, 1e-12) for y in ys], marker="o", label=name)
        ax.axhline(mine[0]["tol"], color="k", ls="--", lw=1, label="tolerance")
        ax.set(xscale="log", yscale="log", xlabel="T (tokens)", title=f"{dtype} r, k, v (float32 logw)")
    axes[0].set_ylabel("max |got - want| / max |want|  (worst case)")
    axes[1].legend(fontsize=8, ncol=2)
    fig.suptitle("wkv6_triton vs the float64 recurrence")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def part_kernel(args):
    """a: the Triton kernel against the float64 recurrence (every case of `kernel_cases` in fp32 and bf16, mild and
    strong decays, with and without an initial state), then wkv6's default dispatch. ~60 s on an H200: about 100
    kernel compilations at ~0.3 s (compile_check.py compiles the six bf16 K=64 kernels for sm_90 in 2.5 s on one slow
    core) and ~15 s of float64 reference, whose Python loop runs ~0.2 ms per token (T = 4097: ~1 s per case)."""
    import torch
    device = "cpu" if args.cpu else "cuda"
    cases = []
    for i, (shape, seg_chunks, int64) in enumerate(kernel_cases(args.cpu)):
        combos = [(torch.bfloat16, "strong", True)] if int64 else [
            (dt, d, s) for dt in (torch.float32, torch.bfloat16) for d in DECAYS for s in (False, True)]
        for j, (dtype, decay, with_state) in enumerate(combos):
            cases.append(check_kernel_case(shape, seg_chunks, int64, dtype, decay, with_state, device, 1000 * i + j))
            c = cases[-1]
            print(f"{str(tuple(shape)):<20} {c['dtype']:<9} {decay:<6} state={with_state!s:<5} int64={int64!s:<5} "
                  f"segments {c['segments']:>3}: worst {c['worst']:.2e} ({'ok' if c['ok'] else 'FAIL'})", flush=True)
    dispatch = check_dispatch(device)
    plot_kernel_errors(cases, args.out / "a_errors_vs_T.png")
    worst = {d: max(c["worst"] for c in cases if c["dtype"] == d) for d in ("float32", "bfloat16")}
    failures = [f"{tuple(c['shape'])} {c['dtype']} {c['decay']} state={c['initial_state']} int64={c['int64']}: "
                f"max rel err {c['worst']:.2e} > {c['tol']:g}" for c in cases if not c["ok"]]
    failures += [f"dispatch at T={d['T']}: default equals {d['default_equals']}, expected {d['expected']!r}; "
                 f"errors {d['max_rel_vs_float64']}" for d in dispatch if not d["ok"]]
    segments = sorted({c["segments"] for c in cases})
    if not args.cpu and (segments[0] != 1 or segments[-1] == 1):
        failures.append(f"expected both one-segment and multi-segment cases, got segment counts {segments}")
    picks = ", ".join(f"T={d['T']} {'/'.join(d['default_equals']) or 'none'}" for d in dispatch)
    summary = (f"{len(cases)} cases, worst fp32 {worst['float32']:.1e} (tol {cases[0]['tol']:g}), bf16 "
               f"{worst['bfloat16']:.1e}; segments {segments[0]}-{segments[-1]}; dispatch {picks}")
    return {"summary": summary, "failures": failures, "worst": worst, "cases": cases, "dispatch": dispatch,
            "pngs": ["a_errors_vs_T.png"]}


# ------------------------------------------------------------------------------------------------------- part b
def plot_bench(report, path):
    """Forward and forward+backward milliseconds per implementation and shape, with the forward's bandwidth floor."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = list(dict.fromkeys(tuple(r["shape"]) for r in report["rows"]))
    impls = list(dict.fromkeys(r["impl"] for r in report["rows"]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rows = {r["impl"]: r for r in report["rows"] if tuple(r["shape"]) == shape}
        for x, impl in enumerate(impls):
            for dx, key in ((-0.2, "fwd_ms"), (0.2, "fwd_bwd_ms")):
                value = rows.get(impl, {}).get(key)
                if isinstance(value, float):
                    ax.bar(x + dx, value, 0.4, color="C0" if key == "fwd_ms" else "C1",
                           label={"fwd_ms": "forward", "fwd_bwd_ms": "forward + backward"}[key])
                else:
                    ax.text(x + dx, 0, str(value or "-"), rotation=90, ha="center", va="bottom", fontsize=7)
        ax.axhline(next(iter(rows.values()))["floor_fwd_ms"], color="k", ls="--", lw=1, label="forward floor")
        ax.set(xticks=range(len(impls)), title=f"(B, T, H, K) = {shape}", yscale="log", ylabel="ms")
        ax.set_xticklabels(impls, rotation=20, fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axes[0][-1].legend(unique.values(), unique.keys(), fontsize=8)
    fig.suptitle(f"WKV6 bf16 on {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def part_bench_wkv(args):
    """b: kernels/bench_wkv.py as a subprocess (its correctness gate, then the timing table), table and JSON kept.
    ~110 s on an H200: its fp32/bf16 correctness and Triton rows reuse part a's compiled kernels (same cache), the
    chunked form runs its 1536-chunk loop for (1, 24576, 32, 64) in a few seconds per timing, and fla's chunk_rwkv6
    autotunes its kernels on the first call (the larger unknown: ~60-90 s)."""
    out_json = args.out / "bench_wkv.json"
    out_json.unlink(missing_ok=True)
    cmd = [sys.executable, str(ROOT / "kernels" / "bench_wkv.py"), "--out", str(out_json)]
    rc, output = stream(cmd + (["--cpu-smoke"] if args.cpu else []), prefix="")
    if not out_json.is_file():
        raise RuntimeError(f"bench_wkv.py exited with code {rc} without writing {out_json.name}:\n{output}")
    report = json.loads(out_json.read_text())
    plot_bench(report, args.out / "b_bench_wkv.png")
    failures = [] if rc == 0 else [f"bench_wkv.py exited with code {rc}"]
    failures += [f"correctness {c['dtype']} {tuple(c['shape'])}: max rel err {c['max_rel_err']:.2e}"
                 for c in report["correctness"] if not c["ok"]]
    first = tuple(report["rows"][0]["shape"])
    fmt = lambda x: f"{x:.3g}" if isinstance(x, float) else str(x)
    times = "; ".join(f"{r['impl']} {fmt(r['fwd_ms'])}/{fmt(r['fwd_bwd_ms'])}" for r in report["rows"]
                      if tuple(r["shape"]) == first)
    summary = (f"{first} fwd/fwd+bwd ms: {times}; floor {report['rows'][0]['floor_fwd_ms']:.3g}; "
               f"correctness {'ok' if all(c['ok'] for c in report['correctness']) else 'FAIL'}")
    return {"summary": summary, "failures": failures, "bench_wkv": report, "table": output,
            "pngs": ["b_bench_wkv.png"]}


# ------------------------------------------------------------------------------------------------------- part c
def peak_bf16_tflops(device_name):
    """The card's bf16 dense peak in TFLOP/s, or None for a card not in PEAK_BF16_TFLOPS."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)


def step_flops(model, T):
    """Model FLOPs of one training step on one sample of T positions with one image (stated in the JSON):
    6 P_lm T (forward + backward of the trainable LM; P_lm without the embedding table, a lookup, with the head)
    + 6 P_proj N (the projector on N image tokens) + 2 P_vit N_vit + 4 N_vit^2 W L_vit (the frozen tower, forward
    only: weights, then attention scores and mixing). Not counted: the WKV recurrence (~12 C K FLOPs per position
    and layer forward and backward: 0.4% at the 1.6B shape), norms and elementwise work."""
    lm = sum(p.numel() for n, p in model.rwkv.named_parameters() if not n.startswith("emb."))
    proj = sum(p.numel() for p in model.proj.parameters())
    vit = sum(p.numel() for p in model.vit.parameters())
    cfg, N = model.vit.cfg, model.n_image_tokens
    terms = {"lm": 6 * lm * T, "projector": 6 * proj * N, "tower_weights": 2 * vit * cfg.n_tokens,
             "tower_attention": 4 * cfg.n_tokens ** 2 * cfg.width * cfg.layers}
    params = {"lm_without_embedding": lm, "embedding": model.rwkv.emb.weight.numel(), "projector": proj, "tower": vit}
    return sum(terms.values()), terms, params


TRAIN_TOL = {"bfloat16": {"loss": 1e-3, "logits": 5e-2}, "float32": {"loss": 1e-4, "logits": 1e-3}}
TRAIN_TOL_NOTE = (
    "Step 1 through the Triton kernel vs the same weights through the chunked PyTorch WKV: the relative difference of "
    "the loss and max|logits diff| / max|logits|. Calibrated on the CPU (interpreter, which truncates where a GPU "
    "rounds) with a 24-layer, 128-wide bf16 VisualRWKV at 160 positions: triton vs chunked gave 1.7e-2 on the logits "
    "and 7e-5 on the loss; multiplying every WKV output by (1 + 0.1 N(0, 1)) gave 7e-2 on the logits and by "
    "(1 + N(0, 1)) 0.43. The loss of a random model stays near ln(65536), so it moved by at most 1e-3 even then: the "
    "logits are the sharper check.")


def make_sample(model, ctx, seed=0):
    """One sample of exactly ctx positions: 16 prompt tokens, the image (N tokens), text, labelled after the image."""
    import torch
    from visualrwkv.prompts import IGNORE_INDEX, IMAGE_TOKEN_INDEX
    g = torch.Generator().manual_seed(seed)
    n_ids = ctx - model.n_image_tokens + 1                              # the placeholder becomes N positions
    ids = torch.randint(0, model.rwkv.cfg.vocab_size, (n_ids,), generator=g)
    ids[16] = IMAGE_TOKEN_INDEX
    labels = ids.clone()
    labels[:17] = IGNORE_INDEX
    S = model.vit.cfg.image_size
    return [ids], [torch.randn(3, S, S, generator=g)], [labels]


def part_train(args):
    """c: one VisualRWKV training process as visualrwkv.train sets it up for stage 2 (init_distributed, set_trainable,
    AdamW(betas=(0.9, 0.99)), ds_config with ZeRO-2, train_dtype, sample_level_loss with l2wrap), 1 warmup + 3 timed steps at ctx
    2048 (one image + text). Before the first step the same bf16 weights run once through the chunked PyTorch WKV: the
    step-1 loss and logits through the Triton kernel must match it (TRAIN_TOL). ~50 s on an H200: imports and NCCL ~15 s, the 1.6B model
    built on the GPU ~5 s and randomized from a CPU generator ~10 s, DeepSpeed's ZeRO-2 setup ~10 s, the chunked
    forward ~2 s, Triton compilation ~5 s, steps ~0.3 s each (1.8e13 FLOPs at a few hundred TFLOP/s, then AdamW over
    1.6e9 parameters)."""
    import torch
    import visualrwkv.train as trainer
    import deepspeed
    from visualrwkv.model import VisualRWKV
    from visualrwkv.rwkv import RWKV6Config, randomize_
    from visualrwkv.vision import VisionConfig
    cuda = not args.cpu
    _, world = trainer.init_distributed()                              # a group of one (RANK etc. set here)
    try:
        if cuda:
            lm_cfg, vision, ctx, precision = RWKV6Config(), VisionConfig(), 2048, "auto"
        else:                                 # the toy shapes, in bf16 too (DeepSpeed's bf16 mode runs on the CPU)
            lm_cfg, vision, ctx, precision = RWKV6Config(**trainer.TOY_LM), trainer.TOY_VISION, 64, "bf16"
        lm_cfg.wkv_impl = "triton"                                      # CUDA's default; on the CPU, the interpreter
        torch.manual_seed(0)
        with torch.device("cuda" if cuda else "cpu"):                  # initialise on the GPU: seconds, not minutes
            model = VisualRWKV(lm_cfg, vision)                          # the paper's: all patches, bidirectional scan
        randomize_(model.rwkv, seed=0)                                  # random blocks that are not the identity
        trainable = trainer.set_trainable(model, stage=2)
        targs = argparse.Namespace(batch_size=1, micro_batch=1, grad_clip=1.0, zero=2, precision=precision)
        dtype = trainer.train_dtype(targs, cuda)
        optimizer = torch.optim.AdamW(trainable, lr=trainer.STAGE_DEFAULTS[2]["lr"], betas=(0.9, 0.99), eps=1e-8,
                                      weight_decay=0.0)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=trainable,
                                               config=trainer.ds_config(targs, world, dtype))
        ids, images, labels = make_sample(model, ctx)
        cfg = engine.module.rwkv.cfg                                    # one config object, read by every TimeMix
        assert all(block.att.cfg is cfg for block in engine.module.rwkv.blocks)
        with torch.no_grad():                                           # the same weights through the chunked form
            cfg.wkv_impl = "chunked"
            ref = engine.module(ids, images, labels)
            ref_loss = trainer.sample_level_loss(ref.logits, ref.labels).item()
            ref_logits = ref.logits.float()
            cfg.wkv_impl = "triton"
            del ref
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        engine.train()
        losses, seconds, tokens = [], [], 0
        for step in range(4):                                          # step 0 warms up (Triton compiles)
            t0 = time.perf_counter()
            out = engine(ids, images, labels)
            loss = trainer.l2wrap(trainer.sample_level_loss(out.logits, out.labels), out.logits)   # as in training
            if step == 0:
                logits_err = max_rel(out.logits.detach().float(), ref_logits)
                del ref_logits
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())                                  # .item() waits for the GPU
            if cuda:
                torch.cuda.synchronize()
            if step > 0:
                seconds.append(time.perf_counter() - t0)
                tokens += int(out.mask.sum())
            print(f"step {step}: loss {losses[-1]:.4f}, {time.perf_counter() - t0:.2f} s", flush=True)
            del out, loss
        flops, terms, params = step_flops(model, ctx)
        tokens_per_s = tokens / sum(seconds)
        name = torch.cuda.get_device_name() if cuda else "cpu"
        peak = peak_bf16_tflops(name) if dtype == torch.bfloat16 else None
        mfu = flops * len(seconds) / sum(seconds) / (peak * 1e12) if cuda and peak else None
        tol = TRAIN_TOL[str(dtype).removeprefix("torch.")]
        loss_err = abs(losses[0] - ref_loss) / abs(ref_loss)
        failures = [f"step-1 loss {losses[0]:.6f} (triton) vs {ref_loss:.6f} (chunked): relative difference "
                    f"{loss_err:.2e} > {tol['loss']:g}"] if loss_err > tol["loss"] else []
        failures += [f"step-1 logits, triton vs chunked: max rel diff {logits_err:.2e} > {tol['logits']:g}"
                     ] if logits_err > tol["logits"] else []
        failures += [f"non-finite loss at step {i}" for i, x in enumerate(losses) if not math.isfinite(x)]
        peak_mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        summary = (f"{tokens_per_s:,.0f} tok/s, MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}, peak "
                   f"{'n/a' if peak_mem is None else f'{peak_mem:.1f} GiB'}; step-1 loss {losses[0]:.4f} vs chunked "
                   f"{ref_loss:.4f} (rel {loss_err:.1e}), logits max rel diff {logits_err:.1e}")
        return {"summary": summary, "failures": failures, "dtype": str(dtype), "ctx": ctx,
                "n_image_tokens": model.n_image_tokens, "zero_stage": 2, "steps_timed": len(seconds),
                "step_seconds": seconds, "losses": losses, "tokens_per_s": tokens_per_s,
                "flops_per_step": flops, "flops_terms": terms, "params": params, "flops_formula": step_flops.__doc__,
                "peak_bf16_tflops": peak, "mfu": mfu, "peak_memory_GiB": peak_mem,
                "loss_chunked": ref_loss, "loss_triton_step1": losses[0], "loss_rel_diff": loss_err,
                "logits_max_rel_diff": logits_err, "tolerance": tol, "tolerance_note": TRAIN_TOL_NOTE}
    finally:
        import torch.distributed as dist
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------------- part d
def part_efficiency(args):
    """d: scripts/bench_efficiency.py --preset gpu (--preset tiny with --cpu) as a subprocess; its JSON is kept.
    Its time is its own (written elsewhere); this part only runs it."""
    script = ROOT / "scripts" / "bench_efficiency.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script.relative_to(ROOT)} is missing: part d runs that script, which this checkout "
                                "does not have")
    out_dir = args.out / "efficiency"
    (out_dir / "efficiency.json").unlink(missing_ok=True)
    rc, output = stream([sys.executable, str(script), "--preset", "tiny" if args.cpu else "gpu", "--out", str(out_dir)],
                        prefix="")
    if not (out_dir / "efficiency.json").is_file():
        raise RuntimeError(f"bench_efficiency.py exited with code {rc} without writing efficiency.json:\n{output}")
    report = json.loads((out_dir / "efficiency.json").read_text())
    pngs = sorted(p.name for p in out_dir.glob("*.png"))
    keys = list(report) if isinstance(report, dict) else []
    summary = f"efficiency.json ({', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}); {len(pngs)} PNGs"
    return {"summary": summary, "failures": [] if rc == 0 else [f"bench_efficiency.py exited with code {rc}"],
            "efficiency": report, "pngs": [f"efficiency/{p}" for p in pngs], "output": output}


# ------------------------------------------------------------------------------------------------------- driver
# name, function, timeout (s): a, c, d about 2-4x their first H200 times; b's is unknown (fla's autotuning)
PARTS = {"a": ("wkv_kernel", part_kernel, 240), "b": ("bench_wkv", part_bench_wkv, 240),
         "c": ("train_1b6", part_train, 150), "d": ("efficiency", part_efficiency, 200)}


def stream(cmd, prefix, env=None, timeout=None):
    """Run cmd, echoing its output; (exit code, None after a timeout; the last lines). With a timeout it runs in a
    process group of its own, which the timeout kills whole (a part and the benchmark it started)."""
    tail = collections.deque(maxlen=80)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=timeout is not None)

    def pump():
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            print(prefix + line, end="", flush=True)
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)                             # the part and anything it started
        proc.wait()
        rc = None
    reader.join(timeout=10)
    return rc, "\n".join(tail)


def environment(cpu):
    """The device's name and the versions of the packages the parts use (None where not installed)."""
    from importlib.metadata import PackageNotFoundError, version
    import torch

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None
    if not cpu and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device visible to torch: run on a GPU machine, or with --cpu for the CPU check")
    device = "cpu (TRITON_INTERPRET=1)" if cpu else torch.cuda.get_device_name()
    return {"device": device, "versions": {name: installed(name) for name in VERSIONED}}


def write_json(path, obj):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def ensure_importable():
    """Import `visualrwkv` and `visualrwkv_kernels` (the folder kernels/, see setup.py) from this checkout where they
    are not installed, as on the GPU machine, which gets only the wheels: kernels/bench_wkv.py's helper, from its file."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_wkv", ROOT / "kernels" / "bench_wkv.py")
    bench_wkv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_wkv)
    bench_wkv.ensure_importable()


def run_part(letter, args):
    """In the part's own process: run it, catch any exception, write its JSON."""
    name, fn, _ = PARTS[letter]
    t0 = time.perf_counter()
    result = {"part": letter, "name": name, "mode": "cpu" if args.cpu else "cuda"}
    try:
        ensure_importable()
        result.update(environment(args.cpu))
        if f"{letter}:exit" in args.inject_failure:
            os._exit(3)                                                 # a crash: no JSON from this process
        if letter in args.inject_failure:
            raise RuntimeError(f"failure injected by --inject-failure {letter}")
        result.update(fn(args))
        result["status"] = "FAIL" if result["failures"] else "ok"
    except Exception as e:
        result.update(status="FAIL", summary=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                      failures=[f"{type(e).__name__}: {e}"], traceback=traceback.format_exc())
        traceback.print_exc()
    result["seconds"] = time.perf_counter() - t0
    write_json(args.out / f"{letter}_{name}.json", result)


def run_child(letter, args, timeout):
    """Run one part in a child process with a timeout; its JSON, or a FAIL record if it died without one."""
    name = PARTS[letter][0]
    path = args.out / f"{letter}_{name}.json"
    path.unlink(missing_ok=True)
    if timeout < 10:
        why = f"not run: the --budget of {args.budget:g} s was used up"
        result = {"part": letter, "name": name, "status": "FAIL", "summary": why, "failures": [why], "seconds": 0.0}
        write_json(path, result)
        return result
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", letter, "--out", str(args.out)]
    if args.cpu:
        cmd.append("--cpu")
    if args.inject_failure:
        cmd += ["--inject-failure", ",".join(args.inject_failure)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.cpu:
        env.update(TRITON_INTERPRET="1", DS_ACCELERATOR="cpu")
    print(f"== part {letter} ({name}), timeout {timeout:.0f} s", flush=True)
    t0 = time.perf_counter()
    rc, tail = stream(cmd, prefix=f"[{letter}] ", env=env, timeout=timeout)
    if path.is_file():
        return json.loads(path.read_text())
    why = f"timed out after {timeout:.0f} s" if rc is None else f"its process exited with code {rc} without a report"
    result = {"part": letter, "name": name, "mode": "cpu" if args.cpu else "cuda", "status": "FAIL", "summary": why,
              "failures": [why], "output_tail": tail, "seconds": time.perf_counter() - t0}
    write_json(path, result)
    return result


def print_table(results):
    first = next((r for r in results.values() if "versions" in r), None)
    if first:
        v = first["versions"]
        print(f"\ngpu_check on {first['device']}: " + ", ".join(f"{k} {v[k]}" for k in VERSIONED if v[k]))
    print(f"{'part':<15}{'status':<9}{'seconds':>8}  numbers")
    for letter, (name, _, _) in PARTS.items():
        r = results.get(letter)
        status, secs = (r["status"], f"{r['seconds']:.1f}") if r else ("skipped", "-")
        summary = r["summary"] if r else "not in --parts"
        print(f"{letter + ' ' + name:<15}{status:<9}{secs:>8}  {summary}")
        for failure in (r or {}).get("failures", [])[:5]:
            print(f"{'':<34}FAIL: {failure.splitlines()[0]}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated letters, e.g. a,c (default: all)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check", help="folder for the JSON and PNG files")
    p.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU: Triton interpreter, DeepSpeed on gloo")
    p.add_argument("--budget", type=float, default=540,
                   help="seconds for all parts together (each is also capped by its own timeout); the default leaves "
                        "a 600 s device command time to install the wheels and pack the results")
    p.add_argument("--inject-failure", metavar="PART[:exit],...", default="",
                   help="for tests: each PART named raises at its start (PART:exit: its process dies without a report)")
    p.add_argument("--child", choices=list(PARTS), help=argparse.SUPPRESS)   # internal: run one part in this process
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = [x for x in args.parts if x not in PARTS]
    if unknown or not args.parts:
        p.error(f"--parts: unknown part(s) {unknown}; choose from {','.join(PARTS)}")
    args.inject_failure = [x.strip() for x in args.inject_failure.split(",") if x.strip()]
    args.out = args.out.resolve()
    return args


def main(argv=None):
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        run_part(args.child, args)
        return
    deadline = time.monotonic() + args.budget
    results = {}
    for letter in args.parts:
        results[letter] = run_child(letter, args, timeout=min(PARTS[letter][2], deadline - time.monotonic()))
    print_table(results)
    sys.exit(1 if any(r["status"] == "FAIL" for r in results.values()) else 0)


if __name__ == "__main__":
    main()
