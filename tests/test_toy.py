"""visualrwkv.toy: the toy world read back from its pixels, its splits and balance, the toy tokenizer, stage 0."""
import hashlib
import json
import re
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from visualrwkv.generate import stop_token_ids
from visualrwkv.prompts import IMAGE_POSITIONS, SHORT_ANSWER_HINT, STOP_TOKEN_INDEX, default_tokenizer, tokenize_conversation
from visualrwkv.rwkv import load_rwkv6, read_state_dict
from visualrwkv.toy import (COLOURS, BACKGROUND, MC_HINT, QUESTION_TYPES, SHAPES, SIZES, TOY_TOWER, ToyObject,
                            ToyTokenizer, chance_and_baseline, conversation_text, draw_scene, make_world,
                            pretrain_lm, pretrain_vision, read_scenes, toy_corpus)
from visualrwkv.train import load_tower

ROWS, COLS = ("top", "middle", "bottom"), ("left", "centre", "right")


def records(paths):
    stage1 = json.loads(paths["stage1"].read_text())
    stage2 = json.loads(paths["stage2"].read_text())
    evaluation = [json.loads(line) for line in paths["eval"].read_text().splitlines()]
    return stage1, stage2, evaluation


def digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world")
    return folder, make_world(folder, n_train=80, n_eval=70, seed=5)


# --- the world read back from the pixels, with rules written here, apart from the generator ---

def shape_from_mask(mask):
    "Square and triangle fill their bottom row (square all its box, triangle half); a cross leaves its corners empty."
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    if box[-1].mean() > 0.9: return "square" if box.mean() > 0.85 else "triangle"
    t = box.shape[1] // 3
    corners = box[:t, :t].any() or box[:t, -t:].any() or box[-t:, :t].any() or box[-t:, -t:].any()
    return "circle" if corners else "cross"


def objects_from_pixels(path):
    "Per 3x3 cell: the one palette colour its non-background pixels have, the shape of that mask, small or large."
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    cell = pixels.shape[0] / 3
    found = []
    for row in range(3):
        for col in range(3):
            block = pixels[round(row * cell):round((row + 1) * cell), round(col * cell):round((col + 1) * cell)]
            foreground = ~(block == BACKGROUND).all(-1)
            if not foreground.any(): continue
            colours = [name for name, rgb in COLOURS.items() if (block[foreground] == rgb).all(-1).all()]
            assert len(colours) == 1, f"{path} cell {(row, col)}: pixels of more than one colour"
            width = np.ptp(np.nonzero(foreground.any(0))[0]) + 1
            found.append(ToyObject(shape_from_mask(foreground), colours[0], "large" if width > 0.8 * cell else "small",
                                   row, col))
    return tuple(found)


def the(objects, description):
    "The one object matching every word of a description such as 'small red' or 'blue circle' ('object' matches all)."
    words = [w for w in description.split() if w != "object"]
    matching = [o for o in objects if all(w in (o.size, o.colour, o.shape) for w in words)]
    assert len(matching) == 1, f"{description!r} matches {len(matching)} objects of {objects}"
    return matching[0]


def where(o):
    return "centre" if (o.row, o.col) == (1, 1) else f"{ROWS[o.row]} {COLS[o.col]}"


NEIGHBOUR = {"to the left of": (0, -1), "to the right of": (0, 1), "above": (-1, 0), "below": (1, 0)}


