"""The chunked WKV forms equal the naive recurrence: outputs, final state and every gradient, in float64 and float32;
`wkv6` keeps its dtype contract and dispatches as `default_impl` says."""
import pytest
import torch

import visualrwkv.wkv as wkv
from visualrwkv.wkv import IMPLS, default_impl, wkv6, wkv6_chunked, wkv6_chunked_matmul, wkv6_naive

FORMS = {"chunked": wkv6_chunked, "chunked_matmul": wkv6_chunked_matmul}


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


def rel_err(got, want):
    """max |got - want| / max |want|, in float64."""
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def outputs_and_grads(fn, inputs, seed):
    inputs = [None if x is None else x.detach().clone().requires_grad_() for x in inputs]
    o, s = fn(*inputs)
    g = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() + (s * torch.randn(s.shape, generator=g, dtype=s.dtype)).sum()
    loss.backward()
    return [o, s] + [x.grad for x in inputs if x is not None]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("T", [1, 15, 64, 100, 257])
@pytest.mark.parametrize("decay", ["mild", "strong"])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_recurrent(form, T, decay, with_state):
    B, H, K = (2, 3, 8) if T < 200 else (1, 2, 16)
    inputs = make_inputs(B, T, H, K, decay, with_state, seed=T)
    want = outputs_and_grads(wkv6_naive, inputs, seed=1)
    got = outputs_and_grads(lambda *a: FORMS[form](*a, chunk_size=32), inputs, seed=1)
    for name, g, w in zip(["o", "state", "dr", "dk", "dv", "dlogw", "du", "dstate"], got, want):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")  # notebook 03: 1e-12


@pytest.mark.parametrize("form,chunk_size", [("chunked", 1), ("chunked", 7), ("chunked", 16), ("chunked", 64),
                                             ("chunked_matmul", 1), ("chunked_matmul", 2), ("chunked_matmul", 8),
                                             ("chunked_matmul", 64)])
def test_any_chunk_size(form, chunk_size):
    inputs = make_inputs(2, 50, 2, 8, "mild", True, seed=chunk_size)
    want, got = wkv6_naive(*inputs), FORMS[form](*inputs, chunk_size=chunk_size)
    for g, w in zip(got, want): torch.testing.assert_close(g, w, rtol=3e-14, atol=3e-14)   # observed <= 8e-15


@pytest.mark.parametrize("segment", [16, 48, 100, None])
def test_segments_carry_the_state(segment):
    inputs = make_inputs(2, 100, 2, 8, "strong", True, seed=3)
    want = outputs_and_grads(wkv6_naive, inputs, seed=1)
    got = outputs_and_grads(lambda *a: wkv6_chunked_matmul(*a, chunk_size=16, segment=segment), inputs, seed=1)
    for g, w in zip(got, want): torch.testing.assert_close(g, w, rtol=2e-13, atol=2e-13)   # observed <= 6.3e-14


@pytest.mark.parametrize("chunk_size", [0, 3, 24])
def test_halving_needs_a_power_of_two(chunk_size):
    inputs = make_inputs(1, 8, 1, 4, "mild", False, seed=0)
    with pytest.raises(ValueError, match="chunk_size must be a power of 2"):
        wkv6_chunked_matmul(*inputs, chunk_size=chunk_size)


@pytest.mark.parametrize("impl", ["chunked", "chunked_matmul"])
@pytest.mark.parametrize("dtype,o_tol", [(torch.float32, 2e-5),      # observed 3e-6 to 1.1e-5 over six seeds
                                         (torch.bfloat16, 1e-2)])    # observed 1.9e-3 to 3.3e-3: the bf16 output
def test_low_precision_against_float64(impl, dtype, o_tol):
    """The output in its dtype, the state in float32 whatever r, k, v are (observed <= 6e-7 over six seeds)."""
    inputs = make_inputs(2, 70, 2, 16, "strong", True, seed=5)
    low = [x.to(dtype) if i < 3 else x.float() for i, x in enumerate(inputs)]   # r, k, v in dtype; logw, u, state fp32
    o, s = wkv6(*low, impl=impl)
    assert o.dtype == dtype and s.dtype == torch.float32
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    ref_o, ref_s = wkv6_naive(*[x.double() for x in low])                      # same rounded inputs, exact arithmetic
    assert rel_err(o, ref_o) < o_tol and rel_err(s, ref_s) < 2e-6


