"""scripts/train.py: two-stage DeepSpeed training with 2 CPU processes (gloo), checkpoints, resume, bad data; helpers."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from visualrwkv.data import make_toy_llava
from visualrwkv.model import load_visualrwkv, next_token_loss, visualrwkv_state_dict
from visualrwkv.prompts import IGNORE_INDEX
from visualrwkv.rwkv import read_state_dict

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("train_script", REPO / "scripts" / "train.py")
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)
spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "scripts" / "evaluate.py")
evaluate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(evaluate)

COMMON = ["--toy", "--ctx-len", "128", "--batch-size", "8", "--micro-batch", "4", "--steps", "4", "--save-every", "2"]


def torchrun(*args, timeout=240, expect_failure=False):
    """Run scripts/train.py in 2 CPU processes; returns stdout + stderr, fails the test with them on an unexpected exit."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "scripts" / "train.py"), *map(str, args)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    log = done.stdout + done.stderr
    assert (done.returncode != 0) == expect_failure, log[-6000:]
    return log


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Stage 1 on toy data with a corrupt image, stage 2 from its checkpoint, and stage 2 resumed from its step 2."""
    root = tmp_path_factory.mktemp("train")
    paths = make_toy_llava(root / "toy_data", n_samples=24, seed=0, n_eval=4)
    stage1 = json.loads(paths["stage1"].read_text())
    corrupt = root / "toy_data" / stage1[5]["image"]
    corrupt.write_bytes(corrupt.read_bytes()[:100])                                  # a truncated PNG
    logs = {"stage1": torchrun("--stage", 1, "--out", root / "stage1", "--data", paths["stage1"], "--lr", "1e-2",
                               *COMMON)}
    logs["stage2"] = torchrun("--stage", 2, "--out", root / "stage2", "--data", paths["stage2"], "--lr", "3e-3",
                              "--init", root / "stage1" / "visualrwkv.pth", *COMMON)
    logs["resumed"] = torchrun("--stage", 2, "--out", root / "resumed", "--data", paths["stage2"], "--lr", "3e-3",
                               "--resume", root / "stage2" / "checkpoints" / "step-000002", *COMMON)
    return root, logs, stage1[5]["id"]


def test_stage1_trains_only_the_projector(runs):
    root, logs, _ = runs
    rows = metrics(root / "stage1")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)
    early = read_state_dict(root / "stage1" / "checkpoints" / "step-000002" / "visualrwkv.pth")
    final = read_state_dict(root / "stage1" / "visualrwkv.pth")
    assert early.keys() == final.keys()
    for k in final:
        same = torch.equal(early[k], final[k])
        assert same != (k == "proj.weight"), k                    # the projector moved, nothing else did


def test_stage2_from_stage1_trains_lm_and_projector_and_loss_falls(runs):
    root, logs, _ = runs
    rows = metrics(root / "stage2")
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3, [r["loss"] for r in rows]
    start = read_state_dict(root / "stage1" / "visualrwkv.pth")
    final = read_state_dict(root / "stage2" / "visualrwkv.pth")
    for k in final:
        assert torch.equal(start[k], final[k]) == k.startswith("vit."), k          # the tower stays frozen
    lrs = [r["lr"] for r in rows]
    assert lrs[0] == pytest.approx(3e-3) and all(a > b > 1.5e-5 for a, b in zip(lrs, lrs[1:]))   # cosine decay


def test_checkpoints_load_with_weights_only(runs):
    root, _, _ = runs
    folder = root / "stage2" / "checkpoints" / "step-000004"
    assert (root / "stage2" / "checkpoints" / "latest").read_text() == "step-000004"
    for rank in (0, 1):
        state = torch.load(folder / f"train_state-rank{rank}.pth", weights_only=True, map_location="cpu")
        assert state["step"] == 4 and state["rank"] == rank and state["world_size"] == 2
        assert state["optimizer"]["kind"] == "zero" and state["optimizer"]["master"][0].dtype == torch.float32
    model = load_visualrwkv(folder / "visualrwkv.pth", **json.loads((root / "stage2" / "model_config.json").read_text()))
    assert model.n_image_tokens == 17 and not any(p.requires_grad for p in model.vit.parameters())


def test_resume_continues_at_the_right_step_and_matches(runs):
    root, logs, _ = runs
    assert "resumed from" in logs["resumed"] and "at step 2" in logs["resumed"]
    resumed, straight = metrics(root / "resumed"), metrics(root / "stage2")
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(resumed, straight[2:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["lr"] == pytest.approx(b["lr"], rel=1e-9)
    final_a = read_state_dict(root / "resumed" / "visualrwkv.pth")
    final_b = read_state_dict(root / "stage2" / "visualrwkv.pth")
    for k in final_b: torch.testing.assert_close(final_a[k], final_b[k], rtol=1e-5, atol=1e-6)


def test_a_corrupt_image_does_not_stop_training(runs):
    root, logs, bad_id = runs
    assert f"skipping sample {bad_id!r}: corrupt image" in logs["stage1"]
    rows = metrics(root / "stage1")
    assert rows[-1]["skipped"] >= 1 and rows[-1]["step"] == 4
    assert "samples skipped" in logs["stage1"]


def test_mostly_corrupt_images_stop_training_with_a_clear_error(tmp_path):
    paths = make_toy_llava(tmp_path / "toy_data", n_samples=12, seed=1, n_eval=1)
    for image in sorted(paths["images"].glob("*.png"))[:9]: image.write_bytes(b"not a png")
    log = torchrun("--stage", 1, "--out", tmp_path / "run", "--data", paths["stage1"], "--toy", "--ctx-len", "128",
                   "--batch-size", "4", "--micro-batch", "2", "--steps", "3", expect_failure=True)
    assert "ValueError" in log and "samples are bad (more than 50%)" in log and "corrupt image" in log


# ------------------------------------------------------------------ helpers, in this process
def test_lr_schedule_warmup_then_cosine():
    lrs = [train.lr_at(s, 100, 1e-3, 1e-5, warmup=10) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-3)
    assert lrs[55] == pytest.approx((1e-3 + 1e-5) / 2) and lrs[100] == pytest.approx(1e-5)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_sample_level_loss_matches_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 9, 11
    logits = torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :6] = IGNORE_INDEX; labels[1, 2:] = IGNORE_INDEX; labels[2, ::2] = IGNORE_INDEX
    per_sample = []
    for b in range(B):
        terms = [-torch.log_softmax(logits[b, t].double(), -1)[labels[b, t + 1]] for t in range(T - 1)
                 if labels[b, t + 1] != IGNORE_INDEX]
        per_sample.append(sum(terms) / len(terms))
    expected = sum(per_sample) / B                                     # Appendix D: each sample weighs the same
    torch.testing.assert_close(train.sample_level_loss(logits, labels).double(), expected, rtol=1e-6, atol=1e-6)
    alone = [train.sample_level_loss(logits[b:b + 1], labels[b:b + 1]) for b in range(B)]
    torch.testing.assert_close(train.sample_level_loss(logits, labels), torch.stack(alone).mean())
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(1).tolist()
    batch_level = sum(per_sample[b] * n for b, n in enumerate(counts)) / sum(counts)   # every token weighs the same
    torch.testing.assert_close(train.batch_level_loss(logits, labels).double(), batch_level, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(train.batch_level_loss(logits, labels), next_token_loss(logits, labels))
    grad = torch.autograd.grad(train.sample_level_loss(logits.requires_grad_(), labels), logits)[0]
    assert grad[labels.roll(-1, 1) == IGNORE_INDEX].abs().max() == 0                  # unsupervised rows get no gradient


def test_skip_decisions_without_a_process_group():
    assert train.agree_to_skip(torch.tensor(2.0), empty=False) == (False, False)
    assert train.agree_to_skip(torch.tensor(float("nan")), empty=False) == (False, True)
    assert train.agree_to_skip(torch.tensor(float("inf")), empty=False) == (False, True)
    assert train.agree_to_skip(None, empty=True) == (True, False)


@pytest.mark.parametrize("n,world,micro", [(10, 2, 3), (7, 2, 4), (16, 1, 5)])
def test_epoch_batches_cover_the_data_evenly(n, world, micro):
    per_rank = [train.epoch_batches(n, 1, 0, r, world, micro) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1                         # every rank runs as many micro-batches
    flat = [i for batches in per_rank for b in batches for i in b]
    assert sorted(set(flat)) == list(range(n)) and len(flat) == n + (-n) % world
    assert per_rank[0] != train.epoch_batches(n, 2, 0, 0, world, micro) or n < 3     # reshuffled each epoch


def test_ds_config_and_argument_errors():
    args = train.parse_args(["--toy", "--stage", "2", "--out", "x", "--batch-size", "12", "--micro-batch", "2"])
    assert (args.lr, args.lr_end, args.epochs) == (6e-5, 1.5e-5, 2.0)              # Table 6, 1.6B fine-tuning
    cfg = train.ds_config(args, world=2, dtype=torch.float32)
    assert cfg["gradient_accumulation_steps"] == 3 and cfg["bf16"]["enabled"] is False
    assert cfg["zero_optimization"]["stage"] == 1 and cfg["gradient_clipping"] == 1.0
    assert train.ds_config(args, world=2, dtype=torch.bfloat16)["bf16"]["enabled"] is True
    with pytest.raises(ValueError, match="not a multiple of --micro-batch"):
        train.ds_config(args, world=5, dtype=torch.float32)
    with pytest.raises(SystemExit): train.parse_args(["--stage", "1", "--out", "x"])          # no weights given


def test_tower_from_open_clip_or_visualrwkv_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = train.VisualRWKV(train.RWKV6Config(vocab_size=50, n_layer=1, n_embd=32, head_size=16, lora_mix=4,
                                               lora_decay=4), train.TOY_VISION)
    with torch.no_grad():
        for p in model.vit.parameters(): p.add_(torch.randn_like(p))             # not the default init
    train.save_visualrwkv(model, tmp_path / "visualrwkv.pth")
    torch.save({f"visual.{k}": v for k, v in model.vit.visual.state_dict().items()}, tmp_path / "open_clip.pth")
    for name in ("visualrwkv.pth", "open_clip.pth"):
        tower = train.load_tower(tmp_path / name, head_width=16, quick_gelu=True)
        assert tower.cfg == train.TOY_VISION
        for k, v in model.vit.visual.state_dict().items(): assert torch.equal(tower.visual.state_dict()[k], v), (name, k)


def test_evaluate_writes_answers_for_the_trained_model(runs):
    root, _, _ = runs
    summary = evaluate.main(["--model", str(root / "stage2" / "visualrwkv.pth"),
                             "--data", str(root / "toy_data" / "eval.jsonl"), "--max-new-tokens", "4"])
    rows = [json.loads(line) for line in (root / "stage2" / "answers.jsonl").read_text().splitlines()]
    assert summary["n"] == len(rows) == 4 and summary["skipped"] == 0
    assert summary["accuracy"] == sum(r["correct"] for r in rows) / 4
    assert all(r["correct"] == (evaluate.normalize_answer(r["answer"]) == evaluate.normalize_answer(r["reference"]))
               for r in rows)


@pytest.mark.parametrize("text,expected", [("Red", "red"), ("The red.", "red"), ("  a Circle!", "circle"),
                                           ("Three.", "3"), ("on the  left", "on left"), ("3.5", "3.5"),
                                           ("1,000", "1000"), ("yes, it is", "yes it is")])
def test_normalize_answer(text, expected):
    assert evaluate.normalize_answer(text) == expected


def test_question_only_baseline():
    rows = [dict(question="q1", reference="Red"), dict(question="q1", reference="red."),
            dict(question="q1", reference="Blue"), dict(question="q2", reference="Left")]
    assert evaluate.question_only_baseline(rows) == 3 / 4              # 'red' for q1 (2 of 3), 'left' for q2


def test_a_non_finite_loss_skips_the_step_and_keeps_the_weights_finite(tmp_path, monkeypatch):
    """One process, in this interpreter: the 2nd micro-batch's loss is NaN; it is skipped, the run goes on."""
    for key, value in dict(DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29000 + os.getpid() % 1000)).items():
        monkeypatch.setenv(key, value)
    paths = make_toy_llava(tmp_path / "toy_data", n_samples=12, seed=2, n_eval=1)
    calls, real_loss = [], train.sample_level_loss
    def loss_with_a_nan(logits, labels):
        calls.append(1)
        loss = real_loss(logits, labels)
        return loss * float("nan") if len(calls) == 2 else loss
    monkeypatch.setattr(train, "sample_level_loss", loss_with_a_nan)
    with pytest.warns(UserWarning, match="micro-batch 2 skipped on all processes \\(non-finite loss\\)"):
        train.main(["--toy", "--stage", "2", "--out", str(tmp_path / "run"), "--data", str(paths["stage2"]),
                    "--ctx-len", "128", "--batch-size", "2", "--micro-batch", "2", "--steps", "3", "--zero", "0"])
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["nonfinite"] == 1 and len(calls) == 4
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert all(torch.isfinite(v).all() for v in read_state_dict(tmp_path / "run" / "visualrwkv.pth").values())


