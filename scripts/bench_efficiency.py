"""Figure 1 (b, c) of the paper: per-token decoding latency and memory against context length, VisualRWKV's language
model in RNN mode against a transformer of the same size (Hugging Face `LlamaForCausalLM`) with a KV cache.

At every (batch B, context length T) both models prefill T random token ids in parallel, then decode greedily one token
at a time (the argmax is fed back on the device). The prefill uses the language models alone: once the prompt is read,
decoding is text-only in both VLMs, the image already sits in the RWKV state or the KV cache, and the per-token cost
depends on how many tokens were read, not on what they were. The vision tower (the same CLIP ViT-L/14-336 in VisualRWKV
and LLaVA-1.5) runs once per image in the prefill and its weights would add the same constant to both memories.

Decoding (median ms per token over `--steps` steps after `--warmup`): RWKV6.step on state buffers written in place; the
Llama forward on a transformers `StaticCache` holding T + every decode step the point runs, rounded up to a multiple
of 16 (transformers 5 keeps its position on the device, so a step replays). On CUDA each step is also captured once as
a CUDA graph and replayed; the eager numbers stand beside the graph numbers. Memory on CUDA is the peak allocated
while decoding, after the prefill (peak statistics reset): weights + state or KV cache + decode activations and the
graph's pool; on the CPU, the bytes of the weights and the state or KV cache. The bytes-moved floor per token: weights
read (the input embedding only its B rows), plus the RWKV state read and written, or the KV cache read at T, over a
device copy bandwidth measured in the same run.

    python scripts/bench_efficiency.py --preset gpu --out runs/gpu_check/efficiency   # 1.6B shapes, bf16, one CUDA GPU
    python scripts/bench_efficiency.py --preset tiny --out runs/efficiency_tiny        # tiny models, fp32, CPU, seconds

The gpu preset (5 lengths up to 24,576, batch 1 and 8, 20 timed steps) is estimated, not yet measured, at about two
minutes on one H200. Writes DIR/efficiency.json (rewritten after every point), DIR/latency.png and DIR/memory.png.
"""
import argparse
import gc
import importlib.metadata
import importlib.util
import inspect
import json
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_wkv", ROOT / "kernels" / "bench_wkv.py")
bench_wkv = importlib.util.module_from_spec(_spec)          # the kernel benchmark's helpers, from its file (light imports)
_spec.loader.exec_module(bench_wkv)

bench_wkv.ensure_importable()                                 # this checkout, where it is not installed
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache          # noqa: E402
from visualrwkv.rwkv import RWKV6, RWKV6Config                                # noqa: E402

# the cache keyword of the Llama forward: `cache` from transformers 5.24 on, `past_key_values` before
CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
GiB = 2**30

PRESETS = {
    # the 1.6B RWKV-6 (default RWKV6Config) against a LLaMA-style MHA transformer of 24 layers, width 2048 and the
    # same vocabulary; intermediate_size 6400 puts its parameter count within 1% of the RWKV's
    "gpu": dict(device="cuda", dtype="bfloat16", cpu_threads=None, lengths=[1024, 4096, 8192, 16384, 24576],
                batches=[1, 8], steps=20, warmup=5,
                rwkv=dict(),
                llama=dict(vocab_size=65536, hidden_size=2048, intermediate_size=6400, num_hidden_layers=24,
                           num_attention_heads=16, num_key_value_heads=16, head_dim=128,
                           max_position_embeddings=32768)),
    # one CPU thread: operations this small gain nothing from more, and on a shared machine threads wait for each other
    "tiny": dict(device="cpu", dtype="float32", cpu_threads=1, lengths=[256, 1024, 2048, 4096], batches=[1, 2],
                 steps=10, warmup=3,
                 rwkv=dict(vocab_size=512, n_layer=2, n_embd=64, head_size=16, lora_mix=8, lora_decay=8),
                 llama=dict(vocab_size=512, hidden_size=64, intermediate_size=224, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=8192)),
}
PREFILL_INPUT = ("random token ids through each language model alone: decoding after the prompt is text-only in both "
                 "VLMs and its cost depends on the context length, not its content; the shared vision tower is left "
                 "out of both")
NO_GRAPHS_ON_CPU = ("CUDA graphs need a CUDA device, so on the CPU both models decode eagerly (torch.compile is not "
                    "used either: its compile time would dominate a run this short)")
