"""VisualRWKV: a batch gives each sample exactly its own result; scans equal a simple per-sample float64 reference."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from visualrwkv.model import VisualRWKV, build_batch, next_token_loss, visual_forward_embeds
from visualrwkv.prompts import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from visualrwkv.rwkv import HybridLayerState, RWKV6Config, TinyAttention, randomize_
from visualrwkv.scans import ORDERS, layer_order, patch_order, scan_permutation
from visualrwkv.vision import VisionConfig

VOCAB = 61
VIS = VisionConfig(image_size=28, patch_size=7, width=24, layers=2, head_width=8)
# per scan, grid (2, 3, 4) and layer (0-7): the patch order each block receives in the official forward functions
# (v5.1 src/model.py uni/bi/multidirectional_forward, v6.0 bidirectional_forward, v6.01 multidirectional_forward), as
# recorded by tests/fixtures/make_official_fixtures.py
OFFICIAL_ORDERS = json.loads((Path(__file__).parent / "fixtures" / "official_scan_orders.json").read_text())["orders"]


def official_patch_order(scan, layer, grid):
    "The official order of layer `layer`'s patches; a 1x1 grid has the one order [0]."
    return [0] if grid == 1 else OFFICIAL_ORDERS[scan][str(grid)][layer]


def make_model(scan="bidirectional", grid_size=-1, data_dependent=True, seed=0):
    cfg = RWKV6Config(vocab_size=VOCAB, n_layer=4, n_embd=32, head_size=8, lora_mix=4, lora_decay=4,
                      data_dependent=data_dependent)
    model = VisualRWKV(cfg, VIS, grid_size=grid_size, scan=scan)
    randomize_(model.rwkv, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in list(model.vit.parameters()) + [model.proj.weight]: p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.double()


def make_samples(seed):
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(0, VOCAB, (n,), generator=g).tolist()
    samples = [ids(2) + [IMAGE_TOKEN_INDEX] + ids(7), ids(11), ids(8) + [IMAGE_TOKEN_INDEX] + ids(1),
               [IMAGE_TOKEN_INDEX] + ids(3), ids(1)]
    images = [torch.randn(3, 28, 28, generator=g, dtype=torch.float64) if IMAGE_TOKEN_INDEX in s else None for s in samples]
    return samples, images


def reference_logits(model, ids, image):
    """One sample, float64, no padding and no gather: the image spliced in, and each layer reads the patch tokens in the
    official code's order for that layer (from the fixture) by an explicit Python permutation."""
    rw = model.rwkv
    if IMAGE_TOKEN_INDEX in ids:
        k = ids.index(IMAGE_TOKEN_INDEX)
        x = torch.cat([rw.emb(torch.tensor(ids[:k], dtype=torch.long)), model.encode_images(image[None])[0], rw.emb(torch.tensor(ids[k + 1:], dtype=torch.long))])
    else: k, x = None, rw.emb(torch.tensor(ids, dtype=torch.long))
    G = model.patch_grid
    for i, block in enumerate(rw.blocks):
        order = list(range(len(x)))
        if k is not None and G:
            order[k:k + G * G] = [k + p for p in official_patch_order(model.scan, i, G)]
        y, _ = block(x[order][None])
        x = torch.empty_like(x)
        x[order] = y[0]
    return rw.head(rw.ln_out(x))


def test_reading_orders_of_a_3x3_grid_by_hand():
    """Patches numbered row-major: 0 1 2 / 3 4 5 / 6 7 8 (Fig. 4): along the rows, backwards, down the columns, and
    down the columns read backwards (from the bottom-right corner, up each column)."""
    assert {o: patch_order(o, 3).tolist() for o in ORDERS} == {
        "row_forward": [0, 1, 2, 3, 4, 5, 6, 7, 8], "row_reverse": [8, 7, 6, 5, 4, 3, 2, 1, 0],
        "column_forward": [0, 3, 6, 1, 4, 7, 2, 5, 8], "column_reverse": [8, 5, 2, 7, 4, 1, 6, 3, 0]}
    assert [layer_order("unidirectional", i) for i in range(5)] == ["row_forward"] * 5
    assert [layer_order("bidirectional", i) for i in range(5)] == ["row_forward", "row_reverse"] * 2 + ["row_forward"]
    assert [layer_order("multidirectional", i) for i in range(5)] == [
        "row_forward", "row_reverse", "column_forward", "column_reverse", "row_forward"]


