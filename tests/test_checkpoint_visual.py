"""Official VisualRWKV-v060 layout: rwkv.* (RWKV-6), vit.vision_model.* (HF CLIPVisionModel), proj.weight."""
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from visualrwkv.checkpoint import load_visualrwkv, save_visualrwkv, visualrwkv_state_dict
from visualrwkv.prompts import IMAGE_TOKEN_INDEX
from visualrwkv.rwkv import RWKV6, RWKV6Config, load_rwkv6, randomize_

W, LAYERS, N_EMBD = 32, 2, 48


def official_checkpoint(seed=0, data_dependent=True):
    torch.manual_seed(seed)
    hf = CLIPVisionModel(CLIPVisionConfig(hidden_size=W, intermediate_size=64, num_hidden_layers=LAYERS,
                                          num_attention_heads=4, image_size=28, patch_size=7, hidden_act="quick_gelu"))
    with torch.no_grad():
        for p in hf.parameters(): p.normal_(0, 0.2)
    lm = randomize_(RWKV6(RWKV6Config(vocab_size=50, n_layer=3, n_embd=N_EMBD, head_size=16, lora_mix=4, lora_decay=8,
                                      data_dependent=data_dependent)), seed=seed)
    sd = {f"rwkv.{k}": v.clone() for k, v in lm.state_dict().items()}
    sd.update({f"vit.vision_model.{k}": v.clone() for k, v in hf.state_dict().items()})
    sd["vit.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    sd["proj.weight"] = torch.randn(N_EMBD, W)
    return sd, hf.eval()


def where_it_lands(model, key):
    "The loaded tensor an official key must equal, found by hand from the HF names."
    if key.startswith("rwkv."): return model.rwkv.state_dict()[key[5:]]
    if key == "proj.weight": return model.proj.weight
    k = key[len("vit.vision_model."):]
    v = model.vit.visual
    fixed = {"embeddings.class_embedding": v.class_embedding, "embeddings.patch_embedding.weight": v.conv1.weight,
             "embeddings.position_embedding.weight": v.positional_embedding, "pre_layrnorm.weight": v.ln_pre.weight,
             "pre_layrnorm.bias": v.ln_pre.bias, "post_layernorm.weight": v.ln_post.weight,
             "post_layernorm.bias": v.ln_post.bias}
    if k in fixed: return fixed[k]
    _, _, i, *rest = k.split(".")
    blk, name = v.transformer.resblocks[int(i)], ".".join(rest)
    for j, q in enumerate("qkv"):
        for kind in ("weight", "bias"):
            if name == f"self_attn.{q}_proj.{kind}": return getattr(blk.attn, f"in_proj_{kind}")[j * W:(j + 1) * W]
    simple = {"self_attn.out_proj": blk.attn.out_proj, "layer_norm1": blk.ln_1, "layer_norm2": blk.ln_2,
              "mlp.fc1": blk.mlp.c_fc, "mlp.fc2": blk.mlp.c_proj}
    module, kind = name.rsplit(".", 1)
    return getattr(simple[module], kind)


@pytest.mark.parametrize("data_dependent", [True, False])
def test_every_tensor_lands_and_forward_runs(tmp_path, data_dependent):
    sd, hf = official_checkpoint(1, data_dependent)
    torch.save(sd, tmp_path / "v060.pth")
    model = load_visualrwkv(tmp_path / "v060.pth", vision_head_width=8, grid_size=2, scan="multidirectional")
    assert model.rwkv.cfg.data_dependent == data_dependent
    for key, value in sd.items():
        if key.endswith("position_ids"): continue
        torch.testing.assert_close(where_it_lands(model, key).reshape(value.shape), value, rtol=0, atol=0)
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        h = hf(pixel_values=images).last_hidden_state
        hf_features = torch.cat([h[:, 1:], h[:, :1]], 1)                               # values up to 2.6
        torch.testing.assert_close(model.vit(images), hf_features, atol=2e-6, rtol=0)     # observed <= 4.8e-7
        out = model([[1, 2, IMAGE_TOKEN_INDEX, 3], [4, 5]], [images[0], None])
    assert out.logits.shape == (2, 2 + 5 + 1, 50) and torch.isfinite(out.logits).all()
    assert not any(p.requires_grad for p in model.vit.parameters())


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_save_gives_back_the_official_layout(tmp_path, suffix):
    sd, _ = official_checkpoint(2)
    model = load_visualrwkv(sd, vision_head_width=8)
    save_visualrwkv(model, tmp_path / f"out{suffix}")
    assert [p.name for p in tmp_path.iterdir()] == [f"out{suffix}"]           # atomic: no temporary left behind
    again = load_visualrwkv(tmp_path / f"out{suffix}", vision_head_width=8)
    saved = visualrwkv_state_dict(again)
    assert sorted(saved) == sorted(k for k in sd if not k.endswith("position_ids"))
    for k, v in saved.items(): torch.testing.assert_close(v, sd[k], rtol=0, atol=0)


def test_dtype_on_load():
    sd, _ = official_checkpoint(3)
    model = load_visualrwkv({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()},
                            vision_head_width=8, dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_bad_checkpoint_names_everything():
    sd, _ = official_checkpoint(4)
    sd.pop("rwkv.blocks.1.att.time_maa_w2")
    sd.pop("vit.vision_model.encoder.layers.0.self_attn.q_proj.weight")
    sd["rwkv.blocks.0.ln1.weight"] = torch.ones(N_EMBD + 1)
    sd["vit.vision_model.encoder.layers.1.mlp.fc9.bias"] = torch.zeros(2)
    sd["step"] = torch.zeros(())
    with pytest.raises(ValueError) as err: load_visualrwkv(sd, vision_head_width=8)
    msg = str(err.value)
    for part in ("missing 'rwkv.blocks.1.att.time_maa_w2'",
                 "missing 'vit.vision_model.encoder.layers.0.self_attn.q_proj.weight'",
                 "'rwkv.blocks.0.ln1.weight' has shape (49,)",
                 "unexpected 'vit.vision_model.encoder.layers.1.mlp.fc9.bias'", "unexpected 'step'"):
        assert part in msg, (part, msg)


def test_not_a_visualrwkv_checkpoint():
    sd, _ = official_checkpoint(5)
    with pytest.raises(ValueError, match="no 'proj.weight"): load_visualrwkv({k: v for k, v in sd.items() if k != "proj.weight"})
    with pytest.raises(ValueError, match="no 'vit.vision_model"):
        load_visualrwkv({k: v for k, v in sd.items() if not k.startswith("vit.")})


def test_hybrid_round_trip(tmp_path):
    """The official hybrid's keys (VisualRWKV v5.2 src/model.py:219-223 and 256-257): rwkv.blocks.L.tiny_att.tiny_ln,
    tiny_q, tiny_k, tiny_v ([d, C]) and tiny_o ([C, d]); tiny_att_dim and tiny_att_layer are read off them."""
    sd, _ = official_checkpoint(6)
    g = torch.Generator().manual_seed(0)
    d, L = 32, 1
    sd.update({f"rwkv.blocks.{L}.tiny_att.tiny_ln.weight": torch.rand(N_EMBD, generator=g),
               f"rwkv.blocks.{L}.tiny_att.tiny_ln.bias": torch.rand(N_EMBD, generator=g),
               f"rwkv.blocks.{L}.tiny_att.tiny_q.weight": torch.randn(d, N_EMBD, generator=g),
               f"rwkv.blocks.{L}.tiny_att.tiny_k.weight": torch.randn(d, N_EMBD, generator=g),
               f"rwkv.blocks.{L}.tiny_att.tiny_v.weight": torch.randn(d, N_EMBD, generator=g),
               f"rwkv.blocks.{L}.tiny_att.tiny_o.weight": torch.randn(N_EMBD, d, generator=g)})
    model = load_visualrwkv(sd, vision_head_width=8)
    assert (model.rwkv.cfg.tiny_att_dim, model.rwkv.cfg.tiny_att_layer) == (d, L)
    assert model.tiny_att is model.rwkv.blocks[L].tiny_att and model.tiny_att.head_size == 16
    torch.testing.assert_close(model.rwkv.blocks[L].tiny_att.tiny_k.weight, sd[f"rwkv.blocks.{L}.tiny_att.tiny_k.weight"],
                               rtol=0, atol=0)
    save_visualrwkv(model, tmp_path / "hybrid.safetensors")
    again = visualrwkv_state_dict(load_visualrwkv(tmp_path / "hybrid.safetensors", vision_head_width=8))
    assert sorted(again) == sorted(k for k in sd if not k.endswith("position_ids"))
    for k, v in again.items(): torch.testing.assert_close(v, sd[k], rtol=0, atol=0)
    with torch.no_grad(): out = model([[1, 2, IMAGE_TOKEN_INDEX, 3], [4, 5]], [torch.randn(3, 28, 28), None])
    assert torch.isfinite(out.logits).all() and out.state[L].tiny.k.shape == (2, d // 16, 3 + 17, 16)
    lm = load_rwkv6({k[len("rwkv."):]: v for k, v in sd.items() if k.startswith("rwkv.")})   # the language model alone
    assert lm.blocks[L].tiny_att is not None and lm.blocks[0].tiny_att is None


def test_hybrid_checkpoint_refusals():
    sd, _ = official_checkpoint(7)
    extra = {f"rwkv.blocks.{L}.tiny_att.tiny_q.weight": torch.zeros(16, N_EMBD) for L in (0, 2)}
    with pytest.raises(ValueError, match="tiny attention in more than one block"): load_visualrwkv({**sd, **extra})
    part = {"rwkv.blocks.2.tiny_att.tiny_q.weight": torch.zeros(16, N_EMBD)}
    with pytest.raises(ValueError) as err: load_visualrwkv({**sd, **part}, vision_head_width=8)
    assert "missing 'rwkv.blocks.2.tiny_att.tiny_o.weight'" in str(err.value)
