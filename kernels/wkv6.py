"""Chunked WKV6 (RWKV-6 time mixing, VisualRWKV Eq. 9) in Triton: forward and backward with state in and out.

Shapes: B batch, T time, H heads, K key size, V value size (V == K), NS segments, NK key blocks. Per (b, h):

    for t in range(T):
        kv = outer(k[t], v[t])                 # [K, V]
        o[t] = r[t] @ (S + u[:, None] * kv)    # [V]
        S = exp(logw[t])[:, None] * S + kv

T is cut into chunks of BT = 16 tokens and the chunks into NS segments. A program owns one (b, h, segment) and walks
its chunks with the state S (or its gradient G) in registers. Inside a chunk every pair j < i gets its exact decay
exp(sum_{j<m<i} logw[m]) from fp32 cumulative sums, elementwise and masked to -inf before `exp`: no exponent is ever
positive. Across segments the state is carried by a short scan over per-segment summaries. See kernels/README.md.
"""
import contextlib

import torch
import triton
import triton.language as tl

__all__ = ["wkv6_triton"]

CHUNK = 16                    # tokens per chunk (BT); tl.dot needs every dimension >= 16
HEAD_SIZES = (16, 32, 64, 128)
INT32_LIMIT = 2**31


# ---------------------------------------------------------------------------------------------------- building blocks
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
    """Cumulative log-decays of one chunk: inclusive A [BT, C], exclusive Ae [BT, C], chunk total A_last [C]."""
    A = tl.cumsum(w, axis=0)                                            # sum_{m<=i} logw[m]
    Ae = tl.minimum(A - w, 0.0)                                         # sum_{m<i} logw[m]
    A_last = tl.sum(tl.where(it[:, None] == BT - 1, A, 0.0), axis=0)   # [C]
    return A, Ae, A_last


@triton.jit
def _pair_decays(A, Ae, causal):
    """exp(sum_{j<m<i} logw[m]) for every pair j < i of a chunk, 0 elsewhere: [BT(i), BT(j), C], exponents <= 0."""
    diff = tl.minimum(Ae[:, None, :] - A[None, :, :], 0.0)
    return tl.exp(tl.where(causal[:, :, None], diff, float("-inf")))


@triton.jit
def _segment_of(pid, NS, seg_len, T, BT: tl.constexpr, INT64: tl.constexpr):
    """(b*H + h, segment, first row, number of chunks) of program `pid` on a grid of B*H*NS programs."""
    if INT64:
        pid = pid.to(tl.int64)
    bh, seg = pid // NS, pid % NS
    start = seg * seg_len
    n_chunks = tl.cdiv(tl.minimum(seg_len, T - start), BT)
    return bh, seg, start, n_chunks


# ------------------------------------------------------------------------------------------------------------ forward
@triton.jit
def _fwd_segment_kernel(k_ptr, v_ptr, w_ptr, local_ptr, decay_ptr, T, NS, seg_len,
                        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                        INT64: tl.constexpr, MODE: tl.constexpr):
    """Per segment: the state it adds from zero, sum_j exp(sum_{m>j} logw[m]) k[j] v[j]^T [K, V], and its log-decay [K]."""
    bh, seg, start, n_chunks = _segment_of(tl.program_id(0), NS, seg_len, T, BT, INT64)
    b, h = bh // H, bh % H
    ik, iv, it = tl.arange(0, K), tl.arange(0, V), tl.arange(0, BT)
    S = tl.zeros([K, V], dtype=tl.float32)
    total = tl.zeros([K], dtype=tl.float32)
    for c in range(n_chunks):
        rows = start + c * BT + it
        m = (rows < T)[:, None]
        x_offs = (b * T + rows[:, None]) * (H * K) + h * K + ik[None, :]
        y_offs = (b * T + rows[:, None]) * (H * V) + h * V + iv[None, :]
        k = tl.load(k_ptr + x_offs, mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + x_offs, mask=m, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + y_offs, mask=m, other=0.0).to(tl.float32)
        A, Ae, A_last = _chunk_decays(w, it, BT)
        S = tl.exp(A_last)[:, None] * S + _dot(tl.trans(k * tl.exp(A_last[None, :] - A)), v, MODE)
        total += A_last
    tl.store(local_ptr + (bh * NS + seg) * K * V + ik[:, None] * V + iv[None, :], S)
    tl.store(decay_ptr + (bh * NS + seg) * K + ik, total)


