"""Training (visualrwkv.train through scripts/train.py): two stages with 2 CPU processes (gloo), checkpoints, resume on
another number of processes and after SIGKILL, refusals, bad input files; helpers in this process."""
import contextlib
import importlib.util
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import psutil
import pytest
import torch

import visualrwkv.train as T
from visualrwkv.data import make_toy_llava
from visualrwkv.checkpoint import load_visualrwkv, save_visualrwkv, visualrwkv_state_dict
from visualrwkv.model import VisualRWKV, next_token_loss
from visualrwkv.prompts import IGNORE_INDEX
from visualrwkv.rwkv import RWKV6Config, read_state_dict

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("train_script", REPO / "scripts" / "train.py")
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)
spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "scripts" / "evaluate.py")
evaluate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(evaluate)

COMMON = ["--toy", "--ctx-len", "128", "--batch-size", "8", "--micro-batch", "4", "--steps", "4", "--save-every", "2"]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}


def torchrun_cmd(*args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            str(REPO / "scripts" / "train.py"), *map(str, args)]


def torchrun(*args, timeout=240, expect_failure=False, nproc=2):
    """Run scripts/train.py in `nproc` CPU processes (1: plain python); returns stdout + stderr, fails the test with
    them on an unexpected exit."""
    cmd = torchrun_cmd(*args, nproc=nproc) if nproc > 1 else [sys.executable, str(REPO / "scripts" / "train.py"),
                                                              *map(str, args)]
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    log = done.stdout + done.stderr
    assert (done.returncode != 0) == expect_failure, log[-6000:]
    return log


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Stage 1 on toy data with a corrupt image, stage 2 from its checkpoint (2 processes each), and stage 2 resumed
    from its step-2 checkpoint by 1 process."""
    root = tmp_path_factory.mktemp("train")
    paths = make_toy_llava(root / "toy_data", n_samples=24, seed=0, n_eval=4)
    stage1 = json.loads(paths["stage1"].read_text())
    corrupt = root / "toy_data" / stage1[5]["image"]
    corrupt.write_bytes(corrupt.read_bytes()[:100])                                  # a truncated PNG
    logs = {"stage1": torchrun("--stage", 1, "--out", root / "stage1", "--data", paths["stage1"], "--lr", "1e-2",
                               *COMMON)}
    logs["stage2"] = torchrun(*stage2_args(root), *COMMON)
    logs["resumed"] = torchrun("--stage", 2, "--out", root / "resumed", "--data", paths["stage2"], "--lr", "3e-3",
                               "--no-l2wrap", "--resume", root / "stage2" / "checkpoints" / "step-000002", *COMMON,
                               nproc=1)
    return root, logs, stage1[5]["id"]


def stage2_args(root, out="stage2"):
    """Stage 2 without L2Wrap: its push is summed over accumulated micro-batches (as official), so it is the one term
    that changes when 1 process accumulates what 2 processes did; without it a resume on 1 process is exact."""
    return ["--stage", 2, "--out", root / out, "--data", root / "toy_data" / "stage2.json", "--lr", "3e-3",
            "--init", root / "stage1" / "visualrwkv.pth", "--no-l2wrap"]


@pytest.fixture
def one_process(monkeypatch):
    """This interpreter as a process group of one (a fresh port each time)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    for key, value in dict(DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(key, value)


def cli(argv):
    """scripts/train.py's main in this process: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try: train.main([str(a) for a in argv]); code = 0
        except SystemExit as e: code = e.code
    return code, err.getvalue()


# ------------------------------------------------------------------ two stages, 2 processes
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
    for k in final:                                 # the tower and the embedding stay frozen (official train.py)
        assert torch.equal(start[k], final[k]) == (k.startswith("vit.") or k == "rwkv.emb.weight"), k
    lrs = [r["lr"] for r in rows]
    assert lrs[0] == pytest.approx(3e-3) and all(a > b > 1.5e-5 for a, b in zip(lrs, lrs[1:]))   # cosine decay


def test_stage_defaults_and_model_config_beside_every_checkpoint(runs):
    """Stage 1 puts the image first, stage 2 in the middle (official rwkv1b5_pretrain.sh / rwkv1b5_mix665k.sh), even
    though stage 2 starts from stage 1's checkpoint; every saved model has its model_config.json, which evaluation
    reads."""
    root, logs, _ = runs
    for stage, position in (("stage1", "first"), ("stage2", "middle")):
        top = json.loads((root / stage / "model_config.json").read_text())
        assert top["image_position"] == position and top["grid_size"] == -1 and top["vision_head_width"] == 16
        for step in ("step-000002", "step-000004"):
            assert json.loads((root / stage / "checkpoints" / step / "model_config.json").read_text()) == top
    args = evaluate.parse_args(["--model", str(root / "stage1" / "checkpoints" / "step-000002" / "visualrwkv.pth"),
                                "--data", "unused.jsonl", "--device", "cpu"])
    assert evaluate.load_model(args).image_position == "first"
    assert "image first" in logs["stage1"] and "image middle" in logs["stage2"]


def test_checkpoints_load_with_weights_only(runs):
    """train_state.pth: every trainable parameter's fp32 weights and Adam moments as full tensors keyed by name (the
    same whatever the number of processes), Adam's step count, progress and run settings; rng-rank{r}.pth per process;
    a manifest of sizes and checksums; all with torch.load(weights_only=True)."""
    root, _, _ = runs
    folder = root / "stage2" / "checkpoints" / "step-000004"
    assert (root / "stage2" / "checkpoints" / "latest").read_text() == "step-000004"
    state = torch.load(folder / "train_state.pth", weights_only=True, map_location="cpu")
    assert state["step"] == 4 and state["world_size"] == 2 and state["adam_step"] == 4
    model = load_visualrwkv(folder / "visualrwkv.pth", **json.loads((folder / "model_config.json").read_text()))
    T.set_trainable(model, stage=2)
    named = dict(model.named_parameters())
    assert set(state["params"]) == set(T.trainable_names(model)) and "rwkv.emb.weight" not in state["params"]
    for name, saved in state["params"].items():
        assert set(saved) == {"fp32", "exp_avg", "exp_avg_sq"} and saved["fp32"].dtype == torch.float32
        assert saved["fp32"].shape == named[name].shape and torch.equal(saved["fp32"], named[name].detach())
        assert (saved["exp_avg_sq"] >= 0).all()
    for rank in (0, 1): torch.load(folder / f"rng-rank{rank}.pth", weights_only=True)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == {"visualrwkv.pth", "model_config.json", "train_state.pth", "rng-rank0.pth",
                                      "rng-rank1.pth"}
    assert model.n_image_tokens == 17 and not any(p.requires_grad for p in model.vit.parameters())
    assert sorted(p.name for p in (root / "stage2" / "checkpoints").iterdir()) == ["latest", "step-000002", "step-000004"]
    assert os.path.samefile(root / "stage2" / "visualrwkv.pth", folder / "visualrwkv.pth")   # written once


def test_resume_continues_at_the_right_step_and_matches(runs):
    """Saved by 2 processes, resumed by 1 (accumulating 2 micro-batches where 2 processes took one each): the same
    samples per step, the same losses and weights as the 2-process run that went on."""
    root, logs, _ = runs
    assert "resumed from" in logs["resumed"] and "at step 2" in logs["resumed"]
    assert "saved by 2 processes, now 1" in logs["resumed"]
    resumed, straight = metrics(root / "resumed"), metrics(root / "stage2")
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(resumed, straight[2:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["lr"] == pytest.approx(b["lr"], rel=1e-9)
        assert a["samples"] == b["samples"]
    final_a = read_state_dict(root / "resumed" / "visualrwkv.pth")
    final_b = read_state_dict(root / "stage2" / "visualrwkv.pth")
    for k in final_b: torch.testing.assert_close(final_a[k], final_b[k], rtol=1e-5, atol=1e-6)


def test_summary_and_curves(runs):
    root, _, _ = runs
    summary = json.loads((root / "stage2" / "summary.json").read_text())
    rows = metrics(root / "stage2")
    assert summary["steps"] == 4 and summary["processes"] == 2 and summary["last_loss"] == rows[-1]["loss"]
    assert (root / "stage2" / "curves.png").stat().st_size > 10_000


def test_sigkill_then_resume_auto_matches_the_uninterrupted_run(runs, tmp_path):
    """Kill every process of a 2-process run (SIGKILL) once its step-2 checkpoint has landed and step 3 is logged;
    `--resume auto` goes on from step 2: every step's loss equals the uninterrupted run's, each step logged once."""
    root, _, _ = runs
    out = tmp_path / "killed"
    args = [*stage2_args(root, out=out), *COMMON]
    run = subprocess.Popen(torchrun_cmd(*args), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    latest, t0 = out / "checkpoints" / "latest", time.time()
    def logged(step): return (out / "metrics.jsonl").is_file() and f'"step": {step},' in (out / "metrics.jsonl").read_text()
    while not (latest.is_file() and logged(3)):
        assert run.poll() is None and time.time() - t0 < 200, "the run ended before it could be killed"
        time.sleep(0.01)
    processes = [psutil.Process(run.pid), *psutil.Process(run.pid).children(recursive=True)]
    for p in processes:                               # torchrun starts each worker in its own session
        with contextlib.suppress(ProcessLookupError): os.killpg(p.pid, signal.SIGKILL)
    run.wait()
    assert latest.read_text() == "step-000002" and [r["step"] for r in metrics(out)] == [1, 2, 3]
    log = torchrun(*args, "--resume", "auto")
    assert "resumed from" in log and "step-000002 at step 2" in log
    resumed, straight = metrics(out), metrics(root / "stage2")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(resumed, straight): assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), (a, b)


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
    assert f"error: {paths['stage1']}" in log and "samples are bad (more than 50%)" in log and "corrupt image" in log


# ------------------------------------------------------------------ resume: refusals, changes, broken checkpoints
def copy_run(root, tmp_path, name="stage2"):
    shutil.copytree(root / name, tmp_path / name)
    return tmp_path / name


def test_resume_refuses_changed_settings_unless_allowed(runs, tmp_path, one_process):
    root, _, _ = runs
    now = T.run_settings(T.resolve_config(T.TrainConfig(stage=2, out="x", toy=True, batch_size=8, steps=4, lr=3e-3,
                                                        l2wrap=False)),
                         root / "toy_data" / "stage2.json", total=4)
    saved = torch.load(root / "stage2" / "checkpoints" / "step-000002" / "train_state.pth", weights_only=True)["run"]
    assert saved == {**now, "ctx_len": 128}
    for key, flag in (("batch_size", "--batch-size"), ("steps", "--steps"), ("data", "--data")):
        changed = {**saved, key: "other"}
        with pytest.raises(T.RunError, match=f"changes {flag}.*--allow-changes"): T.check_resume(saved, changed, False)
        assert len(T.check_resume(saved, changed, allow_changes=True)) == 1
    with pytest.raises(T.RunError, match="--stage 2 -> 1"): T.check_resume(saved, {**saved, "stage": 1}, True)
    resume = ["--resume", root / "stage2" / "checkpoints" / "step-000004", "--data", root / "toy_data" / "stage2.json",
              "--lr", "3e-3", "--no-l2wrap", *COMMON[:-4], "--steps", "6"]
    code, err = cli(["--stage", 2, "--out", tmp_path / "more", *resume])
    assert code == 2 and err.strip().splitlines() == [
        "error: --resume: this run changes --steps (total steps) 4 -> 6 from the checkpoint's; rerun with the saved "
        "values, or pass --allow-changes to continue with the new ones"]
    code, err = cli(["--stage", 2, "--out", tmp_path / "more", *resume, "--allow-changes"])
    assert code == 0, err
    rows = metrics(tmp_path / "more")
    # the new schedule at step 4 of 6, not the restored lr of 4 of 4: cos(4/6 pi) = -1/2, so
    # 1.5e-5 + (3e-3 - 1.5e-5) / 2 * (1 - 1/2) = 1.5e-5 + 2.985e-3 / 4 = 7.6125e-4
    assert [r["step"] for r in rows] == [5, 6]
    assert rows[0]["lr"] == pytest.approx(7.6125e-4, rel=1e-12)


def test_an_out_with_checkpoints_is_refused_unless_overwrite(runs, tmp_path, one_process):
    root, _, _ = runs
    out = copy_run(root, tmp_path)
    args = ["--stage", 2, "--out", out, "--data", root / "toy_data" / "stage2.json", "--init",
            root / "stage1" / "visualrwkv.pth", *COMMON[:-4], "--steps", "1"]
    code, err = cli(args)
    assert code == 2 and "holds checkpoints of an earlier run" in err and len(err.strip().splitlines()) == 1
    code, err = cli(args + ["--overwrite"])
    assert code == 0, err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-000001"]
    assert [r["step"] for r in metrics(out)] == [1]


def test_a_broken_checkpoint_is_named_and_auto_falls_back(runs, tmp_path, one_process):
    root, _, _ = runs
    out = copy_run(root, tmp_path)
    state = out / "checkpoints" / "step-000004" / "train_state.pth"
    state.write_bytes(state.read_bytes()[:1000])                                   # truncated
    with pytest.warns(UserWarning, match=f"skipping a broken checkpoint: {state}: .* bytes, the manifest says"):
        assert T.find_resume("auto", out) == out / "checkpoints" / "step-000002"
    with pytest.raises(T.CheckpointError, match=f"{state}: .*truncated"): T.find_resume(str(state.parent), out)
    (out / "checkpoints" / "step-000002" / "manifest.json").unlink()             # never finished
    with pytest.warns(UserWarning), pytest.raises(T.CheckpointError, match="no intact checkpoint"):
        T.find_resume("auto", out)
    # a file that passes the manifest but holds a pickled object: refused by weights_only, named, without torch's advice
    folder = out / "checkpoints" / "step-000004"
    torch.save({"format": T.STATE_FORMAT, "oops": Path("x")}, folder / "train_state.pth")
    T.write_manifest(folder, 4)
    code, err = cli(["--stage", 2, "--out", tmp_path / "r", "--resume", folder, "--data",
                     root / "toy_data" / "stage2.json", "--lr", "3e-3", "--no-l2wrap", *COMMON])
    assert code == 2 and err.strip().splitlines() == [
        f"error: {folder / 'train_state.pth'}: holds pickled Python objects, not only tensors and numbers (refused: "
        "loading it could run code)"]


@pytest.mark.parametrize("name,content,expected", [
    ("missing.json", None, "not found"),
    ("truncated.json", '[{"id": "a", "conversations": [', "cannot read the LLaVA records"),
    ("strings.json", '["hello", "world"]', "no record has a 'conversations' key"),
    ("one_string.json", '[{"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", '
                        '"value": "yo"}]}, "a bare string"]', "cannot read the LLaVA records")])
def test_bad_data_files_end_in_one_error_line(tmp_path, one_process, name, content, expected):
    data = tmp_path / name
    if content is not None: data.write_text(content)
    code, err = cli(["--stage", 1, "--toy", "--out", tmp_path / "run", "--data", data, "--steps", 1, "--batch-size", 1])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {data}") and expected in lines[0], err


def test_the_command_line_exits_with_code_2_and_one_line(tmp_path):
    """The same through a real process: no traceback, exit code 2."""
    data = tmp_path / "truncated.json"
    data.write_text('[{"id": "a", "conversations": [')
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--stage", "1", "--toy", "--out",
                           str(tmp_path / "run"), "--data", str(data), "--steps", "1", "--batch-size", "1"],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: {data}: cannot read the LLaVA records (") and len(line) < 250, line


# ------------------------------------------------------------------ helpers, in this process
def test_lr_schedule_warmup_then_cosine():
    lrs = [T.lr_at(s, 100, 1e-3, 1e-5, warmup=10) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-3)
    assert lrs[55] == pytest.approx((1e-3 + 1e-5) / 2) and lrs[100] == pytest.approx(1e-5)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_sample_level_loss_matches_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    B, T_, V = 3, 9, 11
    logits = torch.randn(B, T_, V, generator=g)
    labels = torch.randint(0, V, (B, T_), generator=g)
    labels[0, :6] = IGNORE_INDEX; labels[1, 2:] = IGNORE_INDEX; labels[2, ::2] = IGNORE_INDEX
    per_sample = []
    for b in range(B):
        terms = [-torch.log_softmax(logits[b, t].double(), -1)[labels[b, t + 1]] for t in range(T_ - 1)
                 if labels[b, t + 1] != IGNORE_INDEX]
        per_sample.append(sum(terms) / len(terms))
    expected = sum(per_sample) / B                                     # Appendix D: each sample weighs the same
    torch.testing.assert_close(T.sample_level_loss(logits, labels).double(), expected, rtol=1e-6, atol=1e-6)
    alone = [T.sample_level_loss(logits[b:b + 1], labels[b:b + 1]) for b in range(B)]
    torch.testing.assert_close(T.sample_level_loss(logits, labels), torch.stack(alone).mean())
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(1).tolist()
    batch_level = sum(per_sample[b] * n for b, n in enumerate(counts)) / sum(counts)   # every token weighs the same
    torch.testing.assert_close(T.batch_level_loss(logits, labels).double(), batch_level, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(T.batch_level_loss(logits, labels), next_token_loss(logits, labels))
    grad = torch.autograd.grad(T.sample_level_loss(logits.requires_grad_(), labels), logits)[0]
    assert grad[labels.roll(-1, 1) == IGNORE_INDEX].abs().max() == 0                  # unsupervised rows get no gradient


def test_l2wrap_gradient_matches_a_hand_worked_case():
    """Official src/model.py L2Wrap on logits [B=1, T=2, V=3]: factor 1e-4 / (B*T) = 5e-5; the largest logit of each
    position gets max * factor: 5 * 5e-5 = 2.5e-4 at [0, 0, 1], -2 * 5e-5 = -1e-4 at [0, 1, 0]. The loss's own
    gradient passes through scaled by the incoming gradient (0.5 here); L2Wrap's part is not scaled (as official)."""
    y = torch.tensor([[[1.0, 5.0, 2.0], [-2.0, -3.0, -4.0]]], requires_grad=True)
    w = torch.tensor([[[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]])
    loss = T.l2wrap((y * w).sum(), y)
    assert loss.item() == pytest.approx((y * w).sum().item())                 # the forward value is unchanged
    (0.5 * loss).backward()
    expected = 0.5 * w + torch.tensor([[[0.0, 2.5e-4, 0.0], [-1e-4, 0.0, 0.0]]])
    torch.testing.assert_close(y.grad, expected, rtol=0, atol=1e-9)


def test_freezing_follows_the_official_train_py():
    """Tower always frozen, embedding always frozen (freeze_emb), stage 1 the projector only (freeze_rwkv = n_layer),
    stage 2 everything else, --freeze-proj the projector too (7B stage-2 script)."""
    torch.manual_seed(0)
    model = VisualRWKV(RWKV6Config(vocab_size=50, n_layer=2, n_embd=32, head_size=16, lora_mix=4, lora_decay=4),
                       T.TOY_VISION)
    everything = [n for n, _ in model.named_parameters()]
    T.set_trainable(model, stage=1)
    assert T.trainable_names(model) == ["proj.weight"]
    T.set_trainable(model, stage=2)
    assert T.trainable_names(model) == [n for n in everything if not n.startswith("vit.") and n != "rwkv.emb.weight"]
    T.set_trainable(model, stage=2, freeze_proj=True)
    assert "proj.weight" not in T.trainable_names(model) and "rwkv.head.weight" in T.trainable_names(model)
    with pytest.raises(T.RunError, match="leaves nothing to train"): T.set_trainable(model, stage=1, freeze_proj=True)


def test_grad_cp_gives_the_same_gradients():
    """Gradient checkpointing per block recomputes the blocks in the backward pass: the same gradients, the same names."""
    torch.manual_seed(0)
    model = VisualRWKV(RWKV6Config(vocab_size=50, n_layer=3, n_embd=32, head_size=16, lora_mix=4, lora_decay=4),
                       T.TOY_VISION)
    T.set_trainable(model, stage=2)
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, 50, (9,), generator=g).tolist(), torch.randint(0, 50, (5,), generator=g).tolist()]
    ids[0][2] = -200
    images = [torch.randn(3, 32, 32, generator=g), None]
    def grads():
        model.zero_grad()
        out = model(ids, images, ids)
        T.l2wrap(T.sample_level_loss(out.logits, out.labels), out.logits).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    keys = list(model.state_dict())
    plain = grads()
    T.checkpoint_blocks(model)
    checkpointed = grads()
    assert list(model.state_dict()) == keys and plain.keys() == checkpointed.keys()
    for n in plain: torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-6, atol=1e-7, msg=n)