MEMORY_MEANING = {
    "cuda": "peak torch.cuda.max_memory_allocated while decoding (eager and graph), after the prefill with the peak "
            "reset: weights + RWKV state or KV cache + decode activations + the CUDA graph's pool",
    "cpu": "weights + RWKV state or KV cache, counted from the tensors' sizes (no allocator statistics on the CPU; "
           "decode activations not counted)",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    p.add_argument("--out", default="runs/efficiency", help="folder for efficiency.json, latency.png, memory.png")
    p.add_argument("--lengths", help="comma-separated context lengths (default: the preset's)")
    p.add_argument("--batches", help="comma-separated batch sizes (default: the preset's)")
    p.add_argument("--steps", type=int, help="timed decode steps per point (default: the preset's)")
    p.add_argument("--warmup", type=int, help="untimed decode steps before them (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    ints = lambda s: [int(x) for x in s.split(",")]
    args.lengths = ints(args.lengths) if args.lengths else preset["lengths"]
    args.batches = ints(args.batches) if args.batches else preset["batches"]
    args.steps = args.steps or preset["steps"]
    args.warmup = preset["warmup"] if args.warmup is None else args.warmup
    return args


# ------------------------------------------------------------------------------------------------------------ models
def build_rwkv(cfg: RWKV6Config, device, dtype):
    "The RWKV-6 language model with its own (official) initialisation, built on the device (timings ignore values)."
    with torch.device(device): lm = RWKV6(cfg)
    return lm.to(dtype).eval()


def build_llama(kwargs, device, dtype):
    "A LlamaForCausalLM with transformers' random initialisation, untied head, SDPA attention."
    cfg = LlamaConfig(**kwargs, tie_word_embeddings=False, attn_implementation="sdpa")
    with torch.device(device): model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def n_params(model): return sum(p.numel() for p in model.parameters())


def weight_bytes(model): return sum(p.numel() * p.element_size() for p in model.parameters())


def tensor_bytes(tensors): return sum(t.numel() * t.element_size() for t in tensors)


# ------------------------------------------------------------------------------------------------------------ RWKV
def rwkv_prefill(lm: RWKV6, ids):
    "Parallel mode on ids [B, T]: (last token's logits [B, vocab], state in fresh buffers); no [B, T, vocab] logits."
    x = lm.emb(ids)                                                             # [B, T, C]
    state = []
    for block in lm.blocks:
        x, s = block(x)
        state.append(s)                                                         # its own tensors, no views into x
    return lm.head(lm.ln_out(x[:, -1])), state                                  # [B, vocab]


def rwkv_decoder(lm: RWKV6, logits, state):
    "(step, state tensors): step() decodes one greedy token in RNN mode, writing ids and state into the same buffers."
    ids = logits.argmax(-1)                                                     # [B]
    flat = [t for s in state for t in s]                                        # L x (att_x, wkv, ffn_x)
    def step():
        out, new = lm.step(ids, state)                                          # [B, vocab]
        torch._foreach_copy_(flat, [t for s in new for t in s])                 # one multi-tensor copy
        ids.copy_(out.argmax(-1))
        return out
    return step, flat


# ------------------------------------------------------------------------------------------------------------ Llama
def llama_prefill(model, ids, cache_len):
    "Parallel forward of ids [B, T] into a StaticCache of cache_len tokens: (last token's logits [B, vocab], cache)."
    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    logits = model(input_ids=ids, logits_to_keep=1, **{CACHE_KWARG: cache}).logits[:, -1]
    return logits, cache


def llama_decoder(model, logits, cache):
    "(step, cache tensors): step() decodes one greedy token; the static cache keeps its position on the device."
    ids = logits.argmax(-1, keepdim=True)                                       # [B, 1]
    def step():
        out = model(input_ids=ids, **{CACHE_KWARG: cache}).logits[:, -1]       # [B, vocab]
        ids.copy_(out.argmax(-1, keepdim=True))
        return out
    return step, [t for layer in cache.layers for t in (layer.keys, layer.values)]


def prefill_and_decoder(kind, model, ids, cache_len):
    "Prefill ids [B, T], then the greedy decode step over fixed buffers: (step, state or KV cache tensors)."
    if kind == "rwkv": return rwkv_decoder(model, *rwkv_prefill(model, ids))
    return llama_decoder(model, *llama_prefill(model, ids, cache_len))


# ------------------------------------------------------------------------------------------------------------ timing
def sync(device):
    if device.type == "cuda": torch.cuda.synchronize()


def median_ms_cpu(fn, steps, warmup):
    "Median wall-clock ms of fn over `steps` calls after `warmup` calls."
    for _ in range(warmup): fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter(); fn(); times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def median_ms_cuda(fn, steps, warmup):
    "Median ms of fn between CUDA events, recorded back to back on the stream (no sync between calls)."
    for _ in range(warmup): fn()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    events[0].record()
    for e in events[1:]:
        fn(); e.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in zip(events, events[1:]))


def median_ms(fn, steps, warmup, device):
    return (median_ms_cuda if device.type == "cuda" else median_ms_cpu)(fn, steps, warmup)


def cuda_graph(step):
    "Capture one decode step (its inputs and state in fixed buffers) as a CUDA graph; returns its replay."
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side): step()                  # one warm-up on a side stream, as torch.cuda.graph asks
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph): step()
    return graph.replay