@triton.jit
def _scan_kernel(init_ptr, local_ptr, decay_ptr, entry_ptr, final_ptr, NS,
                 K: tl.constexpr, V: tl.constexpr, REVERSE: tl.constexpr, INT64: tl.constexpr):
    """Carry a [K, V] state over the segments of one (b, h): entry[s] = X; X = exp(decay[s]) * X + local[s].

    Forward: X is the state and entry[s] the state a segment starts from. REVERSE: X is the state gradient G and
    entry[s] the gradient of the state a segment ends with; `final` is then the initial state's gradient.
    """
    bh = tl.program_id(0)
    if INT64:
        bh = bh.to(tl.int64)
    ik, iv = tl.arange(0, K), tl.arange(0, V)
    kv = ik[:, None] * V + iv[None, :]
    X = tl.load(init_ptr + bh * K * V + kv)
    for i in range(NS):
        if REVERSE:
            s = NS - 1 - i
        else:
            s = i
        tl.store(entry_ptr + (bh * NS + s) * K * V + kv, X)
        X = tl.exp(tl.load(decay_ptr + (bh * NS + s) * K + ik))[:, None] * X + \
            tl.load(local_ptr + (bh * NS + s) * K * V + kv)
    tl.store(final_ptr + bh * K * V + kv, X)


@triton.jit
def _fwd_kernel(r_ptr, k_ptr, v_ptr, w_ptr, u_ptr, start_ptr, o_ptr, sT_ptr, T, NS, seg_len,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                WRITE_FINAL: tl.constexpr, INT64: tl.constexpr, MODE: tl.constexpr):
    """Forward of one segment from its start state: o [B, T, H, V]; with one segment also the final state."""
    bh, seg, start, n_chunks = _segment_of(tl.program_id(0), NS, seg_len, T, BT, INT64)
    b, h = bh // H, bh % H
    ik, iv, it, ib = tl.arange(0, K), tl.arange(0, V), tl.arange(0, BT), tl.arange(0, BK)
    causal = it[:, None] > it[None, :]                                  # j < i
    diag = it[:, None] == it[None, :]
    u = tl.load(u_ptr + h * K + ik).to(tl.float32)                     # [K]
    state_offs = (bh * NS + seg) * K * V + ik[:, None] * V + iv[None, :]
    S = tl.load(start_ptr + state_offs)                                 # [K, V]
    for c in range(n_chunks):
        rows = start + c * BT + it                                      # [BT]
        m = (rows < T)[:, None]
        row_offs = (b * T + rows[:, None]) * (H * K) + h * K            # [BT, 1]
        x_offs = row_offs + ik[None, :]                                 # [BT, K]
        y_offs = (b * T + rows[:, None]) * (H * V) + h * V + iv[None, :]   # [BT, V]
        r = tl.load(r_ptr + x_offs, mask=m, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + x_offs, mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + x_offs, mask=m, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + y_offs, mask=m, other=0.0).to(tl.float32)
        A, Ae, A_last = _chunk_decays(w, it, BT)
        att = tl.where(diag, tl.sum(r * u[None, :] * k, axis=1)[:, None], 0.0)   # the u bonus on the diagonal
        for kb in tl.static_range(0, K, BK):                            # pairs j < i, BK channels at a time
            rb = tl.load(r_ptr + row_offs + kb + ib[None, :], mask=m, other=0.0).to(tl.float32)
            kk = tl.load(k_ptr + row_offs + kb + ib[None, :], mask=m, other=0.0).to(tl.float32)
            wb = tl.load(w_ptr + row_offs + kb + ib[None, :], mask=m, other=0.0).to(tl.float32)
            Ab, Aeb, _ = _chunk_decays(wb, it, BT)
            att += tl.sum(rb[:, None, :] * kk[None, :, :] * _pair_decays(Ab, Aeb, causal), axis=2)
        o = _dot(att, v, MODE) + _dot(r * tl.exp(Ae), S, MODE)         # [BT, V]
        tl.store(o_ptr + y_offs, o.to(o_ptr.dtype.element_ty), mask=m)
        S = tl.exp(A_last)[:, None] * S + _dot(tl.trans(k * tl.exp(A_last[None, :] - A)), v, MODE)
    if WRITE_FINAL:
        tl.store(sT_ptr + bh * K * V + ik[:, None] * V + iv[None, :], S)


