"""The chunked WKV equals the naive recurrence: outputs, final state and every gradient, in float64 and float32."""
import pytest
import torch

from visualrwkv.wkv import wkv6, wkv6_chunked, wkv6_naive


def make_inputs(B, T, H, K, decay, with_state, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, K, generator=g, dtype=dtype) for _ in range(3))
    if decay == "mild":                                   # log w in [-e^-1, -e^-6]: memories of tens to hundreds of steps
        logw = -torch.exp(torch.empty(B, T, H, K, dtype=dtype).uniform_(-6, -1, generator=g))
    else:                                                 # strong: down to -20 per step, some at -30
        logw = -torch.exp(torch.empty(B, T, H, K, dtype=dtype).uniform_(-1, 3, generator=g))
        logw[:, T // 2:T // 2 + 3] = -30.0
    u = torch.randn(H, K, generator=g, dtype=dtype)
    state = torch.randn(B, H, K, K, generator=g, dtype=dtype) if with_state else None
    return r, k, v, logw, u, state


def outputs_and_grads(fn, inputs, seed):
    inputs = [None if x is None else x.detach().clone().requires_grad_() for x in inputs]
    o, s = fn(*inputs)
    g = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() + (s * torch.randn(s.shape, generator=g, dtype=s.dtype)).sum()
    loss.backward()
    return [o, s] + [x.grad for x in inputs if x is not None]


@pytest.mark.parametrize("T", [1, 15, 64, 100, 257])
@pytest.mark.parametrize("decay", ["mild", "strong"])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_recurrent(T, decay, with_state):
    B, H, K = (2, 3, 8) if T < 200 else (1, 2, 16)
    inputs = make_inputs(B, T, H, K, decay, with_state, seed=T)
    want = outputs_and_grads(wkv6_naive, inputs, seed=1)
    got = outputs_and_grads(lambda *a: wkv6_chunked(*a, chunk_size=32), inputs, seed=1)
    for name, g, w in zip(["o", "state", "dr", "dk", "dv", "dlogw", "du", "dstate"], got, want):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-8, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 64])
def test_any_chunk_size(chunk_size):
    inputs = make_inputs(2, 50, 2, 8, "mild", True, seed=chunk_size)
    want, got = wkv6_naive(*inputs), wkv6_chunked(*inputs, chunk_size=chunk_size)
    for g, w in zip(got, want): torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_low_precision_against_float64(dtype, tol):
    inputs = make_inputs(2, 70, 2, 16, "strong", True, seed=5)
    o64, s64 = wkv6_naive(*inputs)
    low = [x.to(dtype) if i < 4 else x.float() for i, x in enumerate(inputs)]   # r, k, v, logw in dtype; u, state fp32
    o, s = wkv6(*low, impl="chunked")
    assert o.dtype == dtype and s.dtype == torch.float32
    ref_o, ref_s = wkv6_naive(*[x.double() for x in low])                      # same rounded inputs, exact arithmetic
    assert ((o.double() - ref_o).abs().max() / ref_o.abs().max()).item() < tol
    assert ((s.double() - ref_s).abs().max() / ref_s.abs().max()).item() < tol


def test_batched_equals_alone():
    inputs = make_inputs(3, 40, 2, 8, "mild", True, seed=9)
    o, s = wkv6_chunked(*inputs)
    for b in range(3):
        r, k, v, logw, u, st = inputs
        o_b, s_b = wkv6_chunked(r[b:b + 1], k[b:b + 1], v[b:b + 1], logw[b:b + 1], u, st[b:b + 1])
        torch.testing.assert_close(o_b[0], o[b]); torch.testing.assert_close(s_b[0], s[b])


def test_shape_errors_name_the_problem():
    r, k, v, logw, u, state = make_inputs(1, 4, 2, 8, "mild", True, seed=0)
    with pytest.raises(ValueError, match="k must have r's shape"):
        wkv6(r, k[:, :3], v, logw, u)
    with pytest.raises(ValueError, match=r"state must be \[B, H, K, V\]"):
        wkv6(r, k, v, logw, u, state[:, :1])
