"""Our RWKV-6 against the reference `rwkv` package (its x060 model, strategy `cpu fp32`) on random official-format checkpoints."""
import os

import pytest
import torch

from visualrwkv.rwkv import RWKV6, RWKV6Config, load_rwkv6, randomize_, write_state_dict

os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ.setdefault("RWKV_CUDA_ON", "0")
from rwkv.model import RWKV as ReferenceRWKV  # noqa: E402  (test-only: importing it turns TF32 on globally)

SIZES = {  # LoRA widths of the <=3B models (32/64) and of the 7B model (64/128), at toy widths
    "small-lora": dict(vocab_size=1000, n_layer=3, n_embd=128, head_size=64, lora_mix=32, lora_decay=64),
    "7b-lora": dict(vocab_size=777, n_layer=2, n_embd=256, head_size=64, lora_mix=64, lora_decay=128),
}


TOL = 2e-6   # float32 rounding: observed 1.8e-7 to 4.7e-7 (logits, RNN steps, state) over three random checkpoints


def rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


@pytest.fixture(scope="module", params=list(SIZES))
def checkpoint(request, tmp_path_factory):
    """A random RWKV-6 checkpoint in the official x060 layout, written as a .pth file."""
    torch.manual_seed(0)
    model = randomize_(RWKV6(RWKV6Config(**SIZES[request.param])), seed=1)
    path = tmp_path_factory.mktemp(request.param) / "rwkv6.pth"
    write_state_dict(model.state_dict(), path)
    return path


