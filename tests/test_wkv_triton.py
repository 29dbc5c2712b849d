"""The Triton WKV6 kernels (kernels/wkv6.py) equal a float64 naive recurrence: outputs, final state, every gradient.

Runs on the CPU under TRITON_INTERPRET=1. Errors are relative in norm: ||got - want|| / ||want|| over a whole tensor.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest
import torch

from visualrwkv_kernels import wkv6_triton
from visualrwkv_kernels import wkv6 as wkv6_module
from visualrwkv_kernels.wkv6 import WKV6Triton, _dot_mode, _interpreted, _needs_int64, _segment_chunks

# Worst relative error observed over the cases below: fp32 2.2e-6 (dlogw, T = 257); bf16 8.6e-3 in o and 1.3e-2 in dlogw
# (T = 257; 1.4e-2 to 2.1e-2 with three other seeds); fp16 3.3e-4 over four seeds.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-3}
NAMES = ("r", "k", "v", "logw", "u", "state")


def naive_wkv6(r, k, v, logw, u, state):
    """The recurrence of the contract, one token at a time, in the inputs' dtype (float64 here)."""
    B, T, H, K = r.shape
    S = state
    out = []
    for t in range(T):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]                             # [B, H, K, V]
        out.append(torch.einsum("bhk,bhkv->bhv", r[:, t], S + u[None, :, :, None] * kv))
        S = logw[:, t].exp()[..., None] * S + kv
    return torch.stack(out, dim=1), S                                              # [B, T, H, V], [B, H, K, V]


def random_inputs(B, T, H, K, decay, seed):
    """Fresh random inputs; logw = -exp(U(lo, hi)): mild decays stay near 1, strong ones reach -20 or -30 per step."""
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, K, generator=g) for _ in range(3))
    lo, hi = {"mild": (-6.0, -1.0), "strong": (-6.0, 3.0), "strongest": (-6.0, 3.4012)}[decay]  # e^3.4012 = 30
    logw = -torch.empty(B, T, H, K).uniform_(lo, hi, generator=g).exp()
    u = torch.randn(H, K, generator=g)
    state = torch.randn(B, H, K, K, generator=g)
    do = torch.randn(B, T, H, K, generator=g)
    dstate = torch.randn(B, H, K, K, generator=g)
    return (r, k, v, logw, u, state), (do, dstate)


def rel_err(got, want, scale_if_zero=None):
    """||got - want|| / ||want||; an all-zero `want` (dlogw at T = 1 from a zero state) uses scale_if_zero instead."""
    scale = want.norm() if want.norm() > 0 else scale_if_zero
    return ((got.double() - want).norm() / scale).item()


def run_both(inputs, grads, dtype, with_state, loss_on_state=True, seg_chunks=None):
    """Outputs and gradients of the Triton kernel (inputs cast to dtype, T cut into segments of seg_chunks chunks
    when given, else one segment on the CPU) and of the float64 recurrence."""
    r, k, v, logw, u, state = inputs
    do, dstate = grads
    low = [x.to(dtype) for x in (r, k, v)] + [logw.float()]                # the contract: logw stays float32
    results = []
    for cast in (lambda x: x, lambda x: x.double()):
        xs = [cast(x).detach().requires_grad_() for x in low] + [cast(u).detach().requires_grad_()]
        s0 = cast(state).detach().requires_grad_() if with_state else None
        if cast(r).dtype == torch.float64:
            o, sT = naive_wkv6(*xs, s0 if with_state else torch.zeros_like(cast(state)))
        else:
            o, sT = WKV6Triton.apply(*xs, s0, seg_chunks)
        loss = (o.double() * do.double()).sum()
        if loss_on_state:
            loss = loss + (sT.double() * dstate.double()).sum()
        loss.backward()
        leaves = xs + ([s0] if with_state else [])
        input_grads = [torch.zeros_like(x) if x.grad is None else x.grad for x in leaves]   # None: input unused
        results.append((o, sT, input_grads))
    return results


def assert_matches(got, want, dtype):
    tol = TOL[dtype]
    (o, sT, g_got), (o_ref, sT_ref, g_ref) = got, want
    assert o.dtype == dtype and sT.dtype == torch.float32
    assert [g.dtype for g in g_got[:4]] == [dtype] * 3 + [torch.float32], "each gradient in its input's dtype"
    errs = {"o": rel_err(o, o_ref), "final state": rel_err(sT, sT_ref)}
    errs.update({f"d{n}": rel_err(a, b, g_ref[1].norm()) for n, a, b in zip(NAMES, g_got, g_ref)})
    for name, a in zip(NAMES, g_got):
        assert torch.isfinite(a).all(), f"d{name} has NaN or inf"
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"relative errors above {tol}: {bad}"


