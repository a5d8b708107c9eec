"""The selective scan (S6): input checks, two plain-PyTorch references and the dispatcher.

Math, for every batch b, channel d and state index n:

    dt_t  = softplus(delta_t + delta_bias)            (softplus only if delta_softplus)
    h_t   = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t  (zero-order hold for A, Euler for B)
    y_t   = sum_n C_t[n] h_t[n] + D * u_t
    y_t  *= silu(z_t)                                  (only if z is given)

Layouts follow mamba_ssm's ``selective_scan_fn`` so users can swap it in:
u, delta, z (batch, dim, L); A (dim, N); B, C (batch, N, L), (batch, groups, N, L) or
time-invariant (dim, N); D, delta_bias (dim,); initial_state (batch, dim, N).

``selective_scan_ref`` is the sequential oracle; ``selective_scan_chunked`` computes the same
function chunk by chunk (exact, stable: only decays exp(<= 0) are ever formed) and is what CPU
training uses; ``selective_scan`` dispatches to the Triton kernel on CUDA tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "ScanShape",
    "check_scan_inputs",
    "selective_scan",
    "selective_scan_ref",
    "selective_scan_chunked",
    "selective_state_update_ref",
    "check_state_update_inputs",
]


@dataclass(frozen=True)
class ScanShape:
    """Sizes of one selective-scan call; ``bc_mode`` is 'variable', 'grouped' or 'invariant'."""

    batch: int
    dim: int
    length: int
    d_state: int
    groups: int
    b_mode: str
    c_mode: str


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _bc_mode(name: str, X: torch.Tensor, batch: int, dim: int, L: int, N: int) -> tuple[str, int]:
    """Classify B or C by its rank; returns (mode, groups)."""
    if X.dim() == 2:
        if tuple(X.shape) != (dim, N):
            raise ValueError(f"{name}: time-invariant {name} must be (dim, N) = ({dim}, {N}), got {_shape(X)}")
        return "invariant", 1
    if X.dim() == 3:
        if tuple(X.shape) != (batch, N, L):
            raise ValueError(f"{name}: expected (batch, N, L) = ({batch}, {N}, {L}), got {_shape(X)}")
        return "variable", 1
    if X.dim() == 4:
        G = X.shape[1]
        if X.shape[0] != batch or X.shape[2] != N or X.shape[3] != L or G < 1 or dim % G:
            raise ValueError(
                f"{name}: expected (batch, groups, N, L) = ({batch}, G, {N}, {L}) with dim {dim} divisible "
                f"by G, got {_shape(X)}"
            )
        return ("variable", 1) if G == 1 else ("grouped", G)
    raise ValueError(
        f"{name}: expected (batch, N, L), (batch, groups, N, L) or (dim, N), got a {X.dim()}-d tensor {_shape(X)}"
    )


def check_scan_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None) -> ScanShape:
    """Validate the arguments of a selective scan; raise ValueError naming the expected shape."""
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if u.dim() != 3:
        raise ValueError(f"u: expected (batch, dim, L), got a {u.dim()}-d tensor {_shape(u)}")
    batch, dim, L = u.shape
    if not u.is_floating_point():
        raise ValueError(f"u: expected a floating-point tensor, got {u.dtype}")
    if tuple(delta.shape) != (batch, dim, L):
        raise ValueError(f"delta: expected (batch, dim, L) = ({batch}, {dim}, {L}) like u, got {_shape(delta)}")
    if not delta.is_floating_point():
        raise ValueError(f"delta: expected a floating-point tensor, got {delta.dtype}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A: expected (dim, N) = ({dim}, N), got {_shape(A)}")
    if not A.is_floating_point():
        raise ValueError(f"A: expected a floating-point tensor (fp32), got {A.dtype}")
    N = A.shape[1]
    b_mode, gb = _bc_mode("B", B, batch, dim, L, N)
    c_mode, gc = _bc_mode("C", C, batch, dim, L, N)
    if b_mode == "grouped" and c_mode == "grouped" and gb != gc:
        raise ValueError(f"B and C: group counts differ ({gb} vs {gc})")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            raise ValueError(f"{name}: expected (dim,) = ({dim},), got {_shape(t)}")
    if z is not None and tuple(z.shape) != (batch, dim, L):
        raise ValueError(f"z: expected (batch, dim, L) = ({batch}, {dim}, {L}) like u, got {_shape(z)}")
    if initial_state is not None and tuple(initial_state.shape) != (batch, dim, N):
        raise ValueError(
            f"initial_state: expected (batch, dim, N) = ({batch}, {dim}, {N}), got {_shape(initial_state)}"
        )
    for name, t in (("B", B), ("C", C), ("D", D), ("z", z), ("delta_bias", delta_bias),
                    ("initial_state", initial_state)):
        if t is not None and not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    devices = {t.device for t in (u, delta, A, B, C, D, z, delta_bias, initial_state) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(str(d) for d in devices)}")
    return ScanShape(batch, dim, L, N, max(gb, gc), b_mode, c_mode)


def _bc_per_channel(X: torch.Tensor, mode: str, batch: int, dim: int) -> torch.Tensor:
    """B or C as an fp32 tensor broadcastable to (batch, dim, L, N)."""
    X = X.float()
    if mode == "invariant":
        return X[None, :, None, :]  # (1, dim, 1, N)
    if X.dim() == 3:
        return X.transpose(1, 2)[:, None]  # (batch, 1, L, N)
    G = X.shape[1]
    X = X.transpose(2, 3)  # (batch, G, L, N)
    return X.repeat_interleave(dim // G, dim=1)  # (batch, dim, L, N)


def _discretize(u, delta, A, B, D, z, delta_bias, delta_softplus, shape: ScanShape):
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[None, :, None]
    if delta_softplus:
        dt = F.softplus(dt)
    uf = u.float()
    Bc = _bc_per_channel(B, shape.b_mode, shape.batch, shape.dim)
    return dt, uf, Bc


def _finish(y, u, D, z, out_dtype):
    if D is not None:
        y = y + D.float()[None, :, None] * u.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(out_dtype)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None):
    """Sequential oracle of the selective scan: a Python loop over L in fp32.

    Shapes: u, delta, z (batch, dim, L); A (dim, N); B, C (batch, N, L) | (batch, G, N, L) | (dim, N);
    D, delta_bias (dim,); initial_state (batch, dim, N).
    Returns y (batch, dim, L) in u's dtype, and the final state (batch, dim, N) fp32 if asked.
    """
    s = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dt, uf, Bc = _discretize(u, delta, A, B, D, z, delta_bias, delta_softplus, s)
    Cc = _bc_per_channel(C, s.c_mode, s.batch, s.dim)
    Af = A.float()
    h = (initial_state.float() if initial_state is not None
         else u.new_zeros(s.batch, s.dim, s.d_state, dtype=torch.float32))
    ys = []
    for t in range(s.length):
        dt_t = dt[:, :, t, None]  # (batch, dim, 1)
        B_t = Bc[:, :, t if Bc.shape[2] > 1 else 0]
        C_t = Cc[:, :, t if Cc.shape[2] > 1 else 0]
        h = torch.exp(dt_t * Af) * h + dt_t * B_t * uf[:, :, t, None]
        ys.append((h * C_t).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else uf.new_zeros(s.batch, s.dim, 0)
    y = _finish(y, u, D, z, u.dtype)
    return (y, h) if return_last_state else y


def _chunk_scan(dA, x, Cc, h0):
    """One chunk, vectorized: dA, x (batch, dim, T, N) with x = dt*B*u; Cc broadcastable to it;
    h0 (batch, dim, N). Returns y (batch, dim, T) and the state after the chunk."""
    cum = torch.cumsum(dA, dim=2)  # (b, d, T, N), non-increasing for A <= 0
    T = dA.shape[2]
    seg = cum[:, :, :, None, :] - cum[:, :, None, :, :]  # (b, d, t, s, N): log of prod_{s<r<=t} a_r
    causal = torch.ones(T, T, dtype=torch.bool, device=dA.device).tril()
    decay = torch.exp(seg.masked_fill(~causal[:, :, None], float("-inf")))
    h = torch.einsum("bdtsn,bdsn->bdtn", decay, x) + torch.exp(cum) * h0[:, :, None, :]
    y = (h * Cc).sum(-1)
    return y, h[:, :, -1]


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False, initial_state=None, chunk_size=32):
    """Chunked reference: same contract and result as ``selective_scan_ref``, L/chunk_size Python steps.

    Inside a chunk of T steps the states are h_t = sum_{s<=t} exp(cum_t - cum_s) x_s + exp(cum_t) h0
    with cum the running sum of dt*A: every exponent is <= 0 when A <= 0, so nothing overflows.
    Memory per chunk is (batch, dim, T, T, N).
    """
    s = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size}")
    dt, uf, Bc = _discretize(u, delta, A, B, D, z, delta_bias, delta_softplus, s)
    Cc = _bc_per_channel(C, s.c_mode, s.batch, s.dim)
    Af = A.float()
    h = (initial_state.float() if initial_state is not None
         else u.new_zeros(s.batch, s.dim, s.d_state, dtype=torch.float32))
    ys = []
    for start in range(0, s.length, chunk_size):
        sl = slice(start, min(start + chunk_size, s.length))
        dt_c = dt[:, :, sl, None]  # (b, d, T, 1)
        B_c = Bc[:, :, sl] if Bc.shape[2] > 1 else Bc
        C_c = Cc[:, :, sl] if Cc.shape[2] > 1 else Cc
        x = dt_c * B_c * uf[:, :, sl, None]
        y_c, h = _chunk_scan(dt_c * Af[None, :, None, :], x, C_c, h)
        ys.append(y_c)
    y = torch.cat(ys, dim=-1) if ys else uf.new_zeros(s.batch, s.dim, 0)
    y = _finish(y, u, D, z, u.dtype)
    return (y, h) if return_last_state else y


def scan_backend(device: torch.device) -> str:
    """Which implementation ``selective_scan`` uses on ``device``: 'triton', 'chunked' or 'ref'.

    ``MAMBAZOO_SCAN`` = ref | chunked | triton overrides the choice (triton needs CUDA tensors
    unless TRITON_INTERPRET=1)."""
    forced = os.environ.get("MAMBAZOO_SCAN", "").strip().lower()
    if forced:
        if forced not in ("ref", "chunked", "triton"):
            raise ValueError(f"MAMBAZOO_SCAN: expected ref, chunked or triton, got {forced!r}")
        return forced
    return "triton" if device.type == "cuda" else "chunked"


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, initial_state=None):
    """The selective scan (DESIGN.md contract): Triton kernel on CUDA, chunked reference elsewhere.

    Shapes as in ``selective_scan_ref``. Set MAMBAZOO_SCAN=ref to force the sequential oracle.
    """
    backend = scan_backend(u.device)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state)
    if backend == "triton":
        check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
        from kernels import selective_scan_triton

        return selective_scan_triton(*args)
    if backend == "ref":
        return selective_scan_ref(*args)
    return selective_scan_chunked(*args)


def check_state_update_inputs(state, x, dt, A, B, C, D=None, z=None, dt_bias=None):
    """Validate one decode step's arguments (layouts of ``selective_state_update``); returns groups."""
    if state.dim() != 3:
        raise ValueError(f"state: expected (batch, dim, N), got {_shape(state)}")
    batch, dim, N = state.shape
    if state.dtype != torch.float32:
        raise ValueError(f"state: expected float32, got {state.dtype}")
    for name, t in (("x", x), ("dt", dt), ("z", z)):
        if t is not None and tuple(t.shape) != (batch, dim):
            raise ValueError(f"{name}: expected (batch, dim) = ({batch}, {dim}), got {_shape(t)}")
    if tuple(A.shape) != (dim, N) or not A.is_floating_point():
        raise ValueError(f"A: expected a floating-point (dim, N) = ({dim}, {N}), got {A.dtype} {_shape(A)}")
    groups = 1
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 2 and tuple(t.shape) == (batch, N):
            continue
        if t.dim() == 3 and t.shape[0] == batch and t.shape[2] == N and dim % t.shape[1] == 0:
            groups = t.shape[1]
            continue
        raise ValueError(f"{name}: expected (batch, N) = ({batch}, {N}) or (batch, groups, N), got {_shape(t)}")
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            raise ValueError(f"{name}: expected (dim,) = ({dim},), got {_shape(t)}")
    return groups


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decode step of the selective scan in plain PyTorch; updates ``state`` in place.

    state (batch, dim, N) fp32; x, dt, z (batch, dim); B, C (batch, N) or (batch, groups, N);
    A (dim, N); D, dt_bias (dim,). Returns y (batch, dim) in x's dtype.
    """
    check_state_update_inputs(state, x, dt, A, B, C, D, z, dt_bias)
    batch, dim, N = state.shape
    d = dt.float()
    if dt_bias is not None:
        d = d + dt_bias.float()
    if dt_softplus:
        d = F.softplus(d)

    def per_channel(X):
        X = X.float()
        if X.dim() == 2:
            return X[:, None, :]
        return X.repeat_interleave(dim // X.shape[1], dim=1)

    Bc, Cc = per_channel(B), per_channel(C)
    new = torch.exp(d[..., None] * A.float()) * state + d[..., None] * Bc * x.float()[..., None]
    state.copy_(new)
    y = (new * Cc).sum(-1)
    if D is not None:
        y = y + D.float() * x.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)