def test_skip_decisions_without_a_process_group():
    assert T.agree_to_skip(torch.tensor(2.0), empty=False)[:2] == (False, False)
    assert T.agree_to_skip(torch.tensor(float("nan")), empty=False)[:2] == (False, True)
    assert T.agree_to_skip(torch.tensor(float("inf")), empty=False)[:2] == (False, True)
    assert T.agree_to_skip(None, empty=True)[:2] == (True, False)
    assert T.agree_to_skip(torch.tensor(2.0), False, [3, 0.5]).sums == [3, 0.5]      # statistics ride along


@pytest.mark.parametrize("n,batch,micro", [(10, 4, 2), (7, 4, 1), (16, 8, 4), (5, 6, 3)])
def test_micro_batches_cover_the_data_and_do_not_depend_on_the_number_of_processes(n, batch, micro):
    per_epoch = T.epoch_micro_batches(n, 1, 0, batch, micro)
    flat = [i for b in per_epoch for i in b]
    assert sorted(set(flat)) == list(range(n)) and len(flat) == math.ceil(n / batch) * batch
    assert T.epoch_micro_batches(n, 2, 0, batch, micro) != per_epoch or n < 3          # reshuffled each epoch
    steps = 3 * math.ceil(n / batch)
    def samples_per_step(world, start=0):
        gas = batch // (micro * world)
        streams = [iter(T.MicroBatchStream(n, 0, batch, micro, r, world, start)) for r in range(world)]
        return [sorted(i for _ in range(gas) for s in streams for i in next(s)) for _ in range(steps)]
    alone = samples_per_step(1)
    for world in (w for w in (2, 4) if batch % (micro * w) == 0):
        assert samples_per_step(world) == alone
        assert samples_per_step(world, start=batch // micro)[:-1] == alone[1:]         # resumed after step 1


def test_ds_config_and_argument_errors():
    args = train.parse_args(["--toy", "--stage", "2", "--out", "x", "--batch-size", "12", "--micro-batch", "2"])
    assert (args.lr, args.lr_end, args.epochs) == (6e-5, 1.5e-5, 2.0)              # Table 6, 1.6B fine-tuning
    assert args.ctx_len == 2048 and train.parse_args(["--toy", "--stage", "1", "--out", "x"]).ctx_len == 1024
    cfg = T.ds_config(args, world=2, dtype=torch.float32)
    assert cfg["gradient_accumulation_steps"] == 3 and cfg["bf16"]["enabled"] is False
    assert cfg["zero_optimization"]["stage"] == 1 and cfg["gradient_clipping"] == 1.0
    assert T.ds_config(args, world=2, dtype=torch.bfloat16)["bf16"]["enabled"] is True
    with pytest.raises(ValueError, match="not a multiple of --micro-batch"):
        T.ds_config(args, world=5, dtype=torch.float32)
    with pytest.raises(SystemExit): train.parse_args(["--stage", "1", "--out", "x"])          # no weights given
    with pytest.raises(SystemExit): train.parse_args(["--stage", "1", "--out", "x", "--toy", "--freeze-proj"])


def test_model_config_stage_choices_and_what_init_carries_over(tmp_path):
    """The image position is the stage's (first, then middle); --init's model_config.json gives the shape only."""
    T.write_json(dict(grid_size=2, scan="unidirectional", image_position="first", vision_head_width=16), tmp_path / "model_config.json")
    stage1 = T.model_config(T.resolve_config(T.TrainConfig(stage=1, out="x", toy=True)))
    assert stage1["image_position"] == "first" and stage1["grid_size"] == -1
    stage2 = T.model_config(T.resolve_config(T.TrainConfig(stage=2, out="x", init=str(tmp_path / "visualrwkv.pth"))))
    assert stage2 == dict(T.MODEL_DEFAULTS, grid_size=2, scan="unidirectional", image_position="middle", vision_head_width=16)
    given = T.model_config(T.resolve_config(T.TrainConfig(stage=2, out="x", init=str(tmp_path / "v.pth"), image_position="last")))
    assert given["image_position"] == "last"


def test_toy_data_of_another_size_is_refused(tmp_path):
    cfg = T.TrainConfig(stage=1, out=str(tmp_path / "stage1"), toy=True, toy_samples=6)
    assert T.toy_data(cfg).name == "stage1.json"
    assert T.toy_data(cfg) == tmp_path / "toy_data" / "stage1.json"                   # the same settings: reused
    with pytest.raises(T.RunError, match="toy data made with .*'n_samples': 6.*'n_samples': 8"):
        T.toy_data(T.TrainConfig(stage=2, out=str(tmp_path / "stage2"), toy=True, toy_samples=8))


def test_tensorboard_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)                # import fails as if not installed
    with pytest.raises(T.RunError, match="--tensorboard needs the tensorboard package"):
        T.train(T.TrainConfig(stage=1, out=str(tmp_path), toy=True, tensorboard=True))


