"""visualrwkv.data: the toy generator, truncation, bad samples skipped and counted, collate."""
import hashlib
import json
import random
import warnings

import numpy as np
import pytest
import torch

from visualrwkv.data import (BadSample, BadSampleWarning, LlavaDataset, LlavaSample, SkippedSample, TOY_QUESTIONS,
                             check_bad_fraction, collate_llava, draw_toy_image, make_toy_llava, read_llava_records,
                             truncate_sample)
from visualrwkv.prompts import IGNORE_INDEX, IMAGE_TOKEN_INDEX

N_IMAGE = 17          # tokens per image of the toy tower (4 x 4 patches + CLS)


def digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    return folder, make_toy_llava(folder, n_samples=40, seed=3, n_eval=12)


def test_toy_generator_is_deterministic(toy, tmp_path):
    folder, _ = toy
    make_toy_llava(tmp_path / "same", n_samples=40, seed=3, n_eval=12)
    make_toy_llava(tmp_path / "other", n_samples=40, seed=4, n_eval=12)
    assert digest(tmp_path / "same") == digest(folder)
    other = digest(tmp_path / "other")
    assert other.keys() == digest(folder).keys() and other != digest(folder)


def test_toy_content(toy):
    folder, paths = toy
    stage1 = json.loads(paths["stage1"].read_text())
    stage2 = json.loads(paths["stage2"].read_text())
    evaluation = [json.loads(line) for line in paths["eval"].read_text().splitlines()]
    assert len(stage1) == len(stage2) == 40 and len(evaluation) == 12
    for r in stage1:
        assert (folder / r["image"]).is_file() and r["conversations"][0]["value"].startswith("<image>\n")
        assert r["conversations"][1]["value"].startswith("A ") and r["conversations"][1]["value"].endswith(" background.")
    text_only = [r for r in stage2 if "image" not in r]
    multi = [r for r in stage2 if len(r["conversations"]) > 2]
    assert text_only and multi and len(text_only) < len(stage2) // 2
    for r in evaluation:
        question = r["conversations"][0]["value"]
        assert TOY_QUESTIONS[r["question_type"]] in question and question.endswith("single word or phrase.")
        assert " " not in r["conversations"][1]["value"]                         # single-word answers


def test_toy_image_shows_the_scene():
    img = draw_toy_image("square", "red", "black", "left", random.Random(0), size=64)
    pixels = torch.from_numpy(np.array(img))                                 # [64, 64, 3]
    red = (pixels == torch.tensor([220, 40, 40])).all(-1)                      # [64, 64]
    assert red[:, :32].sum() > 100 and red[:, 32:].sum() == 0                  # the red square is in the left half
    with pytest.raises(ValueError, match="shape must be one of"):
        draw_toy_image("hexagon", "red", "black", "left", random.Random(0))


def official_truncate_input(x, y, ctx_len):
    "VisualRWKV v6.0 src/model.py:496-509 (truncate_input), one sample: the first ctx_len if they hold a label, else the last."
    valid_labels = [i for i in y[:ctx_len] if i != IGNORE_INDEX]
    if valid_labels: return x[:ctx_len], y[:ctx_len]
    return x[-ctx_len:], y[-ctx_len:]


def expand(ids, labels, n_image, text_only_tokens=0):
    "The model's positions: -200 becomes n_image markers ('img', j), a text-only sample gets text_only_tokens ('zero', j)."
    if IMAGE_TOKEN_INDEX in ids:
        k = ids.index(IMAGE_TOKEN_INDEX)
        return (ids[:k] + [("img", j) for j in range(n_image)] + ids[k + 1:],
                labels[:k] + [IGNORE_INDEX] * n_image + labels[k + 1:])
    return [("zero", j) for j in range(text_only_tokens)] + ids, [IGNORE_INDEX] * text_only_tokens + labels


LABELS = {"end": lambda n: [IGNORE_INDEX] * (n - 4) + [1] * 4, "start": lambda n: [IGNORE_INDEX] * 2 + [1] * 3 + [IGNORE_INDEX] * (n - 5),
          "middle": lambda n: [IGNORE_INDEX] * 9 + [1] + [IGNORE_INDEX] * (n - 10), "none": lambda n: [IGNORE_INDEX] * n}