# ----------------------------------------------------------------------------------------------------------- backward
@triton.jit
def _bwd_dr_kernel(k_ptr, v_ptr, w_ptr, u_ptr, start_ptr, do_ptr, dr_ptr, T, NS, seg_len,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                   INT64: tl.constexpr, MODE: tl.constexpr):
    """dr [B, T, H, K] (fp32) for BK key channels of one segment, forward in time from the segment's start state."""
    bh, seg, start, n_chunks = _segment_of(tl.program_id(0), NS, seg_len, T, BT, INT64)
    b, h = bh // H, bh % H
    ck = tl.program_id(1) * BK + tl.arange(0, BK)                      # this program's key channels
    iv, it = tl.arange(0, V), tl.arange(0, BT)
    causal = it[:, None] > it[None, :]
    u = tl.load(u_ptr + h * K + ck).to(tl.float32)
    S = tl.load(start_ptr + (bh * NS + seg) * K * V + ck[:, None] * V + iv[None, :])   # [BK, V]
    for c in range(n_chunks):
        rows = start + c * BT + it
        m = (rows < T)[:, None]
        x_offs = (b * T + rows[:, None]) * (H * K) + h * K + ck[None, :]
        y_offs = (b * T + rows[:, None]) * (H * V) + h * V + iv[None, :]
        k = tl.load(k_ptr + x_offs, mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + x_offs, mask=m, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + y_offs, mask=m, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + y_offs, mask=m, other=0.0).to(tl.float32)
        A, Ae, A_last = _chunk_decays(w, it, BT)
        datt = tl.where(causal, _dot(do, tl.trans(v), MODE), 0.0)       # do_i . v_j, [BT, BT]
        dr = tl.sum(datt[:, :, None] * k[None, :, :] * _pair_decays(A, Ae, causal), axis=1)   # [BT, BK]
        dr += tl.exp(Ae) * _dot(do, tl.trans(S), MODE)
        dr += u[None, :] * k * tl.sum(do * v, axis=1)[:, None]
        tl.store(dr_ptr + x_offs, dr, mask=m)
        S = tl.exp(A_last)[:, None] * S + _dot(tl.trans(k * tl.exp(A_last[None, :] - A)), v, MODE)


@triton.jit
def _bwd_segment_kernel(r_ptr, w_ptr, do_ptr, local_ptr, T, NS, seg_len,
                        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                        INT64: tl.constexpr, MODE: tl.constexpr):
    """Per segment: the state gradient its outputs send to its start, sum_i exp(sum_{m<i} logw[m]) r[i] do[i]^T."""
    bh, seg, start, n_chunks = _segment_of(tl.program_id(0), NS, seg_len, T, BT, INT64)
    b, h = bh // H, bh % H
    ik, iv, it = tl.arange(0, K), tl.arange(0, V), tl.arange(0, BT)
    G = tl.zeros([K, V], dtype=tl.float32)
    for c in range(n_chunks):
        rows = start + (n_chunks - 1 - c) * BT + it
        m = (rows < T)[:, None]
        x_offs = (b * T + rows[:, None]) * (H * K) + h * K + ik[None, :]
        y_offs = (b * T + rows[:, None]) * (H * V) + h * V + iv[None, :]
        r = tl.load(r_ptr + x_offs, mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + x_offs, mask=m, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + y_offs, mask=m, other=0.0).to(tl.float32)
        A, Ae, A_last = _chunk_decays(w, it, BT)
        G = tl.exp(A_last)[:, None] * G + _dot(tl.trans(r * tl.exp(Ae)), do, MODE)
    tl.store(local_ptr + (bh * NS + seg) * K * V + ik[:, None] * V + iv[None, :], G)