def test_tensorboard_logs_what_metrics_jsonl_holds(tmp_path, one_process):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    paths = make_toy_llava(tmp_path / "toy_data", n_samples=8, seed=3, n_eval=1)
    train.main(["--toy", "--stage", "1", "--out", str(tmp_path / "run"), "--data", str(paths["stage1"]),
                "--ctx-len", "128", "--batch-size", "2", "--micro-batch", "2", "--steps", "2", "--tensorboard"])
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("loss")]
    assert logged == pytest.approx([(r["step"], r["loss"]) for r in metrics(tmp_path / "run")])
    assert {"loss", "lr", "tokens_per_s"} <= set(events.Tags()["scalars"])


def test_the_shared_memory_op_is_skipped_through_deepspeeds_table(monkeypatch):
    import deepspeed.ops
    table = dict(deepspeed.ops.__compatible_ops__)
    monkeypatch.setattr(deepspeed.ops, "__compatible_ops__", table)
    T.skip_shm_build()
    assert table["deepspeed_shm_comm"] is False
    monkeypatch.setattr(deepspeed.ops, "__compatible_ops__", {})
    with pytest.raises(RuntimeError, match="'deepspeed_shm_comm' is not in deepspeed.ops.__compatible_ops__"):
        T.skip_shm_build()