@pytest.mark.parametrize("scan", ["unidirectional", "bidirectional", "multidirectional"])
@pytest.mark.parametrize("grid", [2, 3, 4])
def test_scan_permutation_equals_the_official_forward(scan, grid):
    """Layer by layer, the patch order of our permutation is the one the official forward functions hand each block;
    the text before (2 tokens) and the CLS token and text after the patches stay where they are."""
    T = 2 + grid * grid + 3
    for layer in range(8):
        perm = scan_permutation(scan, layer, T, 2, grid).tolist()
        assert perm == [0, 1] + [2 + p for p in OFFICIAL_ORDERS[scan][str(grid)][layer]] + list(range(T - 3, T))


def test_bad_scan_arguments_are_named():
    with pytest.raises(ValueError, match="do not fit a sequence of 8"): scan_permutation("bidirectional", 1, 8, 2, 3)
    with pytest.raises(ValueError, match="scan must be one of"): layer_order("diagonal", 0)
    with pytest.raises(ValueError, match="order must be one of"): patch_order("spiral", 3)


@pytest.mark.parametrize("scan", ["unidirectional", "bidirectional", "multidirectional"])
@pytest.mark.parametrize("grid_size", [-1, 0, 1, 2])
def test_batched_equals_reference(scan, grid_size):
    model = make_model(scan, grid_size, seed=grid_size + 7)
    samples, images = make_samples(seed=grid_size + 11)
    with torch.no_grad():
        out = model(samples, images)
        for b, (ids, img) in enumerate(zip(samples, images)):
            ref = reference_logits(model, ids, img)
            n = int(out.mask[b].sum())
            assert n == len(ref)
            torch.testing.assert_close(out.logits[b, :n], ref, atol=1e-10, rtol=0)


def assert_logits_equal_alone(model, samples, images, out):
    "Each sample's logits in the batched output `out` equal its logits when run alone; returns the solo outputs."
    solos = []
    for b, (ids, img) in enumerate(zip(samples, images)):
        alone = model([ids], None if img is None else [img])
        n = int(alone.mask.sum())
        torch.testing.assert_close(out.logits[b, :n], alone.logits[0], atol=1e-10, rtol=0)
        solos.append(alone)
    return solos


@pytest.mark.parametrize("scan", ["unidirectional", "bidirectional", "multidirectional"])
@pytest.mark.parametrize("data_dependent", [True, False])
def test_batched_equals_alone_logits_and_state(scan, data_dependent):
    model = make_model(scan, grid_size=2, data_dependent=data_dependent, seed=3)
    samples, images = make_samples(seed=5)
    with torch.no_grad():
        out = model(samples, images)
        for b, alone in enumerate(assert_logits_equal_alone(model, samples, images, out)):
            for layer_batch, layer_alone in zip(out.state, alone.state):
                for t_batch, t_alone in zip(layer_batch, layer_alone):
                    torch.testing.assert_close(t_batch[b], t_alone[0], atol=1e-10, rtol=0)


def test_padding_content_never_matters():
    model = make_model("multidirectional", grid_size=-1, seed=9)
    samples, images = make_samples(seed=13)
    with torch.no_grad():
        batch = build_batch(model, samples, images)
        garbage = batch.embeds.masked_fill(~batch.mask[..., None], 0) + 50 * torch.randn_like(batch.embeds) * ~batch.mask[..., None]
        clean, s_clean = visual_forward_embeds(model, batch.embeds, batch.mask, batch.image_starts)
        dirty, s_dirty = visual_forward_embeds(model, garbage, batch.mask, batch.image_starts)
    torch.testing.assert_close(clean[batch.mask], dirty[batch.mask], atol=1e-10, rtol=0)
    for a, b in zip(s_clean, s_dirty):
        for x, y in zip(a, b): torch.testing.assert_close(x, y, atol=1e-10, rtol=0)


