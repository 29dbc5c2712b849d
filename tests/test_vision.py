"""The open_clip vision tower equals HF CLIPVisionModel after conversion; grid pooling equals a float64 loop reference."""
import math

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from visualrwkv.vision import (CLIPVisionTower, VisionConfig, grid_pool, hf_clip_vision_to_open_clip, load_checked,
                               n_pooled_tokens, open_clip_to_hf_clip_vision, vision_config_from_state_dict)


def random_hf(seed, act="quick_gelu", layers=2):
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=3,
                           image_size=42, patch_size=7, hidden_act=act)
    model = CLIPVisionModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters(): p.normal_(0, 0.2)
    return model


def hf_features(model, images):
    with torch.no_grad(): h = model(pixel_values=images).last_hidden_state
    return torch.cat([h[:, 1:], h[:, :1]], dim=1)


@pytest.mark.parametrize("prefix", ["vision_model.", ""])
def test_hf_converted_features_equal(prefix):
    hf = random_hf(1)
    sd = hf_clip_vision_to_open_clip({prefix + k: v for k, v in hf.state_dict().items()})
    tower = CLIPVisionTower(vision_config_from_state_dict(sd, head_width=16))
    load_checked(tower.visual, sd)
    images = torch.randn(3, 3, 42, 42)
    feats = tower(images)
    assert feats.shape == (3, 37, 48)
    torch.testing.assert_close(feats, hf_features(hf, images), atol=3e-6, rtol=0)   # features up to 3.6: observed 0


def test_gelu_tower_matches_gelu_hf_and_differs_from_quick_gelu():
    hf = random_hf(2, act="gelu")
    sd = hf_clip_vision_to_open_clip(hf.state_dict())
    images = torch.randn(2, 3, 42, 42)
    exact, quick = (CLIPVisionTower(vision_config_from_state_dict(sd, head_width=16, quick_gelu=q)) for q in (False, True))
    for t in (exact, quick): load_checked(t.visual, sd)
    torch.testing.assert_close(exact(images), hf_features(hf, images), atol=3e-6, rtol=0)   # observed <= 9.5e-7
    assert (quick(images) - exact(images)).abs().max() > 1e-2                              # observed 2.5e-2 to 4.1e-2


def test_round_trip_and_position_ids_buffer():
    hf_sd = {f"vision_model.{k}": v for k, v in random_hf(3).state_dict().items()}
    oc = hf_clip_vision_to_open_clip({**hf_sd, "vision_model.embeddings.position_ids": torch.arange(37)[None]})
    back = open_clip_to_hf_clip_vision(oc)
    assert sorted(back) == sorted(hf_sd) and all(torch.equal(back[k], hf_sd[k]) for k in back)
    with pytest.raises(ValueError, match="position_ids"):
        hf_clip_vision_to_open_clip({**hf_sd, "vision_model.embeddings.position_ids": torch.zeros(1, 37)})
    incomplete = {k: v for k, v in hf_sd.items() if "layers.1.self_attn.k_proj" not in k}
    with pytest.raises(ValueError, match="encoder.layers.1.self_attn"):
        hf_clip_vision_to_open_clip(incomplete)


def test_load_checked_names_every_problem():
    hf = random_hf(4)
    sd = hf_clip_vision_to_open_clip({**hf.state_dict(), "encoder.layers.0.mlp.fc3.weight": torch.zeros(1)}, unknown_ok=True)
    sd.pop("ln_post.bias")
    sd["ln_pre.weight"] = torch.zeros(5)
    tower = CLIPVisionTower(vision_config_from_state_dict(sd, head_width=16))
    with pytest.raises(ValueError) as err: load_checked(tower.visual, sd, "tower")
    msg = str(err.value)
    assert "missing 'ln_post.bias'" in msg and "unexpected 'encoder.layers.0.mlp.fc3.weight'" in msg
    assert "'ln_pre.weight' has shape (5,)" in msg
    with pytest.raises(ValueError, match="unknown keys"): hf_clip_vision_to_open_clip({"encoder.layers.0.mlp.fc3.weight": 0})


