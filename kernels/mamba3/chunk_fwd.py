"""Triton forward of the Mamba-3 scan (core/mamba3_scan.py holds the equations and the reference), SISO and
MIMO in one kernel.

One program per (batch, head, block of P head channels) walks the sequence in chunks of T steps, the state
h (BLOCK_P, N) in registers as two halves h0 / h1: the first and second member of each rotation pair (pairwise
layout: dims 2i and 2i+1; halves layout: dims i and i + N/2), so the rotation of B and C by theta is done
on the loaded tiles (cos / sin of the host's cumulative angles) and q . k = q0 . k0 + q1 . k1. Per chunk and
output rank r:
    y_r = sum_r' ((q_r k_r'^T) * W) v_r' + exp(acs) (q_r h^T) + D v_r,  W[t, s] = exp(acs_t - acs_s) *
          (gamma_s if t == s, e_s if t > s, 0 above),  v_r = x * mimo_x_r
    h <- exp(acs_T) h + sum_r' (v_r' * exp(acs_T - acs) e)^T k_r'
with acs the in-chunk cumulative log decay. The host passes the carry h0 + delta_0 u_{-1} as the initial state
and gets the final carry (= the true final state) back; for training it also stores the carry entering every
chunk (chunk_bwd.py reads them). Needs N a power of two >= 32 and T >= 16 (tl.dot's
smallest tile is 16).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rotated(ptr, bias_ptr, cos, sin, offs_t, t_mask, idx0, idx1, stride_t):
    """Load a (T, N) tile of B or C at ptr (rows offs_t), add the per-head bias and rotate each pair by the
    step's angle: returns the pairs' first and second members, (T, N/2) each, fp32."""
    m = t_mask[:, None]
    a0 = tl.load(ptr + offs_t[:, None] * stride_t + idx0[None, :], mask=m, other=0.0).to(tl.float32)
    a1 = tl.load(ptr + offs_t[:, None] * stride_t + idx1[None, :], mask=m, other=0.0).to(tl.float32)
    a0 = a0 + tl.load(bias_ptr + idx0).to(tl.float32)[None, :]
    a1 = a1 + tl.load(bias_ptr + idx1).to(tl.float32)[None, :]
    r0 = a0 * cos - a1 * sin
    r1 = a0 * sin + a1 * cos
    return tl.where(m, r0, 0.0), tl.where(m, r1, 0.0)


@triton.jit
def mamba3_chunk_fwd_kernel(
    x_ptr, B_ptr, C_ptr, theta_ptr, a_ptr, gamma_ptr, e_ptr, Bb_ptr, Cb_ptr, D_ptr, mx_ptr, h0_ptr,
    y_ptr, hT_ptr, states_ptr,
    L, H, P, G, S,
    sx_b, sx_l, sx_h,  # x (b, L, H, P), last stride 1
    sB_b, sB_l, sB_r, sB_g,  # B and C (b, L, R, G, N), same strides, last 1
    sth_b, sth_l, sth_h,  # theta (b, L, H, S)
    sa_b, sa_l,  # a, gamma, e (b, L, H), same strides, last 1
    sy_b, sy_l, sy_r, sy_h,  # y (b, L, R, H, P)
    R: tl.constexpr, N: tl.constexpr, T: tl.constexpr, BLOCK_P: tl.constexpr,
    PAIRWISE: tl.constexpr, HAS_D: tl.constexpr, HAS_MIMO: tl.constexpr, PRECISION: tl.constexpr,
    STORE_STATES: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_p = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    g = h // (H // G)
    N2: tl.constexpr = N // 2
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < P
    offs_i = tl.arange(0, N2)
    if PAIRWISE:
        idx0 = 2 * offs_i
        idx1 = 2 * offs_i + 1
    else:
        idx0 = offs_i
        idx1 = offs_i + N2
    offs_tt = tl.arange(0, T)
    tri = offs_tt[:, None] >= offs_tt[None, :]
    diag = offs_tt[:, None] == offs_tt[None, :]

    # the carry (BLOCK_P, N/2) x 2; h0 / hT are (b, H, P, N) contiguous
    hbase = (b * H + h) * P * N
    hm = p_mask[:, None]
    st0 = tl.load(h0_ptr + hbase + offs_p[:, None] * N + idx0[None, :], mask=hm, other=0.0)
    st1 = tl.load(h0_ptr + hbase + offs_p[:, None] * N + idx1[None, :], mask=hm, other=0.0)
    if HAS_D:
        Dh = tl.load(D_ptr + h).to(tl.float32)

    NC = tl.cdiv(L, T)
    for c0 in range(0, L, T):
        if STORE_STATES:  # the carry entering each chunk, (b, H, NC, P, N), for the backward
            sb = ((b * H + h) * NC + c0 // T) * P * N
            tl.store(states_ptr + sb + offs_p[:, None] * N + idx0[None, :], st0, mask=hm)
            tl.store(states_ptr + sb + offs_p[:, None] * N + idx1[None, :], st1, mask=hm)
        offs_t = c0 + offs_tt
        t_mask = offs_t < L
        a = tl.load(a_ptr + b * sa_b + offs_t * sa_l + h, mask=t_mask, other=0.0)
        gam = tl.load(gamma_ptr + b * sa_b + offs_t * sa_l + h, mask=t_mask, other=0.0)
        ee = tl.load(e_ptr + b * sa_b + offs_t * sa_l + h, mask=t_mask, other=0.0)
        acs = tl.cumsum(a, axis=0)  # (T,)
        acs_last = tl.sum(a, axis=0)
        W = tl.exp(tl.where(tri, acs[:, None] - acs[None, :], float("-inf")))
        W = W * tl.where(diag, gam[None, :], ee[None, :])  # (T, T)
        # angles of the chunk's steps: pairs beyond S get 0 (cos 1, sin 0)
        th = tl.load(theta_ptr + b * sth_b + offs_t[:, None] * sth_l + h * sth_h + offs_i[None, :],
                     mask=t_mask[:, None] & (offs_i[None, :] < S), other=0.0)
        cos = tl.cos(th)
        sin = tl.sin(th)
        xv = tl.load(x_ptr + b * sx_b + offs_t[:, None] * sx_l + h * sx_h + offs_p[None, :],
                     mask=t_mask[:, None] & p_mask[None, :], other=0.0).to(tl.float32)  # (T, BLOCK_P)
        decay_in = tl.exp(acs)  # (T,)
        to_end = tl.exp(acs_last - acs) * ee  # (T,)
        new0 = tl.zeros((BLOCK_P, N2), dtype=tl.float32)
        new1 = tl.zeros((BLOCK_P, N2), dtype=tl.float32)
        for r in tl.static_range(R):
            cb = C_ptr + b * sB_b + r * sB_r + g * sB_g
            q0, q1 = _rotated(cb, Cb_ptr + (h * R + r) * N, cos, sin, offs_t, t_mask, idx0, idx1, sB_l)
            if HAS_MIMO:
                v_r = xv * tl.load(mx_ptr + (h * R + r) * P + offs_p, mask=p_mask, other=0.0)[None, :]
            else:
                v_r = xv
            # the carry's share: exp(acs_t) q_t . h
            acc = tl.dot(q0, tl.trans(st0), input_precision=PRECISION)
            acc = tl.dot(q1, tl.trans(st1), acc, input_precision=PRECISION)
            acc = acc * decay_in[:, None]
            for r2 in tl.static_range(R):
                kb = B_ptr + b * sB_b + r2 * sB_r + g * sB_g
                k0, k1 = _rotated(kb, Bb_ptr + (h * R + r2) * N, cos, sin, offs_t, t_mask, idx0, idx1, sB_l)
                if HAS_MIMO:
                    v2 = xv * tl.load(mx_ptr + (h * R + r2) * P + offs_p, mask=p_mask, other=0.0)[None, :]
                else:
                    v2 = xv
                sc = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)
                sc = tl.dot(q1, tl.trans(k1), sc, input_precision=PRECISION)
                acc = tl.dot(sc * W, v2, acc, input_precision=PRECISION)
                if r == 0:  # the state update, once per input rank
                    vs = v2 * to_end[:, None]  # (T, BLOCK_P)
                    new0 = tl.dot(tl.trans(vs), k0, new0, input_precision=PRECISION)
                    new1 = tl.dot(tl.trans(vs), k1, new1, input_precision=PRECISION)
            if HAS_D:
                acc = acc + Dh * v_r
            tl.store(y_ptr + b * sy_b + offs_t[:, None] * sy_l + r * sy_r + h * sy_h + offs_p[None, :],
                     acc.to(y_ptr.dtype.element_ty), mask=t_mask[:, None] & p_mask[None, :])
        dec = tl.exp(acs_last)
        st0 = st0 * dec + new0
        st1 = st1 * dec + new1

    tl.store(hT_ptr + hbase + offs_p[:, None] * N + idx0[None, :], st0, mask=hm)
    tl.store(hT_ptr + hbase + offs_p[:, None] * N + idx1[None, :], st1, mask=hm)