def test_state_continues_the_sequence():
    model = make_model("bidirectional", grid_size=2, seed=21)
    samples, images = make_samples(seed=23)
    tail = [[1, 2, 3], [4], [5, 6], [7, 8, 9], [10]]
    with torch.no_grad():
        first = model(samples, images)
        second = model(tail, None, state=first.state)
        for b in range(len(samples)):
            full = model([samples[b] + tail[b]], None if images[b] is None else [images[b]])
            torch.testing.assert_close(second.logits[b, :len(tail[b])], full.logits[0, -len(tail[b]):], atol=1e-10, rtol=0)


def test_labels_expand_and_loss():
    model = make_model(seed=1)
    samples, images = make_samples(seed=2)
    labels = [[IGNORE_INDEX if i == IMAGE_TOKEN_INDEX else i for i in ids] for ids in samples]
    out = model(samples, images, labels)
    for b, ids in enumerate(samples):
        lab = out.labels[b][out.mask[b]]
        assert (lab != IGNORE_INDEX).sum() == sum(i != IMAGE_TOKEN_INDEX for i in ids)
        assert (out.labels[b][~out.mask[b]] == IGNORE_INDEX).all()
    loss = next_token_loss(out.logits, out.labels)
    pairs = [(out.logits[b, t], out.labels[b, t + 1]) for b in range(len(samples)) for t in range(out.logits.shape[1] - 1)
             if out.labels[b, t + 1] != IGNORE_INDEX]
    ref = torch.stack([-torch.log_softmax(lg, -1)[y] for lg, y in pairs]).mean()
    torch.testing.assert_close(loss, ref.float(), rtol=1e-6, atol=1e-6)
    loss.backward()
    assert model.proj.weight.grad is not None and model.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.vit.parameters())


@pytest.mark.parametrize("samples, images, match", [
    ([[1, IMAGE_TOKEN_INDEX, 2, IMAGE_TOKEN_INDEX]], [torch.zeros(3, 28, 28)], "at most one image"),
    ([[1, 2]], [torch.zeros(3, 28, 28)], "no -200 placeholder"),
    ([[1, IMAGE_TOKEN_INDEX]], [None], "images\\[b\\] is None"),
    ([[1], [2]], [None], "1 entries for 2 samples"),
    ([[1, IMAGE_TOKEN_INDEX]], [torch.zeros(3, 20, 20)], "images: expected shape"),
])
def test_bad_batches_are_named(samples, images, match):
    model = make_model()
    with pytest.raises(ValueError, match=match): model(samples, [None if i is None else i.double() for i in images])


def test_bad_model_choices_are_named():
    cfg = RWKV6Config(vocab_size=VOCAB, n_layer=2, n_embd=32, head_size=8)
    with pytest.raises(ValueError, match="scan must be"): VisualRWKV(cfg, VIS, scan="spiral")
    with pytest.raises(ValueError, match="image_position"): VisualRWKV(cfg, VIS, image_position="top")
    with pytest.raises(ValueError, match="does not divide"): VisualRWKV(cfg, VIS, grid_size=3)


def make_hybrid(seed=0, scan="bidirectional", layer=None):
    base = make_model(scan, grid_size=2, seed=seed)
    model = VisualRWKV(base.rwkv.cfg, VIS, grid_size=2, scan=scan, tiny_att_dim=16, tiny_att_layer=layer).double()
    state = base.state_dict()
    g = torch.Generator().manual_seed(seed + 1)
    state.update({k: torch.randn(v.shape, generator=g, dtype=v.dtype) * 0.3 for k, v in model.state_dict().items()
                  if ".tiny_att." in k})
    model.load_state_dict(state)
    return model


def official_tiny_attention(att, x):
    """VisualRWKV v5.2 src/model.py:225-234 (TinyAttention.forward), written out: LN, q/k/v of tiny_att_dim split into
    heads of head_size_a, causal softmax attention (F.scaled_dot_product_attention, is_causal=True), tiny_o."""
    B, T, C = x.shape
    n_head = att.dim // att.head_size
    xx = F.layer_norm(x, (C,), att.tiny_ln.weight, att.tiny_ln.bias)
    q = (xx @ att.tiny_q.weight.T).view(B, T, n_head, att.head_size).transpose(1, 2)
    k = (xx @ att.tiny_k.weight.T).view(B, T, n_head, att.head_size).transpose(1, 2)
    v = (xx @ att.tiny_v.weight.T).view(B, T, n_head, att.head_size).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=True)
    y = y.transpose(1, 2).contiguous().view(B, T, att.dim)
    return y @ att.tiny_o.weight.T


