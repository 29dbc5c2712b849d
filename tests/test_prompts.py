"""tokenize_conversation builds VisualRWKV v6.0 prompts: the expected ids and labels are the official code's own output,
saved in tests/fixtures/official_prompts.json by tests/fixtures/make_official_fixtures.py (VisualRWKV-v6/v6.0
src/dataset.py run as training and as evaluate.py runs it, with the official tokenizer src/rwkv_tokenizer.py)."""
import json
import os
from pathlib import Path

import pytest
import rwkv
from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

from visualrwkv.prompts import IGNORE_INDEX, IMAGE_TOKEN_INDEX, tokenize_conversation

OFFICIAL = json.loads((Path(__file__).parent / "fixtures" / "official_prompts.json").read_text())["cases"]
REF = TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt"))


def official(name, position):
    "The official (input_ids, labels) of the fixture case `name` at image `position` (None: a text-only sample)."
    case = next(c for c in OFFICIAL if c["name"] == name and c["image_position"] == position)
    return case["input_ids"], case["labels"]


def conversation(name):
    return next(c["conversations"] for c in OFFICIAL if c["name"] == name)


@pytest.mark.parametrize("case", [c for c in OFFICIAL if c["image_position"]],
                         ids=lambda c: f"{c['name']}-{c['image_position']}")
def test_equals_the_official_output(case):
    assert tokenize_conversation(case["conversations"], case["image_position"]) == (case["input_ids"], case["labels"])


@pytest.mark.parametrize("position", ["first", "middle", "last"])
def test_text_only_equals_the_official_output_at_every_position(position):
    "Official text-only samples skip image placement (MyDataset.__getitem__ calls process_tokens_in_conversations)."
    assert tokenize_conversation(conversation("text_only"), position) == official("text_only", None)


def test_default_is_sandwich():
    assert tokenize_conversation(conversation("vqa_two_turns")) == official("vqa_two_turns", "middle")


def test_the_sandwich_copy_keeps_a_later_turns_blank_lines():
    """The official get_all_human_conversation only strips the human turns without the image: the copy of
    'And  its colour?\\n\\n \\nBe brief.' keeps its blank lines, while that turn itself has them collapsed."""
    ids, _ = tokenize_conversation(conversation("blank_lines_everywhere"), "middle")
    image = ids.index(IMAGE_TOKEN_INDEX)
    assert REF.decode(ids[:image]) == "User: What is on the table?\nAnd  its colour?\n\n \nBe brief.\n"
    assert "User: And  its colour?\nBe brief.\n\n" in REF.decode(ids[image + 1:])


def test_labels_keep_only_answers_and_stop_tokens():
    ids, labels = tokenize_conversation(conversation("vqa_two_turns"), "middle")
    kept = [l for l in labels if l != IGNORE_INDEX]
    assert kept == [20733, 261, 28918, 261] and REF.decode(kept) == " Red\n\n Four\n\n"


def test_inference_prompt_ends_with_bare_assistant():
    ids, labels = tokenize_conversation(conversation("inference_prompt"), "first")
    assert ids[-3:] == [5585, 41693, 59] and REF.decode(ids[-3:]) == "Assistant:" and set(labels) == {IGNORE_INDEX}


def test_role_names_ignore_case():
    """'Human'/'GPT' read as 'human'/'gpt'. (The official preprocess accepts them too, but its mask_targets compares the
    speaker case-sensitively and would leave a 'Human' turn unmasked; we mask it.)"""
    conv = [{"from": "Human", "value": "<image>"}, {"from": "GPT", "value": "ok"}]
    for position in ("first", "middle", "last"):
        assert tokenize_conversation(conv, position) == official("image_only_turn", position)


@pytest.mark.parametrize("conv, position, match", [
    (conversation("vqa_two_turns"), "centre", "image_position must be one of"),
    ([], "first", "non-empty list"),
    ([{"from": "system", "value": "hi"}], "first", r"conversations\[0\]\['from'\]"),
    ([{"from": "human", "value": 3}], "first", r"conversations\[0\]\['value'\]"),
    ([{"value": "hi"}], "first", "keys 'from' and 'value'"),
    (conversation("vqa_two_turns") + [{"from": "human", "value": "<image> again"}], "first", "one image per sample"),
])
def test_bad_input_is_named(conv, position, match):
    with pytest.raises(ValueError, match=match): tokenize_conversation(conv, position)