@pytest.mark.parametrize("ctx_len", [4, 9, 12, 20, 40])
@pytest.mark.parametrize("image_at", [None, 0, 3, 15])
@pytest.mark.parametrize("layout", list(LABELS))
@pytest.mark.parametrize("zero_image", [False, True])
def test_truncation_follows_the_official_rule(ctx_len, image_at, layout, zero_image):
    """Our cut, expanded to the model's positions, is the official window of the expanded sample; when that window
    would cut the image or keep no label at a position the loss reads, or the sample has no label, we refuse it."""
    g = random.Random(ctx_len)
    ids = [g.randrange(1000) for _ in range(20)]
    labels = [l if l == IGNORE_INDEX else ids[t] for t, l in enumerate(LABELS[layout](20))]
    if image_at is not None: ids[image_at] = IMAGE_TOKEN_INDEX; labels[image_at] = IGNORE_INDEX
    zero = N_IMAGE if zero_image and image_at is None else 0
    x, y = expand(ids, labels, N_IMAGE, zero)
    want_x, want_y = official_truncate_input(x, y, ctx_len)
    span = [p for p in x if isinstance(p, tuple)]
    if all(l == IGNORE_INDEX for l in labels): cause = "no label"
    elif span and not all(p in want_x for p in span): cause = "image cut by truncation"
    elif all(l == IGNORE_INDEX for l in want_y[1:]): cause = "nothing to learn after truncation"
    else: cause = None
    if cause is not None:
        with pytest.raises(BadSample) as err: truncate_sample(ids, labels, ctx_len, N_IMAGE, zero)
        assert err.value.cause == cause
        return
    cut_ids, cut_labels = truncate_sample(ids, labels, ctx_len, N_IMAGE, zero)
    assert expand(cut_ids, cut_labels, N_IMAGE, zero) == (want_x, want_y)


def test_truncation_worked_by_hand():
    img, ign = IMAGE_TOKEN_INDEX, IGNORE_INDEX
    # 10 ids, image of 5 at index 2: 14 positions, labels at positions 8-13; the first 12 hold labels: keep them
    assert truncate_sample([11, 12, img, 13, 14, 15, 16, 17, 18, 19], [ign] * 4 + [14, 15, 16, 17, 18, 19], 12, 5) == \
        ([11, 12, img, 13, 14, 15, 16, 17], [ign] * 4 + [14, 15, 16, 17])
    # image of 3 at index 6 of 9 ids: 11 positions, labels at 9, 10; the first 6 hold none: keep the last 6 (5-10)
    late, late_labels = [11, 12, 13, 14, 15, 16, img, 17, 18], [ign] * 7 + [17, 18]
    assert truncate_sample(late, late_labels, 6, 3) == ([16, img, 17, 18], [ign, ign, 17, 18])
    with pytest.raises(BadSample, match="image does not fit"): truncate_sample(late, late_labels, 4, 3)   # last 4 cut it
    # text only, one label at 6 of 12: neither the first 4 nor the last 4 reach it
    with pytest.raises(BadSample, match="no supervised token left") as err:
        truncate_sample(list(range(1, 13)), [ign] * 6 + [7] + [ign] * 5, 4, 3)
    assert err.value.cause == "nothing to learn after truncation"
    with pytest.raises(BadSample, match="no label") as err: truncate_sample([1, 2, 3], [ign] * 3, 100, 3)
    assert err.value.cause == "no label"


def test_dataset_reads_the_toy_records(toy):
    folder, paths = toy
    ds = LlavaDataset(paths["stage2"], folder, ctx_len=512, n_image_tokens=N_IMAGE, image_size=32,
                      image_position="last", cache_dir=folder / "cache")
    records = json.loads(paths["stage2"].read_text())
    for i in range(len(ds)):
        sample = ds[i]
        assert isinstance(sample, LlavaSample) and sample.id == records[i]["id"]
        assert len(sample.input_ids) == len(sample.labels) and sample.input_ids[:2] == [24281, 59]       # "User:"
        assert sample.input_ids.count(IMAGE_TOKEN_INDEX) == ("image" in records[i]) == (sample.image is not None)
        if sample.image is not None: assert sample.image.shape == (3, 32, 32) and sample.image.std() > 0.1