def graph_ms(step, args):
    "(median ms of the replayed graph, None), or (None, why the capture failed): one failure must not sink the run."
    try: replay = cuda_graph(step)
    except Exception as e:
        print(f"bench_efficiency: CUDA graph capture failed: {e!r}", file=sys.stderr)
        return None, f"capture failed: {type(e).__name__}: {e}"
    return median_ms_cuda(replay, args.steps, args.warmup), None


def tokens_decoded(args, device):
    "Decode steps one point runs: warm-up and timed, eagerly, then on CUDA the side-stream warm-up and the replays."
    per_phase = args.warmup + args.steps
    return per_phase + (1 + per_phase if device.type == "cuda" else 0)


# ------------------------------------------------------------------------------------------------------------ one point
def floor_bytes(kind, model, batch, ctx, state_bytes):
    """Bytes one decode step must move: the weights (of the input embedding only the B rows looked up), plus the RWKV
    state read and written, or the KV cache read at ctx: 2 x layers x kv_heads x head_dim x ctx x bytes x batch."""
    emb = (model.emb if kind == "rwkv" else model.model.embed_tokens).weight                # [vocab, C]
    size = emb.element_size()
    weights = weight_bytes(model) - (emb.shape[0] - batch) * emb.shape[1] * size
    if kind == "rwkv": return weights + 2 * state_bytes
    c = model.config
    return weights + 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * ctx * size * batch


