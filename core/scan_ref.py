"""The selective scan (S6) in plain PyTorch: input checks, the sequential oracle and the decode-step oracle.

Math, for every batch b, channel d and state index n:

    dt_t  = softplus(delta_t + delta_bias)            (softplus only if delta_softplus)
    h_t   = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t  (zero-order hold for A, Euler for B)
    y_t   = sum_n C_t[n] h_t[n] + D * u_t
    y_t  *= silu(z_t)                                  (only if z is given)

Layouts follow mamba_ssm's ``selective_scan_fn`` so users can swap it in:
u, delta, z (batch, dim, L); A (dim, N); B, C (batch, N, L), (batch, groups, N, L) or
time-invariant (dim, N); D, delta_bias (dim,); initial_state (batch, dim, N).

``selective_scan_ref`` is the sequential oracle every scan kernel is tested against;
``selective_state_update_ref`` the oracle of the one-token decode step. The chunked reference (CPU training)
is mambazoo.core.scan.selective_scan_chunked; which one runs is mambazoo.core.dispatch's choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "ScanShape",
    "check_scan_inputs",
    "check_low_rank_delta",
    "check_state_update_inputs",
    "direction_pairs",
    "low_rank_delta",
    "low_rank_dtype",
    "selective_scan_ref",
    "selective_state_update_ref",
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


def check_scan_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None,
                      seq_idx=None) -> ScanShape:
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
    if seq_idx is not None and (not isinstance(seq_idx, torch.Tensor) or tuple(seq_idx.shape) != (batch, L)
                                or seq_idx.is_floating_point() or seq_idx.is_complex()):
        got = f"{seq_idx.dtype} {_shape(seq_idx)}" if isinstance(seq_idx, torch.Tensor) else type(seq_idx).__name__
        raise ValueError(f"seq_idx: expected an integer tensor (batch, L) = ({batch}, {L}), got {got}")
    devices = {t.device for t in (u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx) if t is not None}
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


def time_step(dt, delta_bias=None, delta_softplus=False, channel_dim: int = 1):
    """The step size: dt fp32 in any layout (channels along ``channel_dim``: 1 for (batch, dim, L), -1 for
    (L, batch, dim)) -> softplus(dt + delta_bias) (each part only if given / asked), delta_bias (dim,)."""
    dt = dt.float()
    if delta_bias is not None:
        shape = [1] * dt.dim()
        shape[channel_dim] = -1
        dt = dt + delta_bias.float().view(shape)
    if delta_softplus:
        # contiguous first: for a (b, L, d)-laid delta the CPU softplus backward returns another layout than
        # its meta function promises, which breaks torch.compile's traced views (the Triton path is unaffected)
        dt = F.softplus(dt.contiguous())
    return dt


def initial_state_f32(initial_state, u, shape: ScanShape):
    """initial_state (batch, dim, N) as fp32, or zeros of that shape on u's device."""
    if initial_state is not None:
        return initial_state.float()
    return u.new_zeros(shape.batch, shape.dim, shape.d_state, dtype=torch.float32)


def _discretize(u, delta, A, B, D, z, delta_bias, delta_softplus, shape: ScanShape):
    dt = time_step(delta, delta_bias, delta_softplus, channel_dim=1)
    uf = u.float()
    Bc = _bc_per_channel(B, shape.b_mode, shape.batch, shape.dim)
    return dt, uf, Bc


def _segment_starts(seq_idx, L: int):
    """(batch, L) bool: True where a new packed sequence starts (seq_idx differs from the step before)."""
    starts = torch.zeros(seq_idx.shape, dtype=torch.bool, device=seq_idx.device)
    if L > 1:
        starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return starts