def test_dataset_truncates_to_ctx_len(tmp_path):
    """Worked by hand, token ids from the official tokenizer (v6.0 src/rwkv_tokenizer.py), image_position 'last',
    17 image tokens. The image sample is 9 tokens of 'User: What colour is the shape?\n', the image, then
    '\n\n', 'Assistant:' (3), ' Red', '.', '\n\n': 33 positions. Its first 25 hold no label, so the last 25 are kept
    (positions 8-32: from the '\n' before the image). The text-only sample's first 12 tokens reach ' Red', '.': kept."""
    draw_toy_image("circle", "red", "black", "left", random.Random(0), 32).save(tmp_path / "red.png")
    ask = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    records = [{"id": "image", "image": "red.png", "conversations": ask("<image>\nWhat colour is the shape?", "Red.")},
               {"id": "text", "conversations": ask("Name a colour.", "Red.") + ask("And another?", "Blue.")}]
    (tmp_path / "d.json").write_text(json.dumps(records))
    kw = dict(n_image_tokens=N_IMAGE, image_size=32, image_position="last", cache_dir=tmp_path / "cache")
    image = LlavaDataset(tmp_path / "d.json", ctx_len=25, **kw)[0]
    text = LlavaDataset(tmp_path / "d.json", ctx_len=12, **kw)[1]
    ign = IGNORE_INDEX
    assert image.input_ids == [11, IMAGE_TOKEN_INDEX, 261, 5585, 41693, 59, 20733, 47, 261]
    assert image.labels == [ign] * 6 + [20733, 47, 261] and image.image.shape == (3, 32, 32)
    assert text.input_ids == [24281, 59, 29456, 332, 45520, 47, 261, 5585, 41693, 59, 20733, 47]
    assert text.labels == [ign] * 10 + [20733, 47]


def test_jsonl_and_json_list_give_the_same_samples(toy, tmp_path):
    folder, paths = toy
    records = json.loads(paths["stage2"].read_text())[:10]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "d.json").write_text(json.dumps(records))
    a, b = (LlavaDataset(tmp_path / f"d.{ext}", folder, 256, N_IMAGE, image_size=32, cache_dir=tmp_path / ext)
            for ext in ("jsonl", "json"))
    for i in range(10):
        assert a[i].input_ids == b[i].input_ids and a[i].id == b[i].id