def measure_point(kind, model, batch, ctx, args, device, bandwidth):
    "Prefill to ctx, then decode: one JSON record (latencies in ms per token, bytes, floor)."
    vocab = model.cfg.vocab_size if kind == "rwkv" else model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, ctx), device=device)                                # [B, T]
    cache_len = -(-(ctx + tokens_decoded(args, device)) // 16) * 16    # a multiple of 16: SDPA's masks need no padding
    sync(device); t0 = time.perf_counter()
    step, state = prefill_and_decoder(kind, model, ids, cache_len)
    sync(device); prefill_s = time.perf_counter() - t0
    del ids
    if device.type == "cuda": torch.cuda.reset_peak_memory_stats()
    eager = median_ms(step, args.steps, args.warmup, device)
    graph, graph_error = graph_ms(step, args) if device.type == "cuda" else (None, None)
    state_b = tensor_bytes(state)
    memory = torch.cuda.max_memory_allocated() if device.type == "cuda" else weight_bytes(model) + state_b
    floor = floor_bytes(kind, model, batch, ctx, state_b)
    floor_ms = floor / bandwidth * 1e3
    point = dict(model=kind, batch=batch, ctx=ctx, prefill_s=prefill_s, prefill_tokens_per_s=batch * ctx / prefill_s,
                 decode_ms_eager=eager, decode_ms_graph=graph, memory_bytes=memory, weight_bytes=weight_bytes(model),
                 state_bytes=state_b, cache_len=cache_len if kind == "llama" else None, floor_bytes=floor,
                 floor_ms=floor_ms, eager_over_floor=eager / floor_ms,
                 graph_over_floor=None if graph is None else graph / floor_ms)
    if graph_error: point["graph_error"] = graph_error
    return point


def measure_model(kind, model, args, device, bandwidth, record):
    "Every (batch, length) point of one model, each passed to record(), after one untimed prefill that warms it up."
    prefill_and_decoder(kind, model, torch.zeros(1, min(args.lengths), dtype=torch.long, device=device),
                        min(args.lengths) + 1)
    for batch in args.batches:
        for ctx in args.lengths:
            try: point = measure_point(kind, model, batch, ctx, args, device, bandwidth)
            except torch.cuda.OutOfMemoryError: point = dict(model=kind, batch=batch, ctx=ctx, error="out of memory")
            if device.type == "cuda": gc.collect(); torch.cuda.empty_cache()
            print(f"{kind:>5} B={batch} T={ctx}: " + progress(point), flush=True)
            record(point)


# ------------------------------------------------------------------------------------------------------------ report
def progress(point):
    "One line of a point's numbers, printed as the run goes."
    if "error" in point: return point["error"]
    return (f"{fmt(point['decode_ms_graph'], 1)} ms graph, {fmt(point['decode_ms_eager'], 1)} ms eager per token, "
            f"{point['memory_bytes'] / GiB:.3f} GiB, prefill {point['prefill_tokens_per_s']:.0f} tokens/s")


def comparisons(points):
    "Per (batch, ctx): Llama/RWKV time per token (graph and eager) and the memory RWKV saves, in %."
    by = {(p["model"], p["batch"], p["ctx"]): p for p in points}
    rows = []
    for (kind, batch, ctx), r in by.items():
        t = by.get(("llama", batch, ctx))
        if kind != "rwkv" or t is None or "error" in r or "error" in t: continue
        ratio = lambda key: None if r[key] is None or t[key] is None else t[key] / r[key]
        rows.append(dict(batch=batch, ctx=ctx, speedup_graph=ratio("decode_ms_graph"),
                         speedup_eager=ratio("decode_ms_eager"),
                         memory_saving_pct=100 * (1 - r["memory_bytes"] / t["memory_bytes"])))
    return rows


def fmt(x, width, digits=3):
    "x right-aligned in `width` characters with `digits` decimals, or '-' for a missing number."
    return f"{'-':>{width}}" if x is None else f"{x:{width}.{digits}f}"


def print_tables(report):
    by = {(p["model"], p["batch"], p["ctx"]): p for p in report["points"]}
    cmp = {(c["batch"], c["ctx"]): c for c in report["comparisons"]}
    unit, scale = ("GiB", GiB) if report["device_type"] == "cuda" else ("MiB", 2**20)
    print(f"\n{report['device']}; {report['dtype']}; copy bandwidth {report['copy_bandwidth_GBps']:.0f} GB/s; "
          f"parameters RWKV {report['params']['rwkv']:,}, Llama {report['params']['llama']:,}")
    print(f"ms per token: median of {report['steps']} greedy decode steps; memory: {report['memory']}")
    head = (f"{'ctx':>6} | {'RWKV ms graph':>13} {'eager':>7} | {'Llama ms graph':>14} {'eager':>7} | "
            f"{'Llama/RWKV':>10} | {'RWKV ' + unit:>8} {'Llama ' + unit:>9} {'saving':>6} | "
            f"{'floor ms RWKV':>13} {'Llama':>7} | {'meas/floor RWKV':>15} {'Llama':>5} | "
            f"{'prefill tok/s RWKV':>18} {'Llama':>9}")
    for batch in report["batches"]:
        print(f"\nbatch {batch}\n{head}")
        for ctx in report["lengths"]:
            r, t = by[("rwkv", batch, ctx)], by[("llama", batch, ctx)]
            if "error" in r or "error" in t:
                print(f"{ctx:>6} | RWKV: {r.get('error', 'ok')}, Llama: {t.get('error', 'ok')}"); continue
            c = cmp[(batch, ctx)]
            best = lambda p: p["graph_over_floor"] or p["eager_over_floor"]
            print(f"{ctx:>6} | {fmt(r['decode_ms_graph'], 13)} {fmt(r['decode_ms_eager'], 7)} | "
                  f"{fmt(t['decode_ms_graph'], 14)} {fmt(t['decode_ms_eager'], 7)} | "
                  f"{fmt(c['speedup_graph'] or c['speedup_eager'], 10, 2)} | {fmt(r['memory_bytes'] / scale, 8, 2)} "
                  f"{fmt(t['memory_bytes'] / scale, 9, 2)} {fmt(c['memory_saving_pct'], 5, 1)}% | "
                  f"{fmt(r['floor_ms'], 13)} {fmt(t['floor_ms'], 7)} | {fmt(best(r), 15, 1)} {fmt(best(t), 5, 1)} | "
                  f"{fmt(r['prefill_tokens_per_s'], 18, 0)} {fmt(t['prefill_tokens_per_s'], 9, 0)}")
    print("Llama/RWKV and meas/floor use the graph numbers where there are any, else the eager ones")


def plot(report, out):
    "Fig. 1 (b) latency.png: ms per token against context length; (c) memory.png: memory against context length."
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    unit, scale = ("GiB", GiB) if report["device_type"] == "cuda" else ("MiB", 2**20)
    ok = [p for p in report["points"] if "error" not in p]
    series = lambda kind, batch, key: [(p["ctx"], p[key]) for p in ok
                                       if p["model"] == kind and p["batch"] == batch and p[key] is not None]
    colors = {"rwkv": "tab:red", "llama": "tab:blue"}
    names = {"rwkv": "VisualRWKV LM (RNN mode)", "llama": "Llama (KV cache)"}
    latency = [("decode_ms_graph", "-o", "graph"), ("decode_ms_eager", "--x", "eager")]
    for fname, keys, ylabel in (("latency.png", latency, "ms per token"),
                                ("memory.png", [("memory_bytes", "-o", "")], f"memory ({unit})")):
        fig, axes = plt.subplots(1, len(report["batches"]), figsize=(5 * len(report["batches"]), 4), squeeze=False)
        for ax, batch in zip(axes[0], report["batches"]):
            for kind in ("rwkv", "llama"):
                for key, style, label in keys:
                    xy = series(kind, batch, key)
                    if not xy: continue
                    ys = [y / scale if key == "memory_bytes" else y for _, y in xy]
                    ax.plot([x for x, _ in xy], ys, style, color=colors[kind], label=f"{names[kind]} {label}".strip())
            ax.set(title=f"batch {batch}", xlabel="context length (tokens)", ylabel=ylabel)
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=8)
        fig.suptitle(f"{report['device']}, {report['dtype']}")
        fig.tight_layout()
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)


