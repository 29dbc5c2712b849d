"""Generation: prefill + RNN-mode decoding gives the tokens of the official loop (the whole sequence through the
parallel forward for every new token), a batch gives each prompt its own tokens, replies stop exactly at the
tokenizer's stop ids, streamed text is UTF-8 safe, a chat prefills its whole conversation each turn, and a checkpoint
loads with its model_config.json."""
import json

import pytest
import torch

import visualrwkv.generate as G
from visualrwkv.generate import (Chat, decode_step, generate, load_for_inference, prefill, stop_token_ids, stream,
                                 text_pieces)
from visualrwkv.checkpoint import save_visualrwkv
from visualrwkv.model import VisualRWKV
from visualrwkv.prompts import IMAGE_TOKEN_INDEX
from visualrwkv.rwkv import RWKV6Config, randomize_
from visualrwkv.tokenizer import WorldTokenizer
from visualrwkv.vision import VisionConfig

WORLD = WorldTokenizer()
VOCAB = 61
VIS = VisionConfig(image_size=28, patch_size=7, width=24, layers=2, head_width=8)      # 16 patches + CLS
N_IMAGE = 17


def make_model(scan="bidirectional", grid_size=-1, seed=0, vocab_size=VOCAB, tiny_att_dim=0, dtype=torch.float64):
    cfg = RWKV6Config(vocab_size=vocab_size, n_layer=4, n_embd=32, head_size=8, lora_mix=4, lora_decay=4)
    model = VisualRWKV(cfg, VIS, grid_size=grid_size, scan=scan, tiny_att_dim=tiny_att_dim)
    randomize_(model.rwkv, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in list(model.vit.parameters()) + [model.proj.weight]: p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.to(dtype).eval()


def make_samples(seed, vocab_size=VOCAB, dtype=torch.float64):
    """Five prompts: images at different places, text only, an image first, a one-token prompt."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(1, vocab_size, (n,), generator=g).tolist()
    samples = [ids(2) + [IMAGE_TOKEN_INDEX] + ids(7), ids(11), ids(8) + [IMAGE_TOKEN_INDEX] + ids(1),
               [IMAGE_TOKEN_INDEX] + ids(3), ids(1)]
    images = [torch.randn(3, 28, 28, generator=g, dtype=dtype) if IMAGE_TOKEN_INDEX in s else None for s in samples]
    return samples, images


def scripted_model(chain, vocab_size=VOCAB):
    """Greedy next token after t is chain[t], after any other token 0: the blocks add nothing (zero output
    projections), so the last position's vector is ln0(emb[t]); emb[t] is a one-hot the head maps to chain[t]."""
    cfg = RWKV6Config(vocab_size=vocab_size, n_layer=2, n_embd=16, head_size=8, lora_mix=4, lora_decay=4)
    model = VisualRWKV(cfg, VIS).eval()
    with torch.no_grad():
        for block in model.rwkv.blocks: block.att.output.weight.zero_(); block.ffn.value.weight.zero_()
        model.rwkv.emb.weight.zero_(); model.rwkv.head.weight.zero_()
        for slot, (token, following) in enumerate(chain.items()):
            model.rwkv.emb.weight[token, slot] = 1.0
            model.rwkv.head.weight[following, slot] = 10.0
    return model


class ByteTokenizer:
    """A fake tokenizer over the given id -> bytes table; the turn end '\\n\\n' and end of text are its own ids."""
    def __init__(self, vocab, end_of_text=0):
        self.vocab, self.end_of_text = vocab, end_of_text

    def encode(self, text):
        by_bytes = {v: k for k, v in self.vocab.items()}
        data, out = text.encode("utf-8"), []
        while data:
            match = max((b for b in by_bytes if data.startswith(b)), key=len)
            out.append(by_bytes[match]); data = data[len(match):]
        return out

    def decode_bytes(self, ids): return b"".join(self.vocab.get(i, b"") for i in ids)
    def decode(self, ids): return self.decode_bytes(ids).decode("utf-8", errors="replace")
    def __len__(self): return max(self.vocab) + 1


@torch.no_grad()
def greedy_by_reforward(model, ids, image, n):
    """The official evaluation's loop (v6.0 src/model.py:572-606): the whole sequence through the parallel forward
    for each new token, argmax at the last position."""
    new = []
    for _ in range(n):
        new.append(int(model([ids + new], None if image is None else [image]).logits[0, -1].argmax()))
    return new


@pytest.mark.parametrize("scan, grid_size", [("bidirectional", -1), ("multidirectional", 2)])
def test_greedy_equals_full_reforward(scan, grid_size):
    model = make_model(scan, grid_size, seed=3)
    samples, images = make_samples(seed=5)
    new = generate(model, samples, images, max_new_tokens=8, stop_ids=())
    for b, (ids, image) in enumerate(zip(samples, images)):
        assert new[b] == greedy_by_reforward(model, ids, image, 8), b


def test_prefill_equals_the_forward_at_the_last_real_token():
    model = make_model(seed=7)
    samples, images = make_samples(seed=11)
    lengths = [len(ids) + (N_IMAGE - 1 if IMAGE_TOKEN_INDEX in ids else 0) for ids in samples]   # [10+16, 11, ...]
    assert lengths == [26, 11, 26, 20, 1]
    logits, state = prefill(model, samples, images)
    with torch.no_grad(): out = model(samples, images)
    assert logits.shape == (5, VOCAB)
    for b, n in enumerate(lengths):                                   # observed 0: the same forward, head at one place
        torch.testing.assert_close(logits[b], out.logits[b, n - 1], atol=4e-15, rtol=0)
    for s_prefill, s_forward in zip(state, out.state):
        for a, c in zip(s_prefill, s_forward): assert torch.equal(a, c)


def test_decode_step_continues_the_prompt():
    model = make_model(seed=13)
    samples, images = make_samples(seed=17)
    tail = torch.tensor([[3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13, 14], [15, 16, 17]])        # [B, 3]
    logits, state = prefill(model, samples, images)
    for t in range(3): logits, state = decode_step(model, tail[:, t], state)
    for b, (ids, image) in enumerate(zip(samples, images)):
        with torch.no_grad(): whole = model([ids + tail[b].tolist()], None if image is None else [image]).logits[0, -1]
        torch.testing.assert_close(logits[b], whole, atol=4e-15, rtol=0)            # logits up to 2: observed <= 9e-16


def test_generate_batched_equals_alone():
    model = make_model("multidirectional", grid_size=1, seed=31)
    samples, images = make_samples(seed=37)
    new = generate(model, samples, images, max_new_tokens=5, stop_ids=())
    assert [len(ids) for ids in new] == [5] * 5
    for b in range(len(samples)):
        assert new[b] == generate(model, [samples[b]], None if images[b] is None else [images[b]], max_new_tokens=5,
                                  stop_ids=())[0]


def test_hybrid_generate_equals_parallel_and_alone():
    model = make_model("multidirectional", grid_size=2, seed=59, tiny_att_dim=16)
    samples, images = make_samples(seed=61)
    new = generate(model, samples, images, max_new_tokens=4, stop_ids=())
    for b, (ids, image) in enumerate(zip(samples, images)):
        assert generate(model, [ids], None if image is None else [image], max_new_tokens=4, stop_ids=())[0] == new[b]
        assert new[b] == greedy_by_reforward(model, ids, image, 4)


def test_stops_exactly_at_the_stop_ids_and_finished_rows_leave(monkeypatch):
    """5 -> 7 -> 9 -> 11 -> 3 (stop) -> 13 -> 14 -> 13 ...; after an unscripted token comes 0 (end of text)."""
    model = scripted_model({5: 7, 7: 9, 9: 11, 11: 3, 3: 13, 13: 14, 14: 13})
    prompts = [[1, 2, 5], [8, 9], [4, 13], [4, 20]]
    rows_per_step = []
    real_decode = G.decode_step
    monkeypatch.setattr(G, "decode_step", lambda m, ids, s: rows_per_step.append(len(ids)) or real_decode(m, ids, s))
    new = generate(model, prompts, max_new_tokens=6, stop_ids=(3, 0))
    assert new == [[7, 9, 11], [11], [14, 13, 14, 13, 14, 13], []]
    assert rows_per_step == [3, 2, 2, 1, 1]            # the unscripted row stops at once, then rows 2 and 1 finish
    assert generate(model, prompts[:1], max_new_tokens=6, stop_ids=())[0] == [7, 9, 11, 3, 13, 14]
    assert generate(model, prompts[:1], max_new_tokens=0) == [[]]
    rows_per_step.clear()
    assert generate(model, prompts[:2], max_new_tokens=100, stop_ids=(3,)) == [[7, 9, 11], [11]]
    assert rows_per_step == [2, 1, 1]                   # the loop ends when every row has stopped


def test_stop_ids_come_from_the_tokenizer():
    assert stop_token_ids(WORLD) == (261, 0)
    assert G.WORLD_STOP_IDS == (261, 0)
    fake = ByteTokenizer({5: b"a", 6: b"b", 7: b"\n\n", 8: b"\n"}, end_of_text=2)
    assert stop_token_ids(fake) == (7, 2)
    model = scripted_model({5: 6, 6: 7, 7: 5})
    assert "".join(stream(model, fake, [5])) == "b"                                       # stops at id 7, not 261
    with pytest.raises(ValueError, match=r"turn end '\\n\\n' as 2 tokens \[8, 8\]"):
        stop_token_ids(ByteTokenizer({5: b"a", 8: b"\n"}))


SPLIT = {5: b"2", 6: b"5", 7: b" ", 8: b"\xc2", 9: b"\xb0", 10: b"C", 11: b" \xf0\x9f", 12: b"\xa6", 13: b"\x9c",
         20: b"\n\n"}                                   # '25 °C 🦜': the degree sign in 2 tokens, the parrot in 3


def test_streamed_text_holds_back_a_split_character():
    tokenizer = ByteTokenizer(SPLIT)
    model = scripted_model({4: 5, 5: 6, 6: 7, 7: 8, 8: 9, 9: 10, 10: 11, 11: 12, 12: 13, 13: 20})
    pieces = list(stream(model, tokenizer, [1, 4]))
    assert pieces == ["2", "5", " ", "°", "C", " ", "🦜"]
    assert "".join(pieces) == "25 °C 🦜" == tokenizer.decode([5, 6, 7, 8, 9, 10, 11, 12, 13])
    cut = list(text_pieces(tokenizer, [5, 11, 12]))                                      # ends inside the parrot
    assert cut == ["2", " ", "\ufffd"] and "".join(cut) == tokenizer.decode([5, 11, 12])


def test_streamed_text_with_the_world_tokenizer():
    tokenizer = WORLD
    ids = tokenizer.encode("a parrot 🦜 at 25 °C")
    assert [3319, 167, 157] == ids[4:7]                                                 # the parrot: 3 tokens
    pieces = list(text_pieces(tokenizer, ids))
    assert "".join(pieces) == "a parrot 🦜 at 25 °C" and "🦜" in pieces


def test_chat_prefills_the_whole_conversation_each_turn(monkeypatch):
    """Sandwich prompt: every question so far comes before the image, so the second prompt does not extend the
    first; the prompt text is written out by hand."""
    tokenizer = WORLD
    reply = tokenizer.encode(" It is red") + [261]
    model = scripted_model(dict(zip([59] + reply[:-1], reply)), vocab_size=65536)       # ':' -> ' It' ' is' ' red'
    seen = []
    real_prefill = G.prefill
    monkeypatch.setattr(G, "prefill", lambda m, ids, images: seen.append((ids, images)) or real_prefill(m, ids, images))
    image = torch.randn(3, 28, 28)
    chat = Chat(model, tokenizer, image=image)
    assert "".join(chat.ask("What is it?")) == " It is red"
    assert "".join(chat.ask("Which colour?")) == " It is red"
    assert chat.turns == [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "It is red"},
                          {"from": "human", "value": "Which colour?"}, {"from": "gpt", "value": "It is red"}]
    (first, first_images), (second, second_images) = seen
    assert first_images[0] is image and second_images[0] is image
    enc = lambda *pieces: [i for p in pieces for i in (tokenizer.encode(p) if p != "<image>" else [IMAGE_TOKEN_INDEX])]
    assert first == [enc("User: What is it?\n", "<image>", "\nWhat is it?\n\n") + enc("Assistant:")]
    assert second == [enc("User: What is it?\nWhich colour?\n", "<image>", "\nWhat is it?\n\n")       # each turn
                      + enc("Assistant: It is red\n\n") + enc("User: Which colour?\n\n") + enc("Assistant:")]
    assert second[0][:len(first[0])] != first[0] and chat.last_prompt_ids == second[0]