def test_tiny_attention_equals_official_formula():
    g = torch.Generator().manual_seed(3)
    att = TinyAttention(32, 16, head_size=8).double()
    with torch.no_grad():
        for p in att.parameters(): p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
        x = torch.randn(3, 9, 32, generator=g, dtype=torch.float64)
        y, cache = att(x)
        torch.testing.assert_close(y, official_tiny_attention(att, x), atol=1e-12, rtol=0)
        assert cache.k.shape == (3, 2, 9, 8) and cache.mask.all()
        y2, _ = att(x[:, 5:], cache=att(x[:, :5])[1])                       # RNN mode: the rest through the cache
        torch.testing.assert_close(y2, y[:, 5:], atol=1e-12, rtol=0)
        mask = torch.arange(9)[None] < torch.tensor([9, 4, 6])[:, None]       # right padding
        y_pad, _ = att(x, mask)
        for b, n in enumerate([9, 4, 6]):
            torch.testing.assert_close(y_pad[b, :n], official_tiny_attention(att, x[b:b + 1, :n])[0], atol=1e-12, rtol=0)


def test_tiny_attention_ends_its_block():
    "The official Block (v5.2 src/model.py:263-284): x + att, x + ffn, then x + tiny_att(x) in block tiny_att_layer only."
    model = make_hybrid(seed=5, layer=2)
    plain = make_model("bidirectional", grid_size=2, seed=5)
    assert [b.tiny_att is not None for b in model.rwkv.blocks] == [False, False, True, False]
    assert model.tiny_att is model.rwkv.blocks[2].tiny_att and plain.tiny_att is None
    x = torch.randn(2, 7, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h_plain, _ = plain.rwkv.blocks[2](x)
        h, state = model.rwkv.blocks[2](x)
        torch.testing.assert_close(h, h_plain + official_tiny_attention(model.tiny_att, h_plain), atol=1e-12, rtol=0)
    assert isinstance(state, HybridLayerState) and state.tiny.k.shape == (2, 2, 7, 8)


def test_hybrid_batched_equals_reference_and_alone():
    model = make_hybrid(seed=41, scan="multidirectional")
    samples, images = make_samples(seed=43)
    with torch.no_grad():
        out = model(samples, images)
        for b, (ids, img) in enumerate(zip(samples, images)):
            n = int(out.mask[b].sum())
            torch.testing.assert_close(out.logits[b, :n], reference_logits(model, ids, img), atol=1e-10, rtol=0)
            alone = model([ids], None if img is None else [img])
            cache_b, cache_alone = out.state[-1].tiny, alone.state[-1].tiny
            real = cache_b.mask[b]
            torch.testing.assert_close(cache_b.k[b][:, real], cache_alone.k[0], atol=1e-10, rtol=0)
            torch.testing.assert_close(cache_b.v[b][:, real], cache_alone.v[0], atol=1e-10, rtol=0)
        plain = make_model("multidirectional", grid_size=2, seed=41)
        assert (plain(samples, images).logits - out.logits).abs().max() > 1e-3          # the attention does something


@pytest.mark.parametrize("layer", [1, 3])
def test_hybrid_state_continues_the_sequence(layer):
    model = make_hybrid(seed=47, layer=layer)
    samples, images = make_samples(seed=53)
    tail = [[1, 2, 3], [4], [5, 6], [7, 8, 9], [10]]
    with torch.no_grad():
        second = model(tail, None, state=model(samples, images).state)
        for b in range(len(samples)):
            full = model([samples[b] + tail[b]], None if images[b] is None else [images[b]])
            torch.testing.assert_close(second.logits[b, :len(tail[b])], full.logits[0, -len(tail[b]):], atol=1e-10, rtol=0)


def official_bidirectional_forward(model, x, img_start, img_end):
    """VisualRWKV v6.0 src/model.py:408-431 (bidirectional_forward), for one sample x [1, T, C]: flip x[:, img_start:img_end]
    before and after every odd block, then ln_out and head."""
    x = x.clone()
    for i, block in enumerate(model.rwkv.blocks):
        if i % 2 == 1: x[:, img_start:img_end] = x[:, img_start:img_end].flip(1)
        x, _ = block(x)
        if i % 2 == 1: x[:, img_start:img_end] = x[:, img_start:img_end].flip(1)
    return model.rwkv.head(model.rwkv.ln_out(x))


@pytest.mark.parametrize("grid_size", [-1, 2, 0])
def test_text_only_zero_image_batched_equals_alone_and_official(grid_size):
    """A text-only sample gets the official v6.0 sequence: N zero image tokens (model.py:527-529 zeroes the image
    features, CLS included), then its text, with img_start = 0 and img_end = N - 1 (model.py:519-521 for a sample
    alone), scanned like an image."""
    model = make_model("bidirectional", grid_size=grid_size, seed=61)
    model.text_only_zero_image = True
    samples, images = make_samples(seed=67)
    N = model.n_image_tokens
    with torch.no_grad():
        out = model(samples, images)
        for ids, img, alone in zip(samples, images, assert_logits_equal_alone(model, samples, images, out)):
            if img is not None: continue
            assert int(alone.mask.sum()) == len(ids) + N
            x = torch.cat([torch.zeros(N, 32, dtype=torch.float64), model.rwkv.emb(torch.tensor(ids))])[None]
            torch.testing.assert_close(alone.logits, official_bidirectional_forward(model, x, 0, N - 1), atol=1e-10, rtol=0)
        if N > 2:                                                  # the scan matters: unscanned zeros give other logits
            ids = samples[1]
            x = torch.cat([torch.zeros(N, 32, dtype=torch.float64), model.rwkv.emb(torch.tensor(ids))])[None]
            assert (model([ids], [None]).logits - model.rwkv.forward_embeds(x)[0]).abs().max() > 1e-4


def test_training_learns_from_the_image():
    "Two noisy image classes, the answer says which: only a working image path (frozen tower, projector, scans) learns it."
    from visualrwkv.vision import VisionConfig as VC
    torch.manual_seed(0)
    model = VisualRWKV(RWKV6Config(vocab_size=16, n_layer=2, n_embd=32, head_size=8, lora_mix=4, lora_decay=4),
                       VC(image_size=28, patch_size=7, width=24, layers=1, head_width=8), grid_size=2, scan="multidirectional")
    with torch.no_grad():
        for p in model.vit.parameters(): p.normal_(0, 0.3)
    patterns = torch.randn(2, 3, 28, 28)

    def batch(n, g):
        cls = torch.randint(0, 2, (n,), generator=g)
        ids = [[3, 4, IMAGE_TOKEN_INDEX, 5, 6, 10 + int(c), 2] for c in cls]
        return ids, list(patterns[cls] + 0.5 * torch.randn(n, 3, 28, 28, generator=g)), [[IGNORE_INDEX] * 5 + i[5:] for i in ids], cls

    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(60):
        ids, imgs, labels, _ = batch(16, g)
        out = model(ids, imgs, labels)
        loss = next_token_loss(out.logits, out.labels)
        opt.zero_grad(); loss.backward(); opt.step()
    ids, imgs, _, cls = batch(64, torch.Generator().manual_seed(2))
    with torch.no_grad(): answer = model(ids, imgs).logits[:, 3 + model.n_image_tokens].argmax(-1)
    assert (answer == 10 + cls).float().mean() >= 0.95


def test_per_sample_loss_equals_reference():
    model = make_model(seed=71)
    samples, images = make_samples(seed=73)
    labels = [[IGNORE_INDEX if i == IMAGE_TOKEN_INDEX or t < 2 else i for t, i in enumerate(ids)] for ids in samples]
    labels[-1] = [IGNORE_INDEX] * len(labels[-1])                       # a sample with nothing to learn is skipped
    with torch.no_grad():
        out = model(samples, images, labels)
        means = []
        for b in range(len(samples)):
            terms = [-torch.log_softmax(out.logits[b, t], -1)[out.labels[b, t + 1]] for t in range(out.logits.shape[1] - 1)
                     if out.labels[b, t + 1] != IGNORE_INDEX]
            if terms: means.append(torch.stack(terms).mean())
        torch.testing.assert_close(next_token_loss(out.logits, out.labels, per_sample=True), torch.stack(means).mean().float())
