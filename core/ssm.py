"""State-space building blocks: discretization, A initializations (S4D, HiPPO-LegS), the LTI SSM.

Conventions: the continuous system is x'(t) = A x(t) + B u(t), y = C x + D u, with A stable
(negative real parts). Diagonal A is stored per channel as (dim, N); Mamba keeps it as
``A_log`` with ``A = -exp(A_log)``. Dense A (N, N) appears only for HiPPO.

Initializations (Gu et al. 2022, "On the Parameterization and Initialization of Diagonal SSMs"):

- S4D-Real: A_n = -(n + 1), n = 0..N-1. This is the diagonal of HiPPO-LegS and Mamba's default
  (``A_log = log(arange(1, N + 1))``).
- S4D-Lin:  A_n = -1/2 + i*pi*n (complex). Our selective scan keeps A real, so the real kind
  ``'s4d-lin-real'`` keeps only the real part -1/2 (every state then decays at the same rate;
  the input projections B, C still differ). The complex A is available from ``s4d_lin`` and is
  usable by the convolution view through ``ssm_kernel``.
- HiPPO-LegS (dense, see ``hippo_legs``) and its diagonal approximation S4D-LegS: the eigenvalues
  of the normal part S of the normal-plus-low-rank split A = S - P P^T, P_n = (n + 1/2)^0.5.
  S = -1/2 I + (skew-symmetric), so every eigenvalue is -1/2 + i*omega.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from mambazoo.core.dispatch import selective_scan
from mambazoo.core.scan_ref import _shape

__all__ = [
    "discretize_zoh",
    "discretize_b",
    "discretize_zoh_dense",
    "discretize_gbt_dense",
    "discretize_bilinear_dense",
    "s4d_real",
    "s4d_lin",
    "hippo_legs",
    "hippo_legs_nplr",
    "hippo_legs_diag",
    "a_log_init",
    "A_INIT_KINDS",
    "ssm_kernel",
    "fft_causal_conv",
    "LTISSM",
    "hippo_legs_transitions",
    "hippo_legs_encode",
    "legendre_reconstruct",
    "hippo_legs_reconstruct",
]



def _check_tensor(name: str, t, expected: str, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of shape {expected}, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected shape {expected}, got a {t.dim()}-d tensor {_shape(t)}")
    if not (t.is_floating_point() or t.is_complex()):
        raise ValueError(f"{name}: expected a floating-point tensor of shape {expected}, got {t.dtype}")


# --------------------------------------------------------------------------------------------
# Discretization
# --------------------------------------------------------------------------------------------

def discretize_zoh(A: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """Zero-order hold for a diagonal A: Abar = exp(dt * A).

    A (dim, N), dt (..., dim) -> Abar (..., dim, N).
    """
    _check_tensor("A", A, "(dim, N)", 2)
    _check_tensor("dt", dt, "(..., dim)")
    if dt.dim() == 0 or dt.shape[-1] != A.shape[0]:
        raise ValueError(f"dt: expected (..., dim) with dim = {A.shape[0]}, got {_shape(dt)}")
    return torch.exp(dt[..., None] * A)


def discretize_b(B: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """Mamba's simplified input discretization: Bbar = dt * B (Euler; exact ZOH would be
    (exp(dt A) - 1) / A * B, which agrees to first order in dt).

    B (dim, N), dt (..., dim) -> Bbar (..., dim, N).
    """
    _check_tensor("B", B, "(dim, N)", 2)
    _check_tensor("dt", dt, "(..., dim)")
    if dt.dim() == 0 or dt.shape[-1] != B.shape[0]:
        raise ValueError(f"dt: expected (..., dim) with dim = {B.shape[0]}, got {_shape(dt)}")
    return dt[..., None] * B


def _check_dense(A: torch.Tensor, B: torch.Tensor) -> int:
    _check_tensor("A", A, "(N, N)", 2)
    if A.shape[0] != A.shape[1]:
        raise ValueError(f"A: expected a square (N, N) matrix, got {_shape(A)}")
    N = A.shape[0]
    _check_tensor("B", B, f"(N,) = ({N},)", 1)
    if B.shape[0] != N:
        raise ValueError(f"B: expected (N,) = ({N},), got {_shape(B)}")
    return N


def discretize_zoh_dense(A: torch.Tensor, B: torch.Tensor, dt: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact zero-order hold for a dense A: Abar = exp(dt A), Bbar = int_0^dt exp(s A) ds B.

    Both come from one matrix exponential of the augmented matrix dt * [[A, B], [0, 0]], which
    is exact even when A is singular. A (N, N), B (N,) -> Abar (N, N), Bbar (N,).
    """
    N = _check_dense(A, B)
    M = A.new_zeros(N + 1, N + 1)
    M[:N, :N] = A
    M[:N, N] = B
    E = torch.linalg.matrix_exp(dt * M)
    return E[:N, :N], E[:N, N]