def test_kernels_run_in_the_interpreter():
    assert _interpreted(), "visualrwkv_kernels was imported before TRITON_INTERPRET=1 was set"


CASES_FP32 = [  # (B, T, H, K, decay, with_state)
    (1, 1, 2, 16, "mild", True), (2, 1, 1, 16, "strongest", False),
    (2, 15, 3, 16, "mild", False), (1, 15, 2, 32, "strong", True),
    (1, 64, 2, 32, "mild", True), (2, 64, 1, 16, "strongest", False),
    (2, 100, 2, 16, "strong", True), (1, 100, 1, 64, "mild", False),
    (1, 257, 2, 16, "mild", True), (1, 257, 1, 16, "strongest", True),
]


@pytest.mark.parametrize("B,T,H,K,decay,with_state", CASES_FP32)
def test_triton_equals_naive_recurrence(B, T, H, K, decay, with_state):
    inputs, grads = random_inputs(B, T, H, K, decay, seed=T * 100 + K + B)
    got, want = run_both(inputs, grads, torch.float32, with_state)
    assert_matches(got, want, torch.float32)


@pytest.mark.parametrize("B,T,H,K,decay,with_state", [
    (2, 1, 2, 16, "mild", False), (2, 15, 2, 16, "mild", True), (1, 64, 1, 64, "strong", False),
    (1, 100, 2, 32, "strongest", True), (1, 257, 1, 16, "strongest", True)])
def test_triton_bf16_equals_naive_recurrence(B, T, H, K, decay, with_state):
    inputs, grads = random_inputs(B, T, H, K, decay, seed=T + 7)
    got, want = run_both(inputs, grads, torch.bfloat16, with_state)
    assert_matches(got, want, torch.bfloat16)


def test_triton_fp16_equals_naive_recurrence():
    inputs, grads = random_inputs(1, 40, 2, 16, "strong", seed=3)
    got, want = run_both(inputs, grads, torch.float16, with_state=True)
    assert_matches(got, want, torch.float16)


def test_head_size_128_equals_naive_recurrence():
    inputs, grads = random_inputs(1, 20, 1, 128, "strong", seed=5)
    got, want = run_both(inputs, grads, torch.float32, with_state=True)
    assert_matches(got, want, torch.float32)


@pytest.mark.parametrize("B,T,H,K,seg_chunks,with_state,dtype", [
    (1, 15, 1, 16, 1, True, torch.float32), (2, 64, 1, 16, 1, False, torch.float32),
    (1, 100, 2, 32, 2, True, torch.float32), (1, 257, 1, 64, 3, True, torch.float32),
    (1, 100, 1, 32, 3, True, torch.bfloat16)])
def test_segments_in_parallel_equal_naive_recurrence(B, T, H, K, seg_chunks, with_state, dtype):
    """T cut into segments run side by side, joined by a scan over segment states (the GPU path for small B*H)."""
    inputs, grads = random_inputs(B, T, H, K, "strong", seed=T + seg_chunks)
    got, want = run_both(inputs, grads, dtype, with_state, seg_chunks=seg_chunks)
    assert_matches(got, want, dtype)


def test_gradients_without_final_state_gradient_equal_naive():
    """When the loss ignores the final state, its incoming gradient is None and the kernel must not need it."""
    inputs, grads = random_inputs(2, 33, 1, 16, "mild", seed=11)
    got, want = run_both(inputs, grads, torch.float32, with_state=True, loss_on_state=False)
    assert_matches(got, want, torch.float32)


@pytest.mark.parametrize("logw_value", [-1e-5, -30.0])
def test_extreme_decays_are_finite_and_exact(logw_value):
    """Every step at the weakest (-1e-5) or strongest (-30) decay: no NaN/inf anywhere, and still exact.

    At -30 the true dlogw is ~e^-30 times smaller than the other gradients, so it is compared in absolute terms
    against the scale of dk (the cancellation error of a sum of O(1) terms), everything else relatively.
    """
    inputs, grads = random_inputs(1, 70, 2, 16, "mild", seed=13)
    inputs = inputs[:3] + (torch.full_like(inputs[3], logw_value),) + inputs[4:]
    got, want = run_both(inputs, grads, torch.float32, with_state=True)
    (o, sT, g_got), (o_ref, sT_ref, g_ref) = got, want
    for name, x in zip(("o", "final state") + NAMES, [o, sT] + g_got):
        assert torch.isfinite(x).all(), f"{name} has NaN or inf at logw = {logw_value}"
    assert rel_err(o, o_ref) <= 1e-6 and rel_err(sT, sT_ref) <= 1e-6          # observed <= 1.2e-7
    for name, a, b in zip(NAMES, g_got, g_ref):
        if name == "logw" and logw_value == -30.0:
            assert (a.double() - b).abs().max() <= 5e-7 * g_ref[1].abs().max()   # observed 1.9e-7
        else:
            assert rel_err(a, b) <= 1e-6, name                                 # observed <= 2.4e-7


