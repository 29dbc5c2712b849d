"""The World tokenizer gives byte-for-byte the ids of the reference `TRIE_TOKENIZER` (rwkv package)."""
import random
from importlib.resources import files

import pytest

from visualrwkv.tokenizer import WorldTokenizer

TEXTS = [
    "",
    "Hello, world!",
    "User: What is in the image?\n\nAssistant: A cat on a sofa.\n\n",
    "中文分词测试：视觉语言模型把图像和文字放在一起。",
    "日本語のテキストと한국어 텍스트, Ελληνικά, русский, العربية",
    "emoji 🦙🖼️👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
    "def f(x):\n\tif x:\n\t\treturn x ** 2  # comment\n    else:\n        return None\n",
    "runs of whitespace:" + " " * 300 + "\n" * 7 + "\t" * 5 + "\r\n\r\n",
    "\x00\x01\x7f control bytes and a NUL",
    "https://example.com/path?query=1&b=2 <image> </s> <|endoftext|>",
]


@pytest.fixture(scope="module")
def tokenizers():
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
    return WorldTokenizer(), TRIE_TOKENIZER(str(files("visualrwkv") / "rwkv_vocab_v20230424.txt"))


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_reference(tokenizers, text):
    ours, ref = tokenizers
    ids = ours.encode(text)
    assert ids == ref.encode(text)
    assert ours.decode(ids) == text


def test_random_unicode_equals_reference(tokenizers):
    ours, ref = tokenizers
    rng = random.Random(0)
    alphabet = [chr(c) for c in list(range(32, 127)) + list(range(0x4E00, 0x4E80)) + list(range(0x1F600, 0x1F620))] + [" ", "\n", "\t"]
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80)))
        assert ours.encode(text) == ref.encode(text), text


def test_special_ids(tokenizers):
    ours, _ = tokenizers
    assert ours.encode("\n\n") == [261]
    assert ours.decode([0]) == ""                       # end of text
    assert len(ours) == 65530


def test_bad_ids_and_bytes_are_clear(tokenizers):
    ours, _ = tokenizers
    with pytest.raises(ValueError, match="unknown token ids"):
        ours.decode([1, 2, 99999])
    half_char = ours.encode_bytes("你".encode("utf-8")[:2])
    assert ours.decode(half_char) == "\ufffd"          # a character cut mid-way: replacement, not a crash
