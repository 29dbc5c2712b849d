"""scripts/toy_diagnose.py: the answer targets worked by hand, each held-out text read back, and the measurement run
through the command line on a tiny world for both models."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import toy_diagnose                                                             # noqa: E402
from visualrwkv.tokenizer import ToyTokenizer                                  # noqa: E402
from visualrwkv.toy import caption, make_world, read_scenes                     # noqa: E402


def test_answer_targets_by_hand():
    ids, targets = toy_diagnose.answer_batch([([5, 6, 7, 8, 9], 3, "a"), ([1, 2, 3], 2, "b")])
    assert ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 0, 0]]
    # row 0: the answer is ids 8, 9, predicted from positions 2 and 3; row 1: id 3 from position 1
    assert targets.tolist() == [[-100, -100, 8, 9, -100], [-100, 3, -100, -100, -100]]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("diagnose")
    make_world(run / "world", n_train=24, n_eval=14, seed=3)
    return run


def test_each_held_out_sample_carries_its_own_pictures_caption(tiny_run):
    world = tiny_run / "world"
    tokenizer = ToyTokenizer.load(world / "toy_tokenizer.json")
    data = toy_diagnose.qa_samples(world, tokenizer)
    conversations = [r["conversations"] for r in json.loads((world / "stage2.json").read_text()) if "image" in r]
    assert len(data["train"]) == sum(len(c) // 2 for c in conversations)       # every turn of every picture's talk
    samples = data["eval"]
    records = [json.loads(line) for line in (world / "eval.jsonl").read_text().splitlines()]
    scenes = read_scenes(world)["eval"]
    assert len(samples) == len(records) == 14
    for (ids, start, qtype), r in zip(samples, records):
        text = tokenizer.decode(ids)
        assert text.startswith(caption(scenes[r["image"]]) + "\n\nUser: ")
        assert text.endswith("Assistant: " + r["conversations"][-1]["value"] + "\n\n")
        assert tokenizer.decode(ids[start:]) == " " + r["conversations"][-1]["value"] + "\n\n"
        assert qtype == r["question_type"]


@pytest.mark.parametrize("arch", ["rwkv", "transformer"])
def test_text_runs_from_the_command_line(tiny_run, tmp_path, arch):
    out = tmp_path / "text.json"
    toy_diagnose.main(["--world", str(tiny_run / "world"), "--arch", arch, "--steps", "3",
                       "--eval-every", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [p["step"] for p in result["curve"]] == [2, 3]
    assert set(result["curve"][-1]["per_type"]) == {"colour", "count", "multiple_choice", "position", "relation",
                                                   "shape", "yes_no"}


def test_exact_match_needs_every_answer_token_right():
    samples = [([5, 6, 7, 8, 9], 3, "a"), ([1, 2, 3], 2, "b"), ([4, 4, 6, 1], 2, "b")]

    def predicting(shift):                       # logits whose top token at t is ids[t + shift] (0 past the end)
        def model(ids):
            nxt = torch.cat([ids[:, shift:], ids.new_zeros(ids.shape[0], shift)], 1) if shift else ids
            return torch.nn.functional.one_hot(nxt, 10).float()
        return model
    model = predicting(1)
    model.eval = model.train = lambda *a: None
    assert toy_diagnose.exact_match(model, samples) == {"a": 1.0, "b": 1.0}
    copying = predicting(0)                       # repeats the current token: right only where it equals the next
    copying.eval = copying.train = lambda *a: None
    assert toy_diagnose.exact_match(copying, samples) == {"a": 0.0, "b": 0.0}
    wrong_last = samples[:2] + [([4, 4, 6, 1], 1, "b")]     # answer 4, 6, 1: the copy gets 4 right, not 6
    assert toy_diagnose.exact_match(copying, wrong_last)["b"] == 0.0
