"""Chunked WKV6 (RWKV-6 time mixing, VisualRWKV Eq. 9) in Triton: forward and backward with state in and out.

Shapes: B batch, T time, H heads, K key size, V value size (V == K). Per batch b and head h, with S = `state`:

    for t in range(T):
        kv = outer(k[t], v[t])                 # [K, V]
        o[t] = r[t] @ (S + u[:, None] * kv)    # [V]
        S = exp(logw[t])[:, None] * S + kv

One program owns one (b, h) and walks T in chunks of BT tokens with S (or its gradient) held in registers.
Inside a chunk every pair (i, j < i) gets its exact decay exp(sum_{j<m<i} logw[m]) from fp32 cumulative sums,
computed elementwise and masked to -inf before `exp`, so no exponent is ever positive. See kernels/README.md.
"""
import torch
import triton
import triton.language as tl

__all__ = ["wkv6_triton"]

CHUNK = 16                    # tokens per chunk (BT); tl.dot needs every dimension >= 16
HEAD_SIZES = (16, 32, 64, 128)
INT32_LIMIT = 2**31


@triton.jit
def _dot(a, b, MODE: tl.constexpr):
    """a @ b with fp32 accumulation: MODE 0 exact fp32 ("ieee"), 1 bf16 operands, 2 tf32 operands,
    3 bf16 operands emulated (rounded to bf16, multiplied in fp32) for the interpreter, whose bf16 dot is broken."""
    if MODE == 1:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif MODE == 3:
        return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), input_precision="ieee")
    elif MODE == 2:
        return tl.dot(a, b, input_precision="tf32")
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _chunk_decays(w, it, BT: tl.constexpr):
    """Cumulative log-decays of one chunk: inclusive A [BT, K], exclusive Ae [BT, K], chunk total A_last [K]."""
    A = tl.cumsum(w, axis=0)                                            # sum_{m<=i} logw[m]
    Ae = tl.minimum(A - w, 0.0)                                         # sum_{m<i} logw[m]
    A_last = tl.sum(tl.where(it[:, None] == BT - 1, A, 0.0), axis=0)   # [K]
    return A, Ae, A_last


@triton.jit
def _pair_decays(A, Ae, causal):
    """exp(sum_{j<m<i} logw[m]) for every pair j < i of a chunk, 0 elsewhere: [BT(i), BT(j), K], exponents <= 0."""
    diff = tl.minimum(Ae[:, None, :] - A[None, :, :], 0.0)
    return tl.exp(tl.where(causal[:, :, None], diff, float("-inf")))


@triton.jit
def _wkv6_fwd_kernel(r_ptr, k_ptr, v_ptr, w_ptr, u_ptr, s0_ptr, o_ptr, sT_ptr, T,
                     H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                     HAS_S0: tl.constexpr, INT64: tl.constexpr, MODE: tl.constexpr):
    """Forward: o [B, T, H, V] and final state [B, H, K, V] from r, k, v, logw [B, T, H, K], u [H, K]."""
    bh = tl.program_id(0)
    if INT64:
        bh = bh.to(tl.int64)
    b, h = bh // H, bh % H
    ik, iv, it = tl.arange(0, K), tl.arange(0, V), tl.arange(0, BT)
    causal = it[:, None] > it[None, :]                                  # j < i
    diag = it[:, None] == it[None, :]
    u = tl.load(u_ptr + h * K + ik).to(tl.float32)                     # [K]
    state_offs = bh * K * V + ik[:, None] * V + iv[None, :]             # [K, V]
    if HAS_S0:
        S = tl.load(s0_ptr + state_offs)
    else:
        S = tl.zeros([K, V], dtype=tl.float32)
    for t0 in range(0, T, BT):
        rows = t0 + it                                                  # [BT]
        if INT64:
            rows = rows.to(tl.int64)
        m = (rows < T)[:, None]
        x_offs = (b * T + rows[:, None]) * (H * K) + h * K + ik[None, :]   # [BT, K]
        y_offs = (b * T + rows[:, None]) * (H * V) + h * V + iv[None, :]   # [BT, V]
        r = tl.load(r_ptr + x_offs, mask=m, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + x_offs, mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + x_offs, mask=m, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + y_offs, mask=m, other=0.0).to(tl.float32)
        A, Ae, A_last = _chunk_decays(w, it, BT)
        E = _pair_decays(A, Ae, causal)                                 # [BT, BT, K]
        att = tl.sum(r[:, None, :] * k[None, :, :] * E, axis=2)         # [BT, BT]
        bonus = tl.sum(r * u[None, :] * k, axis=1)                      # [BT]
        att = att + tl.where(diag, bonus[:, None], 0.0)
        o = _dot(att, v, MODE) + _dot(r * tl.exp(Ae), S, MODE)         # [BT, V]
        tl.store(o_ptr + y_offs, o.to(o_ptr.dtype.element_ty), mask=m)
        k_to_end = k * tl.exp(A_last[None, :] - A)                     # [BT, K]
        S = tl.exp(A_last)[:, None] * S + _dot(tl.trans(k_to_end), v, MODE)
    tl.store(sT_ptr + state_offs, S)