@triton.jit
def _bwd_dkvw_kernel(r_ptr, k_ptr, v_ptr, w_ptr, u_ptr, do_ptr, dr_ptr, gend_ptr, zend_ptr,
                     dk_ptr, dv_ptr, dw_ptr, du_ptr, ds0_ptr, T, NS, seg_len, dv_stride,
                     H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                     NEED_DS0: tl.constexpr, INT64: tl.constexpr, MODE: tl.constexpr):
    """dk, dlogw [B, T, H, K], this key block's share of dv, du and d(initial state), backward in time.

    Carries G, the gradient of the state after the current chunk (from G_end of the segment), and the running
    dlogw[t] = rowsum(G_end * S_end) + sum_{s>t} r[s]*dr_state[s] - sum_{s>=t} k[s]*dk_state[s] over the segment,
    where the `_state` gradients leave out the u terms.
    """
    bh, seg, start, n_chunks = _segment_of(tl.program_id(0), NS, seg_len, T, BT, INT64)
    b, h = bh // H, bh % H
    kb = tl.program_id(1)
    if INT64:
        kb = kb.to(tl.int64)
    ck = kb * BK + tl.arange(0, BK)
    iv, it = tl.arange(0, V), tl.arange(0, BT)
    causal = it[:, None] > it[None, :]
    diag = it[:, None] == it[None, :]
    u = tl.load(u_ptr + h * K + ck).to(tl.float32)
    state_offs = (bh * NS + seg) * K * V + ck[:, None] * V + iv[None, :]
    G = tl.load(gend_ptr + state_offs)                                  # [BK, V]
    suffix = tl.load(zend_ptr + (bh * NS + seg) * K + ck)               # [BK]
    du = tl.zeros([BK], dtype=tl.float32)
    for c in range(n_chunks):
        rows = start + (n_chunks - 1 - c) * BT + it
        m = (rows < T)[:, None]
        x_offs = (b * T + rows[:, None]) * (H * K) + h * K + ck[None, :]
        y_offs = (b * T + rows[:, None]) * (H * V) + h * V + iv[None, :]
        r = tl.load(r_ptr + x_offs, mask=m, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + x_offs, mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + x_offs, mask=m, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + y_offs, mask=m, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + y_offs, mask=m, other=0.0).to(tl.float32)
        dr = tl.load(dr_ptr + x_offs, mask=m, other=0.0)
        A, Ae, A_last = _chunk_decays(w, it, BT)
        E = _pair_decays(A, Ae, causal)                                 # [BT, BT, BK]
        do_v = tl.sum(do * v, axis=1)                                   # [BT]
        att = tl.sum(r[:, None, :] * k[None, :, :] * E, axis=2)         # this block's share, [BT(i), BT(j)]
        att = att + tl.where(diag, tl.sum(r * u[None, :] * k, axis=1)[:, None], 0.0)
        datt = tl.where(causal, _dot(do, tl.trans(v), MODE), 0.0)
        to_end = tl.exp(A_last[None, :] - A)                            # [BT, BK]
        dk_state = tl.sum(datt[:, :, None] * r[:, None, :] * E, axis=0) + to_end * _dot(v, tl.trans(G), MODE)
        dv = _dot(tl.trans(att), do, MODE) + _dot(k * to_end, G, MODE)  # [BT, V]
        x = r * (dr - u[None, :] * k * do_v[:, None])                   # r * dr_state
        y = k * dk_state
        dw = suffix[None, :] + tl.cumsum(x - y, axis=0, reverse=True) - x
        suffix += tl.sum(x - y, axis=0)
        du += tl.sum(r * k * do_v[:, None], axis=0)
        tl.store(dk_ptr + x_offs, dk_state + u[None, :] * r * do_v[:, None], mask=m)
        tl.store(dv_ptr + kb * dv_stride + y_offs, dv, mask=m)
        tl.store(dw_ptr + x_offs, dw, mask=m)
        G = tl.exp(A_last)[:, None] * G + _dot(tl.trans(r * tl.exp(Ae)), do, MODE)
    tl.store(du_ptr + (bh * NS + seg) * K + ck, du)
    if NEED_DS0:
        if seg == 0:
            tl.store(ds0_ptr + bh * K * V + ck[:, None] * V + iv[None, :], G)


