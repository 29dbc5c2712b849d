"""scripts/bench_efficiency.py on the CPU (--preset tiny): every point is measured, the RWKV state stays the same size
while the KV cache grows by exactly its bytes per token, the plots are images, and the decode steps it times are the
real models (they give the logits of a full parallel forward over the same tokens)."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from visualrwkv.model import VisualRWKV
from visualrwkv.prompts import IMAGE_TOKEN_INDEX
from visualrwkv.rwkv import RWKV6, RWKV6Config, randomize_
from visualrwkv.vision import VisionConfig

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_efficiency.py"
STEPS, WARMUP = 4, 2
LENGTHS, BATCHES = [256, 1024, 2048, 4096], [1, 2]              # the tiny preset's
TOL = 1e-6     # float32 decode steps against a full forward: observed <= 2.8e-7 (|diff| / (1 + |want|)), 3 seeds


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_efficiency", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_bench()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("efficiency")
    bench.main(["--preset", "tiny", "--out", str(out), "--steps", str(STEPS), "--warmup", str(WARMUP)])
    return out, json.loads((out / "efficiency.json").read_text())


def test_every_point_has_positive_finite_latencies(run):
    _, report = run
    points = {(p["model"], p["batch"], p["ctx"]): p for p in report["points"]}
    assert sorted(points) == sorted((m, b, t) for m in ("rwkv", "llama") for b in BATCHES for t in LENGTHS)
    for p in points.values():
        for key in ("decode_ms_eager", "prefill_tokens_per_s", "floor_ms"):
            assert math.isfinite(p[key]) and p[key] > 0, (p["model"], p["batch"], p["ctx"], key)
        assert p["decode_ms_graph"] is None                     # no CUDA graphs on the CPU ...
    assert "CUDA graphs need a CUDA device" in report["cuda_graphs"]     # ... and the JSON says why
    assert len(report["comparisons"]) == len(BATCHES) * len(LENGTHS)
    assert {"torch", "triton", "transformers", "device", "dtype", "memory"} <= set(report)


def test_parameter_counts_match_within_two_percent(run):
    _, report = run
    # by hand. RWKV: embedding and head 2*512*64; per layer 4*64 (ln1, ln2: weight and bias) + time mix 6*64 (maa x,
    # w, k, v, r, g) + 64*40 + 5*8*64 (maa LoRA) + 64*8 + 8*64 (decay LoRA) + 64 (time_decay) + 4*16 (u) + 5*64*64
    # (r, k, v, g, o) + 2*64 (ln_x) + channel mix 2*64 (maa) + 2*64*224 (key, value) + 64*64 (receptance);
    # block 0 adds ln0 2*64; ln_out 2*64.
    rwkv_layer = 256 + 384 + 2560 + 2560 + 512 + 512 + 64 + 64 + 20480 + 128 + 128 + 28672 + 4096
    assert report["params"]["rwkv"] == 2 * 512 * 64 + 2 * rwkv_layer + 128 + 128 == 186624
    # Llama: embedding and head 2*512*64; per layer 4*64*64 (q, k, v, o) + 3*64*224 (MLP) + 2*64 (norms); final norm 64
    assert report["params"]["llama"] == 2 * 512 * 64 + 2 * (4 * 4096 + 3 * 64 * 224 + 128) + 64 == 184640
    assert abs(report["params"]["llama"] / report["params"]["rwkv"] - 1) < 0.02


def test_rwkv_state_is_constant_and_the_kv_cache_grows_by_its_bytes_per_token(run):
    _, report = run
    for p in report["points"]:
        B, T = p["batch"], p["ctx"]
        if p["model"] == "rwkv":
            # per sample, per layer: WKV state 4 heads x 16 x 16 fp32 + last tokens of time and channel mix 2 x 64 fp32
            assert p["state_bytes"] == B * 2 * (4 * 16 * 16 * 4 + 2 * 64 * 4) == B * 9216
            assert p["weight_bytes"] == 186624 * 4
        else:
            # K and V, 2 layers, 4 heads of 16, fp32: 1024 bytes per token per sample, for the prompt and the 6 tokens
            # decoded at the point (2 warm-up, 4 timed, eager only on the CPU), rounded up to a multiple of 16
            assert p["cache_len"] == T + 16
            assert p["state_bytes"] == B * 1024 * (T + 16)
            assert p["weight_bytes"] == 184640 * 4
        assert p["memory_bytes"] == p["weight_bytes"] + p["state_bytes"]     # what memory means on the CPU


def test_floor_counts_weights_state_and_kv_cache(run):
    _, report = run
    for p in report["points"]:
        B, T = p["batch"], p["ctx"]
        if p["model"] == "rwkv":   # weights less the embedding rows not gathered, state read and written
            assert p["floor_bytes"] == (186624 - (512 - B) * 64) * 4 + 2 * B * 9216
        else:                      # weights less the embedding rows not gathered, KV cache read at T
            assert p["floor_bytes"] == (184640 - (512 - B) * 64) * 4 + B * 1024 * T
        assert p["floor_ms"] == pytest.approx(p["floor_bytes"] / (report["copy_bandwidth_GBps"] * 1e9) * 1e3)


def test_plots_are_valid_pngs(run):
    out, _ = run
    for name in ("latency.png", "memory.png"):
        with Image.open(out / name) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def greedy_continuation(step, first_logits, n):
    "Run the benchmark's step n times: (logits of each step [B, n, vocab], the ids it was fed [B, n])."
    fed, outs, logits = [], [], first_logits
    for _ in range(n):
        fed.append(logits.argmax(-1))
        logits = step().clone()
        outs.append(logits)
    return torch.stack(outs, 1), torch.stack(fed, 1)


@torch.no_grad()
def test_rwkv_decode_step_equals_the_parallel_forward():
    cfg = RWKV6Config(vocab_size=97, n_layer=3, n_embd=64, head_size=16, lora_mix=8, lora_decay=8)
    lm = randomize_(RWKV6(cfg), seed=3)
    ids = torch.randint(0, 97, (2, 37), generator=torch.Generator().manual_seed(0))
    first, state = bench.rwkv_prefill(lm, ids)
    full_prompt = lm(ids)                                                      # [B, T, vocab], chunked WKV
    torch.testing.assert_close(first, full_prompt[:, -1], atol=TOL, rtol=TOL)
    step, _ = bench.rwkv_decoder(lm, first, state)
    outs, fed = greedy_continuation(step, first, 6)
    full = lm(torch.cat([ids, fed], 1))                                        # [B, T + 6, vocab]
    torch.testing.assert_close(outs, full[:, 37:], atol=TOL, rtol=TOL)


@torch.no_grad()
def test_rwkv_decode_step_continues_a_visualrwkv_prompt_with_an_image():
    cfg = RWKV6Config(vocab_size=61, n_layer=4, n_embd=32, head_size=8, lora_mix=4, lora_decay=4)
    model = VisualRWKV(cfg, VisionConfig(image_size=28, patch_size=7, width=24, layers=2, head_width=8))
    randomize_(model.rwkv, seed=1)
    g = torch.Generator().manual_seed(2)
    for p in list(model.vit.parameters()) + [model.proj.weight]: p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    prompt = [5, 9, IMAGE_TOKEN_INDEX, 7, 3, 11]
    image = torch.randn(3, 28, 28, generator=g)
    out = model([prompt], [image])                                            # bidirectional scans over the patches
    step, _ = bench.rwkv_decoder(model.rwkv, out.logits[:, -1], out.state)
    outs, fed = greedy_continuation(step, out.logits[:, -1], 5)
    full = model([prompt + fed[0].tolist()], [image]).logits                   # [1, T + 5, vocab]
    torch.testing.assert_close(outs, full[:, -5:], atol=TOL, rtol=TOL)


@torch.no_grad()
def test_llama_decode_step_on_the_static_cache_equals_the_full_forward():
    model = bench.build_llama(bench.PRESETS["tiny"]["llama"], torch.device("cpu"), torch.float32)
    ids = torch.randint(0, 512, (2, 29), generator=torch.Generator().manual_seed(4))
    first, cache = bench.llama_prefill(model, ids, cache_len=29 + 6)
    full_prompt = model(ids).logits
    torch.testing.assert_close(first, full_prompt[:, -1], atol=TOL, rtol=TOL)
    step, _ = bench.llama_decoder(model, first, cache)
    outs, fed = greedy_continuation(step, first, 6)
    full = model(torch.cat([ids, fed], 1)).logits                              # no cache: plain causal attention
    torch.testing.assert_close(outs, full[:, 29:], atol=TOL, rtol=TOL)


def test_a_run_cut_short_keeps_the_points_it_measured(tmp_path, monkeypatch):
    measured = bench.measure_point
    def rwkv_only(kind, *args):
        if kind == "llama": raise RuntimeError("cut short")
        return measured(kind, *args)
    monkeypatch.setattr(bench, "measure_point", rwkv_only)
    with pytest.raises(RuntimeError, match="cut short"):
        bench.main(["--preset", "tiny", "--out", str(tmp_path), "--lengths", "64,128", "--batches", "1", "--steps", "2"])
    report = json.loads((tmp_path / "efficiency.json").read_text())
    assert [(p["model"], p["ctx"]) for p in report["points"]] == [("rwkv", 64), ("rwkv", 128)]