def test_tower_from_open_clip_or_visualrwkv_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = VisualRWKV(RWKV6Config(vocab_size=50, n_layer=1, n_embd=32, head_size=16, lora_mix=4, lora_decay=4),
                       T.TOY_VISION)
    with torch.no_grad():
        for p in model.vit.parameters(): p.add_(torch.randn_like(p))             # not the default init
    save_visualrwkv(model, tmp_path / "visualrwkv.pth")
    torch.save({f"visual.{k}": v for k, v in model.vit.visual.state_dict().items()}, tmp_path / "open_clip.pth")
    for name in ("visualrwkv.pth", "open_clip.pth"):
        tower = T.load_tower(tmp_path / name, head_width=16, quick_gelu=True)
        assert tower.cfg == T.TOY_VISION
        for k, v in model.vit.visual.state_dict().items(): assert torch.equal(tower.visual.state_dict()[k], v), (name, k)


def test_evaluate_writes_answers_for_the_trained_model(runs):
    root, _, _ = runs
    summary = evaluate.main(["--model", str(root / "stage2" / "visualrwkv.pth"),
                             "--data", str(root / "toy_data" / "eval.jsonl"), "--max-new-tokens", "4"])
    rows = [json.loads(line) for line in (root / "stage2" / "answers.jsonl").read_text().splitlines()]
    assert summary["n"] == len(rows) == 4 and summary["skipped"] == 0
    assert all(isinstance(r["answer"], str) and isinstance(r["correct"], bool) for r in rows)


