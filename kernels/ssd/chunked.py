"""Triton kernels of the chunked SSD forward (Mamba-2) and the one-token decode step.

Layouts as mambazoo.core.ssd (its ``ssd_ref`` is the oracle): x, z, y (batch, L, heads, headdim); dt
(batch, L, heads); A, dt_bias (heads,); B, C (batch, L, groups, N); D (heads,) or (heads, headdim); states
(batch, heads, headdim, N) fp32; seq_idx (batch, L) int.

The forward is three launches, all arithmetic in fp32 (GEMMs on TF32 tensor cores for half-precision inputs,
``dot_precision``):
1. ``_chunk_state_kernel``, grid (batch * heads, chunks): dt (+ bias, softplus, limits) and its in-chunk
   cumulative log decay, then the chunk's own end state sum_j exp(a_end - a_j) dt_j x_j B_j^T (a GEMM over the
   chunk's tokens) and the chunk's decay exp(a_end) (zero when a sequence starts inside the chunk).
2. ``_state_pass_kernel``, grid (batch * heads, headdim blocks): the recurrence across chunks,
   S_c = decay_c S_{c-1} + chunk_state_c, storing the state entering each chunk and the final state.
3. ``_chunk_out_kernel``, grid (batch * heads, chunks): y = ((C B^T) o decay o dt) x (causal, same sequence)
   + exp(a_i) C_i S_entering, then D x and the silu(z) gate.
Nothing of size (batch, L, heads, headdim, N) is stored: only the per-chunk states (batch, heads, chunks,
headdim, N).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mambazoo.kernels._host import cdiv, gpu_launch, next_power_of_2

LOG2E = tl.constexpr(1.4426950408889634)  # a constexpr: compiled kernels may read no other global


def dot_precision(x: torch.Tensor) -> str:
    """The in-kernel GEMMs' precision: exact fp32 ('ieee') for fp32 inputs; TF32 tensor cores for half-precision
    inputs, whose 10-bit mantissa holds bf16 / fp16 values (7 / 10 bits) exactly, products summed in fp32. The
    interpreter computes both in fp32."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


@triton.jit
def _dt_and_decay(dt_ptr, bias_ptr, A_ptr, b, hh, offs_q, mask_q, stride_db, stride_dl, stride_dh,
                  dt_min, dt_max, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr):
    """dt (Q,) processed as core.ssd.process_dt (0 outside L) and the in-chunk cumulative sum of dt * A."""
    dt = tl.load(dt_ptr + b * stride_db + offs_q * stride_dl + hh * stride_dh, mask=mask_q, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + hh).to(tl.float32)
    if SOFTPLUS:
        dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))
    if HAS_LIMIT:
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    dt = tl.where(mask_q, dt, 0.0)
    A = tl.load(A_ptr + hh).to(tl.float32)
    return dt, tl.cumsum(dt * A, axis=0)