def answer_from_objects(question, objects):
    "The short answer to a question of the world, worked out from the objects read off the pixels."
    at = {(o.row, o.col): o for o in objects}
    beside = lambda rel, desc: at[tuple(np.add((the(objects, desc).row, the(objects, desc).col), NEIGHBOUR[rel]))]
    rules = [
        (r"What colour is the object directly (to the left of|to the right of|above|below) the (.+)\?", lambda m: beside(*m.groups()).colour),
        (r"What shape is directly (to the left of|to the right of|above|below) the (.+)\?", lambda m: beside(*m.groups()).shape),
        (r"What colour is the (.+)\?", lambda m: the(objects, m[1]).colour),
        (r"What shape is the (.+)\?", lambda m: the(objects, m[1]).shape),
        (r"Which shape is (\w+)\?", lambda m: the(objects, m[1]).shape),
        (r"How many (\w+) objects are there\?", lambda m: str(sum(o.colour == m[1] for o in objects))),
        (r"How many (\w+) are there\?", lambda m: str(sum(o.shape + ("es" if o.shape == "cross" else "s") == m[1] for o in objects))),
        (r"Where is the (.+)\?", lambda m: where(the(objects, m[1]))),
        (r"Is there a (\w+) (\w+)\?", lambda m: "yes" if any((o.colour, o.shape) == m.groups() for o in objects) else "no")]
    for pattern, rule in rules:
        if (m := re.fullmatch(pattern, question)): return rule(m)
    raise AssertionError(f"no rule for {question!r}")


VALUES = {*COLOURS, *SHAPES, *ROWS, *COLS, "yes", "no", *"0123456789"}


def words(text):
    "Lower-case words, plurals of shapes and 'objects' made singular."
    singular = lambda w: w[:-2] if w == "crosses" else w[:-1] if w[:-1] in (*SHAPES, "object") else w
    return [singular(w) for w in re.findall(r"[a-z0-9]+", text.lower())]


def check_turn(human, answer, objects):
    "The recorded answer agrees with the pixels: exactly for short answers and letters, by its key word for sentences."
    text = human.replace("<image>\n", "")
    if text.endswith(MC_HINT):
        question, *options = text[:-len(MC_HINT)].strip().split("\n")
        letters = {o[3:]: o[0] for o in options}
        assert answer == letters[answer_from_objects(question, objects)], (text, answer)
    elif text.endswith(SHORT_ANSWER_HINT):
        assert answer.lower() == answer_from_objects(text[:-len(SHORT_ANSWER_HINT)].strip(), objects), (text, answer)
    else:                                                            # a sentence: it says the answer, no other value
        expected = set(words({"0": "no"}.get(answer_from_objects(text, objects), answer_from_objects(text, objects))))
        said = set(words(answer))
        assert expected <= said and (said - set(words(text))) & VALUES <= expected and "not" not in said, (text, answer)


def test_every_answer_follows_from_the_pixels(world):
    folder, paths = world
    stage1, stage2, evaluation = records(paths)
    scenes = {**read_scenes(folder)["train"], **read_scenes(folder)["eval"]}
    checked = Counter()
    for record in stage2 + evaluation:
        if "image" not in record: continue
        objects = objects_from_pixels(folder / record["image"])
        assert objects == scenes[record["image"]]                    # shapes and sizes against the scene too
        turns = record["conversations"]
        for human, gpt in zip(turns[::2], turns[1::2]):
            check_turn(human["value"], gpt["value"], objects)
            checked["short" if SHORT_ANSWER_HINT in human["value"] or MC_HINT in human["value"] else "sentence"] += 1
    assert checked["short"] > 200 and checked["sentence"] > 50


def test_captions_follow_from_the_pixels(world):
    folder, paths = world
    for record in records(paths)[0]:
        objects = objects_from_pixels(folder / record["image"])
        caption = record["conversations"][1]["value"]
        for o in objects:
            phrase = "in the centre" if where(o) == "centre" else f"at the {where(o)}"
            assert f"a {o.size} {o.colour} {o.shape} {phrase}" in caption, (caption, o)
        assert caption.startswith(["Two", "Three", "Four"][len(objects) - 2] + " shapes: ")