@triton.jit
def _wkv6_bwd_dr_kernel(r_ptr, k_ptr, v_ptr, w_ptr, u_ptr, s0_ptr, do_ptr, dr_ptr, T,
                        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                        HAS_S0: tl.constexpr, INT64: tl.constexpr, MODE: tl.constexpr):
    """Backward, forward in time: dr [B, T, H, K] (fp32), recomputing the state S chunk by chunk."""
    bh = tl.program_id(0)
    if INT64:
        bh = bh.to(tl.int64)
    b, h = bh // H, bh % H
    ik, iv, it = tl.arange(0, K), tl.arange(0, V), tl.arange(0, BT)
    causal = it[:, None] > it[None, :]
    u = tl.load(u_ptr + h * K + ik).to(tl.float32)
    state_offs = bh * K * V + ik[:, None] * V + iv[None, :]
    if HAS_S0:
        S = tl.load(s0_ptr + state_offs)
    else:
        S = tl.zeros([K, V], dtype=tl.float32)
    for t0 in range(0, T, BT):
        rows = t0 + it
        if INT64:
            rows = rows.to(tl.int64)
        m = (rows < T)[:, None]
        x_offs = (b * T + rows[:, None]) * (H * K) + h * K + ik[None, :]
        y_offs = (b * T + rows[:, None]) * (H * V) + h * V + iv[None, :]
        k = tl.load(k_ptr + x_offs, mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + x_offs, mask=m, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + y_offs, mask=m, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + y_offs, mask=m, other=0.0).to(tl.float32)
        A, Ae, A_last = _chunk_decays(w, it, BT)
        E = _pair_decays(A, Ae, causal)
        datt = tl.where(causal, _dot(do, tl.trans(v), MODE), 0.0)       # do_i . v_j, [BT, BT]
        dr = tl.sum(datt[:, :, None] * k[None, :, :] * E, axis=1)       # [BT, K]
        dr += tl.exp(Ae) * _dot(do, tl.trans(S), MODE)
        dr += u[None, :] * k * tl.sum(do * v, axis=1)[:, None]
        tl.store(dr_ptr + x_offs, dr, mask=m)
        k_to_end = k * tl.exp(A_last[None, :] - A)
        S = tl.exp(A_last)[:, None] * S + _dot(tl.trans(k_to_end), v, MODE)