def test_chat_keeps_a_reply_cut_short():
    tokenizer = WORLD
    reply = tokenizer.encode(" It is red") + [261]
    chat = Chat(scripted_model(dict(zip([59] + reply[:-1], reply)), vocab_size=65536), tokenizer)
    pieces = chat.ask("What is it?")
    assert next(pieces) == " It"
    pieces.close()
    assert chat.turns == [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "It"}]


OPTIONS = dict(grid_size=2, scan="unidirectional", image_position="first", vision_head_width=8)


@pytest.fixture
def checkpoint(tmp_path):
    model = make_model("unidirectional", grid_size=2, seed=71, vocab_size=65536, dtype=torch.float32)
    save_visualrwkv(model, tmp_path / "visualrwkv.pth")
    (tmp_path / "model_config.json").write_text(json.dumps(OPTIONS))
    return model, tmp_path / "visualrwkv.pth"


def test_load_for_inference_reads_model_config(checkpoint):
    model, path = checkpoint
    loaded, tokenizer = load_for_inference(path, device="cpu")
    assert (loaded.grid_size, loaded.scan, loaded.image_position) == (2, "unidirectional", "first")
    assert not loaded.training and next(loaded.parameters()).dtype == torch.float32
    assert tokenizer.encode("\n\n") == [261]
    samples, images = make_samples(seed=73, vocab_size=65536, dtype=torch.float32)
    assert generate(loaded, samples, images, max_new_tokens=3) == generate(model, samples, images, max_new_tokens=3)
    again, _ = load_for_inference(path, device="cpu", dtype=torch.float64, image_position="middle", scan=None)
    assert (again.image_position, again.scan, next(again.parameters()).dtype) == ("middle", "unidirectional",
                                                                                  torch.float64)