@triton.jit
def _chunk_state_kernel(
    x_ptr, dt_ptr, bias_ptr, A_ptr, B_ptr, seq_ptr, states_ptr, decay_ptr,
    L, H, P, N, heads_per_group, n_chunks, dt_min, dt_max,
    stride_xb, stride_xl, stride_xh, stride_xp, stride_db, stride_dl, stride_dh,
    stride_bb, stride_bl, stride_bg, stride_bn, stride_sb, stride_sl,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, HAS_SEQ: tl.constexpr,
    Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    pid_bh, c = tl.program_id(0), tl.program_id(1)
    b, hh = pid_bh // H, pid_bh % H
    g = hh // heads_per_group
    offs_q = c * Q + tl.arange(0, Q)
    mask_q = offs_q < L
    offs_p, offs_n = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
    dt, acum = _dt_and_decay(dt_ptr, bias_ptr, A_ptr, b, hh, offs_q, mask_q, stride_db, stride_dl, stride_dh,
                             dt_min, dt_max, HAS_BIAS, SOFTPLUS, HAS_LIMIT)
    a_end = tl.sum(tl.where(tl.arange(0, Q) == Q - 1, acum, 0.0), axis=0)
    w = tl.exp2((a_end - acum) * LOG2E) * dt
    keep_carry = 1.0
    if HAS_SEQ:
        last = tl.minimum(c * Q + Q, L) - 1
        s_last = tl.load(seq_ptr + b * stride_sb + last * stride_sl)
        s = tl.load(seq_ptr + b * stride_sb + offs_q * stride_sl, mask=mask_q, other=-1)
        w = tl.where(s == s_last, w, 0.0)
        s_prev = tl.load(seq_ptr + b * stride_sb + tl.maximum(c * Q - 1, 0) * stride_sl)
        keep_carry = tl.where(s_prev == s_last, 1.0, 0.0)
    x = tl.load(x_ptr + b * stride_xb + offs_q[:, None] * stride_xl + hh * stride_xh + offs_p[None, :] * stride_xp,
                mask=mask_q[:, None] & (offs_p[None, :] < P), other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + b * stride_bb + offs_q[:, None] * stride_bl + g * stride_bg + offs_n[None, :] * stride_bn,
                 mask=mask_q[:, None] & (offs_n[None, :] < N), other=0.0).to(tl.float32)
    st = tl.dot(tl.trans(x * w[:, None]), Bv, input_precision=PREC)  # (BLOCK_P, BLOCK_N)
    base = (pid_bh * n_chunks + c) * P * N
    tl.store(states_ptr + base + offs_p[:, None] * N + offs_n[None, :], st,
             mask=(offs_p[:, None] < P) & (offs_n[None, :] < N))
    tl.store(decay_ptr + pid_bh * n_chunks + c, tl.exp2(a_end * LOG2E) * keep_carry)


@triton.jit
def _state_pass_kernel(states_ptr, decay_ptr, init_ptr, final_ptr, P, N, n_chunks,
                       HAS_INIT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """In place: states[c] (the chunk's own end state) becomes the state entering chunk c."""
    pid_bh, pb = tl.program_id(0), tl.program_id(1)
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask = (offs_p[:, None] < P) & (offs_n[None, :] < N)
    pn = offs_p[:, None] * N + offs_n[None, :]
    if HAS_INIT:
        S = tl.load(init_ptr + pid_bh * P * N + pn, mask=mask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for c in range(n_chunks):
        ptr = states_ptr + (pid_bh * n_chunks + c) * P * N + pn
        own = tl.load(ptr, mask=mask, other=0.0)
        tl.store(ptr, S, mask=mask)
        S = tl.load(decay_ptr + pid_bh * n_chunks + c) * S + own
    tl.store(final_ptr + pid_bh * P * N + pn, S, mask=mask)


@triton.jit
def _chunk_out_kernel(
    x_ptr, dt_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, seq_ptr, states_ptr, y_ptr,
    L, H, P, N, heads_per_group, n_chunks, dt_min, dt_max,
    stride_xb, stride_xl, stride_xh, stride_xp, stride_db, stride_dl, stride_dh,
    stride_bb, stride_bl, stride_bg, stride_bn, stride_cb, stride_cl, stride_cg, stride_cn,
    stride_zb, stride_zl, stride_zh, stride_zp, stride_sb, stride_sl,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, HAS_SEQ: tl.constexpr,
    HAS_D: tl.constexpr, D_HDIM: tl.constexpr, HAS_Z: tl.constexpr,
    Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    pid_bh, c = tl.program_id(0), tl.program_id(1)
    b, hh = pid_bh // H, pid_bh % H
    g = hh // heads_per_group
    r = tl.arange(0, Q)
    offs_q = c * Q + r
    mask_q = offs_q < L
    offs_p, offs_n = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
    mask_p, mask_n = offs_p < P, offs_n < N
    dt, acum = _dt_and_decay(dt_ptr, bias_ptr, A_ptr, b, hh, offs_q, mask_q, stride_db, stride_dl, stride_dh,
                             dt_min, dt_max, HAS_BIAS, SOFTPLUS, HAS_LIMIT)
    Bv = tl.load(B_ptr + b * stride_bb + offs_q[:, None] * stride_bl + g * stride_bg + offs_n[None, :] * stride_bn,
                 mask=mask_q[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * stride_cb + offs_q[:, None] * stride_cl + g * stride_cg + offs_n[None, :] * stride_cn,
                 mask=mask_q[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    xp = x_ptr + b * stride_xb + offs_q[:, None] * stride_xl + hh * stride_xh + offs_p[None, :] * stride_xp
    x = tl.load(xp, mask=mask_q[:, None] & mask_p[None, :], other=0.0).to(tl.float32)
    valid = r[:, None] >= r[None, :]
    carry = tl.exp2(acum * LOG2E)
    if HAS_SEQ:
        s = tl.load(seq_ptr + b * stride_sb + offs_q * stride_sl, mask=mask_q, other=-1)
        valid = valid & (s[:, None] == s[None, :])
        s_prev = tl.load(seq_ptr + b * stride_sb + tl.maximum(c * Q - 1, 0) * stride_sl)
        carry = tl.where(s == s_prev, carry, 0.0)
    seg = tl.where(valid, acum[:, None] - acum[None, :], float("-inf"))
    M = tl.dot(Cv, tl.trans(Bv), input_precision=PREC) * tl.exp2(seg * LOG2E) * dt[None, :]
    y = tl.dot(M, x, input_precision=PREC)
    S = tl.load(states_ptr + (pid_bh * n_chunks + c) * P * N + offs_p[:, None] * N + offs_n[None, :],
                mask=mask_p[:, None] & mask_n[None, :], other=0.0)  # (BLOCK_P, BLOCK_N): the entering state
    y += tl.dot(Cv, tl.trans(S), input_precision=PREC) * carry[:, None]
    if HAS_D:
        if D_HDIM:
            Dv = tl.load(D_ptr + hh * P + offs_p, mask=mask_p, other=0.0).to(tl.float32)
            y += x * Dv[None, :]
        else:
            y += x * tl.load(D_ptr + hh).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + b * stride_zb + offs_q[:, None] * stride_zl + hh * stride_zh + offs_p[None, :] * stride_zp,
                    mask=mask_q[:, None] & mask_p[None, :], other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    yp = y_ptr + ((b * L + offs_q[:, None]) * H + hh) * P + offs_p[None, :]
    tl.store(yp, y.to(y_ptr.dtype.element_ty), mask=mask_q[:, None] & mask_p[None, :])


def _limit(dt_limit):
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    return (lo, hi) != (0.0, float("inf")), lo, min(hi, 3.0e38)


def ssd_forward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size: int, dt_softplus: bool,
                dt_min: float, dt_max: float):
    """Launch the three forward kernels: (y (b, L, h, p) in x's dtype, final state (b, h, p, N) fp32).
    chunk_size: a power of two >= 16 (the in-chunk GEMMs' tile)."""
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    Q = chunk_size
    nc = cdiv(L, Q)
    BP, BN = max(16, next_power_of_2(p)), max(16, next_power_of_2(n))
    states = torch.empty(b * h, nc, p, n, device=x.device, dtype=torch.float32)
    decay = torch.empty(b * h, nc, device=x.device, dtype=torch.float32)
    final = torch.empty(b, h, p, n, device=x.device, dtype=torch.float32)
    y = torch.empty(b, L, h, p, device=x.device, dtype=x.dtype)
    has_limit, lo, hi = _limit((dt_min, dt_max))
    seq = seq_idx if seq_idx is not None else x.new_empty(0, dtype=torch.int32)
    sstr = (seq.stride(0), seq.stride(1)) if seq_idx is not None else (0, 0)
    warps = 4 if gpu_launch(x) else 1
    common = dict(HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), HAS_LIMIT=has_limit,
                  HAS_SEQ=seq_idx is not None, Q=Q, BLOCK_P=BP, BLOCK_N=BN, PREC=dot_precision(x),
                  num_warps=warps)
    _chunk_state_kernel[(b * h, nc)](
        x, dt, dt_bias, A, B, seq, states, decay, L, h, p, n, h // g, nc, lo, hi,
        *x.stride(), *dt.stride(), *B.stride(), *sstr, **common)
    init = initial_states.float().contiguous() if initial_states is not None else None
    _state_pass_kernel[(b * h, cdiv(p, min(BP, 64)))](
        states, decay, init, final, p, n, nc, HAS_INIT=init is not None, BLOCK_P=min(BP, 64), BLOCK_N=BN,
        num_warps=warps)
    zs = z.stride() if z is not None else (0, 0, 0, 0)
    _chunk_out_kernel[(b * h, nc)](
        x, dt, dt_bias, A, B, C, D, z, seq, states, y, L, h, p, n, h // g, nc, lo, hi,
        *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *zs, *sstr,
        HAS_D=D is not None, D_HDIM=D is not None and D.dim() == 2, HAS_Z=z is not None, **common)
    return y, final


@triton.jit
def _step_kernel(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
                 H, P, N, heads_per_group, dt_min, dt_max,
                 stride_xb, stride_xh, stride_xp, stride_db, stride_dh, stride_bb, stride_bg, stride_bn,
                 stride_cb, stride_cg, stride_cn, stride_zb, stride_zh, stride_zp,
                 HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, HAS_D: tl.constexpr,
                 D_HDIM: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (batch, heads, headdim blocks): state (BLOCK_P, N) read once, updated, written once."""
    b, hh, pb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    g = hh // heads_per_group
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p, mask_n = offs_p < P, offs_n < N
    mask = mask_p[:, None] & mask_n[None, :]
    sp = state_ptr + ((b * H + hh) * P + offs_p[:, None]) * N + offs_n[None, :]
    S = tl.load(sp, mask=mask, other=0.0)
    dt = tl.load(dt_ptr + b * stride_db + hh * stride_dh).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + hh).to(tl.float32)
    if SOFTPLUS:
        dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))
    if HAS_LIMIT:
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    a = tl.exp2(dt * tl.load(A_ptr + hh).to(tl.float32) * LOG2E)
    x = tl.load(x_ptr + b * stride_xb + hh * stride_xh + offs_p * stride_xp, mask=mask_p, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + b * stride_bb + g * stride_bg + offs_n * stride_bn, mask=mask_n, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * stride_cb + g * stride_cg + offs_n * stride_cn, mask=mask_n, other=0.0).to(tl.float32)
    S = a * S + (dt * x)[:, None] * Bv[None, :]
    tl.store(sp, S, mask=mask)
    y = tl.sum(S * Cv[None, :], axis=1)
    if HAS_D:
        if D_HDIM:
            y += x * tl.load(D_ptr + hh * P + offs_p, mask=mask_p, other=0.0).to(tl.float32)
        else:
            y += x * tl.load(D_ptr + hh).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + b * stride_zb + hh * stride_zh + offs_p * stride_zp, mask=mask_p, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(y_ptr + (b * H + hh) * P + offs_p, y.to(y_ptr.dtype.element_ty), mask=mask_p)


def ssd_step_launch(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus: bool, dt_min: float, dt_max: float):
    """One token; state (b, h, p, N) fp32 contiguous, updated in place. Returns y (b, h, p) in x's dtype."""
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    BP = min(64, max(16, next_power_of_2(p)))
    has_limit, lo, hi = _limit((dt_min, dt_max))
    y = torch.empty(b, h, p, device=x.device, dtype=x.dtype)
    zs = z.stride() if z is not None else (0, 0, 0)
    _step_kernel[(b, h, cdiv(p, BP))](
        state, x, dt, A, B, C, D, z, dt_bias, y, h, p, n, h // g, lo, hi,
        *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *zs,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), HAS_LIMIT=has_limit, HAS_D=D is not None,
        D_HDIM=D is not None and D.dim() == 2, HAS_Z=z is not None, BLOCK_P=BP,
        BLOCK_N=max(16, next_power_of_2(n)), num_warps=4 if gpu_launch(x) else 1)
    return y