def test_evaluate_scores_answers_worked_by_hand(tmp_path, monkeypatch):
    """Generation replaced by fixed answers: ' red.' to 'Red' (right), ' Red' to 'Blue' (wrong), ' a square' to
    'Square' (right: the article goes), and a question whose image is missing counts wrong: 2 of 4. The question-only
    baseline over the 3 asked: 'red' or 'blue' for the colour question (1 of 2), 'square' (1 of 1): 2 of 3."""
    import random
    from types import SimpleNamespace
    from visualrwkv.data import draw_toy_image
    from visualrwkv.tokenizer import WorldTokenizer
    draw_toy_image("square", "red", "black", "left", random.Random(0), 32).save(tmp_path / "a.png")
    ask = lambda q, a, image="a.png": dict(image=image, conversations=[
        {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}])
    records = [ask("What colour is the shape?", "Red"), ask("What colour is the shape?", "Blue"),
               ask("What shape is in the image?", "Square"), ask("What shape is in the image?", "Square", "gone.png")]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    world = WorldTokenizer()
    model = SimpleNamespace(image_position="middle", vit=SimpleNamespace(cfg=SimpleNamespace(image_size=32)))
    monkeypatch.setattr(evaluate, "load_with_tokenizer", lambda args: (model, world))
    def fixed_answers(model, ids, images, **kw):
        assert len(ids) == 3 and all(i is not None for i in images)
        return [world.encode(a) for a in (" red.", " Red", " a square")]
    monkeypatch.setattr(evaluate, "generate", fixed_answers)
    with pytest.warns(UserWarning, match="question '#3' cannot be asked, counted wrong"):
        summary = evaluate.main(["--model", "unused.pth", "--data", str(tmp_path / "q.jsonl"), "--out",
                                 str(tmp_path / "answers.jsonl"), "--max-missing", "0.5"])
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, False, True, False]
    assert summary == dict(n=4, skipped=1, accuracy=0.5, question_only_baseline=2 / 3)


