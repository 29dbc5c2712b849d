"""scripts/check_data.py and visualrwkv.data.check_data: every bad record of a LLaVA file, counted by cause, without training."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from visualrwkv.data import DataFileError, check_data, draw_toy_image, make_toy_llava

REPO = Path(__file__).resolve().parents[1]
N_IMAGE = 17


def run(*args):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "check_data.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    "The toy stage-2 data with bad records planted among the good ones, as .json and .jsonl."
    folder = tmp_path_factory.mktemp("toy")
    paths = make_toy_llava(folder, n_samples=12, seed=5, n_eval=1)
    records = json.loads(paths["stage2"].read_text())
    (folder / "images" / "cut.png").write_bytes((folder / records[0].get("image", "images/000000.png")).read_bytes()[:60])
    ask = lambda q, a, image=True: [{"from": "human", "value": ("<image>\n" if image else "") + q}, {"from": "gpt", "value": a}]
    planted = [
        {"id": "gone-1", "image": "images/nope.png", "conversations": ask("Colour?", "Red.")},
        {"id": "gone-2", "image": "images/nope2.png", "conversations": ask("Colour?", "Red.")},
        {"id": "cut", "image": "images/cut.png", "conversations": ask("Colour?", "Red.")},
        {"id": "role", "conversations": [{"from": "system", "value": "x"}, {"from": "gpt", "value": "y"}]},
        {"id": "image-type", "image": 7, "conversations": ask("Colour?", "Red.")},
        {"id": "silent", "conversations": ask("Say nothing.", "", image=False)},
        {"id": "middle", "conversations": ask("Tell a story. " * 40, "Once.", image=False) +
                                           [{"from": "human", "value": "And another. " * 60}]},
        {"conversations": ask("Tell a story. " * 40, "Once.")},                           # no id, no image file
    ]
    mixed = records[:4] + planted[:3] + records[4:8] + planted[3:] + records[8:]
    (folder / "mixed.json").write_text(json.dumps(mixed))
    (folder / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mixed))
    return folder, paths, mixed


def test_library_report_counts_every_cause(data):
    folder, _, mixed = data
    report = check_data(folder / "mixed.json", ctx_len=64, n_image_tokens=N_IMAGE, n_examples=1)
    assert report.n_records == len(mixed) == 20
    assert report.counts == {"missing image": 2, "corrupt image": 1, "malformed conversation": 3, "no label": 1,
                             "nothing to learn after truncation": 1}
    assert report.n_bad == 8
    assert report.examples["missing image"] == [("gone-1", f"image not found: {folder / 'images' / 'nope.png'}")]
    assert report.examples["malformed conversation"][0][0] == "role"
    by_id = {sid for examples in check_data(folder / "mixed.json", ctx_len=64, n_image_tokens=N_IMAGE).examples.values()
             for sid, _ in examples}
    assert by_id == {"gone-1", "gone-2", "cut", "role", "image-type", "silent", "middle", "#15"}
    assert check_data(folder / "mixed.jsonl", ctx_len=64, n_image_tokens=N_IMAGE).counts == report.counts
    # without a context length nothing is cut: the answer in the middle is then fine
    assert "nothing to learn after truncation" not in check_data(folder / "mixed.json", n_image_tokens=N_IMAGE).counts
    # a long question before the image (the sandwich prompt) and the answer at the end: the last 60 positions cut the image
    (folder / "long.json").write_text(json.dumps([{"id": "long", "image": mixed[0]["image"] if "image" in mixed[0] else
                                                   "images/000000.png", "conversations": [
        {"from": "human", "value": "<image>\n" + "Tell a story. " * 40}, {"from": "gpt", "value": "Once."}]}]))
    long = check_data(folder / "long.json", ctx_len=60, n_image_tokens=N_IMAGE)
    assert long.counts == {"image cut by truncation": 1} and "image does not fit" in long.examples["image cut by truncation"][0][1]
    assert check_data(folder / "long.json", ctx_len=60, n_image_tokens=N_IMAGE, image_position="last").n_bad == 0


def test_script_reports_and_exits_1_on_bad_records(data):
    folder, _, _ = data
    done = run("--data", folder / "mixed.json", "--ctx-len", 64, "--n-image-tokens", N_IMAGE, "--examples", 2)
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"{folder / 'mixed.json'}: 20 records, 8 bad"
    assert "  malformed conversation: 3" in lines and "  missing image: 2" in lines and "  corrupt image: 1" in lines
    assert any(l.startswith("    'gone-2': image not found") for l in lines)
    assert any(l.startswith("    'cut': corrupt image") for l in lines)


def test_script_exits_0_on_clean_data(data):
    folder, paths, _ = data
    done = run("--data", paths["stage2"], "--image-folder", folder, "--ctx-len", 256, "--n-image-tokens", N_IMAGE)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [f"{paths['stage2']}: 12 records, 0 bad"]


@pytest.mark.parametrize("name, content, message", [
    ("absent.json", None, "absent.json: file not found"),
    ("cut.json", '[{"id": "a", "conversations": [', "cut.json: not valid JSON at line 1, column"),
    ("string.json", '[{"id": "a", "conversations": []}, "User: hi"]', 'string.json: record 1 is a str ("User: hi"), not an object'),
    ("dict.json", '{"id": "a"}', "dict.json: expected a list of records, got a dict"),
    ("lines.jsonl", '{"id": "a", "conversations": []}\n{"id": "b", ', "lines.jsonl: not valid JSON at a line"),
    ("data.csv", "a,b", "data.csv: expected a .json list or a .jsonl file"),
])
def test_broken_file_is_one_error_line(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None: path.write_text(content)
    with pytest.raises(DataFileError, match="^" + str(tmp_path).replace("\\", "\\\\")): check_data(path)
    done = run("--data", path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_help_is_fast_and_complete():
    done = run("--help")
    assert done.returncode == 0 and "--image-position" in done.stdout and "Exit status" in done.stdout