def test_one_bf16_step_through_the_kernel_equals_float32(tmp_path):
    """The trainer's GPU path on the CPU: DeepSpeed's bf16 mode with the Triton WKV kernel (TRITON_INTERPRET=1) takes
    the same first step as float32 through the chunked form: the same loss to bf16 precision and the same update of
    the weights to within 10% of its size (Adam's first step is lr * sign(g) where g is not tiny)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    one_step = ["--toy", "--stage", "2", "--toy-samples", "16", "--ctx-len", "96", "--batch-size", "2",
                "--micro-batch", "2", "--steps", "1", "--lr", "1e-2"]
    for name, precision, impl in (("bf16", "bf16", "triton"), ("fp32", "fp32", "chunked")):
        done = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *one_step, "--out", tmp_path / name,
                               "--precision", precision, "--wkv-impl", impl], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        assert f"{'bfloat16' if name == 'bf16' else 'float32'} on the CPU" in done.stdout
    (bf16,), (fp32,) = metrics(tmp_path / "bf16"), metrics(tmp_path / "fp32")
    assert abs(bf16["loss"] - fp32["loss"]) < 1e-3 * fp32["loss"]
    args = train.parse_args(one_step + ["--out", str(tmp_path / "init")])
    args.resume_dir = None
    init = visualrwkv_state_dict(train.build_model(args, train.model_config(args)))
    after = {name: read_state_dict(tmp_path / name / "visualrwkv.pth") for name in ("bf16", "fp32")}
    assert after["bf16"]["rwkv.head.weight"].dtype == torch.bfloat16
    keys = [k for k in init if not k.startswith("vit.")]                           # the tower is frozen
    step = {name: torch.cat([(sd[k].double() - init[k].double()).flatten() for k in keys]) for name, sd in after.items()}
    assert step["fp32"].norm() > 1
    assert (step["bf16"] - step["fp32"]).norm() < 0.1 * step["fp32"].norm()