@pytest.mark.parametrize("text,expected", [("Red", "red"), ("The red.", "red"), ("  a Circle!", "circle"),
                                           ("Three.", "3"), ("on the  left", "on left"), ("3.5", "3.5"),
                                           ("1,000", "1000"), ("yes, it is", "yes it is")])
def test_normalize_answer(text, expected):
    assert evaluate.normalize_answer(text) == expected


def test_question_only_baseline():
    rows = [dict(question="q1", reference="Red"), dict(question="q1", reference="red."),
            dict(question="q1", reference="Blue"), dict(question="q2", reference="Left")]
    assert evaluate.question_only_baseline(rows) == 3 / 4              # 'red' for q1 (2 of 3), 'left' for q2


def test_a_non_finite_loss_skips_the_step_and_keeps_the_weights_finite(tmp_path, monkeypatch, one_process):
    """One process, in this interpreter: the 2nd micro-batch's loss is NaN; it is skipped, the run goes on."""
    paths = make_toy_llava(tmp_path / "toy_data", n_samples=12, seed=2, n_eval=1)
    calls, real_loss = [], T.sample_level_loss
    def loss_with_a_nan(logits, labels):
        calls.append(1)
        loss = real_loss(logits, labels)
        return loss * float("nan") if len(calls) == 2 else loss
    monkeypatch.setattr(T, "sample_level_loss", loss_with_a_nan)
    with pytest.warns(UserWarning, match="micro-batch 2 skipped on all processes \\(non-finite loss\\)"):
        train.main(["--toy", "--stage", "2", "--out", str(tmp_path / "run"), "--data", str(paths["stage2"]),
                    "--ctx-len", "128", "--batch-size", "2", "--micro-batch", "2", "--steps", "3", "--zero", "0"])
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["nonfinite"] == 1 and len(calls) == 4
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert all(torch.isfinite(v).all() for v in read_state_dict(tmp_path / "run" / "visualrwkv.pth").values())