def bad_records(folder):
    (folder / "images").mkdir(exist_ok=True)
    draw_toy_image("circle", "red", "black", "left", random.Random(0), 32).save(folder / "images" / "ok.png")
    draw_toy_image("circle", "red", "black", "left", random.Random(0), 32).save(folder / "images" / "cut.png")
    data = (folder / "images" / "cut.png").read_bytes()
    (folder / "images" / "cut.png").write_bytes(data[:len(data) // 2])                  # truncated PNG
    (folder / "images" / "noise.png").write_bytes(b"definitely not an image")
    ask = lambda q, a, image=True: [{"from": "human", "value": ("<image>\n" if image else "") + q},
                                    {"from": "gpt", "value": a}]
    return [
        {"id": "good", "image": "images/ok.png", "conversations": ask("Colour?", "Red.")},
        {"id": "missing", "image": "images/nope.png", "conversations": ask("Colour?", "Red.")},
        {"id": "truncated", "image": "images/cut.png", "conversations": ask("Colour?", "Red.")},
        {"id": "noise", "image": "images/noise.png", "conversations": ask("Colour?", "Red.")},
        {"id": "role", "conversations": [{"from": "system", "value": "x"}, {"from": "gpt", "value": "y"}]},
        {"id": "number", "conversations": [{"from": "human", "value": "1+1?"}, {"from": "gpt", "value": 2}]},
        {"id": "no-answer", "conversations": [{"from": "human", "value": "Hello?"}]},
        {"id": "not-a-list", "conversations": "User: hi"},
        {"id": "too-long", "conversations": ask("Tell a story. " * 40, "Once.", image=False)
                                            + [{"from": "human", "value": "And another. " * 60}]},   # answer in the middle
        {"id": "cut-image", "image": "images/ok.png", "conversations": ask("Tell a story. " * 40, "Once.")},
        {"id": "long-question", "conversations": ask("Tell a story. " * 40, "Once.", image=False)},  # the last 64 keep it
        {"id": "text", "conversations": ask("Sides of a square?", "Four.", image=False)},
        {"conversations": ask("Colour?", "Blue.", image=False)},                         # no id: named by index
    ]


def test_bad_samples_are_skipped_named_and_counted(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps(bad_records(tmp_path)))
    ds = LlavaDataset(tmp_path / "d.json", ctx_len=64, n_image_tokens=N_IMAGE, image_size=32,
                      cache_dir=tmp_path / "cache", max_bad_fraction=0.9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [ds[i] for i in range(len(ds))]
    skipped = {s.id: s.reason for s in items if isinstance(s, SkippedSample)}
    assert [s.id for s in items if isinstance(s, LlavaSample)] == ["good", "long-question", "text", "#12"]
    assert set(skipped) == {"missing", "truncated", "noise", "role", "number", "no-answer", "not-a-list", "too-long",
                            "cut-image"}
    assert "image not found" in skipped["missing"] and "corrupt image" in skipped["truncated"]
    assert "corrupt image" in skipped["noise"] and "'from'" in skipped["role"] and "'value'" in skipped["number"]
    assert "no 'gpt' turn" in skipped["no-answer"] and "no supervised token" in skipped["too-long"]
    assert "image does not fit" in skipped["cut-image"]
    messages = [str(w.message) for w in caught if issubclass(w.category, BadSampleWarning)]
    assert len(messages) == len(skipped) and all(any(repr(k) in m for m in messages) for k in skipped)

    batch = collate_llava(items[:4])
    assert batch.ids == ["good"] and [s.id for s in batch.skipped] == ["missing", "truncated", "noise"]
    assert batch.images[0].shape == (3, 32, 32) and len(batch) == 1
    empty = collate_llava(items[1:3])
    assert len(empty) == 0 and empty.input_ids == [] and len(empty.skipped) == 2


def test_mostly_bad_data_is_an_error(tmp_path):
    records = bad_records(tmp_path)
    (tmp_path / "d.json").write_text(json.dumps([records[i] for i in (0, 4, 5, 6, 7)]))
    with pytest.raises(ValueError, match="malformed conversations: 4 of 5 samples are bad"):
        LlavaDataset(tmp_path / "d.json", ctx_len=64, n_image_tokens=N_IMAGE, image_size=32, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="6 of 10 samples are bad"): check_bad_fraction(6, 10, 0.5)
    check_bad_fraction(5, 10, 0.5)
    check_bad_fraction(9, 10, 0.5, min_seen=20)                                # too early to judge


def test_clear_errors_for_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="LLaVA data file not found"):
        LlavaDataset(tmp_path / "nope.json")
    (tmp_path / "d.csv").write_text("a,b")
    with pytest.raises(ValueError, match="expected a .json list or a .jsonl"): LlavaDataset(tmp_path / "d.csv")
    (tmp_path / "d.json").write_text(json.dumps([{"id": 1, "text": "no conversations"}]))
    with pytest.raises(ValueError, match="no record has a 'conversations' key"):
        LlavaDataset(tmp_path / "d.json", cache_dir=tmp_path / "c")


@pytest.mark.parametrize("mode", ["P", "RGBA"])
def test_load_image_converts_png_to_rgb_first(tmp_path, mode):
    """The official dataset: `Image.open(path).convert('RGB')`, then the HF processor (v6.0 src/dataset.py:202-207)."""
    from PIL import Image
    from open_clip.constants import OPENAI_DATASET_STD
    from transformers import CLIPImageProcessor
    from visualrwkv.data import load_image
    rng = np.random.default_rng(2)
    if mode == "P":
        img = Image.fromarray(rng.integers(0, 256, (400, 500, 3), dtype=np.uint8)).quantize(colors=16)
        img.info["transparency"] = 3                                        # one palette entry transparent
    else: img = Image.fromarray(rng.integers(0, 256, (400, 500, 4), dtype=np.uint8), mode="RGBA")
    img.save(tmp_path / "img.png")
    with Image.open(tmp_path / "img.png") as saved: assert saved.mode == mode
    proc = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    with Image.open(tmp_path / "img.png") as saved:
        rgb = saved.convert("RGB")
    # PIL keeps a converted palette image's transparent colour in rgb.info; transformers >= 5 composites that colour onto
    # white even in an RGB image, while the transformers of the official code (4.x) passed RGB images through as they are
    rgb.info.pop("transparency", None)
    theirs = torch.tensor(proc(images=rgb, return_tensors="np")["pixel_values"][0])
    diff = (load_image(tmp_path / "img.png", 336) - theirs).abs()
    assert diff.max() <= 1 / 255 / min(OPENAI_DATASET_STD) + 1e-6 and diff.mean() < 1e-3


def test_reading_leaves_nothing_beside_the_data(tmp_path):
    """The Arrow cache goes to datasets' own cache folder (or `cache_dir`), never next to the user's data file."""
    folder = tmp_path / "data"
    folder.mkdir()
    path = folder / "q.jsonl"
    path.write_text(json.dumps({"id": "a", "conversations": [{"from": "human", "value": "hi"},
                                                             {"from": "gpt", "value": "yes"}]}) + "\n")
    assert len(read_llava_records(path)) == 1
    assert list(folder.iterdir()) == [path]