def test_checkpoint_has_official_layout(checkpoint):
    sd = torch.load(checkpoint, weights_only=True)
    C = sd["emb.weight"].shape[1]
    assert sd["blocks.0.att.time_maa_w1"].shape[0] == C and sd["blocks.0.att.time_maa_w1"].shape[1] % 5 == 0
    assert sd["blocks.0.att.time_maa_w2"].shape[0] == 5 and sd["blocks.0.att.time_faaaa"].shape == (C // 64, 64)
    assert "blocks.0.ln0.weight" in sd and "blocks.1.ln0.weight" not in sd


def test_logits_match_reference_package(checkpoint):
    ours = load_rwkv6(checkpoint)
    ref = ReferenceRWKV(str(checkpoint), strategy="cpu fp32", verbose=False)
    tokens = torch.randint(0, ours.cfg.vocab_size, (45,), generator=torch.Generator().manual_seed(2))
    want, _ = ref.forward(tokens.tolist(), None, full_output=True)                  # [T, vocab]
    with torch.no_grad():
        got = ours(tokens[None])[0]
    assert want.shape == got.shape
    assert rel_err(got, want) < TOL


def test_rnn_mode_matches_reference_state(checkpoint):
    """Prefix in parallel, then token-by-token steps, against the reference's own state passing."""
    ours = load_rwkv6(checkpoint)
    ref = ReferenceRWKV(str(checkpoint), strategy="cpu fp32", verbose=False)
    tokens = torch.randint(0, ours.cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    _, ref_state = ref.forward(tokens[:12], None)
    with torch.no_grad():
        _, state = ours.forward_embeds(ours.emb(torch.tensor([tokens[:12]])))
        for t in tokens[12:]:
            want, ref_state = ref.forward([t], ref_state)
            got, state = ours.step(torch.tensor([t]), state)
            assert rel_err(got[0], want) < TOL
    for i, layer in enumerate(state):                 # reference state: [att_x, wkv (transposed as H,K,V), ffn_x] per layer
        assert rel_err(layer.att_x[0], ref_state[3 * i]) < TOL
        assert rel_err(layer.wkv[0], ref_state[3 * i + 1]) < TOL
        assert rel_err(layer.ffn_x[0], ref_state[3 * i + 2]) < TOL


# ---------------------------------------------------------------------------------------------------------------------
# Initialisation: BlinkDL's x060 training code, RWKV-LM RWKV-v5/src/model.py at commit 86affd7: RWKV_Tmix_x060.__init__
# (lines 293-345), RWKV_CMix_x060.__init__ (763-779), RWKV.generate_init_weight (1142-1229); the mixing parameters are
# the same code in the official VisualRWKV v6.0 src/model.py (lines 92-149, 198-215). Values below worked by hand for
# L = 2 layers, C = 8 channels (ddd = n / 8, ratio_0_to_1 = l, ratio_1_to_almost0 = 1 - l / 2).
X060_LITERALS = {
    0: dict(maa_k=[1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125],
            maa_v=[1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125],
            maa_r=[1.0, 0.64645, 0.5, 0.38763, 0.29289, 0.20943, 0.13397, 0.06459],
            decay=[-6.0, -4.71944, -3.91972, -3.23697, -2.62057, -2.04924, -1.51144, -1.0],
            faaaa=[0.0, 0.1, -0.1, 0.0, 0.1, -0.1, 0.0, 0.1],
            ln_x=0.615572),                                                  # (1/2) ** 0.7
    1: dict(maa_k=[1.0, 0.64645, 0.5, 0.38763, 0.29289, 0.20943, 0.13397, 0.06459],
            maa_v=[0.7, 0.34645, 0.2, 0.08763, -0.00711, -0.09057, -0.16603, -0.23541],
            maa_r=[1.0, 0.4054, 0.29289, 0.21746, 0.1591, 0.11086, 0.0694, 0.03283],
            decay=[-6.0, -5.89796, -5.59184, -5.08163, -4.36735, -3.44898, -2.32653, -1.0],
            faaaa=[1.0, 0.95714, 0.61429, 0.57143, 0.52857, 0.18571, 0.14286, 0.1],
            ln_x=1.0),
}


def gram(w, gain, rows):
    """An orthogonal_(w, gain) matrix has orthonormal rows (wide) or columns (tall), times gain: w w^T or w^T w =
    gain^2 I, to float32 rounding (observed within 6e-7 gain^2 over three seeds)."""
    g = w @ w.T if rows else w.T @ w
    return torch.testing.assert_close(g, gain ** 2 * torch.eye(len(g)), atol=2e-6 * gain ** 2, rtol=0)


@pytest.mark.parametrize("vocab_size", [16, 6])          # head gain: 0.5 sqrt(V / C) when V > C, else 0.5
def test_init_matches_x060(vocab_size):
    torch.manual_seed(0)
    model = RWKV6(RWKV6Config(vocab_size=vocab_size, n_layer=2, n_embd=8, head_size=4, dim_ffn=28))
    close = lambda got, want: torch.testing.assert_close(got.flatten(), torch.tensor(want).flatten(), atol=2e-5, rtol=0)
    for l, want in X060_LITERALS.items():
        att, ffn = model.blocks[l].att, model.blocks[l].ffn
        for name in ("x", "w", "k"): close(getattr(att, f"time_maa_{name}"), want["maa_k"])
        close(att.time_maa_v, want["maa_v"])
        close(att.time_maa_r, want["maa_r"]); close(att.time_maa_g, want["maa_r"])
        close(ffn.time_maa_k, want["maa_k"]); close(ffn.time_maa_r, want["maa_k"])
        close(att.time_decay, want["decay"])
        close(att.time_faaaa, want["faaaa"]); assert att.time_faaaa.shape == (2, 4)
        close(att.ln_x.weight, [want["ln_x"]] * 8); close(att.ln_x.bias, [0.0] * 8)
        assert att.time_maa_w1.shape == (8, 5 * 32) and not att.time_maa_w1.any()                 # zeros
        assert att.time_decay_w1.shape == (8, 64) and not att.time_decay_w1.any()
        for w2 in (att.time_maa_w2, att.time_decay_w2):                                           # uniform(-0.01, 0.01)
            assert w2.abs().max() <= 0.01 and w2.abs().max() > 0.005
        gram(att.receptance.weight, 1.0, rows=True); gram(att.value.weight, 1.0, rows=True)
        gram(att.key.weight, 0.1, rows=True); gram(att.gate.weight, 0.1, rows=True)
        gram(ffn.key.weight, 1.0, rows=False)                                                     # [28, 8]: tall
        for zero in (att.output.weight, ffn.receptance.weight, ffn.value.weight): assert not zero.any()
        for ln in (model.blocks[l].ln1, model.blocks[l].ln2):
            close(ln.weight, [1.0] * 8); close(ln.bias, [0.0] * 8)
    close(model.blocks[0].ln0.weight, [1.0] * 8); close(model.ln_out.bias, [0.0] * 8)
    assert model.emb.weight.abs().max() <= 1e-4 and model.emb.weight.abs().max() > 5e-5         # uniform(-1e-4, 1e-4)
    if vocab_size > 8: gram(model.head.weight, 0.5 * (vocab_size / 8) ** 0.5, rows=False)         # [16, 8]: tall
    else: gram(model.head.weight, 0.5, rows=True)                                                 # [6, 8]: wide


def test_init_lora_widths_follow_the_official_rule():
    "VisualRWKV v6.0 src/model.py:117-119, 129-131: D_MIX_LORA 32 (64 from n_embd 4096), D_DECAY_LORA 64 (128)."
    with torch.device("meta"):
        for C, mix, decay in ((2048, 32, 64), (4096, 64, 128)):
            att = RWKV6(RWKV6Config(vocab_size=10, n_layer=1, n_embd=C)).blocks[0].att
            assert att.time_maa_w1.shape == (C, 5 * mix) and att.time_maa_w2.shape == (5, mix, C)
            assert att.time_decay_w1.shape == (C, decay) and att.time_decay_w2.shape == (decay, C)


def test_init_tiny_attention_uses_pytorch_defaults():
    "The official hybrid (v5.2) never re-initialises its TinyAttention: nn.Linear / nn.LayerNorm defaults."
    torch.manual_seed(0)
    model = RWKV6(RWKV6Config(vocab_size=16, n_layer=2, n_embd=32, head_size=8, tiny_att_dim=16, tiny_att_layer=1))
    att = model.blocks[1].tiny_att
    assert model.blocks[0].tiny_att is None and torch.equal(att.tiny_ln.weight, torch.ones(32))
    for lin in (att.tiny_q, att.tiny_k, att.tiny_v, att.tiny_o):                 # kaiming_uniform(a=sqrt(5)): |w| <= 1/sqrt(fan_in)
        bound = 1 / lin.weight.shape[1] ** 0.5
        assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.8 * bound