@triton.jit
def _wkv6_bwd_dkvw_kernel(r_ptr, k_ptr, v_ptr, w_ptr, u_ptr, do_ptr, dr_ptr, dsT_ptr, zT_ptr,
                          dk_ptr, dv_ptr, dw_ptr, du_ptr, ds0_ptr, T,
                          H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                          HAS_DST: tl.constexpr, NEED_DS0: tl.constexpr, INT64: tl.constexpr,
                          MODE: tl.constexpr):
    """Backward, backward in time: dk, dv, dlogw [B, T, H, K] (fp32), du per (b, h), d(initial state).

    Carries G, the gradient of the state after the current chunk, and the running suffix of dlogw:
    dlogw[t] = sum_{s>t} r[s]*dr_state[s] - sum_{s>=t} k[s]*dk_state[s] + rowsum(dS_T * S_T), where the
    `_state` gradients leave out the bonus (u) terms.
    """
    bh = tl.program_id(0)
    if INT64:
        bh = bh.to(tl.int64)
    b, h = bh // H, bh % H
    ik, iv, it = tl.arange(0, K), tl.arange(0, V), tl.arange(0, BT)
    causal = it[:, None] > it[None, :]
    diag = it[:, None] == it[None, :]
    u = tl.load(u_ptr + h * K + ik).to(tl.float32)
    state_offs = bh * K * V + ik[:, None] * V + iv[None, :]
    if HAS_DST:
        G = tl.load(dsT_ptr + state_offs)
        suffix = tl.load(zT_ptr + bh * K + ik)                          # rowsum(dS_T * S_T), [K]
    else:
        G = tl.zeros([K, V], dtype=tl.float32)
        suffix = tl.zeros([K], dtype=tl.float32)
    du = tl.zeros([K], dtype=tl.float32)
    n_chunks = tl.cdiv(T, BT)
    for c in range(n_chunks):
        rows = (n_chunks - 1 - c) * BT + it
        if INT64:
            rows = rows.to(tl.int64)
        m = (rows < T)[:, None]
        x_offs = (b * T + rows[:, None]) * (H * K) + h * K + ik[None, :]
        y_offs = (b * T + rows[:, None]) * (H * V) + h * V + iv[None, :]
        r = tl.load(r_ptr + x_offs, mask=m, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + x_offs, mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + x_offs, mask=m, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + y_offs, mask=m, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + y_offs, mask=m, other=0.0).to(tl.float32)
        dr = tl.load(dr_ptr + x_offs, mask=m, other=0.0)
        A, Ae, A_last = _chunk_decays(w, it, BT)
        E = _pair_decays(A, Ae, causal)
        do_v = tl.sum(do * v, axis=1)                                   # [BT]
        att = tl.sum(r[:, None, :] * k[None, :, :] * E, axis=2)         # [BT(i), BT(j)]
        att = att + tl.where(diag, tl.sum(r * u[None, :] * k, axis=1)[:, None], 0.0)
        datt = tl.where(causal, _dot(do, tl.trans(v), MODE), 0.0)
        to_end = tl.exp(A_last[None, :] - A)                            # [BT, K]
        dk_state = tl.sum(datt[:, :, None] * r[:, None, :] * E, axis=0)  # [BT(j), K]
        dk_state += to_end * _dot(v, tl.trans(G), MODE)
        dv = _dot(tl.trans(att), do, MODE) + _dot(k * to_end, G, MODE)  # [BT, V]
        r_bonus = u[None, :] * k * do_v[:, None]                        # the u term of dr
        dk = dk_state + u[None, :] * r * do_v[:, None]
        du += tl.sum(r * k * do_v[:, None], axis=0)
        x = r * (dr - r_bonus)
        y = k * dk_state
        dw = suffix[None, :] + tl.cumsum(x - y, axis=0, reverse=True) - x
        suffix += tl.sum(x - y, axis=0)
        tl.store(dk_ptr + x_offs, dk, mask=m)
        tl.store(dv_ptr + y_offs, dv, mask=m)
        tl.store(dw_ptr + x_offs, dw, mask=m)
        G = tl.exp(A_last)[:, None] * G + _dot(tl.trans(r * tl.exp(Ae)), do, MODE)
    tl.store(du_ptr + bh * K + ik, du)
    if NEED_DS0:
        tl.store(ds0_ptr + state_offs, G)


def _interpreted():
    """True under TRITON_INTERPRET=1 (read by triton when the kernels were defined)."""
    return isinstance(_wkv6_fwd_kernel, triton.runtime.interpreter.InterpretedFunction)


def _dot_mode(dtype):
    """Tensor-core operand format for an input dtype: fp32 stays exact, bf16 uses bf16, fp16 uses tf32."""
    if dtype == torch.bfloat16:
        return 3 if _interpreted() else 1
    return {torch.float32: 0, torch.float16: 2}[dtype]


def _needs_int64(*tensors):
    """True once any tensor has 2**31 elements or more, so 32-bit offsets could overflow."""
    return any(t.numel() >= INT32_LIMIT for t in tensors)


def _num_warps(K):
    return 4 if K <= 32 else 8


