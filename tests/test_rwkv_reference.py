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
    assert rel_err(got, want) < 1e-4


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
            assert rel_err(got[0], want) < 1e-4
    for i, layer in enumerate(state):                 # reference state: [att_x, wkv (transposed as H,K,V), ffn_x] per layer
        assert rel_err(layer.att_x[0], ref_state[3 * i]) < 1e-4
        assert rel_err(layer.wkv[0], ref_state[3 * i + 1]) < 1e-4
        assert rel_err(layer.ffn_x[0], ref_state[3 * i + 2]) < 1e-4
