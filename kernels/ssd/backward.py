"""Triton backward of the chunked SSD (Mamba-2), recomputing from the inputs (nothing but them is saved).

Notation per (batch, head) and chunk, tokens i, j of the chunk: dt the processed dt, a the in-chunk cumulative
dt * A, a_end its last entry, Lij = exp(a_i - a_j) on causal same-sequence pairs, ce_i = exp(a_i) when token i
continues the carried sequence (else 0), w_j = exp(a_end - a_j) dt_j when j is in the chunk's last sequence,
S the state entering the chunk, G the gradient of the state leaving it, dy the gradient of y before the gate.

    y_i   = sum_j (C_i . B_j) Lij dt_j x_j + ce_i S C_i (+ D x_i, handled on the host)
    S_out = decay S + sum_j w_j x_j B_j^T,        decay = exp(a_end) (0 if a sequence starts in the chunk)

Launches: the forward's chunk-state and state-passing kernels (the entering states S); ``_dstate_kernel`` (each
chunk's direct term sum_i ce_i dy_i C_i^T); ``_dstate_pass_kernel`` (the reverse recurrence
G_c = decay_c G_{c+1} + direct_c, the gradient of each decay and of the initial state); ``_chunk_bwd_kernel``
(dx, per-head dB and dC, d(dt) including the path through the cumulative decay, per-chunk dA). The host sums
dB / dC over the heads of a group, applies softplus' and the dt limits, and reduces dA, d(dt_bias), dD.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from mambazoo.kernels._host import cdiv, gpu_launch, next_power_of_2
from mambazoo.kernels.ssd.chunked import (
    LOG2E,
    _chunk_out_kernel,
    _chunk_state_kernel,
    _dt_and_decay,
    _limit,
    _state_pass_kernel,
    dot_precision,
)


@triton.jit
def _dstate_kernel(dy_ptr, dt_ptr, bias_ptr, A_ptr, C_ptr, seq_ptr, out_ptr,
                   L, H, P, N, heads_per_group, n_chunks, dt_min, dt_max,
                   stride_db, stride_dl, stride_dh, stride_cb, stride_cl, stride_cg, stride_cn, stride_sb, stride_sl,
                   HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, HAS_SEQ: tl.constexpr,
                   Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """out[c] = sum_i ce_i dy_i C_i^T (P, N); dy is contiguous (b, L, h, p) fp32."""
    pid_bh, c = tl.program_id(0), tl.program_id(1)
    b, hh = pid_bh // H, pid_bh % H
    g = hh // heads_per_group
    offs_q = c * Q + tl.arange(0, Q)
    mask_q = offs_q < L
    offs_p, offs_n = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
    dt, acum = _dt_and_decay(dt_ptr, bias_ptr, A_ptr, b, hh, offs_q, mask_q, stride_db, stride_dl, stride_dh,
                             dt_min, dt_max, HAS_BIAS, SOFTPLUS, HAS_LIMIT)
    ce = tl.exp2(acum * LOG2E)
    if HAS_SEQ:
        s = tl.load(seq_ptr + b * stride_sb + offs_q * stride_sl, mask=mask_q, other=-1)
        s_prev = tl.load(seq_ptr + b * stride_sb + tl.maximum(c * Q - 1, 0) * stride_sl)
        ce = tl.where(s == s_prev, ce, 0.0)
    dy = tl.load(dy_ptr + ((b * L + offs_q[:, None]) * H + hh) * P + offs_p[None, :],
                 mask=mask_q[:, None] & (offs_p[None, :] < P), other=0.0)
    Cv = tl.load(C_ptr + b * stride_cb + offs_q[:, None] * stride_cl + g * stride_cg + offs_n[None, :] * stride_cn,
                 mask=mask_q[:, None] & (offs_n[None, :] < N), other=0.0).to(tl.float32)
    st = tl.dot(tl.trans(dy * ce[:, None]), Cv, input_precision=PREC)
    tl.store(out_ptr + (pid_bh * n_chunks + c) * P * N + offs_p[:, None] * N + offs_n[None, :], st,
             mask=(offs_p[:, None] < P) & (offs_n[None, :] < N))


@triton.jit
def _dstate_pass_kernel(g_ptr, states_ptr, decay_ptr, dfinal_ptr, dinit_ptr, ddecay_ptr, P, N, n_chunks, n_pblocks,
                        HAS_DFINAL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """In place: g[c] (the direct term of chunk c) becomes G_{c+1}, the gradient of the state leaving chunk c.
    ddecay[bh, pblock, c] = sum(G_{c+1} * S_c) over this program's rows; dinit = G_0."""
    pid_bh, pb = tl.program_id(0), tl.program_id(1)
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask = (offs_p[:, None] < P) & (offs_n[None, :] < N)
    pn = offs_p[:, None] * N + offs_n[None, :]
    if HAS_DFINAL:
        G = tl.load(dfinal_ptr + pid_bh * P * N + pn, mask=mask, other=0.0).to(tl.float32)
    else:
        G = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k in range(n_chunks):
        c = n_chunks - 1 - k
        ptr = g_ptr + (pid_bh * n_chunks + c) * P * N + pn
        direct = tl.load(ptr, mask=mask, other=0.0)
        tl.store(ptr, G, mask=mask)
        S = tl.load(states_ptr + (pid_bh * n_chunks + c) * P * N + pn, mask=mask, other=0.0)
        tl.store(ddecay_ptr + (pid_bh * n_pblocks + pb) * n_chunks + c, tl.sum(tl.sum(G * S, axis=1), axis=0))
        G = tl.load(decay_ptr + pid_bh * n_chunks + c) * G + direct
    tl.store(dinit_ptr + pid_bh * P * N + pn, G, mask=mask)