def test_one_bf16_step_through_the_kernel_equals_float32(tmp_path):
    """The trainer's GPU path on the CPU: DeepSpeed's bf16 mode with the Triton WKV kernel (TRITON_INTERPRET=1) takes
    the same first step as float32 through the chunked form: the same loss to 3e-4 of it (1.0e-4 observed) and the same
    update of the weights to within 10% of its size (5.7% observed; Adam's first step is lr * sign(g) where g is not
    tiny)."""
    env = {**ENV, "TRITON_INTERPRET": "1"}
    one_step = ["--toy", "--stage", "2", "--toy-samples", "16", "--ctx-len", "96", "--batch-size", "2",
                "--micro-batch", "2", "--steps", "1", "--lr", "1e-2"]
    for name, precision, impl in (("bf16", "bf16", "triton"), ("fp32", "fp32", "chunked")):
        done = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *one_step, "--out", tmp_path / name,
                               "--precision", precision, "--wkv-impl", impl], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        assert f"{'bfloat16' if name == 'bf16' else 'float32'} on the CPU" in done.stdout
    (bf16,), (fp32,) = metrics(tmp_path / "bf16"), metrics(tmp_path / "fp32")
    assert abs(bf16["loss"] - fp32["loss"]) < 3e-4 * fp32["loss"]
    cfg = train.parse_args(one_step + ["--out", str(tmp_path / "init")])
    init = visualrwkv_state_dict(T.build_model(cfg, T.model_config(cfg)))
    after = {name: read_state_dict(tmp_path / name / "visualrwkv.pth") for name in ("bf16", "fp32")}
    assert after["bf16"]["rwkv.head.weight"].dtype == torch.bfloat16
    keys = [k for k in init if not k.startswith("vit.")]                           # the tower is frozen
    step = {name: torch.cat([(sd[k].double() - init[k].double()).flatten() for k in keys]) for name, sd in after.items()}
    assert step["fp32"].norm() > 1
    assert (step["bf16"] - step["fp32"]).norm() < 0.1 * step["fp32"].norm()