def _finish(y, u, D, z, out_dtype):
    """y (batch, dim, L) fp32 -> (y + D u) * silu(z) in out_dtype."""
    if D is not None:
        y = y + D.float()[None, :, None] * u.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(out_dtype)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None, seq_idx=None):
    """Sequential oracle of the selective scan: a Python loop over L in fp32.

    Shapes: u, delta, z (batch, dim, L); A (dim, N); B, C (batch, N, L) | (batch, G, N, L) | (dim, N);
    D, delta_bias (dim,); initial_state (batch, dim, N); seq_idx (batch, L) int: packed sequences,
    the state restarts from zero wherever seq_idx changes (initial_state applies to the first one).
    Returns y (batch, dim, L) in u's dtype, and the final state (batch, dim, N) fp32 if asked.
    """
    s = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
    dt, uf, Bc = _discretize(u, delta, A, B, D, z, delta_bias, delta_softplus, s)
    Cc = _bc_per_channel(C, s.c_mode, s.batch, s.dim)
    Af = A.float()
    h = initial_state_f32(initial_state, u, s)
    keep = None if seq_idx is None else (~_segment_starts(seq_idx, s.length)).float()  # (batch, L)
    ys = []
    for t in range(s.length):
        dt_t = dt[:, :, t, None]  # (batch, dim, 1)
        B_t = Bc[:, :, t if Bc.shape[2] > 1 else 0]
        C_t = Cc[:, :, t if Cc.shape[2] > 1 else 0]
        if keep is not None:
            h = h * keep[:, t, None, None]
        h = torch.exp(dt_t * Af) * h + dt_t * B_t * uf[:, :, t, None]
        ys.append((h * C_t).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else uf.new_zeros(s.batch, s.dim, 0)
    y = _finish(y, u, D, z, u.dtype)
    return (y, h) if return_last_state else y



def check_low_rank_delta(u: torch.Tensor, dt: torch.Tensor, dt_weight: torch.Tensor) -> None:
    """Validates a low-rank delta: dt (batch, R, L) and dt_weight (dim, R) for u (batch, dim, L)."""
    if u.dim() != 3:
        raise ValueError(f"u: expected (batch, dim, L), got a {u.dim()}-d tensor {_shape(u)}")
    batch, dim, L = u.shape
    if not isinstance(dt_weight, torch.Tensor) or dt_weight.dim() != 2 or dt_weight.shape[0] != dim:
        got = _shape(dt_weight) if isinstance(dt_weight, torch.Tensor) else type(dt_weight).__name__
        raise ValueError(f"dt_weight: expected (dim, R) = ({dim}, R), got {got}")
    R = dt_weight.shape[1]
    if not isinstance(dt, torch.Tensor) or tuple(dt.shape) != (batch, R, L) or not dt.is_floating_point():
        got = f"{dt.dtype} {_shape(dt)}" if isinstance(dt, torch.Tensor) else type(dt).__name__
        raise ValueError(f"delta: with dt_weight (dim, R = {R}) expected low-rank dt (batch, R, L) = ({batch}, {R}, "
                         f"{L}) floating point, got {got}")


def low_rank_dtype(dt: torch.Tensor, dt_weight: torch.Tensor) -> torch.dtype:
    """The dtype a low-rank delta's product takes its operands in: the narrower of dt's and dt_weight's (an fp32 dt
    with a bf16 weight is rounded to bf16, as a tensor-core product of the two would take it)."""
    return dt_weight.dtype if dt_weight.element_size() < dt.element_size() else dt.dtype


def low_rank_delta(dt: torch.Tensor, dt_weight: torch.Tensor) -> torch.Tensor:
    """delta = dt_weight @ dt: dt (batch, R, L), dt_weight (dim, R) -> (batch, dim, L) in dt's dtype (Mamba's dt_proj
    without its bias, which the scan adds as delta_bias). Both operands in low_rank_dtype, the sum in fp32."""
    ct = low_rank_dtype(dt, dt_weight)
    return torch.matmul(dt_weight.to(ct).float(), dt.to(ct).float()).to(dt.dtype)



def direction_pairs(**named) -> list[tuple]:
    """The per-direction arguments of a bidirectional scan, in order, each as a (forward, backward) pair (None: both
    absent); u must be a pair of tensors. Raises ValueError naming the first argument that is not a pair."""
    pairs = []
    for name, v in named.items():
        v = (None, None) if v is None else v
        if not (isinstance(v, (tuple, list)) and len(v) == 2):
            raise ValueError(f"{name}: expected a (forward, backward) pair, got {type(v).__name__}")
        pairs.append(tuple(v))
    if not all(isinstance(t, torch.Tensor) for t in pairs[0]):
        raise ValueError(f"{next(iter(named))}: expected a pair of tensors, got {[type(t).__name__ for t in pairs[0]]}")
    return pairs



def check_state_update_inputs(state, x, dt, A, B, C, D=None, z=None, dt_bias=None):
    """Validate one decode step's arguments (layouts of ``selective_state_update``); returns groups."""
    if state.dim() != 3:
        raise ValueError(f"state: expected (batch, dim, N), got {_shape(state)}")
    batch, dim, N = state.shape
    if state.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"state: expected float32, float16 or bfloat16, got {state.dtype}")
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

    state (batch, dim, N) fp32, fp16 or bf16 (as mamba_ssm's selective_state_update takes it: the step runs in fp32
    and the new state is stored back rounded to the state's dtype; y is formed from the fp32 state);
    x, dt, z (batch, dim); B, C (batch, N) or (batch, groups, N); A (dim, N); D, dt_bias (dim,).
    Returns y (batch, dim) in x's dtype.
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
    new = torch.exp(d[..., None] * A.float()) * state.float() + d[..., None] * Bc * x.float()[..., None]
    state.copy_(new)
    y = (new * Cc).sum(-1)
    if D is not None:
        y = y + D.float() * x.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)