@triton.jit
def _state_columns(B_ptr, C_ptr, S_ptr, G_ptr, b, g, offs_q, mask_q, offs_p, mask_p, offs_n, N,
                   stride_bb, stride_bl, stride_bg, stride_bn, stride_cb, stride_cl, stride_cg, stride_cn):
    """The chunk's B and C (Q, len(offs_n)) and its entering state S and state gradient G (P, len(offs_n)) at the
    state columns offs_n, fp32, zero where masked (S_ptr / G_ptr point at the chunk's (P, N) state)."""
    mqn = mask_q[:, None] & (offs_n < N)[None, :]
    mpn = mask_p[:, None] & (offs_n < N)[None, :]
    Bv = tl.load(B_ptr + b * stride_bb + offs_q[:, None] * stride_bl + g * stride_bg + offs_n[None, :] * stride_bn,
                 mask=mqn, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * stride_cb + offs_q[:, None] * stride_cl + g * stride_cg + offs_n[None, :] * stride_cn,
                 mask=mqn, other=0.0).to(tl.float32)
    pn = offs_p[:, None] * N + offs_n[None, :]
    return Bv, Cv, tl.load(S_ptr + pn, mask=mpn, other=0.0), tl.load(G_ptr + pn, mask=mpn, other=0.0)