def versions():
    def version(name):
        try: return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError: return None
    return {name: version(name) for name in ("torch", "triton", "transformers")}


def device_name(device):
    if device.type == "cuda": return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} thread(s))"


def write_json(report, out: Path):
    "DIR/efficiency.json, replaced atomically; rewritten after every point, so a run cut short keeps what it measured."
    tmp = out / "efficiency.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out / "efficiency.json")


def run(args, out: Path):
    "Both models on the preset's device, one after the other, with the preset's CPU threads (restored afterwards)."
    threads, wanted = torch.get_num_threads(), PRESETS[args.preset]["cpu_threads"]
    try:
        if wanted: torch.set_num_threads(wanted)
        return measure_all(args, out)
    finally: torch.set_num_threads(threads)


@torch.no_grad()
def measure_all(args, out: Path):
    preset = PRESETS[args.preset]
    device, dtype = torch.device(preset["device"]), getattr(torch, preset["dtype"])
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"bench_efficiency: --preset {args.preset} needs a CUDA device; use --preset tiny on the CPU")
    torch.manual_seed(args.seed)
    rwkv_cfg = RWKV6Config(**preset["rwkv"])
    report = dict(device=device_name(device), device_type=device.type, **versions(), dtype=preset["dtype"],
                  preset=args.preset, lengths=args.lengths, batches=args.batches, steps=args.steps, warmup=args.warmup,
                  rwkv_config=asdict(rwkv_cfg), llama_config=preset["llama"], prefill_input=PREFILL_INPUT,
                  memory=MEMORY_MEANING[device.type], cuda_graphs="used" if device.type == "cuda" else NO_GRAPHS_ON_CPU,
                  copy_bandwidth_GBps=bench_wkv.copy_bandwidth(device.type, bench_wkv.make_timer(device.type)) / 1e9,
                  params={}, points=[], comparisons=[])

    def record(point):
        report["points"].append(point)
        report["comparisons"] = comparisons(report["points"])
        write_json(report, out)
    for kind, build in (("rwkv", lambda: build_rwkv(rwkv_cfg, device, dtype)),
                        ("llama", lambda: build_llama(preset["llama"], device, dtype))):
        model = build()                                   # one model on the device at a time
        report["params"][kind] = n_params(model)
        print(f"{kind}: {report['params'][kind]:,} parameters", flush=True)
        measure_model(kind, model, args, device, report["copy_bandwidth_GBps"] * 1e9, record)
        del model
        if device.type == "cuda": gc.collect(); torch.cuda.empty_cache()
    return report


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = run(args, out)
    print_tables(report)
    plot(report, out)
    print(f"wrote {out / 'efficiency.json'}, {out / 'latency.png'}, {out / 'memory.png'}")
    return report


if __name__ == "__main__":
    main()