def test_load_for_inference_without_model_config(checkpoint, tmp_path):
    _, path = checkpoint
    (tmp_path / "model_config.json").unlink()
    with pytest.warns(UserWarning, match="no model_config.json beside"):
        loaded, _ = load_for_inference(path, device="cpu", vision_head_width=8)
    assert (loaded.grid_size, loaded.image_position) == (-1, "middle")
    with pytest.raises(ValueError, match="no model_config.json there"):
        load_for_inference(path, device="cpu", config=tmp_path / "elsewhere")


def test_load_for_inference_refuses_a_vocabulary_smaller_than_the_tokenizer(tmp_path):
    save_visualrwkv(make_model(seed=79, dtype=torch.float32), tmp_path / "visualrwkv.pth")
    (tmp_path / "model_config.json").write_text(json.dumps(OPTIONS))
    with pytest.raises(ValueError, match="61 token embeddings, its tokenizer 65530 ids"):
        load_for_inference(tmp_path / "visualrwkv.pth", device="cpu")


@pytest.mark.parametrize("call, match", [
    (lambda m: generate(m, [[1, 2]], temperature=-1.0), "temperature: expected >= 0"),
    (lambda m: generate(m, [[1, 2]], top_p=0.0), "top_p: expected 0 < top_p <= 1"),
    (lambda m: generate(m, [[1, 2]], top_p=1.5), "top_p: expected 0 < top_p <= 1"),
    (lambda m: generate(m, [[1, 2]], max_new_tokens=-1), "max_new_tokens: expected an int >= 0"),
    (lambda m: generate(m, [[1, 2], []]), "non-empty samples"),
    (lambda m: generate(m, [[1, IMAGE_TOKEN_INDEX]]), "placeholder in its ids but images\\[b\\] is None"),
    (lambda m: stream(m, WORLD, [[1, 2], [3]]), "one non-empty prompt"),
    (lambda m: stream(m, WORLD, [1, IMAGE_TOKEN_INDEX], torch.zeros(1, 3, 28, 28)),
     "one image tensor \\[3, S, S\\], got torch.Size\\(\\[1, 3, 28, 28\\]\\)"),
    (lambda m: Chat(m, WORLD).ask("look: <image>"), "<image> is placed by the chat"),
    (lambda m: Chat(m, WORLD).ask("  "), "expected a question"),
    (lambda m: decode_step(m, torch.tensor([[1, 2]]), None), "one id per sample \\[B\\]"),
    (lambda m: decode_step(m, torch.tensor([1, 2, 3]), prefill(m, [[1], [2]])[1]), "3 ids for a state of 2 samples"),
])
def test_bad_input_errors(call, match):
    with pytest.raises(ValueError, match=match): call(make_model(seed=83))