@triton.jit
def _chunk_bwd_kernel(
    x_ptr, dt_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, seq_ptr, dy_ptr, states_ptr, gnext_ptr, decay_ptr, ddecay_ptr,
    dx_ptr, dB_ptr, dC_ptr, ddt_ptr, dA_ptr,
    L, H, P, N, heads_per_group, n_chunks, dt_min, dt_max,
    stride_xb, stride_xl, stride_xh, stride_xp, stride_db, stride_dl, stride_dh,
    stride_bb, stride_bl, stride_bg, stride_bn, stride_cb, stride_cl, stride_cg, stride_cn, stride_sb, stride_sl,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, HAS_SEQ: tl.constexpr,
    Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, BLOCK_NB: tl.constexpr,
):
    """Grid (batch * heads, chunks). Writes dx (b, L, h, p) fp32, dB / dC per head (b, L, h, N) fp32, d(dt) with
    respect to the processed dt (b, L, h) fp32 and sum_k dt_k d(dt_k A) per chunk (b * h, chunks)."""
    pid_bh, c = tl.program_id(0), tl.program_id(1)
    b, hh = pid_bh // H, pid_bh % H
    g = hh // heads_per_group
    r = tl.arange(0, Q)
    offs_q = c * Q + r
    mask_q = offs_q < L
    offs_p = tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    mqp = mask_q[:, None] & mask_p[None, :]
    dt, acum = _dt_and_decay(dt_ptr, bias_ptr, A_ptr, b, hh, offs_q, mask_q, stride_db, stride_dl, stride_dh,
                             dt_min, dt_max, HAS_BIAS, SOFTPLUS, HAS_LIMIT)
    a_end = tl.sum(tl.where(r == Q - 1, acum, 0.0), axis=0)
    valid = r[:, None] >= r[None, :]
    ce = tl.exp2(acum * LOG2E)
    wd = tl.exp2((a_end - acum) * LOG2E)  # w_j / dt_j
    if HAS_SEQ:
        s = tl.load(seq_ptr + b * stride_sb + offs_q * stride_sl, mask=mask_q, other=-1)
        valid = valid & (s[:, None] == s[None, :])
        s_prev = tl.load(seq_ptr + b * stride_sb + tl.maximum(c * Q - 1, 0) * stride_sl)
        ce = tl.where(s == s_prev, ce, 0.0)
        s_last = tl.load(seq_ptr + b * stride_sb + (tl.minimum(c * Q + Q, L) - 1) * stride_sl)
        wd = tl.where(s == s_last, wd, 0.0)
    w = wd * dt
    Lm = tl.exp2(tl.where(valid, acum[:, None] - acum[None, :], float("-inf")) * LOG2E)
    x = tl.load(x_ptr + b * stride_xb + offs_q[:, None] * stride_xl + hh * stride_xh + offs_p[None, :] * stride_xp,
                mask=mqp, other=0.0).to(tl.float32)
    row_qp = ((b * L + offs_q[:, None]) * H + hh) * P + offs_p[None, :]
    dy = tl.load(dy_ptr + row_qp, mask=mqp, other=0.0)
    state_base = (pid_bh * n_chunks + c) * P * N
    # B, C, S and G are taken BLOCK_NB state columns at a time, in two passes: whole (Q, N) and (P, N) tiles held
    # side by side, staged as TF32 GEMM operands, overflow an H100's shared memory at N 128 (docs/kernel_notes.md)
    # Pass 1: the GEMMs that reduce over N.
    CBL = tl.zeros((Q, Q), dtype=tl.float32)  # C_i . B_j
    GB = tl.zeros((Q, BLOCK_P), dtype=tl.float32)  # row j = G B_j
    SC = tl.zeros((Q, BLOCK_P), dtype=tl.float32)  # row i = S C_i
    for n0 in tl.range(0, BLOCK_N, BLOCK_NB, num_stages=1):
        offs_n = n0 + tl.arange(0, BLOCK_NB)
        Bv, Cv, S, Gn = _state_columns(B_ptr, C_ptr, states_ptr + state_base, gnext_ptr + state_base, b, g, offs_q,
                                       mask_q, offs_p, mask_p, offs_n, N, stride_bb, stride_bl, stride_bg, stride_bn,
                                       stride_cb, stride_cl, stride_cg, stride_cn)
        CBL += tl.dot(Cv, tl.trans(Bv), input_precision=PREC)
        GB += tl.dot(Bv, tl.trans(Gn), input_precision=PREC)
        SC += tl.dot(Cv, tl.trans(S), input_precision=PREC)
    CBL = CBL * Lm  # (Q_i, Q_j)
    dyx = tl.dot(dy, tl.trans(x), input_precision=PREC)  # (Q_i, Q_j): dy_i . x_j
    # dx_j = dt_j sum_i CBL_ij dy_i + w_j G B_j
    dx = dt[:, None] * tl.dot(tl.trans(CBL), dy, input_precision=PREC) + w[:, None] * GB
    # Pass 2, per block of state columns:
    # dC_i = sum_j Lij dt_j (dy_i . x_j) B_j + ce_i S^T dy_i ; dB_j = sum_i Lij dt_j (dy_i . x_j) C_i + w_j G^T x_j
    K = Lm * dt[None, :] * dyx
    for n0 in tl.range(0, BLOCK_N, BLOCK_NB, num_stages=1):
        offs_n = n0 + tl.arange(0, BLOCK_NB)
        Bv, Cv, S, Gn = _state_columns(B_ptr, C_ptr, states_ptr + state_base, gnext_ptr + state_base, b, g, offs_q,
                                       mask_q, offs_p, mask_p, offs_n, N, stride_bb, stride_bl, stride_bg, stride_bn,
                                       stride_cb, stride_cl, stride_cg, stride_cn)
        dC = tl.dot(K, Bv, input_precision=PREC) + ce[:, None] * tl.dot(dy, S, input_precision=PREC)
        dB = tl.dot(tl.trans(K), Cv, input_precision=PREC) + w[:, None] * tl.dot(x, Gn, input_precision=PREC)
        row_qn = ((b * L + offs_q[:, None]) * H + hh) * N + offs_n[None, :]
        mqn = mask_q[:, None] & (offs_n < N)[None, :]
        tl.store(dB_ptr + row_qn, dB, mask=mqn)
        tl.store(dC_ptr + row_qn, dC, mask=mqn)
    # the processed dt, directly: sum_i CBL_ij (dy_i . x_j) + (w_j / dt_j) x_j . G B_j
    xGB = tl.sum(x * GB, axis=1)
    ddt = tl.sum(CBL * dyx, axis=0) + wd * xGB
    # the cumulative log decay a: pairs (+ for i, - for j), the carry, the chunk's own end state, a_end
    Pm = CBL * dyx * dt[None, :]
    T = ce * tl.sum(dy * SC, axis=1)
    R = w * xGB
    dacum = tl.sum(Pm, axis=1) - tl.sum(Pm, axis=0) + T - R
    d_end = tl.sum(R, axis=0)
    for pb in range(0, tl.cdiv(P, 64)):  # the decay's gradient, summed over the state-passing row blocks
        d_end += tl.load(ddecay_ptr + (pid_bh * tl.cdiv(P, 64) + pb) * n_chunks + c) * \
            tl.load(decay_ptr + pid_bh * n_chunks + c)
    dacum += tl.where(r == Q - 1, d_end, 0.0)
    # a = cumsum(dt A): d(dt_k A) = sum_{i >= k} dacum_i
    dda = tl.sum(dacum, axis=0) - tl.cumsum(dacum, axis=0) + dacum
    A = tl.load(A_ptr + hh).to(tl.float32)
    ddt += dda * A
    tl.store(dA_ptr + pid_bh * n_chunks + c, tl.sum(dda * dt, axis=0))
    tl.store(dx_ptr + row_qp, dx, mask=mqp)
    tl.store(ddt_ptr + (b * L + offs_q) * H + hh, ddt, mask=mask_q)


