"""The `visualrwkv` command (visualrwkv.cli): generate, evaluate with two processes and a merge, chat, and the errors a
user can fix. Expected answers come from `visualrwkv.generate.generate` on prompts built here by hand, one at a time."""
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from visualrwkv.cli import (get_chunk, main, parse_train_args, read_answer_rows, run_chat, build_parser,
                            write_answers)
from visualrwkv.generate import generate
from visualrwkv.checkpoint import save_visualrwkv
from visualrwkv.model import VisualRWKV
from visualrwkv.prompts import default_tokenizer, tokenize_conversation
from visualrwkv.rwkv import RWKV6Config, randomize_
from visualrwkv.vision import VisionConfig, clip_preprocess

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
VIS = VisionConfig(image_size=28, patch_size=7, width=24, layers=2, head_width=8)
NEW = 6                                                        # new tokens per answer: short, the model is random
COLOURS = {"red.png": "red", "blue.png": "blue", "green.png": "green"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random VisualRWKV (sandwich prompt) saved with its model_config.json, and the model itself."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = randomize_(VisualRWKV(RWKV6Config(vocab_size=65536, n_layer=2, n_embd=32, head_size=8, lora_mix=4,
                                              lora_decay=4), VIS, image_position="middle"))
    save_visualrwkv(model, root / "visualrwkv.pth")
    (root / "model_config.json").write_text(json.dumps({"image_position": "middle", "vision_head_width": 8}))
    return root / "visualrwkv.pth", model.eval()


def expected_reply(model, text, image_file=None):
    """The raw text `generate` gives for one question alone, its prompt built here: `<image>` first as the official
    evaluate.py, the sandwich placement by tokenize_conversation."""
    tok = default_tokenizer()
    value = f"<image>\n{text}" if image_file else text
    ids = tokenize_conversation([{"from": "human", "value": value}, {"from": "gpt", "value": ""}], "middle", tok)[0]
    image = clip_preprocess(28)(Image.open(image_file)) if image_file else None
    return tok.decode(generate(model, [ids], [image], max_new_tokens=NEW)[0])


def expected_answer(model, text, image_file=None):
    "The answer-file text: the reply without surrounding spaces, as the official evaluate.py strips it."
    return expected_reply(model, text, image_file).strip()


def write_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names: Image.new("RGB", (40, 30), COLOURS.get(name, "white")).save(folder / name)


# ---------------------------------------------------------------------------------------------- generate
def test_generate_answers_each_question_as_generate_does_alone(checkpoint, tmp_path):
    path, model = checkpoint
    write_images(tmp_path / "img", ["red.png", "blue.png"])
    questions = [dict(question_id="q1", image="red.png", text="What colour is it?"),
                 dict(question_id="q2", text="Say hello."),                               # text only
                 dict(question_id="q3", image="blue.png", text="Describe the picture in a few words please."),
                 dict(question_id="q4", image="gone.png", text="What is this?")]          # its picture is missing
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    code = main(["generate", "--model", path, "--questions", tmp_path / "q.jsonl", "--image-folder", tmp_path / "img",
                 "--answers", tmp_path / "a.jsonl", "--max-new-tokens", NEW, "--batch-size", 3, "--device", "cpu"])
    assert code == 0
    rows = {r["question_id"]: r for r in read_answer_rows(tmp_path / "a.jsonl")}
    assert set(rows) == {"q1", "q2", "q3", "q4"}
    assert rows["q1"]["text"] == expected_answer(model, "What colour is it?", tmp_path / "img" / "red.png")
    assert rows["q2"]["text"] == expected_answer(model, "Say hello.")
    assert rows["q3"]["text"] == expected_answer(model, "Describe the picture in a few words please.",
                                                 tmp_path / "img" / "blue.png")
    assert "text" not in rows["q4"] and "gone.png" in rows["q4"]["error"]
    assert rows["q1"]["prompt"] == "<image>\nWhat colour is it?" and rows["q1"]["model_id"] == path.parent.name
    assert rows["q1"]["metadata"] == {"image_file": "red.png"}
    assert not (tmp_path / "a.jsonl.partial").exists()


def test_an_interrupted_answer_file_is_resumed(tmp_path):
    class Question:
        def __init__(self, i): self.id = i
    questions = [Question(i) for i in range(5)]

    def answers(todo, stop_after=None):
        for n, q in enumerate(todo):
            if n == stop_after: raise KeyboardInterrupt
            yield {"question_id": q.id, "text": f"a{q.id}"}
    with pytest.raises(KeyboardInterrupt):
        write_answers(tmp_path / "a.jsonl", questions, lambda todo: answers(todo, stop_after=2))
    assert not (tmp_path / "a.jsonl").exists()
    assert [r["question_id"] for r in read_answer_rows(tmp_path / "a.jsonl.partial")] == [0, 1]
    with open(tmp_path / "a.jsonl.partial", "a") as f: f.write('{"question_id": 2, "te')      # cut mid-row
    asked = []
    rows = write_answers(tmp_path / "a.jsonl", questions,
                         lambda todo: (asked.extend(q.id for q in todo), answers(todo))[1])
    assert asked == [2, 3, 4] and [r["text"] for r in rows] == ["a0", "a1", "a2", "a3", "a4"]
    again = write_answers(tmp_path / "a.jsonl", questions, lambda todo: pytest.fail("a finished file is kept"))
    assert again == rows


