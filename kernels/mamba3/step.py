"""Triton decode step of the Mamba-3 recurrence (core.mamba3_scan.mamba3_step_ref is its reference).

One program per (batch, head): it reads the head's state once (the SSM state as the two members of each rotation
pair, (P, N/2) each, the previous rotated keys (R, N) and value (P,), the angle (S,)), advances the angle by
pi * tanh(angles) * dt, rotates the biased B and C of every rank, applies
    h <- exp(adt) h + exp(adt) dt (1 - trap) sum_r v_prev_r k_prev_r^T + dt trap sum_r v_r k_r^T,
    y_r = h q_r + D v_r,  v_r = x * mimo_x_r,
and writes the state back in place.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def mamba3_step_kernel(
    x_ptr, dt_ptr, adt_ptr, trap_ptr, B_ptr, C_ptr, ang_ptr, Bb_ptr, Cb_ptr, D_ptr, mx_ptr,
    angle_ptr, ssm_ptr, k_ptr, v_ptr, y_ptr,
    H, P, G, N, S,
    R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N2: tl.constexpr,
    PAIRWISE: tl.constexpr, HAS_D: tl.constexpr, HAS_MIMO: tl.constexpr,
):
    # contiguous layouts: x, v (b, H, P); dt, adt, trap (b, H); B, C (b, R, G, N); angles, angle (b, H, S);
    # ssm (b, H, P, N); k (b, R, H, N); y (b, R, H, P); biases (H, R, N); mimo_x (H, R, P)
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    g = h // (H // G)
    N2 = N // 2
    offs_p = tl.arange(0, BLOCK_P)
    pm = offs_p < P
    offs_i = tl.arange(0, BLOCK_N2)
    im = offs_i < N2
    if PAIRWISE:
        idx0 = 2 * offs_i
        idx1 = 2 * offs_i + 1
    else:
        idx0 = offs_i
        idx1 = offs_i + N2
    dt = tl.load(dt_ptr + pid).to(tl.float32)
    alpha = tl.exp(tl.load(adt_ptr + pid).to(tl.float32))
    lam = tl.load(trap_ptr + pid).to(tl.float32)
    beta = alpha * dt * (1 - lam)
    gamma = dt * lam

    # the angle: pairs beyond S keep angle 0 (cos 1, sin 0)
    sm = offs_i < S
    ang = tl.load(ang_ptr + pid * S + offs_i, mask=sm, other=0.0).to(tl.float32)
    e2 = tl.exp(2.0 * ang)
    tanh = 1.0 - 2.0 / (e2 + 1.0)
    theta = tl.load(angle_ptr + pid * S + offs_i, mask=sm, other=0.0) + 3.141592653589793 * tanh * dt
    two_pi = 6.283185307179586
    theta = theta - two_pi * tl.floor(theta / two_pi)
    tl.store(angle_ptr + pid * S + offs_i, theta, mask=sm)
    cos = tl.cos(theta)
    sin = tl.sin(theta)

    sbase = pid * P * N
    m2 = pm[:, None] & im[None, :]
    h0 = tl.load(ssm_ptr + sbase + offs_p[:, None] * N + idx0[None, :], mask=m2, other=0.0) * alpha
    h1 = tl.load(ssm_ptr + sbase + offs_p[:, None] * N + idx1[None, :], mask=m2, other=0.0) * alpha
    x = tl.load(x_ptr + pid * P + offs_p, mask=pm, other=0.0).to(tl.float32)
    x_prev = tl.load(v_ptr + pid * P + offs_p, mask=pm, other=0.0).to(tl.float32)
    for r in tl.static_range(R):
        kp = k_ptr + ((b * R + r) * H + h) * N
        kp0 = tl.load(kp + idx0, mask=im, other=0.0).to(tl.float32)
        kp1 = tl.load(kp + idx1, mask=im, other=0.0).to(tl.float32)
        bb = B_ptr + ((b * R + r) * G + g) * N
        bias = Bb_ptr + (h * R + r) * N
        a0 = tl.load(bb + idx0, mask=im, other=0.0).to(tl.float32) + tl.load(bias + idx0, mask=im, other=0.0)
        a1 = tl.load(bb + idx1, mask=im, other=0.0).to(tl.float32) + tl.load(bias + idx1, mask=im, other=0.0)
        k0 = a0 * cos - a1 * sin
        k1 = a0 * sin + a1 * cos
        if HAS_MIMO:
            w = tl.load(mx_ptr + (h * R + r) * P + offs_p, mask=pm, other=0.0)
            v = x * w
            vp = x_prev * w
        else:
            v = x
            vp = x_prev
        h0 += (beta * vp)[:, None] * kp0[None, :] + (gamma * v)[:, None] * k0[None, :]
        h1 += (beta * vp)[:, None] * kp1[None, :] + (gamma * v)[:, None] * k1[None, :]
        tl.store(kp + idx0, k0.to(k_ptr.dtype.element_ty), mask=im)  # the new key state (read above first)
        tl.store(kp + idx1, k1.to(k_ptr.dtype.element_ty), mask=im)
    tl.store(ssm_ptr + sbase + offs_p[:, None] * N + idx0[None, :], h0, mask=m2)
    tl.store(ssm_ptr + sbase + offs_p[:, None] * N + idx1[None, :], h1, mask=m2)
    tl.store(v_ptr + pid * P + offs_p, x.to(v_ptr.dtype.element_ty), mask=pm)
    if HAS_D:
        Dh = tl.load(D_ptr + h).to(tl.float32)
    for r in tl.static_range(R):
        cc = C_ptr + ((b * R + r) * G + g) * N
        bias = Cb_ptr + (h * R + r) * N
        c0 = tl.load(cc + idx0, mask=im, other=0.0).to(tl.float32) + tl.load(bias + idx0, mask=im, other=0.0)
        c1 = tl.load(cc + idx1, mask=im, other=0.0).to(tl.float32) + tl.load(bias + idx1, mask=im, other=0.0)
        q0 = c0 * cos - c1 * sin
        q1 = c0 * sin + c1 * cos
        y = tl.sum(h0 * q0[None, :], axis=1) + tl.sum(h1 * q1[None, :], axis=1)
        if HAS_D:
            if HAS_MIMO:
                y += Dh * x * tl.load(mx_ptr + (h * R + r) * P + offs_p, mask=pm, other=0.0)
            else:
                y += Dh * x
        tl.store(y_ptr + ((b * R + r) * H + h) * P + offs_p, y, mask=pm)