def test_64bit_offsets_equal_32bit_offsets():
    """The INT64 code path (taken once a tensor has 2**31 elements) computes the same numbers."""
    inputs, grads = random_inputs(2, 20, 2, 16, "strong", seed=17)
    outs = []
    for force_int64 in (False, True):
        xs = [x.detach().requires_grad_() for x in inputs]
        o, sT = WKV6Triton.apply(*xs, 1, force_int64)
        ((o * grads[0]).sum() + (sT * grads[1]).sum()).backward()
        outs.append([o, sT] + [x.grad for x in xs])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("B,H,T,n_sm,segments", [
    (8, 32, 4096, 132, 2),      # 256 chunks; cdiv(264, 256) = 2 segments wanted, of 128 chunks
    (1, 32, 24576, 132, 9),     # 1536 chunks; cdiv(264, 32) = 9 wanted -> 171 chunks each -> cdiv(1536, 171) = 9
    (1, 4, 1000, 132, 8),       # 63 chunks; 66 wanted, but segments keep at least 8 chunks -> cdiv(63, 8) = 8
    (2, 3, 1000, None, 1),      # the CPU: one segment
])
def test_segments_fill_the_gpu_twice(B, H, T, n_sm, segments):
    """The GPU's choice of segment length, worked by hand for a 132-SM H100/H200, forced here without a GPU."""
    seg_chunks = _segment_chunks(B, H, T, n_sm)
    assert -(-T // (seg_chunks * 16)) == segments


def test_bf16_products_use_bf16_tensor_cores_when_compiled(monkeypatch):
    """Compiled for a GPU, bf16 inputs take the bf16 tl.dot (mode 1); the interpreter emulates it (mode 3)."""
    assert _dot_mode(torch.bfloat16) == 3
    monkeypatch.setattr(wkv6_module, "_interpreted", lambda: False)
    assert [_dot_mode(d) for d in (torch.float32, torch.bfloat16, torch.float16)] == [0, 1, 2]


def test_offsets_switch_to_64_bit_at_2_pow_31_elements():
    assert not _needs_int64(2**31 - 1, 10)
    assert _needs_int64(10, 2**31)


@pytest.mark.parametrize("change,match", [
    (lambda a: {**a, "k": a["k"][:, :-1]}, "k must have r's shape"),
    (lambda a: {**a, "logw": a["logw"].double()}, "logw must be float32"),
    (lambda a: {**a, **{n: a[n].bfloat16() for n in "rkv"}, "logw": a["logw"].bfloat16()}, "logw must be float32"),
    (lambda a: {**a, "v": a["v"].bfloat16()}, "v must have r's dtype"),
    (lambda a: {**a, "u": a["u"][:, :8]}, "u must be"),
    (lambda a: {**a, "state": a["state"][:, :, :8]}, "state must be"),
    (lambda a: {k: (x[..., :8] if x.dim() == 4 else x) for k, x in a.items()}, "head size K"),
    (lambda a: {**a, "r": a["r"][0]}, "r must be"),
])
def test_bad_inputs_raise_value_error(change, match):
    (r, k, v, logw, u, state), _ = random_inputs(1, 4, 1, 16, "mild", seed=0)
    args = change(dict(r=r, k=k, v=v, logw=logw, u=u, state=state))
    with pytest.raises(ValueError, match=match):
        wkv6_triton(**args)


def test_wkv6_dispatch_triton_equals_naive():
    """`visualrwkv.wkv.wkv6(..., impl="triton")` reaches this kernel and equals the float64 recurrence."""
    from visualrwkv.wkv import wkv6
    (r, k, v, logw, u, state), _ = random_inputs(2, 23, 2, 16, "strong", seed=19)
    o, sT = wkv6(r, k, v, logw, u, state, impl="triton")
    o_ref, sT_ref = naive_wkv6(*(x.double() for x in (r, k, v, logw, u, state)))
    assert rel_err(o, o_ref) <= 2e-6 and rel_err(sT, sT_ref) <= 2e-6          # observed <= 6.1e-7 over three seeds


def test_kernels_compile_for_h100_without_register_spills():
    """The interpreter cannot tell whether the kernels compile for a GPU: compile all six for sm_90 (bf16, K = 64)."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        get_ptxas(90)
    except Exception as e:                                   # a triton install without its CUDA toolchain
        pytest.skip(f"no ptxas for sm_90: {e!r}")
    script = Path(__file__).resolve().parents[1] / "kernels" / "compile_check.py"
    run = subprocess.run([sys.executable, str(script), "--head-size", "64", "--dtype", "bf16", "--arch", "90"],
                         capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    kernels = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(kernels) == 6
    assert all(k["spill_bytes"] == 0 for k in kernels), kernels