def test_get_chunk_splits_as_the_official_evaluate():
    # split_list: chunks of ceil(n / N) consecutive items; 10 in 4 -> 3, 3, 3, 1; 9 in 4 -> 3, 3, 3, 0
    assert [get_chunk(list(range(10)), 4, i) for i in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert [len(get_chunk(list(range(9)), 4, i)) for i in range(4)] == [3, 3, 3, 0]
    with pytest.raises(ValueError, match="chunk_idx"): get_chunk([1], 2, 2)


# ---------------------------------------------------------------------------------------------- evaluate
def write_pope(root, n=6):
    """A POPE benchmark in LLaVA-1.5's layout: n questions over three pictures, labels split over the three files."""
    folder = root / "eval" / "pope"
    write_images(folder / "val2014", ["red.png", "blue.png", "green.png"])
    pictures = ["red.png", "blue.png", "green.png"]
    questions, labels = [], {s: [] for s in ("adversarial", "popular", "random")}
    for i in range(n):
        split, picture = list(labels)[i % 3], pictures[i % 3]
        text = f"Is there a {'cat' if i % 2 else 'dog'} number {i} in the image?"
        questions.append(dict(question_id=i, image=picture, category=split,
                              text=f"{text}\nAnswer the question using a single word or phrase."))
        labels[split].append(dict(image=picture, text=text, label="yes" if i % 2 else "no"))
    (folder / "coco").mkdir(parents=True, exist_ok=True)
    (folder / "llava_pope_test.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    for split, rows in labels.items():
        (folder / "coco" / f"coco_pope_{split}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return questions


def evaluate_args(path, root, out, *more):
    return ["evaluate", "--model", str(path), "--benchmark", "pope", "--root", str(root), "--out", str(out),
            "--max-new-tokens", str(NEW), "--device", "cpu", *map(str, more)]


def test_two_processes_and_a_merge_give_one_process_answers_and_scores(checkpoint, tmp_path):
    path, model = checkpoint
    questions = write_pope(tmp_path / "root")
    parts = [subprocess.Popen([sys.executable, "-m", "visualrwkv.cli",
                               *evaluate_args(path, tmp_path / "root", tmp_path / "two", "--num-chunks", 2,
                                              "--chunk-idx", i)],
                              cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in (0, 1)]
    logs = [p.communicate(timeout=300)[0] for p in parts]
    assert [p.returncode for p in parts] == [0, 0], logs
    assert "score with --merge" in logs[0]
    assert not (tmp_path / "two" / "scores.json").exists()
    assert main(evaluate_args(path, tmp_path / "root", tmp_path / "two", "--num-chunks", 2, "--merge")) == 0
    assert main(evaluate_args(path, tmp_path / "root", tmp_path / "one", "--batch-size", 4)) == 0

    merged = read_answer_rows(tmp_path / "two" / "answers" / "merge.jsonl")
    single = read_answer_rows(tmp_path / "one" / "answers" / "1_0.jsonl")
    assert [r["question_id"] for r in merged] == list(range(6))          # part 0 holds 0-2, part 1 holds 3-5
    assert {r["question_id"]: r["text"] for r in merged} == {r["question_id"]: r["text"] for r in single}
    pope = tmp_path / "root" / "eval" / "pope" / "val2014"
    for q, row in zip(questions, single):                                 # each as generate gives it alone
        assert row["text"] == expected_answer(model, q["text"], pope / q["image"])
    scores = json.loads((tmp_path / "two" / "scores.json").read_text())
    assert scores == json.loads((tmp_path / "one" / "scores.json").read_text())
    assert scores["questions"] == 6 and scores["missing"] == [] and set(scores["headline"]) == {
        "f1_adversarial", "f1_popular", "f1_random", "f1_mean"}
    assert (tmp_path / "two" / "scores.md").read_text().startswith("| benchmark | f1_adversarial |")


def test_merge_refuses_while_a_part_is_unfinished(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    write_pope(tmp_path / "root")
    assert main(evaluate_args(path, tmp_path / "root", tmp_path / "out", "--num-chunks", 3, "--chunk-idx", 1)) == 0
    (tmp_path / "out" / "answers" / "3_2.jsonl.partial").write_text("")
    assert main(evaluate_args(path, tmp_path / "root", tmp_path / "out", "--num-chunks", 3, "--merge")) == 2
    err = capsys.readouterr().err
    assert "2 of 3 parts not finished: 3_0.jsonl (missing), 3_2.jsonl (interrupted)" in err


def test_a_missing_picture_counts_wrong_is_named_and_too_many_refuse_a_score(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    write_pope(tmp_path / "root")
    (tmp_path / "root" / "eval" / "pope" / "val2014" / "green.png").unlink()      # questions 2 and 5
    assert main(evaluate_args(path, tmp_path / "root", tmp_path / "out")) == 2     # 2 of 6 > 1% missing
    err = capsys.readouterr().err
    assert "2 of 6 questions could not be asked" in err and "error: pope: 2 of 6 questions have no answer" in err
    assert main(evaluate_args(path, tmp_path / "root", tmp_path / "out", "--max-missing", 0.5)) == 0
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert scores["missing"] == [2, 5] and set(scores["errors"]) == {"2", "5"}
    assert "green.png" in scores["errors"]["2"]


def test_user_errors_are_one_line(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    assert main(["generate", "--model", path, "--questions", tmp_path / "none.jsonl", "--answers", tmp_path / "a"]) == 2
    assert capsys.readouterr().err.strip() == f"error: question file not found: {tmp_path / 'none.jsonl'}"
    assert main(evaluate_args(path, tmp_path, tmp_path / "out")) == 2
    assert "pope: missing" in capsys.readouterr().err
    with pytest.raises(SystemExit): build_parser().parse_args(["evaluate", "--model", "m"])


# ---------------------------------------------------------------------------------------------- chat
def test_chat_streams_the_reply_generate_gives(checkpoint, tmp_path):
    path, model = checkpoint
    write_images(tmp_path, ["red.png"])
    args = build_parser().parse_args(["chat", "--model", str(path), "--image", str(tmp_path / "red.png"),
                                      "--max-new-tokens", str(NEW), "--device", "cpu"])
    out = io.StringIO()
    assert run_chat(args, io.StringIO("What colour is it?\n/exit\n"), out) == 0
    reply = expected_reply(model, "What colour is it?", tmp_path / "red.png")
    assert out.getvalue().endswith(f"User: Assistant: {reply}\n\nUser: ")


# ---------------------------------------------------------------------------------------------- the command itself
def test_help_imports_no_torch_and_shows_examples():
    probe = ("import sys; from visualrwkv.cli import build_parser, train_parser; build_parser().format_help(); "
             "train_parser().format_help(); print(sorted(m for m in ('torch', 'open_clip', 'deepspeed') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert done.stdout.strip() == "[]", done.stderr
    help_text = subprocess.run([sys.executable, "-m", "visualrwkv.cli", "evaluate", "--help"], cwd=REPO, env=ENV,
                               capture_output=True, text=True).stdout
    assert "examples:" in help_text and "visualrwkv chat --model" in help_text and "--num-chunks" in help_text


def test_console_script_is_installed():
    exe = shutil.which("visualrwkv")
    assert exe, "the `visualrwkv` command is not on PATH: pip install -e . declares it (setup.py console_scripts)"
    done = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "chat" in done.stdout and "evaluate" in done.stdout


def test_train_subcommand_takes_every_training_option():
    from visualrwkv.wkv import IMPLS
    cfg = parse_train_args(["--toy", "--stage", "1", "--out", "x", "--wkv-impl", IMPLS[-1]])
    assert cfg.ctx_len == 1024 and cfg.wkv_impl == IMPLS[-1]
    for impl in IMPLS: parse_train_args(["--toy", "--stage", "2", "--out", "x", "--wkv-impl", impl])
    with pytest.raises(SystemExit): parse_train_args(["--stage", "1", "--out", "x"])        # no weights given


# ---------------------------------------------------------------------------------------------- scripts/evaluate.py
def test_evaluate_script_counts_a_question_it_cannot_ask_as_wrong(checkpoint, tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "scripts" / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    path, _ = checkpoint
    write_images(tmp_path, ["red.png"])
    turn = lambda image: [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red."}]
    records = [dict(id="ok", image="red.png", conversations=turn("red.png")),
               dict(id="gone", image="gone.png", conversations=turn("gone.png"))]
    (tmp_path / "set.json").write_text(json.dumps(records))
    argv = ["--model", str(path), "--data", str(tmp_path / "set.json"), "--device", "cpu", "--max-new-tokens", "2",
            "--out", str(tmp_path / "answers.jsonl")]
    with pytest.raises(ValueError, match="1 of 2 questions cannot be asked .*'gone'"): evaluate.main(argv)
    with pytest.warns(UserWarning, match="'gone' cannot be asked, counted wrong"):
        summary = evaluate.main(argv + ["--max-missing", "0.5"])
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["ok", "gone"] and rows[1]["correct"] is False and "gone.png" in rows[1]["error"]
    assert summary["n"] == 2 and summary["skipped"] == 1
    assert summary["accuracy"] == (0.5 if rows[0]["correct"] else 0.0)       # of 2 questions: the skipped one is wrong