def _check_inputs(r, k, v, logw, u, state):
    if r.dim() != 4:
        raise ValueError(f"wkv6_triton: r must be [B, T, H, K], got shape {tuple(r.shape)}")
    for name, x in (("k", k), ("v", v), ("logw", logw)):
        if x.shape != r.shape:
            raise ValueError(f"wkv6_triton: {name} must have r's shape {tuple(r.shape)}, got {tuple(x.shape)}")
        if x.dtype != r.dtype:
            raise ValueError(f"wkv6_triton: {name} must have r's dtype {r.dtype}, got {x.dtype}")
    if r.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"wkv6_triton: dtype must be float32, bfloat16 or float16, got {r.dtype}")
    B, T, H, K = r.shape
    if K not in HEAD_SIZES:
        raise ValueError(f"wkv6_triton: head size K must be one of {HEAD_SIZES}, got {K}")
    if u.shape != (H, K):
        raise ValueError(f"wkv6_triton: u must be [H, K] = {(H, K)}, got {tuple(u.shape)}")
    if state is not None and state.shape != (B, H, K, K):
        raise ValueError(f"wkv6_triton: state must be [B, H, K, V] = {(B, H, K, K)}, got {tuple(state.shape)}")
    devices = {x.device for x in (r, k, v, logw, u) + (() if state is None else (state,))}
    if len(devices) != 1:
        raise ValueError(f"wkv6_triton: all tensors must be on one device, got {sorted(map(str, devices))}")


class WKV6Triton(torch.autograd.Function):
    """Autograd wrapper: Triton forward, two Triton backward passes (dr forward in time, the rest backward)."""

    @staticmethod
    def forward(ctx, r, k, v, logw, u, state, force_int64=False):
        B, T, H, K = r.shape
        r, k, v, logw = (x.contiguous() for x in (r, k, v, logw))
        u32 = u.float().contiguous()
        s0 = None if state is None else state.float().contiguous()
        o = torch.empty_like(v)
        sT = torch.empty(B, H, K, K, device=r.device, dtype=torch.float32)
        int64 = force_int64 or _needs_int64(r)
        _wkv6_fwd_kernel[(B * H,)](r, k, v, logw, u32, s0 if s0 is not None else sT, o, sT, T,
                                   H=H, K=K, V=K, BT=CHUNK, HAS_S0=s0 is not None, INT64=int64,
                                   MODE=_dot_mode(r.dtype), num_warps=_num_warps(K))
        ctx.save_for_backward(r, k, v, logw, u32, s0, sT)
        ctx.int64, ctx.u_dtype, ctx.state_dtype = int64, u.dtype, None if state is None else state.dtype
        return o, sT

    @staticmethod
    def backward(ctx, do, dsT):
        r, k, v, logw, u32, s0, sT = ctx.saved_tensors
        B, T, H, K = r.shape
        do = do.contiguous()
        mode, warps = _dot_mode(r.dtype), _num_warps(K)
        dr = torch.empty(B, T, H, K, device=r.device, dtype=torch.float32)
        _wkv6_bwd_dr_kernel[(B * H,)](r, k, v, logw, u32, s0 if s0 is not None else sT, do, dr, T,
                                      H=H, K=K, V=K, BT=CHUNK, HAS_S0=s0 is not None, INT64=ctx.int64,
                                      MODE=mode, num_warps=warps)
        dk, dv, dw = (torch.empty_like(dr) for _ in range(3))
        du = torch.empty(B, H, K, device=r.device, dtype=torch.float32)
        ds0 = torch.empty_like(sT) if s0 is not None else None
        if dsT is not None:
            dsT = dsT.float().contiguous()
            zT = (dsT * sT).sum(-1).contiguous()                        # rowsum(dS_T * S_T), [B, H, K]
        _wkv6_bwd_dkvw_kernel[(B * H,)](r, k, v, logw, u32, do, dr,
                                        dsT if dsT is not None else sT, zT if dsT is not None else du,
                                        dk, dv, dw, du, ds0 if ds0 is not None else sT, T,
                                        H=H, K=K, V=K, BT=CHUNK, HAS_DST=dsT is not None,
                                        NEED_DS0=ds0 is not None, INT64=ctx.int64, MODE=mode, num_warps=warps)
        dt = r.dtype
        ds0 = None if ds0 is None else ds0.to(ctx.state_dtype)
        return dr.to(dt), dk.to(dt), dv.to(dt), dw.to(dt), du.sum(0).to(ctx.u_dtype), ds0, None


def wkv6_triton(r, k, v, logw, u, state=None):
    """WKV6 (Eq. 9) with Triton kernels: r, k, v, logw [B, T, H, K], u [H, K], state [B, H, K, V] or None.

    Returns (o [B, T, H, V] in the input dtype, final state [B, H, K, V] float32); differentiable in every input.
    """
    _check_inputs(r, k, v, logw, u, state)
    return WKV6Triton.apply(r, k, v, logw, u, state)