# ------------------------------------------------------------------------------------------------------------ wrapper
def _interpreted():
    """True under TRITON_INTERPRET=1 (read by triton when the kernels were defined)."""
    return not isinstance(_fwd_kernel, triton.runtime.jit.JITFunction)


def _dot_mode(dtype):
    """Tensor-core operand format for an input dtype: fp32 stays exact, bf16 uses bf16, fp16 uses tf32."""
    if dtype == torch.bfloat16:
        return 3 if _interpreted() else 1
    return {torch.float32: 0, torch.float16: 2}[dtype]


def _needs_int64(*sizes):
    """True once any buffer has 2**31 elements or more, so 32-bit offsets could overflow."""
    return any(n >= INT32_LIMIT for n in sizes)


def _segment_chunks(B, H, T, n_sm):
    """Chunks per segment: enough segments that B*H*NS programs fill a GPU of n_sm SMs about twice (segments of at
    least 8 chunks); one segment on the CPU (n_sm None)."""
    n_chunks = triton.cdiv(T, CHUNK)
    if n_sm is None:
        return n_chunks
    want = triton.cdiv(2 * n_sm, B * H)
    return max(triton.cdiv(n_chunks, want), 8)


def _sm_count(device):
    """Streaming multiprocessors of a CUDA device; None on the CPU."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


def _fwd_warps(K):
    """Warps of the forward kernel: its [BT, K] x [K, V] state product wants more threads from K = 64 on."""
    return 4 if K <= 32 else 8


def _key_block(K):
    """Key channels per block of the pairwise (3D) work: at most 32 keeps registers in check."""
    return min(K, 32)


def _on_device(device):
    """Launch on the tensors' GPU, not the current one (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check_inputs(r, k, v, logw, u, state):
    if r.dim() != 4:
        raise ValueError(f"wkv6_triton: r must be [B, T, H, K], got shape {tuple(r.shape)}")
    for name, x in (("k", k), ("v", v), ("logw", logw)):
        if x.shape != r.shape:
            raise ValueError(f"wkv6_triton: {name} must have r's shape {tuple(r.shape)}, got {tuple(x.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != r.dtype:
            raise ValueError(f"wkv6_triton: {name} must have r's dtype {r.dtype}, got {x.dtype}")
    if logw.dtype != torch.float32:
        raise ValueError(f"wkv6_triton: logw must be float32 (its cumulative sums need the precision), got {logw.dtype}")
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
    """Autograd wrapper. Forward: segment summaries, a scan over segments, then all segments at once.
    Backward: dr forward in time, then per-segment gradient summaries, a reverse scan, and dk, dv, dlogw, du."""

    @staticmethod
    def forward(ctx, r, k, v, logw, u, state, seg_chunks=None, force_int64=False):
        B, T, H, K = r.shape
        r, k, v, logw = (x.contiguous() for x in (r, k, v, logw))
        seg_chunks = max(seg_chunks or _segment_chunks(B, H, T, _sm_count(r.device)), 1)
        seg_len = seg_chunks * CHUNK
        NS = max(triton.cdiv(T, seg_len), 1)
        u32 = u.float().contiguous()
        s0 = torch.zeros(B, H, K, K, device=r.device) if state is None else state.float().contiguous()
        sT = torch.empty_like(s0)
        int64 = force_int64 or _needs_int64(r.numel() * (K // _key_block(K)), B * H * NS * K * K)
        mode = _dot_mode(r.dtype)
        meta = dict(H=H, K=K, V=K, BT=CHUNK, INT64=int64, MODE=mode)
        decay = None
        if NS == 1:
            starts = s0[:, :, None]                                      # [B, H, 1, K, V]
        else:
            local = torch.empty(B, H, NS, K, K, device=r.device)
            decay = torch.empty(B, H, NS, K, device=r.device)
            _fwd_segment_kernel[(B * H * NS,)](k, v, logw, local, decay, T, NS, seg_len, **meta)
            starts = torch.empty_like(local)
            _scan_kernel[(B * H,)](s0, local, decay, starts, sT, NS, K=K, V=K, REVERSE=False, INT64=int64)
        o = torch.empty_like(v)
        _fwd_kernel[(B * H * NS,)](r, k, v, logw, u32, starts, o, sT, T, NS, seg_len, BK=_key_block(K),
                                   WRITE_FINAL=NS == 1, **meta, num_warps=_fwd_warps(K))
        ctx.save_for_backward(r, k, v, logw, u32, starts, sT, decay)
        ctx.seg, ctx.meta, ctx.has_state = (NS, seg_len), meta, state is not None
        ctx.dtypes = (logw.dtype, u.dtype, None if state is None else state.dtype)
        return o, sT

    @staticmethod
    def backward(ctx, do, dsT):
        with _on_device(do.device):
            return WKV6Triton._backward(ctx, do, dsT)

    @staticmethod
    def _backward(ctx, do, dsT):
        r, k, v, logw, u32, starts, sT, decay = ctx.saved_tensors
        (NS, seg_len), meta = ctx.seg, ctx.meta
        B, T, H, K = r.shape
        BK = _key_block(K)
        grid = (B * H * NS, K // BK)
        do = do.contiguous()
        dr = torch.empty(B, T, H, K, device=r.device, dtype=torch.float32)
        _bwd_dr_kernel[grid](k, v, logw, u32, starts, do, dr, T, NS, seg_len, BK=BK, **meta)
        dsT = torch.zeros_like(sT) if dsT is None else dsT.float().contiguous()
        if NS == 1:
            g_end = dsT[:, :, None]                                      # [B, H, 1, K, V]
        else:
            local = torch.empty_like(starts)
            _bwd_segment_kernel[(B * H * NS,)](r, logw, do, local, T, NS, seg_len, **meta)
            g_end = torch.empty_like(local)
            _scan_kernel[(B * H,)](dsT, local, decay, g_end, torch.empty_like(sT), NS, K=K, V=K, REVERSE=True,
                                   INT64=meta["INT64"])
        s_end = torch.cat([starts[:, :, 1:], sT[:, :, None]], dim=2)    # [B, H, NS, K, V]
        z_end = (g_end * s_end).sum(-1).contiguous()                    # rowsum(G_end * S_end), [B, H, NS, K]
        dk, dw = torch.empty_like(dr), torch.empty_like(dr)
        dv = torch.empty(K // BK, B, T, H, K, device=r.device)
        du = torch.empty(B, H, NS, K, device=r.device)
        ds0 = torch.empty_like(sT) if ctx.has_state else None
        _bwd_dkvw_kernel[grid](r, k, v, logw, u32, do, dr, g_end.contiguous(), z_end, dk, dv, dw, du,
                               ds0 if ds0 is not None else sT, T, NS, seg_len, B * T * H * K, BK=BK,
                               NEED_DS0=ds0 is not None, **meta)
        dt, (w_dtype, u_dtype, s_dtype) = r.dtype, ctx.dtypes
        ds0 = None if ds0 is None else ds0.to(s_dtype)
        return (dr.to(dt), dk.to(dt), dv.sum(0).to(dt), dw.to(w_dtype), du.sum((0, 2)).to(u_dtype), ds0, None, None)


def wkv6_triton(r, k, v, logw, u, state=None):
    """WKV6 (Eq. 9) with Triton kernels: r, k, v, logw [B, T, H, K], u [H, K], state [B, H, K, V] or None.

    r, k, v share one dtype (float32, bfloat16 or float16); logw is float32 whatever r's dtype, as in BlinkDL's RWKV-6
    CUDA op: its cumulative sums inside a chunk need 24 mantissa bits, and it is never rounded to 16. u and the state
    may have any float dtype (read as float32). Returns (o [B, T, H, V] in r's dtype, final state [B, H, K, V]
    float32); differentiable in every input, each gradient in its input's dtype.
    """
    _check_inputs(r, k, v, logw, u, state)
    with _on_device(r.device):
        return WKV6Triton.apply(r, k, v, logw, u, state)
