"""tokenize_conversation builds VisualRWKV v6.0 prompts: expected ids are assembled here from the rules, turn by turn,
with the reference tokenizer of the `rwkv` package (independent of visualrwkv.tokenizer)."""
import os

import pytest
import rwkv
from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

from visualrwkv.prompts import IGNORE_INDEX, IMAGE_TOKEN_INDEX, tokenize_conversation

REF = TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt"))
IMG = IMAGE_TOKEN_INDEX
HINT = "Answer the question using a single word or phrase."


def enc(text): return REF.encode(text)


def human(*pieces):
    "Expected ids and labels of a human turn given its text pieces and IMG markers."
    ids = [t for p in pieces for t in ([p] if p == IMG else enc(p))]
    return ids, [IGNORE_INDEX] * len(ids)


def gpt(answer):
    ids = enc(f"Assistant: {answer}\n\n") if answer else enc("Assistant:")
    return ids, [IGNORE_INDEX] * min(3, len(ids)) + ids[3:]


def join(*turns):
    return [t for ids, _ in turns for t in ids], [l for _, labels in turns for l in labels]


VQA = [{"from": "human", "value": f"<image>\nWhat is on the table?\n{HINT}"},
       {"from": "gpt", "value": "A cup"},
       {"from": "human", "value": "And  its colour?\n\n \nBe brief."},
       {"from": "gpt", "value": "Blue"}]


@pytest.mark.parametrize("position", ["first", "middle", "last"])
def test_multi_turn_each_position(position):
    q1 = f"What is on the table?\n{HINT}"
    first_turn = {"first": human("User: ", IMG, f"\n{q1}\n\n"),
                  "last": human(f"User: {q1}\n", IMG, "\n\n"),
                  "middle": human("User: What is on the table?\nAnd  its colour?\n\n \nBe brief.\n", IMG, f"\n{q1}\n\n")}
    expected = join(first_turn[position], gpt("A cup"), human("User: And  its colour?\nBe brief.\n\n"), gpt("Blue"))
    assert tokenize_conversation(VQA, position) == expected


def test_default_is_sandwich():
    assert tokenize_conversation(VQA) == tokenize_conversation(VQA, "middle")


def test_labels_keep_only_answers_and_stop_tokens():
    ids, labels = tokenize_conversation(VQA, "middle")
    assert len(ids) == len(labels) and ids.count(IMG) == 1
    kept = [l for l in labels if l != IGNORE_INDEX]
    assert kept == enc(" A cup\n\n") + enc(" Blue\n\n")
    assert all(l in (IGNORE_INDEX, i) for i, l in zip(ids, labels))
    assert kept.count(261) == 2 and ids[-1] == 261


def test_text_only_is_the_same_for_every_position():
    conv = [{"from": "human", "value": " Tell me\n\n\na joke. "}, {"from": "gpt", "value": "No.\n\n\nSorry."},
            {"from": "human", "value": "Please"}, {"from": "gpt", "value": "Fine"}]
    expected = join(human("User: Tell me\na joke.\n\n"), gpt("No.\nSorry."), human("User: Please\n\n"), gpt("Fine"))
    for position in ("first", "middle", "last"):
        assert tokenize_conversation(conv, position) == expected


def test_inference_prompt_ends_with_bare_assistant():
    conv = [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": ""}]
    ids, labels = tokenize_conversation(conv, "first")
    assert (ids, labels) == join(human("User: ", IMG, "\nDescribe it.\n\n"), gpt(""))
    assert ids[-3:] == enc("Assistant:") and set(labels) == {IGNORE_INDEX}


def test_image_only_turn_and_human_case():
    conv = [{"from": "Human", "value": "<image>"}, {"from": "GPT", "value": "ok"}]
    for position in ("first", "middle", "last"):   # the turn text is stripped after the image is placed
        assert tokenize_conversation(conv, position) == join(human("User: ", IMG, "\n\n"), gpt("ok"))


@pytest.mark.parametrize("conv, position, match", [
    (VQA, "centre", "image_position"),
    ([], "first", "non-empty list"),
    ([{"from": "system", "value": "hi"}], "first", r"conversations\[0\]\['from'\]"),
    ([{"from": "human", "value": 3}], "first", r"conversations\[0\]\['value'\]"),
    ([{"value": "hi"}], "first", "keys 'from' and 'value'"),
    (VQA + [{"from": "human", "value": "<image> again"}], "first", "one image per sample"),
])
def test_bad_input_is_named(conv, position, match):
    with pytest.raises(ValueError, match=match): tokenize_conversation(conv, position)
