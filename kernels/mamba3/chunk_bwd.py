"""Triton backward of the Mamba-3 scan in rotated space (the part whose cost grows with L * T); the rotation, the
biases, the angle sums, the MIMO value weights and the trapezoid weights' own inputs are differentiated on the
host by autograd (kernels/mamba3/ops.py).

Forward per chunk (chunk_fwd.py), q = q~, k = k~ already rotated, v_r = x * mimo_x_r, acs the in-chunk cumulative
log decay, W[t, s] = exp(acs_t - acs_s) (gamma_s if t == s, e_s if t > s), to_end = exp(acs_T - acs) e:
    Y_r = sum_r' (Q_r K_r'^T o W) V_r' + exp(acs) o (Q_r Hin^T) + D V_r
    Hout = exp(acs_T) Hin + sum_r' (V_r' o to_end)^T K_r'
The backward walks the chunks in reverse with dH = dL/dHout, one program per (batch, head) holding all P channels
(dQ, dK and the scalar gradients sum over them), reading the chunk's Hin that the forward stored:
    G = (dY_r V_r'^T) o W;  dQ_r = sum_r' G K_r' + exp(acs) o (dY_r Hin);  dK_r' = sum_r G^T Q_r + (V_r' o to_end) dH
    dV_r' = sum_r (Q_r K_r'^T o W)^T dY_r + to_end o (K_r' dH^T) + D dY_r'
    dHin = exp(acs_T) dH + sum_r (exp(acs) o dY_r)^T Q_r
    dW = sum (Q_r K_r'^T) o (dY_r V_r'^T) -> d gamma (diagonal), d e (below it, and through to_end), d acs -> d a
    (a reverse cumulative sum).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile(ptr, offs_t, t_mask, stride_t, cols, col_mask):
    return tl.load(ptr + offs_t[:, None] * stride_t + cols[None, :], mask=t_mask[:, None] & col_mask[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def mamba3_chunk_bwd_kernel(
    dy_ptr, dhT_ptr, q_ptr, k_ptr, v_ptr, a_ptr, gamma_ptr, e_ptr, D_ptr, states_ptr,
    dq_ptr, dk_ptr, dv_ptr, da_ptr, dgamma_ptr, de_ptr, dD_ptr, dh0_ptr,
    L, H, P, NC,
    # y-like (b, L, R, H, P): dy, v, dv; qk-like (b, L, R, H, N): q, k, dq, dk; scalars (b, L, H); all contiguous
    R: tl.constexpr, N: tl.constexpr, T: tl.constexpr, BLOCK_P: tl.constexpr,
    HAS_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    N2: tl.constexpr = N // 2
    offs_p = tl.arange(0, BLOCK_P)
    pm = offs_p < P
    offs_n0 = tl.arange(0, N2)
    offs_n1 = N2 + offs_n0
    nm = offs_n0 < N2
    offs_tt = tl.arange(0, T)
    tri = offs_tt[:, None] >= offs_tt[None, :]
    diag = offs_tt[:, None] == offs_tt[None, :]
    below = offs_tt[:, None] > offs_tt[None, :]
    ys_l = R * H * P  # row strides
    qs_l = R * H * N
    hbase = pid * P * N
    m2 = pm[:, None]
    dH0 = tl.load(dhT_ptr + hbase + offs_p[:, None] * N + offs_n0[None, :], mask=m2, other=0.0)
    dH1 = tl.load(dhT_ptr + hbase + offs_p[:, None] * N + offs_n1[None, :], mask=m2, other=0.0)
    if HAS_D:
        Dh = tl.load(D_ptr + h).to(tl.float32)
    dD = tl.zeros((BLOCK_P,), dtype=tl.float32)

    for ci in range(NC):
        c = NC - 1 - ci
        offs_t = c * T + offs_tt
        t_mask = offs_t < L
        sbase = (pid * NC + c) * P * N
        Hin0 = tl.load(states_ptr + sbase + offs_p[:, None] * N + offs_n0[None, :], mask=m2, other=0.0)
        Hin1 = tl.load(states_ptr + sbase + offs_p[:, None] * N + offs_n1[None, :], mask=m2, other=0.0)
        srow = b * L * H + offs_t * H + h
        a = tl.load(a_ptr + srow, mask=t_mask, other=0.0)
        gam = tl.load(gamma_ptr + srow, mask=t_mask, other=0.0)
        ee = tl.load(e_ptr + srow, mask=t_mask, other=0.0)
        acs = tl.cumsum(a, axis=0)
        acs_last = tl.sum(a, axis=0)
        decay = tl.exp(tl.where(tri, acs[:, None] - acs[None, :], float("-inf")))
        W = decay * tl.where(diag, gam[None, :], ee[None, :])
        enter = tl.exp(acs)
        to_end = tl.exp(acs_last - acs) * ee
        dec = tl.exp(acs_last)

        dexpT = tl.sum(tl.sum(Hin0 * dH0, axis=1), axis=0) + tl.sum(tl.sum(Hin1 * dH1, axis=1), axis=0)
        dHin0 = dH0 * dec
        dHin1 = dH1 * dec
        d_enter = tl.zeros((T,), dtype=tl.float32)
        dto_end = tl.zeros((T,), dtype=tl.float32)
        dW = tl.zeros((T, T), dtype=tl.float32)

        # queries: dQ_r, the carry's gradient, dW, dD
        for r in tl.static_range(R):
            qrow = q_ptr + b * L * qs_l + r * H * N + h * N
            q0 = _tile(qrow, offs_t, t_mask, qs_l, offs_n0, nm)
            q1 = _tile(qrow, offs_t, t_mask, qs_l, offs_n1, nm)
            yrow = b * L * ys_l + r * H * P + h * P
            dy = _tile(dy_ptr + yrow, offs_t, t_mask, ys_l, offs_p, pm)  # (T, BLOCK_P)
            qh = tl.dot(q0, tl.trans(Hin0), input_precision=PRECISION)
            qh = tl.dot(q1, tl.trans(Hin1), qh, input_precision=PRECISION)  # (T, BLOCK_P)
            d_enter += tl.sum(dy * qh, axis=1)
            dye = dy * enter[:, None]
            dHin0 = tl.dot(tl.trans(dye), q0, dHin0, input_precision=PRECISION)
            dHin1 = tl.dot(tl.trans(dye), q1, dHin1, input_precision=PRECISION)
            dq0 = tl.dot(dye, Hin0, input_precision=PRECISION)
            dq1 = tl.dot(dye, Hin1, input_precision=PRECISION)
            for r2 in tl.static_range(R):
                krow = k_ptr + b * L * qs_l + r2 * H * N + h * N
                k0 = _tile(krow, offs_t, t_mask, qs_l, offs_n0, nm)
                k1 = _tile(krow, offs_t, t_mask, qs_l, offs_n1, nm)
                v2 = _tile(v_ptr + b * L * ys_l + r2 * H * P + h * P, offs_t, t_mask, ys_l, offs_p, pm)
                sc = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)
                sc = tl.dot(q1, tl.trans(k1), sc, input_precision=PRECISION)
                dyv = tl.dot(dy, tl.trans(v2), input_precision=PRECISION)  # (T, T)
                dW += sc * dyv
                g = dyv * W
                dq0 = tl.dot(g, k0, dq0, input_precision=PRECISION)
                dq1 = tl.dot(g, k1, dq1, input_precision=PRECISION)
            if HAS_D:
                vr = _tile(v_ptr + yrow, offs_t, t_mask, ys_l, offs_p, pm)
                dD += tl.sum(dy * vr, axis=0)
            tm = t_mask[:, None]
            qbase = dq_ptr + b * L * qs_l + r * H * N + h * N + offs_t[:, None] * qs_l
            tl.store(qbase + offs_n0[None, :], dq0, mask=tm)
            tl.store(qbase + offs_n1[None, :], dq1, mask=tm)

        # keys and values
        for r2 in tl.static_range(R):
            krow = k_ptr + b * L * qs_l + r2 * H * N + h * N
            k0 = _tile(krow, offs_t, t_mask, qs_l, offs_n0, nm)
            k1 = _tile(krow, offs_t, t_mask, qs_l, offs_n1, nm)
            vrow = b * L * ys_l + r2 * H * P + h * P
            v2 = _tile(v_ptr + vrow, offs_t, t_mask, ys_l, offs_p, pm)
            kdh = tl.dot(k0, tl.trans(dH0), input_precision=PRECISION)
            kdh = tl.dot(k1, tl.trans(dH1), kdh, input_precision=PRECISION)  # (T, BLOCK_P)
            dto_end += tl.sum(v2 * kdh, axis=1)
            dv = kdh * to_end[:, None]
            ve = v2 * to_end[:, None]
            dk0 = tl.dot(ve, dH0, input_precision=PRECISION)
            dk1 = tl.dot(ve, dH1, input_precision=PRECISION)
            for r in tl.static_range(R):
                qrow = q_ptr + b * L * qs_l + r * H * N + h * N
                q0 = _tile(qrow, offs_t, t_mask, qs_l, offs_n0, nm)
                q1 = _tile(qrow, offs_t, t_mask, qs_l, offs_n1, nm)
                dy = _tile(dy_ptr + b * L * ys_l + r * H * P + h * P, offs_t, t_mask, ys_l, offs_p, pm)
                g = tl.dot(dy, tl.trans(v2), input_precision=PRECISION) * W  # (T, T)
                dk0 = tl.dot(tl.trans(g), q0, dk0, input_precision=PRECISION)
                dk1 = tl.dot(tl.trans(g), q1, dk1, input_precision=PRECISION)
                sc = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)
                sc = tl.dot(q1, tl.trans(k1), sc, input_precision=PRECISION)
                dv = tl.dot(tl.trans(sc * W), dy, dv, input_precision=PRECISION)
            if HAS_D:
                dv += Dh * _tile(dy_ptr + vrow, offs_t, t_mask, ys_l, offs_p, pm)
            tm = t_mask[:, None]
            kbase = dk_ptr + b * L * qs_l + r2 * H * N + h * N + offs_t[:, None] * qs_l
            tl.store(kbase + offs_n0[None, :], dk0, mask=tm)
            tl.store(kbase + offs_n1[None, :], dk1, mask=tm)
            tl.store(dv_ptr + vrow + offs_t[:, None] * ys_l + offs_p[None, :], dv, mask=tm & pm[None, :])

        # the scalar chain: W -> gamma, e, acs; to_end -> e, acs; enter, dec -> acs; acs -> a
        dWW = dW * W
        dcoef = dW * decay
        dgam = tl.sum(tl.where(diag, dcoef, 0.0), axis=0)
        de = tl.sum(tl.where(below, dcoef, 0.0), axis=0) + dto_end * tl.exp(acs_last - acs)
        dacs = tl.sum(dWW, axis=1) - tl.sum(dWW, axis=0) + d_enter * enter - dto_end * to_end
        dlast = tl.sum(dto_end * to_end, axis=0) + dexpT * dec
        dacs += tl.where(offs_tt == T - 1, dlast, 0.0)
        da = tl.cumsum(dacs, axis=0, reverse=True)
        tl.store(da_ptr + srow, da, mask=t_mask)
        tl.store(dgamma_ptr + srow, dgam, mask=t_mask)
        tl.store(de_ptr + srow, de, mask=t_mask)
        dH0 = dHin0
        dH1 = dHin1

    tl.store(dh0_ptr + hbase + offs_p[:, None] * N + offs_n0[None, :], dH0, mask=m2)
    tl.store(dh0_ptr + hbase + offs_p[:, None] * N + offs_n1[None, :], dH1, mask=m2)
    if HAS_D:
        tl.store(dD_ptr + pid, tl.sum(dD, axis=0))