def grid_pool_reference(features, g):
    B, N1, W = features.shape
    P = math.isqrt(N1 - 1)
    if g == -1: return features
    if g == 0: return features[:, -1:]
    if g == 1: return torch.cat([features[:, :-1].mean(1, keepdim=True), features[:, -1:]], 1)
    s = P // g
    out = torch.zeros(B, g * g + 1, W, dtype=torch.float64)
    for b in range(B):
        for i in range(g):
            for j in range(g):
                cell = [features[b, (i * s + di) * P + j * s + dj] for di in range(s) for dj in range(s)]
                out[b, i * g + j] = torch.stack(cell).mean(0)
        out[b, -1] = features[b, -1]
    return out


@pytest.mark.parametrize("g", [-1, 0, 1, 2, 3, 4, 6, 12])
def test_grid_pool_equals_reference(g):
    feats = torch.randn(2, 12 * 12 + 1, 4, dtype=torch.float64)
    pooled = grid_pool(feats, g)
    torch.testing.assert_close(pooled, grid_pool_reference(feats, g))
    assert pooled.shape[1] == n_pooled_tokens(g, 12)


def test_grid_pool_bad_sizes():
    with pytest.raises(ValueError, match="divisor"): grid_pool(torch.randn(1, 145, 2), 5)
    with pytest.raises(ValueError, match="divisor"): grid_pool(torch.randn(1, 145, 2), -2)
    with pytest.raises(ValueError, match="square"): grid_pool(torch.randn(1, 11, 2), 2)


def test_vit_l_14_336_shape():
    cfg = VisionConfig()
    assert (cfg.grid, cfg.heads, cfg.n_tokens) == (24, 16, 577)


@pytest.mark.parametrize("size", [(500, 400), (401, 640), (336, 336), (1000, 337)])
def test_preprocess_matches_hf_clip_image_processor(size):
    import numpy as np
    from PIL import Image
    from open_clip.constants import OPENAI_DATASET_STD
    from transformers import CLIPImageProcessor
    from visualrwkv.vision import clip_preprocess
    proc = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    w, h = size
    img = Image.fromarray(np.random.default_rng(w * h).integers(0, 256, (h, w, 3), dtype=np.uint8))
    ours = clip_preprocess()(img)
    theirs = torch.tensor(proc(images=img, return_tensors="np")["pixel_values"][0])
    diff = (ours - theirs).abs()
    assert ours.shape == (3, 336, 336)
    assert diff.max() <= 1 / 255 / min(OPENAI_DATASET_STD) + 1e-6 and diff.mean() < 2e-4  # one level; mean <= 7e-5


@pytest.mark.parametrize("mode", ["P", "RGBA", "LA"])
def test_preprocess_converts_to_rgb_before_resizing(mode):
    """The official dataset opens images with `Image.open(...).convert('RGB')` and then runs the HF processor
    (VisualRWKV v6.0 src/dataset.py:202-207): our tensor equals the processor's on img.convert('RGB')."""
    import numpy as np
    from PIL import Image
    from open_clip.constants import OPENAI_DATASET_STD
    from transformers import CLIPImageProcessor
    from visualrwkv.vision import clip_preprocess
    proc = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    rng = np.random.default_rng(2)
    channels = {"P": 3, "RGBA": 4, "LA": 2}[mode]
    img = Image.fromarray(rng.integers(0, 256, (400, 500, channels), dtype=np.uint8), mode=None if mode == "P" else mode)
    if mode == "P": img = img.quantize(colors=16)
    assert img.mode == mode
    ours = clip_preprocess()(img)
    theirs = torch.tensor(proc(images=img.convert("RGB"), return_tensors="np")["pixel_values"][0])
    diff = (ours - theirs).abs()
    assert ours.shape == (3, 336, 336)
    assert diff.max() <= 1 / 255 / min(OPENAI_DATASET_STD) + 1e-6 and diff.mean() < 2e-4  # one level; mean <= 7e-5