def discretize_gbt_dense(A: torch.Tensor, B: torch.Tensor, dt: float,
                         alpha: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized bilinear transform for a dense A (alpha 0: forward Euler, 1/2: bilinear,
    1: backward Euler): Abar = (I - alpha dt A)^-1 (I + (1 - alpha) dt A), Bbar = (I - alpha dt A)^-1 dt B.

    A (N, N), B (N,) -> Abar (N, N), Bbar (N,).
    """
    N = _check_dense(A, B)
    eye = torch.eye(N, dtype=A.dtype, device=A.device)
    lhs = eye - alpha * dt * A
    Abar = torch.linalg.solve(lhs, eye + (1 - alpha) * dt * A)
    Bbar = torch.linalg.solve(lhs, dt * B[:, None])[:, 0]
    return Abar, Bbar


def discretize_bilinear_dense(A: torch.Tensor, B: torch.Tensor, dt: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear (Tustin) discretization of a dense A: ``discretize_gbt_dense`` with alpha = 1/2."""
    return discretize_gbt_dense(A, B, dt, alpha=0.5)


# --------------------------------------------------------------------------------------------
# A initializations
# --------------------------------------------------------------------------------------------

def s4d_real(dim: int, N: int) -> torch.Tensor:
    """S4D-Real: A_n = -(n + 1) for n = 0..N-1, repeated over channels. -> (dim, N) fp32."""
    return -torch.arange(1, N + 1, dtype=torch.float32).repeat(dim, 1)


def s4d_lin(dim: int, N: int) -> torch.Tensor:
    """S4D-Lin: A_n = -1/2 + i pi n, repeated over channels. -> (dim, N) complex64."""
    n = torch.arange(N, dtype=torch.float32)
    return torch.complex(torch.full_like(n, -0.5), math.pi * n).repeat(dim, 1)


def hippo_legs(N: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """HiPPO-LegS, in the stable sign convention x' = A x + B u:

    A_nk = -(2n+1)^0.5 (2k+1)^0.5 for n > k, -(n+1) for n = k, 0 for n < k;  B_n = (2n+1)^0.5.
    -> A (N, N), B (N,).
    """
    if N < 1:
        raise ValueError(f"N: expected a positive int, got {N}")
    q = torch.sqrt(2 * torch.arange(N, dtype=dtype) + 1)
    A = torch.tril(-q[:, None] * q[None, :], diagonal=-1) - torch.diag(torch.arange(1, N + 1, dtype=dtype))
    return A, q.clone()


def hippo_legs_nplr(N: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Normal-plus-low-rank split of HiPPO-LegS: A = S - P P^T with P_n = (n + 1/2)^0.5.

    S = -1/2 I + K with K skew-symmetric (K_nk = -1/2 (2n+1)^0.5 (2k+1)^0.5 below the diagonal,
    its negative above). -> S (N, N), P (N,).
    """
    A, _ = hippo_legs(N, dtype)
    P = torch.sqrt(torch.arange(N, dtype=dtype) + 0.5)
    return A + P[:, None] * P[None, :], P


def hippo_legs_diag(N: int) -> torch.Tensor:
    """Diagonal approximation of HiPPO-LegS (S4D-LegS): the eigenvalues of its normal part S.

    S = -1/2 I + K with K skew-symmetric, so the eigenvalues are -1/2 + i omega with omega the
    eigenvalues of the Hermitian matrix -iK (computed with eigvalsh, in float64). They come in
    conjugate pairs (one omega = 0 when N is odd); S4D keeps the N/2 with omega >= 0.
    -> (N,) complex128, sorted by omega.
    """
    S, _ = hippo_legs_nplr(N)
    K = S + 0.5 * torch.eye(N, dtype=S.dtype)
    omega = torch.linalg.eigvalsh(-1j * K.to(torch.complex128))
    return torch.complex(torch.full_like(omega, -0.5), omega)


A_INIT_KINDS = ("s4d-real", "s4d-lin-real")


def a_log_init(dim: int, N: int, kind: str = "s4d-real") -> torch.Tensor:
    """The ``A_log`` parameter (dim, N) fp32 for a real diagonal A = -exp(A_log).

    kind 's4d-real': A_n = -(n+1) (Mamba's default); 's4d-lin-real': A_n = -1/2, the real part of
    S4D-Lin (and of S4D-LegS).
    """
    if kind == "s4d-real":
        A = s4d_real(dim, N)
    elif kind == "s4d-lin-real":
        A = torch.full((dim, N), -0.5)
    else:
        raise ValueError(f"kind: expected one of {A_INIT_KINDS}, got {kind!r}")
    return torch.log(-A).contiguous()


# --------------------------------------------------------------------------------------------
# The LTI SSM and its convolution view
# --------------------------------------------------------------------------------------------

def ssm_kernel(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, dt: torch.Tensor, L: int) -> torch.Tensor:
    """Convolution kernel of a diagonal LTI SSM with ZOH for A and dt*B for B:

    K[d, l] = sum_n C[d, n] exp(dt_d A[d, n])^l dt_d B[d, n],  l = 0..L-1.

    A, B, C (dim, N) real or complex; dt (dim,) -> K (dim, L), real part taken for complex inputs
    (for a conjugate-pair half of a real system, double it). Powers are formed as exp(l dt A),
    so nothing overflows when Re A <= 0.
    """
    _check_tensor("A", A, "(dim, N)", 2)
    for name, t in (("B", B), ("C", C)):
        _check_tensor(name, t, f"(dim, N) = {_shape(A)}", 2)
        if t.shape != A.shape:
            raise ValueError(f"{name}: expected (dim, N) = {_shape(A)}, got {_shape(t)}")
    _check_tensor("dt", dt, f"(dim,) = ({A.shape[0]},)", 1)
    if dt.shape[0] != A.shape[0]:
        raise ValueError(f"dt: expected (dim,) = ({A.shape[0]},), got {_shape(dt)}")
    dtA = dt[:, None] * A  # (dim, N)
    powers = torch.exp(dtA[..., None] * torch.arange(L, device=A.device, dtype=dt.dtype))  # (dim, N, L)
    with torch.autocast(device_type=A.device.type, enabled=False):  # keep the kernel in full precision
        K = torch.einsum("dn,dnl->dl", C * dt[:, None] * B, powers)
    return K.real if K.is_complex() else K


def fft_causal_conv(u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Causal convolution y[..., t] = sum_{s<=t} K[..., s] u[..., t-s] by FFT of length 2L
    (zero padding keeps it linear, not circular). u (batch, dim, L), K (dim, L) -> (batch, dim, L)."""
    L = u.shape[-1]
    n = 2 * L
    # cuFFT has no bf16 transforms, and autocast may have made K bf16 (the einsum that builds it)
    with torch.autocast(device_type=u.device.type, enabled=False):
        y = torch.fft.irfft(torch.fft.rfft(u.float(), n=n) * torch.fft.rfft(K.float(), n=n), n=n)
    return y[..., :L]


class LTISSM(nn.Module):
    """Non-selective SSM (S4D with real diagonal A), one independent SSM per channel.

    Per channel d: h_t = exp(dt A) h_{t-1} + dt B u_t;  y_t = C h_t + D u_t,
    with A = -exp(A_log) (dim, N), dt = exp(log_dt) (dim,), B, C (dim, N), D (dim,).
    ``forward(u, mode)`` computes the same map three ways: 'recurrent' (a loop over time),
    'conv' (the kernel K = (C dtB, C Abar dtB, ..., C Abar^(L-1) dtB) applied by FFT) and
    'scan' (``mambazoo.core.dispatch.selective_scan`` with constant delta and time-invariant B, C).
    """

    MODES = ("conv", "recurrent", "scan")

    def __init__(self, dim: int, d_state: int = 16, init: str = "s4d-real",
                 dt_min: float = 1e-3, dt_max: float = 1e-1):
        super().__init__()
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"dt_min, dt_max: expected 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        self.dim, self.d_state = dim, d_state
        self.init, self.dt_min, self.dt_max = init, dt_min, dt_max
        self.log_dt = nn.Parameter(torch.empty(dim))
        self.A_log = nn.Parameter(torch.empty(dim, d_state))
        self.B = nn.Parameter(torch.empty(dim, d_state))
        self.C = nn.Parameter(torch.empty(dim, d_state))
        self.D = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """log dt uniform in [log dt_min, log dt_max], A_log from ``init`` (a_log_init), B = 1, C ~ N(0, 1 / N),
        D = 1."""
        dim, d_state = self.dim, self.d_state
        self.log_dt.copy_(torch.rand(dim) * (math.log(self.dt_max) - math.log(self.dt_min)) + math.log(self.dt_min))
        self.A_log.copy_(a_log_init(dim, d_state, self.init))
        self.B.fill_(1.0)
        self.C.copy_(torch.randn(dim, d_state) / math.sqrt(d_state))
        self.D.fill_(1.0)

    # -- derived quantities ----------------------------------------------------------------
    @property
    def A(self) -> torch.Tensor:
        """(dim, N), negative."""
        return -torch.exp(self.A_log.float())

    @property
    def dt(self) -> torch.Tensor:
        """(dim,), positive."""
        return torch.exp(self.log_dt.float())

    def kernel(self, L: int) -> torch.Tensor:
        """The convolution kernel (dim, L)."""
        return ssm_kernel(self.A, self.B.float(), self.C.float(), self.dt, L)

    def allocate_state(self, batch: int, device=None) -> torch.Tensor:
        """Zero recurrent state (batch, dim, N) fp32 for ``step``."""
        return torch.zeros(batch, self.dim, self.d_state, dtype=torch.float32,
                           device=device if device is not None else self.A_log.device)

    # -- views ---------------------------------------------------------------------------
    def _check_u(self, u) -> None:
        _check_tensor("u", u, f"(batch, dim, L) with dim = {self.dim}", 3)
        if u.shape[1] != self.dim:
            raise ValueError(f"u: expected (batch, dim, L) with dim = {self.dim}, got {_shape(u)}")

    def forward(self, u: torch.Tensor, mode: str = "conv") -> torch.Tensor:
        """u (batch, dim, L) -> y (batch, dim, L) in u's dtype."""
        self._check_u(u)
        if mode == "conv":
            y = fft_causal_conv(u.float(), self.kernel(u.shape[-1])) + self.D[:, None] * u.float()
        elif mode == "recurrent":
            y = self._recurrent(u)
        elif mode == "scan":
            delta = self.dt[None, :, None].expand(u.shape[0], -1, u.shape[-1])
            y = selective_scan(u.float(), delta, self.A, self.B.float(), self.C.float(), self.D.float())
        else:
            raise ValueError(f"mode: expected one of {self.MODES}, got {mode!r}")
        return y.to(u.dtype)

    def _recurrent(self, u: torch.Tensor) -> torch.Tensor:
        Abar = discretize_zoh(self.A, self.dt)  # (dim, N)
        Bbar = discretize_b(self.B.float(), self.dt)  # (dim, N)
        h = self.allocate_state(u.shape[0], u.device)
        ys = []
        for t in range(u.shape[-1]):
            h = Abar * h + Bbar * u[:, :, t, None].float()
            ys.append((h * self.C).sum(-1))
        y = torch.stack(ys, -1) if ys else u.new_zeros(u.shape, dtype=torch.float32)
        return y + self.D[:, None] * u.float()

    def step(self, u_t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """One decoding step with constant memory: u_t (batch, dim), state (batch, dim, N) fp32,
        updated in place. Returns y_t (batch, dim) in u_t's dtype."""
        _check_tensor("u_t", u_t, f"(batch, dim) with dim = {self.dim}", 2)
        if u_t.shape[1] != self.dim:
            raise ValueError(f"u_t: expected (batch, dim) with dim = {self.dim}, got {_shape(u_t)}")
        expected = (u_t.shape[0], self.dim, self.d_state)
        if not isinstance(state, torch.Tensor) or tuple(state.shape) != expected:
            got = _shape(state) if isinstance(state, torch.Tensor) else type(state).__name__
            raise ValueError(f"state: expected (batch, dim, N) = {expected}, got {got}")
        Abar = discretize_zoh(self.A, self.dt)
        Bbar = discretize_b(self.B.float(), self.dt)
        new = Abar * state + Bbar * u_t.float()[..., None]
        state.copy_(new)
        y = (new * self.C).sum(-1) + self.D * u_t.float()
        return y.to(u_t.dtype)


# --------------------------------------------------------------------------------------------
# HiPPO-LegS online function approximation
# --------------------------------------------------------------------------------------------
#
# LegS keeps c(t) = the coefficients of the projection of the whole history f|[0, t] onto the
# scaled Legendre basis g_n(s) = (2n+1)^0.5 P_n(2s/t - 1), orthonormal for the uniform measure
# on [0, t]. They obey c'(t) = (1/t) (A c + B f(t)) with (A, B) = hippo_legs(N).
# With the samples f_0..f_{L-1} held constant on [k, k+1), step k maps c(k) to c(k+1):
#   'zoh':      exact. In log-time tau = log t the ODE is LTI, so over [k, k+1) it is a ZOH
#               step of length log((k+1)/k); the first step [0, 1) gives c(1) = -A^-1 B f_0 = f_0 e_0.
#   'bilinear': the HiPPO paper's discretization: GBT(1/2) of (A/(k+1), B/(k+1)) with unit step.
#   'euler':    forward Euler of the same (for comparison; unstable early on for large N).

_HIPPO_METHODS = ("zoh", "bilinear", "euler")


def hippo_legs_transitions(N: int, L: int, method: str = "zoh") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step LegS transitions: c_{k+1} = Abar[k] c_k + Bbar[k] f_k, k = 0..L-1.

    -> Abar (L, N, N), Bbar (L, N), float64.
    """
    if method not in _HIPPO_METHODS:
        raise ValueError(f"method: expected one of {_HIPPO_METHODS}, got {method!r}")
    A, B = hippo_legs(N)
    eye = torch.eye(N, dtype=A.dtype)
    k = torch.arange(L, dtype=A.dtype)
    if method == "zoh":
        h = torch.log((k[1:] + 1) / k[1:])  # log-time step lengths for k >= 1
        M = torch.zeros(L - 1, N + 1, N + 1, dtype=A.dtype)
        M[:, :N, :N] = A
        M[:, :N, N] = B
        E = torch.linalg.matrix_exp(h[:, None, None] * M)
        first_A = torch.zeros(1, N, N, dtype=A.dtype)  # c(0) carries no information
        first_B = eye[:1, :]  # c(1) = f_0 e_0
        return torch.cat([first_A, E[:, :N, :N]]), torch.cat([first_B, E[:, :N, N]])
    s = 1.0 / (k + 1)  # step k integrates over [k, k+1); evaluate the 1/t scale at t = k + 1
    At, Bt = s[:, None, None] * A, s[:, None] * B
    if method == "euler":
        return eye + At, Bt
    lhs = eye - 0.5 * At
    Abar = torch.linalg.solve_triangular(lhs, eye + 0.5 * At, upper=False)
    Bbar = torch.linalg.solve_triangular(lhs, Bt[..., None], upper=False)[..., 0]
    return Abar, Bbar


def hippo_legs_encode(signal: torch.Tensor, N: int, method: str = "zoh",
                      return_all: bool = False) -> torch.Tensor:
    """Run the LegS recurrence over a 1-d signal (L,) and return the final coefficients (N,)
    float64, or every state (L, N) (row k after seeing f_0..f_k) with ``return_all``."""
    _check_tensor("signal", signal, "(L,)", 1)
    L = signal.shape[0]
    if L < 1 or N < 1:
        raise ValueError(f"signal, N: expected L >= 1 and N >= 1, got L = {L}, N = {N}")
    Abar, Bbar = hippo_legs_transitions(N, L, method)
    f = signal.detach().to(torch.float64).cpu()
    c = torch.zeros(N, dtype=torch.float64)
    states = []
    for k in range(L):
        c = Abar[k] @ c + Bbar[k] * f[k]
        if return_all:
            states.append(c)
    return torch.stack(states) if return_all else c


def _legendre_values(N: int, x: torch.Tensor) -> torch.Tensor:
    """P_0..P_{N-1} at x by the three-term recurrence (n+1) P_{n+1} = (2n+1) x P_n - n P_{n-1}.
    x (M,) -> (N, M)."""
    P = [torch.ones_like(x), x]
    for n in range(1, N - 1):
        P.append(((2 * n + 1) * x * P[n] - n * P[n - 1]) / (n + 1))
    return torch.stack(P[:N])


def legendre_reconstruct(c: torch.Tensor, L: int) -> torch.Tensor:
    """The history encoded by LegS coefficients c (N,), evaluated at the midpoints of L equal
    steps of [0, t]: f(s) ~ sum_n c_n (2n+1)^0.5 P_n(2s/t - 1). -> (L,) float64."""
    _check_tensor("c", c, "(N,)", 1)
    N = c.shape[0]
    x = (torch.arange(L, dtype=torch.float64) + 0.5) / L * 2 - 1
    scale = torch.sqrt(2 * torch.arange(N, dtype=torch.float64) + 1)
    return (c.to(torch.float64) * scale) @ _legendre_values(N, x)


def hippo_legs_reconstruct(signal: torch.Tensor, N: int, method: str = "zoh") -> torch.Tensor:
    """Encode a signal (L,) online with an N-coefficient LegS state, then reconstruct its whole
    history from the final state alone. -> (L,) float64."""
    c = hippo_legs_encode(signal, N, method)
    return legendre_reconstruct(c, signal.shape[0])