def test_bf16_inputs_keep_logw_float32():
    """bf16 r, k, v with float32 logw through the default CPU path equal the float64 recurrence on the same rounded
    r, k, v and the unrounded logw. Rounding logw to bf16 first shows in the float32 state (in the bf16 output the
    output's own rounding hides it)."""
    r, k, v, logw, u, state = make_inputs(2, 70, 2, 16, "mild", True, seed=11)
    r16, k16, v16 = (x.to(torch.bfloat16) for x in (r, k, v))
    ref_o, ref_s = wkv6_naive(r16.double(), k16.double(), v16.double(), logw, u, state)
    o, s = wkv6(r16, k16, v16, logw.float(), u.float(), state.float())
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    # observed over five seeds: o 1.8e-3 to 3.9e-3, state 1e-7 to 1.3e-7; state from a bf16 logw 4.7e-4 to 7e-4
    assert rel_err(o, ref_o) < 1e-2 and rel_err(s, ref_s) < 5e-7
    _, s_rounded = wkv6(r16, k16, v16, logw.to(torch.bfloat16).float(), u.float(), state.float())
    assert rel_err(s_rounded, ref_s) > 1e-4


@pytest.mark.parametrize("form", FORMS)
def test_batched_equals_alone(form):
    inputs = make_inputs(3, 40, 2, 8, "mild", True, seed=9)
    o, s = FORMS[form](*inputs)
    for b in range(3):
        r, k, v, logw, u, st = inputs
        o_b, s_b = FORMS[form](r[b:b + 1], k[b:b + 1], v[b:b + 1], logw[b:b + 1], u, st[b:b + 1])
        for alone, batched in ((o_b[0], o[b]), (s_b[0], s[b])):             # observed equal to the bit
            torch.testing.assert_close(alone, batched, rtol=1e-13, atol=1e-13)


def test_default_impl():
    assert default_impl(1, is_cuda=False) == "naive"
    assert default_impl(1, is_cuda=True) == "naive"          # decoding one token: the one-step recurrence, also on CUDA
    assert default_impl(2, is_cuda=True) == "triton"
    assert default_impl(2, is_cuda=False) == "chunked_matmul"


def spy_on(monkeypatch, module, name, calls):
    """Replace module.name with a function that records its name and returns zeros of the right shapes."""
    def spy(r, k, v, logw, u, state=None):
        calls.append(name)
        B, T, H, K = r.shape
        return torch.zeros(B, T, H, K), torch.zeros(B, H, K, K)
    monkeypatch.setattr(module, name, spy)


@pytest.mark.parametrize("T,expected", [(1, "wkv6_naive"), (2, "wkv6_chunked_matmul"), (100, "wkv6_chunked_matmul")])
def test_default_dispatch_on_cpu(monkeypatch, T, expected):
    calls = []
    for name in ("wkv6_naive", "wkv6_chunked", "wkv6_chunked_matmul"): spy_on(monkeypatch, wkv, name, calls)
    wkv6(*make_inputs(1, T, 2, 8, "mild", True, seed=0, dtype=torch.float32))
    assert calls == [expected]


@pytest.mark.parametrize("impl", IMPLS)
def test_every_impl_can_be_forced_on_cpu(monkeypatch, impl):
    import visualrwkv_kernels
    calls = []
    for name in ("wkv6_naive", "wkv6_chunked", "wkv6_chunked_matmul"): spy_on(monkeypatch, wkv, name, calls)
    spy_on(monkeypatch, visualrwkv_kernels, "wkv6_triton", calls)
    for T in (1, 20):
        wkv6(*make_inputs(1, T, 2, 8, "mild", True, seed=0, dtype=torch.float32), impl=impl)
    assert calls == [f"wkv6_{impl}"] * 2


def test_shape_errors_name_the_problem():
    r, k, v, logw, u, state = make_inputs(1, 4, 2, 8, "mild", True, seed=0)
    with pytest.raises(ValueError, match="k must have r's shape"):
        wkv6(r, k[:, :3], v, logw, u)
    with pytest.raises(ValueError, match=r"u must be \[H, K\]"):
        wkv6(r, k, v, logw, u[:1])
    with pytest.raises(ValueError, match=r"state must be \[B, H, K, V\]"):
        wkv6(r, k, v, logw, u, state[:, :1])
    with pytest.raises(ValueError, match="impl must be one of"):
        wkv6(r, k, v, logw, u, impl="cuda")


def test_dtype_errors_name_the_contract():
    r, k, v, logw, u, state = (None if x is None else x.float() for x in make_inputs(1, 4, 2, 8, "mild", True, seed=0))
    with pytest.raises(ValueError, match="v must have r's dtype"):
        wkv6(r, k, v.to(torch.bfloat16), logw, u, state)
    with pytest.raises(ValueError, match="logw must be float32"):
        wkv6(r.bfloat16(), k.bfloat16(), v.bfloat16(), logw.bfloat16(), u, state)
    with pytest.raises(ValueError, match="r must be float32, bfloat16, float16 or float64"):
        wkv6(*(x.to(torch.int32) for x in (r, k, v)), logw, u, state)
