"""mambazoo.core.ssm: discretization, A initializations, the LTI SSM's three views, HiPPO-LegS."""

import math

import numpy as np
import pytest
import torch
from numpy.polynomial import legendre as npleg

from mambazoo.core.scan import selective_scan_ref
from mambazoo.core.ssm import (
    LTISSM,
    a_log_init,
    discretize_b,
    discretize_bilinear_dense,
    discretize_gbt_dense,
    discretize_zoh,
    discretize_zoh_dense,
    hippo_legs,
    hippo_legs_diag,
    hippo_legs_encode,
    hippo_legs_nplr,
    hippo_legs_reconstruct,
    s4d_lin,
    s4d_real,
    ssm_kernel,
)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def smooth_signal(L, seed=0):
    """Sum of sinusoids plus a random smooth component (a few random low-frequency cosines)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, L, dtype=torch.float64)
    f = torch.sin(2 * math.pi * 3 * t) + 0.5 * torch.cos(2 * math.pi * 7 * t + 1.0)
    for k, (a, p) in enumerate(zip(torch.randn(4, generator=g), torch.rand(4, generator=g)), start=1):
        f = f + 0.3 * a * torch.cos(math.pi * k * t + 2 * math.pi * p)
    return f


# ------------------------------------------------------------------------- LTI SSM views
@pytest.mark.parametrize("init", ["s4d-real", "s4d-lin-real"])
def test_lti_three_views_agree(init):
    m = LTISSM(dim=6, d_state=8, init=init, dt_min=1e-2, dt_max=0.5)
    u = torch.randn(3, 6, 70)
    y_rec = m(u, mode="recurrent")
    y_conv = m(u, mode="conv")
    y_scan = m(u, mode="scan")
    assert y_rec.shape == (3, 6, 70)
    assert rel_err(y_conv, y_rec) < 1e-4
    assert rel_err(y_scan, y_rec) < 1e-4
    # the SSM part is not negligible next to the D skip term
    assert rel_err(y_rec, m.D[:, None] * u) > 1e-2


def test_lti_views_agree_in_gradient():
    m = LTISSM(dim=4, d_state=6, dt_min=1e-2, dt_max=0.5)
    u = torch.randn(2, 4, 40)
    w = torch.randn(2, 4, 40)
    grads = {}
    for mode in ("recurrent", "conv", "scan"):
        m.zero_grad()
        (m(u, mode=mode) * w).sum().backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in m.parameters()])
    assert rel_err(grads["conv"], grads["recurrent"]) < 1e-4
    assert rel_err(grads["scan"], grads["recurrent"]) < 1e-4


def test_lti_kernel_is_impulse_response_in_float64():
    m = LTISSM(dim=3, d_state=5, dt_min=1e-2, dt_max=0.5)
    L = 30
    A, dt = m.A.double(), m.dt.double()
    B, C = m.B.double(), m.C.double()
    # independent: K[d, l] = C_d diag(Abar)^l Bbar_d by repeated multiplication
    expected = torch.zeros(3, L, dtype=torch.float64)
    for d in range(3):
        x = dt[d] * B[d]
        for l in range(L):
            expected[d, l] = (C[d] * x).sum()
            x = torch.exp(dt[d] * A[d]) * x
    assert rel_err(m.kernel(L).double(), expected) < 1e-5


def test_lti_step_loop_equals_forward():
    m = LTISSM(dim=5, d_state=4, dt_min=1e-2, dt_max=0.5)
    u = torch.randn(2, 5, 25)
    state = m.allocate_state(2)
    ys = [m.step(u[:, :, t], state) for t in range(u.shape[-1])]
    y_step = torch.stack(ys, -1)
    assert rel_err(y_step, m(u, mode="conv")) < 1e-4
    # the state was updated in place and equals the scan's final state
    _, last = selective_scan_ref(
        u, m.dt[None, :, None].expand(2, 5, 25), m.A, m.B, m.C, return_last_state=True)
    assert rel_err(state, last) < 1e-5


def test_complex_kernel_matches_complex_recurrence():
    A = s4d_lin(2, 4).to(torch.complex128)
    B = torch.randn(2, 4, dtype=torch.complex128)
    C = torch.randn(2, 4, dtype=torch.complex128)
    dt = torch.tensor([0.1, 0.3], dtype=torch.float64)
    L = 20
    K = ssm_kernel(A, B, C, dt, L)
    h = dt[:, None] * B
    for l in range(L):
        assert torch.allclose(K[:, l], (C * h).sum(-1).real, atol=1e-10)
        h = torch.exp(dt[:, None] * A) * h


# ------------------------------------------------------------------------- discretization
def test_discretize_zoh_and_b_broadcast():
    A = -torch.rand(3, 4) - 0.1
    B = torch.randn(3, 4)
    dt = torch.rand(2, 7, 3)  # (..., dim)
    Abar, Bbar = discretize_zoh(A, dt), discretize_b(B, dt)
    assert Abar.shape == Bbar.shape == (2, 7, 3, 4)
    i, j, d, n = 1, 5, 2, 3
    assert math.isclose(Abar[i, j, d, n].item(), math.exp(dt[i, j, d].item() * A[d, n].item()), rel_tol=1e-5)
    assert math.isclose(Bbar[i, j, d, n].item(), dt[i, j, d].item() * B[d, n].item(), rel_tol=1e-5)


def test_zoh_dense_matches_fine_euler_integration():
    A, B = hippo_legs(4)
    x0 = torch.tensor([0.3, -1.0, 0.5, 2.0], dtype=torch.float64)
    dt, steps = 0.2, 20000
    Abar, Bbar = discretize_zoh_dense(A, B, dt)
    x, h = x0.clone(), dt / steps
    for _ in range(steps):  # x' = A x + B u with u = 1 held over the step
        x = x + h * (A @ x + B)
    assert torch.allclose(Abar @ x0 + Bbar, x, atol=1e-3)
    assert not torch.allclose(Abar @ x0 + Bbar, x0 + dt * (A @ x0 + B), atol=1e-3)  # not one Euler step


def test_gbt_dense_scalar_closed_forms():
    a, b, dt = torch.tensor([[-3.0]], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64), 0.1
    Ab, Bb = discretize_bilinear_dense(a, b, dt)
    assert math.isclose(Ab.item(), (1 - 0.15) / (1 + 0.15), rel_tol=1e-12)
    assert math.isclose(Bb.item(), 0.2 / (1 + 0.15), rel_tol=1e-12)
    Ae, Be = discretize_gbt_dense(a, b, dt, alpha=0.0)
    assert math.isclose(Ae.item(), 0.7, rel_tol=1e-12) and math.isclose(Be.item(), 0.2, rel_tol=1e-12)
    Az, Bz = discretize_zoh_dense(a, b, dt)
    assert math.isclose(Az.item(), math.exp(-0.3), rel_tol=1e-12)
    assert math.isclose(Bz.item(), (math.exp(-0.3) - 1) / -3.0 * 2.0, rel_tol=1e-12)


# ------------------------------------------------------------------------- initializations
def test_s4d_inits_and_a_log():
    assert torch.equal(s4d_real(2, 4), torch.tensor([[-1.0, -2.0, -3.0, -4.0]] * 2))
    A_mamba = -torch.exp(a_log_init(3, 16, "s4d-real"))
    assert torch.allclose(A_mamba, -torch.arange(1, 17, dtype=torch.float32).repeat(3, 1))
    assert torch.allclose(-torch.exp(a_log_init(2, 5, "s4d-lin-real")), torch.full((2, 5), -0.5))
    lin = s4d_lin(1, 3)
    assert torch.allclose(lin.real, torch.full((1, 3), -0.5))
    assert torch.allclose(lin.imag, torch.tensor([[0.0, math.pi, 2 * math.pi]]))


def test_hippo_legs_entries_against_formula():
    N = 6
    A, B = hippo_legs(N)
    for n in range(N):
        assert B[n].item() == pytest.approx(math.sqrt(2 * n + 1))
        for k in range(N):
            if n > k:
                want = -math.sqrt(2 * n + 1) * math.sqrt(2 * k + 1)
            elif n == k:
                want = -(n + 1)
            else:
                want = 0.0
            assert A[n, k].item() == pytest.approx(want, abs=1e-12), (n, k)


def test_hippo_legs_nplr_and_diagonal_approximation():
    N = 8
    A, _ = hippo_legs(N)
    S, P = hippo_legs_nplr(N)
    assert torch.allclose(S - torch.outer(P, P), A)
    K = S + 0.5 * torch.eye(N, dtype=S.dtype)
    assert torch.allclose(K, -K.T)  # S = -1/2 I + skew
    lam = hippo_legs_diag(N)
    assert lam.shape == (N,)
    assert torch.allclose(lam.real, torch.full((N,), -0.5, dtype=torch.float64))
    # the imaginary parts agree with a general eigen-solver on S, and come in conjugate pairs
    ref = torch.linalg.eigvals(S)
    assert torch.allclose(torch.sort(ref.imag).values, lam.imag, atol=1e-8)
    assert torch.allclose(lam.imag, -lam.imag.flip(0), atol=1e-8)
    assert lam.imag.abs().max() > 1.0  # genuinely oscillatory, not all -1/2


# ------------------------------------------------------------------------- HiPPO online approximation
def test_hippo_zoh_encoding_is_the_exact_legendre_projection():
    L, N = 40, 6
    f = smooth_signal(L, seed=1)
    c = hippo_legs_encode(f, N, method="zoh")
    # independent: project the piecewise-constant signal onto sqrt(2n+1) P_n(2s/L - 1) on [0, L]
    y = np.linspace(-1, 1, L + 1)
    want = np.zeros(N)
    for n in range(N):
        Q = npleg.legint(np.eye(N)[n])  # antiderivative of P_n in y
        seg = npleg.legval(y[1:], Q) - npleg.legval(y[:-1], Q)
        want[n] = math.sqrt(2 * n + 1) * 0.5 * float(np.dot(f.numpy(), seg))
    assert np.allclose(c.numpy(), want, atol=1e-9)


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_hippo_reconstruction_error_falls_with_N(method):
    f = smooth_signal(300)
    mse = {N: ((hippo_legs_reconstruct(f, N, method) - f) ** 2).mean().item() for N in (4, 16, 64)}
    assert mse[4] > mse[16] > mse[64]
    assert mse[4] > 1e-2 and mse[64] < 1e-3


def test_hippo_all_states_track_history():
    f = smooth_signal(50)
    states = hippo_legs_encode(f, 4, return_all=True)
    assert states.shape == (50, 4)
    assert torch.allclose(states[:, 0], torch.cumsum(f, 0) / torch.arange(1, 51))  # c_0 = running mean


# ------------------------------------------------------------------------- bad input
def test_bad_input_raises_value_error_naming_shape():
    m = LTISSM(dim=4, d_state=3)
    with pytest.raises(ValueError, match=r"\(batch, dim, L\) with dim = 4"):
        m(torch.randn(2, 5, 10))
    with pytest.raises(ValueError, match=r"\(batch, dim, L\)"):
        m(torch.randn(4, 10))
    with pytest.raises(ValueError, match="mode"):
        m(torch.randn(1, 4, 10), mode="fft")
    with pytest.raises(ValueError, match=r"\(batch, dim, N\) = \(2, 4, 3\)"):
        m.step(torch.randn(2, 4), torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match=r"\(\.\.\., dim\) with dim = 3"):
        discretize_zoh(torch.randn(3, 4), torch.rand(5, 2))
    with pytest.raises(ValueError, match=r"\(dim, N\)"):
        discretize_zoh(torch.randn(3), torch.rand(3))
    with pytest.raises(ValueError, match=r"square \(N, N\)"):
        discretize_zoh_dense(torch.randn(3, 4), torch.randn(3), 0.1)
    with pytest.raises(ValueError, match=r"\(N,\) = \(3,\)"):
        discretize_bilinear_dense(torch.randn(3, 3), torch.randn(4), 0.1)
    with pytest.raises(ValueError, match=r"floating-point"):
        discretize_zoh(torch.ones(3, 4, dtype=torch.int64), torch.rand(3))
    with pytest.raises(ValueError, match=r"\(L,\)"):
        hippo_legs_encode(torch.randn(3, 10), 4)
    with pytest.raises(ValueError, match="s4d-real"):
        a_log_init(2, 4, "legs")


def test_lti_conv_view_runs_under_bf16_autocast_in_full_precision():
    """Under autocast the kernel and the FFT stay fp32 (cuFFT has no bf16 transforms)."""
    from mambazoo.core.ssm import LTISSM

    layer = LTISSM(4, d_state=3)
    u = torch.randn(2, 4, 17)
    ref = layer(u, mode="conv")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(u, mode="conv")
    assert y.dtype == torch.float32
    assert torch.allclose(y, ref, atol=1e-5)