def test_text_only_answers(world):
    stage2 = records(world[1])[1]
    text_only = [r for r in stage2 if "image" not in r]
    assert len(text_only) == 8                                       # one after every tenth of 80 images
    for record in text_only:
        question, answer = (t["value"] for t in record["conversations"])
        question = question.replace(f"\n{SHORT_ANSWER_HINT}", "")
        if (m := re.fullmatch(r"A picture has (\d) \w+ and (\d) \w+\. How many shapes does it have\?", question)):
            assert str(int(m[1]) + int(m[2])) in answer
        elif (m := re.fullmatch(r"How many sides does a (\w+) have\?", question)):
            assert {"triangle": "3", "square": "4"}[m[1]] in answer
        else:
            m = re.fullmatch(r"Is (\w+) a colour or a shape\?", question)
            assert ("colour" if m[1] in COLOURS else "shape") in answer.lower()


# --- format, splits, determinism, balance ---

def test_record_format(world):
    stage1, stage2, evaluation = records(world[1])
    for record in stage1 + stage2 + evaluation:
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        with_image = [k for k, t in enumerate(turns) if "<image>" in t["value"]]
        assert with_image == ([0] if "image" in record else []) and turns[0]["value"].count("<image>") <= 1
    assert all(2 <= len(r["conversations"]) // 2 <= 4 for r in stage2 if "image" in r)
    assert Counter(r["question_type"] for r in evaluation) == {t: 10 for t in QUESTION_TYPES}
    for record in evaluation:
        human = record["conversations"][0]["value"]
        assert human.endswith(MC_HINT if record["question_type"] == "multiple_choice" else SHORT_ANSWER_HINT)


def test_held_out_images_never_in_training(world):
    folder, paths = world
    stage1, stage2, evaluation = records(paths)
    train_names = {r["image"] for r in stage1 + stage2 if "image" in r}
    eval_names = {r["image"] for r in evaluation}
    assert len(eval_names) == 70 and not train_names & eval_names
    pixels = lambda name: hashlib.sha256(np.asarray(Image.open(folder / name)).tobytes()).hexdigest()
    assert not {pixels(n) for n in train_names} & {pixels(n) for n in eval_names}


def test_same_seed_same_bytes(world, tmp_path):
    folder, _ = world
    make_world(tmp_path / "again", n_train=80, n_eval=70, seed=5)
    assert digest(tmp_path / "again") == digest(folder)
    make_world(tmp_path / "other", n_train=80, n_eval=70, seed=6)
    other = digest(tmp_path / "other")
    assert other["stage1.json"] != digest(folder)["stage1.json"]
    assert sum(other[k] != v for k, v in digest(folder).items() if k.startswith("images/")) > 100


# The stated limits: no answer of a type above 1.5 / K, for its K answers (count: 0-3, "3" is rare, "4" rarer).
ANSWERS = {"colour": 5, "shape": 4, "count": 4, "position": 9, "relation": 9, "yes_no": 2, "multiple_choice": 3}


def test_answers_are_balanced(tmp_path):
    paths = make_world(tmp_path, n_train=300, n_eval=7 * 60, seed=1)
    _, stage2, evaluation = records(paths)
    by_type = {t: Counter() for t in QUESTION_TYPES}
    for r in evaluation: by_type[r["question_type"]][r["conversations"][1]["value"]] += 1
    for qtype, answers in by_type.items():
        assert len(answers) >= ANSWERS[qtype], (qtype, answers)
        assert max(answers.values()) / sum(answers.values()) <= 1.5 / ANSWERS[qtype], (qtype, answers)
    assert by_type["yes_no"]["Yes"] == by_type["yes_no"]["No"]
    training = Counter(gpt["value"].split(",")[0] for r in stage2 for human, gpt in zip(r["conversations"][::2],
                       r["conversations"][1::2]) if "Is there a" in human["value"])            # short and sentence answers
    assert set(training) == {"Yes", "No"} and abs(training["Yes"] - training["No"]) <= 1


def test_bad_input_refused(tmp_path):
    with pytest.raises(ValueError, match="n_train"): make_world(tmp_path, n_train=0)
    with pytest.raises(ValueError, match="already holds"):
        draw_scene([ToyObject("circle", "red", "small", 0, 0), ToyObject("square", "blue", "large", 0, 0)])
    with pytest.raises(ValueError, match="'pink'"): draw_scene([ToyObject("circle", "pink", "small", 0, 0)])
    with pytest.raises(ValueError, match="outside"): draw_scene([ToyObject("circle", "red", "small", 3, 0)])


def test_chance_and_baseline_by_hand():
    def record(qtype, question, answer):
        return {"question_type": qtype, "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                                          {"from": "gpt", "value": answer}]}
    evaluation = [record("colour", "What colour is the circle?", "Red"), record("colour", "What colour is the circle?", "Red"),
                  record("colour", "What colour is the cross?", "Blue"), record("colour", "What colour is the cross?", "Green"),
                  record("count", "How many squares are there?", "2")]
    train = [{"conversations": record("", "What colour is the cross?", "Green")["conversations"]
              + record("", "What colour is the circle?", "Blue")["conversations"]}]
    # colour: Red is the commonest answer (2 of 4); per text: circle -> Red (2 right), cross -> a tie, 1 right;
    # from training: circle -> Blue (0), cross -> Green (1); count: one question, always right.
    assert chance_and_baseline(evaluation, train) == {
        "colour": dict(n=4, answers=3, chance=0.5, question_only=0.75, question_only_train=0.25),
        "count": dict(n=1, answers=1, chance=1.0, question_only=1.0, question_only_train=1.0)}


# --- the toy tokenizer ---

@pytest.fixture(scope="module")
def toy(world):
    return ToyTokenizer.load(world[1]["tokenizer"])


def test_tokenizer_is_world_renumbered(world, toy):
    stage1, stage2, evaluation = records(world[1])
    table = json.loads(world[1]["tokenizer"].read_text())["world_ids"]
    renumber = {w: i for i, w in enumerate(table)}
    world_tokenizer = default_tokenizer()
    texts = toy_corpus(stage1 + stage2 + evaluation)
    for text in texts:
        ids = toy.encode(text)
        assert ids == [renumber[i] for i in world_tokenizer.encode(text)]
        assert toy.decode(ids) == text
    assert table[0] == 0 and len(toy) == len(table) < 200


def test_tokenize_conversation_with_the_toy_tokenizer(world, toy):
    renumber = {w: i for i, w in enumerate(toy.world_ids)}
    stage1, stage2, evaluation = records(world[1])
    for record in stage1[:20] + stage2 + evaluation:
        for position in IMAGE_POSITIONS:
            ids, labels = tokenize_conversation(record["conversations"], position, toy)
            world_ids, world_labels = tokenize_conversation(record["conversations"], position, default_tokenizer())
            assert ids == [renumber[i] if i >= 0 else i for i in world_ids]
            assert labels == [renumber[i] if i >= 0 else i for i in world_labels]


def test_stop_ids(toy):
    turn_end, end = stop_token_ids(toy)
    assert end == 0 and toy.world_ids[turn_end] == STOP_TOKEN_INDEX and toy.decode([turn_end]) == "\n\n"


def test_unknown_text_and_ids_refused(toy):
    with pytest.raises(ValueError, match="zebra"): toy.encode("A zebra at the top left.")
    for bad in ([len(toy)], [-1], [1.5]):
        with pytest.raises(ValueError, match="unknown token ids"): toy.decode(bad)


def test_save_load_round_trip(toy, tmp_path):
    toy.save(tmp_path / "tok.json")
    again = ToyTokenizer.load(tmp_path / "tok.json")
    assert again.world_ids == toy.world_ids and len(again) == len(toy)
    assert again.encode("What colour is the triangle?") == toy.encode("What colour is the triangle?")


def _edit(data, key, value): return {**data, key: value}


@pytest.mark.parametrize("corrupt, message", [
    (lambda text, data: text[:len(text) // 2], "not a JSON file"),
    (lambda text, data: json.dumps(_edit(data, "format", "bpe")), "not a toy tokenizer"),
    (lambda text, data: json.dumps(_edit(data, "version", 2)), "not a toy tokenizer"),
    (lambda text, data: json.dumps(_edit(data, "world_ids", data["world_ids"][1:])), "end of text"),
    (lambda text, data: json.dumps(_edit(data, "world_ids", data["world_ids"] + [70000])), "not World token ids"),
    (lambda text, data: json.dumps(_edit(data, "world_ids", data["world_ids"] + data["world_ids"][-1:])), "twice"),
    (lambda text, data: json.dumps(_edit(data, "world_ids", [i for i in data["world_ids"] if i != STOP_TOKEN_INDEX])),
     "turn end"),
    (lambda text, data: json.dumps(_edit(data, "tokens", data["tokens"][:-1] + ["x"])), "disagree"),
    (lambda text, data: json.dumps(_edit(data, "world_ids", "0 1 2")), "list of ints")])
def test_corrupt_tokenizer_refused(toy, tmp_path, corrupt, message):
    toy.save(tmp_path / "tok.json")
    text = (tmp_path / "tok.json").read_text()
    (tmp_path / "tok.json").write_text(corrupt(text, json.loads(text)))
    with pytest.raises(ValueError, match=message) as e: ToyTokenizer.load(tmp_path / "tok.json")
    assert "tok.json" in str(e.value)


# --- stage 0 at a tiny size ---

def test_pretrain_vision_learns_and_loads(world, tmp_path):
    folder, _ = world
    metrics = pretrain_vision(folder, tmp_path / "clip.pth", steps=12, batch_size=32, seed=0)
    assert len(metrics["loss"]) == 12 and np.mean(metrics["loss"][-3:]) < metrics["loss"][0]
    assert metrics["n_held_out"] == 70 and metrics["retrieval_chance"] == 1 / 70   # one caption right of 70 by chance
    right = [metrics[k] * 70 for k in ("retrieval_before", "retrieval_after")]    # 12 steps stay at chance: 1 and 1
    assert all(0 <= n <= 70 and n == pytest.approx(round(n)) for n in right)      # a count of held-out captions
    tower = load_tower(tmp_path / "clip.pth", head_width=TOY_TOWER.head_width, quick_gelu=True)   # what --vision does
    assert tower.cfg == TOY_TOWER
    saved = read_state_dict(tmp_path / "clip.pth")
    assert torch.equal(tower.visual.conv1.weight, saved["visual.conv1.weight"])
    images = torch.randn(2, 3, TOY_TOWER.image_size, TOY_TOWER.image_size)
    assert tower(images).shape == (2, TOY_TOWER.grid ** 2 + 1, TOY_TOWER.width)


def test_pretrain_lm_learns_loads_and_repeats(world, toy, tmp_path):
    stage1, stage2, _ = records(world[1])
    texts = [conversation_text(r["conversations"]) for r in stage1 + stage2]
    metrics = pretrain_lm(texts, toy, tmp_path / "lm.pth", steps=12, seed=0, batch_size=4, ctx_len=64)
    assert len(metrics["loss"]) == 12 and np.mean(metrics["loss"][-3:]) < metrics["loss"][0]
    assert metrics["held_out_loss"] < metrics["held_out_loss_before"]
    model = load_rwkv6(tmp_path / "lm.pth")                                                       # what --lm does
    assert (model.cfg.vocab_size, model.cfg.n_layer, model.cfg.n_embd) == (len(toy), 4, 64)
    pretrain_lm(texts, toy, tmp_path / "again.pth", steps=12, seed=0, batch_size=4, ctx_len=64)
    first, again = read_state_dict(tmp_path / "lm.pth"), read_state_dict(tmp_path / "again.pth")
    assert all(torch.equal(first[k], again[k]) for k in first)