def ssd_backward(dout, dfinal, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size: int,
                 dt_softplus: bool, dt_min: float, dt_max: float):
    """[dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_states] (None for absent inputs) of the SSD forward
    (mambazoo.kernels.ssd.chunked.ssd_forward) with output gradient dout (b, L, h, p) and final-state gradient
    dfinal (b, h, p, N) (either may be None)."""
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    Q, nc = chunk_size, cdiv(L, chunk_size)
    BP, BN = max(16, next_power_of_2(p)), max(16, next_power_of_2(n))
    PB = min(BP, 64)
    npb = cdiv(p, 64) if BP > 64 else 1
    dev, f32 = x.device, torch.float32
    has_limit, lo, hi = _limit((dt_min, dt_max))
    seq = seq_idx if seq_idx is not None else x.new_empty(0, dtype=torch.int32)
    sstr = (seq.stride(0), seq.stride(1)) if seq_idx is not None else (0, 0)
    warps = 4 if gpu_launch(x) else 1
    common = dict(HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), HAS_LIMIT=has_limit,
                  HAS_SEQ=seq_idx is not None, Q=Q, BLOCK_P=BP, BLOCK_N=BN, PREC=dot_precision(x),
                  num_warps=warps)
    # 1. the states entering each chunk, as in the forward
    states = torch.empty(b * h, nc, p, n, device=dev, dtype=f32)
    decay = torch.empty(b * h, nc, device=dev, dtype=f32)
    final = torch.empty(b, h, p, n, device=dev, dtype=f32)
    _chunk_state_kernel[(b * h, nc)](x, dt, dt_bias, A, B, seq, states, decay, L, h, p, n, h // g, nc, lo, hi,
                                     *x.stride(), *dt.stride(), *B.stride(), *sstr, **common)
    init = initial_states.float().contiguous() if initial_states is not None else None
    _state_pass_kernel[(b * h, cdiv(p, PB))](states, decay, init, final, p, n, nc, HAS_INIT=init is not None,
                                             BLOCK_P=PB, BLOCK_N=BN, num_warps=warps)
    # 2. the gate and D on the host: dy is the gradient of y before the gate, without D x
    dout = dout if dout is not None else x.new_zeros(x.shape)
    dz = None
    if z is not None:
        y_pre = torch.empty(b, L, h, p, device=dev, dtype=f32)
        _chunk_out_kernel[(b * h, nc)](
            x, dt, dt_bias, A, B, C, D, None, seq, states, y_pre, L, h, p, n, h // g, nc, lo, hi,
            *x.stride(), *dt.stride(), *B.stride(), *C.stride(), 0, 0, 0, 0, *sstr,
            HAS_D=D is not None, D_HDIM=D is not None and D.dim() == 2, HAS_Z=False, **common)
        zf = z.float()
        sig = torch.sigmoid(zf)
        dz = (dout.float() * y_pre * sig * (1 + zf * (1 - sig))).to(z.dtype)
        dy = (dout.float() * zf * sig).contiguous()
    else:
        dy = dout.float().contiguous()
    dD = None
    if D is not None:
        prod = (dy * x.float()).sum((0, 1))  # (h, p)
        dD = (prod if D.dim() == 2 else prod.sum(-1)).to(D.dtype)
    # 3. the reverse recurrence of the state gradients
    gnext = torch.empty(b * h, nc, p, n, device=dev, dtype=f32)
    _dstate_kernel[(b * h, nc)](dy, dt, dt_bias, A, C, seq, gnext, L, h, p, n, h // g, nc, lo, hi,
                                *dt.stride(), *C.stride(), *sstr, **common)
    dinit = torch.empty(b, h, p, n, device=dev, dtype=f32)
    ddecay = torch.empty(b * h, npb, nc, device=dev, dtype=f32)
    dfin = dfinal.float().contiguous() if dfinal is not None else None
    _dstate_pass_kernel[(b * h, npb)](gnext, states, decay, dfin, dinit, ddecay, p, n, nc, npb,
                                      HAS_DFINAL=dfin is not None, BLOCK_P=64 if BP > 64 else BP, BLOCK_N=BN,
                                      num_warps=warps)
    # 4. everything else, chunk by chunk
    dx = torch.empty(b, L, h, p, device=dev, dtype=f32)
    dBh = torch.empty(b, L, h, n, device=dev, dtype=f32)
    dCh = torch.empty(b, L, h, n, device=dev, dtype=f32)
    ddt = torch.empty(b, L, h, device=dev, dtype=f32)
    dA = torch.empty(b * h, nc, device=dev, dtype=f32)
    _chunk_bwd_kernel[(b * h, nc)](
        x, dt, dt_bias, A, B, C, seq, dy, states, gnext, decay, ddecay, dx, dBh, dCh, ddt, dA,
        L, h, p, n, h // g, nc, lo, hi, *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *sstr,
        BLOCK_NB=min(BN, 64), **common)
    if D is not None:
        dx += dy * (D.float()[:, None] if D.dim() == 1 else D.float())
    # 5. through softplus, the limits and the bias; group sums
    raw = dt.float() + (dt_bias.float() if dt_bias is not None else 0.0)
    if dt_softplus:
        proc = F.softplus(raw)
        ddt = ddt * torch.sigmoid(raw)
    else:
        proc = raw
    if has_limit:
        ddt = ddt * ((proc >= lo) & (proc <= hi)).float()
    dbias = ddt.sum((0, 1)).to(dt_bias.dtype) if dt_bias is not None else None
    dB = dBh.view(b, L, g, h // g, n).sum(3).to(B.dtype)
    dC = dCh.view(b, L, g, h // g, n).sum(3).to(C.dtype)
    dA = dA.view(b, h, nc).sum((0, 2)).to(A.dtype)
    return [dx.to(x.dtype), ddt.to(dt.dtype), dA, dB, dC, dD, dz,
            dbias, dinit.to(initial_states.dtype) if initial_states is not None else None]
