"""The main job's pieces at a tiny size: stage 0 (world, reduced vocabulary, tower, LM), a training stage that carries
the reduced vocabulary beside every checkpoint, evaluation reading it back, and the summary."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from visualrwkv.generate import load_for_inference, stop_token_ids
from visualrwkv.tokenizer import TOKENIZER_FILE, ToyTokenizer, WorldTokenizer, checkpoint_tokenizer

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def run(*args, expect_failure=False):
    done = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert (done.returncode != 0) == expect_failure, (done.stdout + done.stderr)[-4000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    run("scripts/toy_stage0.py", "--out", out, "--train-images", 40, "--eval-questions", 14, "--vision-steps", 2,
        "--lm-steps", 2)
    common = ["--ctx-len", 192, "--batch-size", 4, "--micro-batch", 4, "--steps", 2, "--no-progress-bar"]
    run("scripts/train.py", "--stage", 1, "--out", out / "stage1", "--lm", out / "stage0" / "toy_lm.pth",
        "--vision", out / "stage0" / "toy_clip.pth", "--tokenizer", out / "world" / "toy_tokenizer.json",
        "--data", out / "world" / "stage1.json", "--save-every", 1, *common)
    run("scripts/train.py", "--stage", 2, "--out", out / "stage2", "--init", out / "stage1" / "visualrwkv.pth",
        "--data", out / "world" / "stage2.json", *common)
    run("scripts/evaluate.py", "--model", out / "stage2" / "visualrwkv.pth", "--data", out / "world" / "eval.jsonl",
        "--out", out / "answers.jsonl", "--device", "cpu", "--max-new-tokens", 4)
    return out


def test_the_reduced_vocabulary_travels_with_every_checkpoint(toy_run):
    table = (toy_run / "world" / "toy_tokenizer.json").read_text()
    saved = [toy_run / "stage1" / TOKENIZER_FILE, toy_run / "stage2" / TOKENIZER_FILE,
             *(toy_run / "stage1" / "checkpoints").glob(f"step-*/{TOKENIZER_FILE}")]
    assert len(saved) == 4 and all(p.read_text() == table for p in saved)   # stage 2 took it from --init's folder
    model, tokenizer = load_for_inference(toy_run / "stage2" / "visualrwkv.pth", "cpu")
    assert isinstance(tokenizer, ToyTokenizer) and len(tokenizer) == model.rwkv.cfg.vocab_size
    world = WorldTokenizer()
    assert stop_token_ids(tokenizer) == (tokenizer.world_ids.index(261), 0)       # "\n\n" is World id 261
    assert tokenizer.world_ids[stop_token_ids(tokenizer)[0]] == world.encode("\n\n")[0]


def test_evaluation_reads_the_answers_through_the_checkpoint_tokenizer(toy_run):
    rows = [json.loads(line) for line in (toy_run / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 14 and all("error" not in r for r in rows)
    tokenizer = ToyTokenizer.load(toy_run / "world" / "toy_tokenizer.json")
    for r in rows: tokenizer.encode(r["answer"])                              # text of the toy vocabulary's tokens


def test_summary_has_every_question_type(toy_run):
    out = run("scripts/toy_report.py", toy_run, "--seconds", 12.5)
    summary = json.loads((toy_run / "summary.json").read_text())
    types = {"colour", "count", "multiple_choice", "position", "relation", "shape", "yes_no"}
    assert set(summary["question_types"]) == types and summary["seconds"] == 12.5
    rows = [json.loads(line) for line in (toy_run / "answers.jsonl").read_text().splitlines()]
    assert summary["overall"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows))
    for qtype, t in summary["question_types"].items():
        right = [r["correct"] for r in rows if r["question_type"] == qtype]
        assert t["n"] == len(right) == 2 and t["accuracy"] == sum(right) / 2
        assert 0 < t["chance"] <= 1 and 0 <= t["question_only"] <= 1
    assert "margin" in out and (toy_run / "answers.png").stat().st_size > 10_000


def test_checkpoint_tokenizer_defaults_to_world(tmp_path):
    (tmp_path / "visualrwkv.pth").write_bytes(b"")
    assert isinstance(checkpoint_tokenizer(tmp_path / "visualrwkv.pth"), WorldTokenizer)


def test_a_tokenizer_larger_than_the_model_is_refused(toy_run, tmp_path):
    log = run("scripts/train.py", "--stage", 1, "--out", tmp_path / "run", "--lm", toy_run / "stage0" / "toy_lm.pth",
              "--vision", toy_run / "stage0" / "toy_clip.pth", "--data", toy_run / "world" / "stage1.json",
              "--ctx-len", 192, "--batch-size", 4, "--micro-batch", 4, "--steps", 1, expect_failure=True)
    vocab = len(ToyTokenizer.load(toy_run / "world" / "toy_tokenizer.json"))
    assert f"error: the tokenizer has {len(WorldTokenizer())} ids, the language model only {vocab} embeddings" in log
