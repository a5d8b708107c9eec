"""The Mamba-3 state-space recurrence in plain PyTorch: the one-token step, the sequential oracle built from it,
and a chunked form equal to it (up to rounding) that trains on the CPU.

Mamba-3 (Lahoti, Li, Chen, Wang, Bick, Kolter, Dao, Gu; ICLR 2026) as the published module computes it
(mamba-ssm ``mamba_ssm/modules/mamba3.py`` and ``ops/triton/mamba3``, read at commit 0348a3d).

Shapes: batch b, length L, heads H, head dim P, state size N, B/C groups G (H % G == 0), MIMO rank R (SISO:
R = 1), rotary angles S (S <= N / 2).

Inputs (the mixer computes them from its projections):
    x      (b, L, H, P)     values
    dt     (b, L, H)        step size, > 0 (softplus(dd_dt + dt_bias))
    adt    (b, L, H)        log decay A * dt, < 0 (A data-dependent, floored at -A_floor)
    trap   (b, L, H)        trapezoid gate lambda in [0, 1] (sigmoid of a projection)
    B, C   (b, L, R, G, N)  RMSNorm'd keys / queries, shared by the H / G heads of a group
    angles (b, L, H, S)     angle projections (raw; tanh is applied here)
    B_bias, C_bias (H, R, N); D (H,) or None; mimo_x (H, R, P) or None (SISO)

Per head and step t (q, k, v below carry the rank index r):
    k_{t,r} = B_{t,r} + B_bias_r      q_{t,r} = C_{t,r} + C_bias_r
    theta_t = theta_{t-1} + pi * tanh(angles_t) * dt_t                            (S angles, theta_{-1} = angle state)
    k~ = rot(theta_t) k,  q~ = rot(theta_t) q: the first S pairs of state dims rotate, the rest pass through.
        Pairs are (2i, 2i+1) (``pairwise``, the published SISO layout) or (i, i + N/2) (the MIMO layout).
    v_{t,r} = x_t * mimo_x_r                       (SISO: v = x)
    u_t = sum_r v_{t,r} k~_{t,r}^T                 (P, N)
    alpha_t = exp(adt_t),  beta_t = alpha_t dt_t (1 - trap_t),  gamma_t = dt_t trap_t
    h_t = alpha_t h_{t-1} + beta_t u_{t-1} + gamma_t u_t                          (exponential-trapezoidal rule)
    y_{t,r} = h_t q~_{t,r} + D v_{t,r}                                            (b, L, R, H, P)
u_{-1} comes from the previous-step state (k~_{-1} (b, R, H, N), x_{-1} (b, H, P)); zeros at a sequence start.

States (initial and final), a tuple ``(angle, ssm, k, v)``: angle (b, H, S) (reduced mod 2 pi), ssm (b, H, P, N),
k (b, R, H, N) the last rotated key, v (b, H, P) the last x. Packed sequences: ``seq_idx`` (b, L) restarts every
state from zero wherever it changes (the initial state belongs to the first sequence); ``cu_seqlens``
(n + 1,) with b = 1 takes and returns n states, one per sequence.

The chunked form: u_s reaches h_t (t > s) with weight prod_{s<j<=t} alpha_j * (gamma_s + delta_{s+1}), where
delta_j = dt_j (1 - trap_j) = beta_j / alpha_j, and at t = s with gamma_s. So within a chunk of T steps it is a
masked attention (q~ k~^T times a decay matrix with gamma on the diagonal and gamma + delta below), and across
chunks a carry h' = h + delta_next u (the state plus the next step's trapezoid share of the last input).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mambazoo.core.backend import mamba3_impl

TWO_PI = 2 * math.pi

# ----------------------------------------------------------------------------------------------------------
# input checks


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _expect(name: str, t, shape: tuple) -> None:
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {_shape(t)}")


def check_mamba3_inputs(x, dt, adt, trap, B, C, angles, B_bias, C_bias, D=None, mimo_x=None,
                        initial_states=None, seq_idx=None, cu_seqlens=None) -> tuple[int, ...]:
    """Validate the scan's inputs (shapes in the module docstring); returns (b, L, H, P, R, G, N, S).
    Raises ValueError naming the expected shape and the one that came."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x: expected (batch, L, nheads, headdim), got {_shape(x)}")
    b, L, H, P = x.shape
    if L < 1:
        raise ValueError(f"x: expected a length L >= 1, got {_shape(x)}")
    if not isinstance(B, torch.Tensor) or B.dim() != 5 or B.shape[:2] != (b, L):
        raise ValueError(f"B: expected (batch, L, rank, ngroups, d_state) = ({b}, {L}, R, G, N), got {_shape(B)}")
    R, G, N = B.shape[2:]
    if H % G:
        raise ValueError(f"B: expected ngroups dividing nheads={H}, got {G}")
    if N % 2:
        raise ValueError(f"B: expected an even d_state (rotation pairs), got {N}")
    _expect("C", C, (b, L, R, G, N))
    for name, t in (("dt", dt), ("adt", adt), ("trap", trap)):
        _expect(name, t, (b, L, H))
    if not isinstance(angles, torch.Tensor) or angles.dim() != 4 or angles.shape[:3] != (b, L, H) \
            or not 0 < angles.shape[3] <= N // 2:
        raise ValueError(f"angles: expected (batch, L, nheads, S) = ({b}, {L}, {H}, S) with 0 < S <= {N // 2}, "
                         f"got {_shape(angles)}")
    S = angles.shape[3]
    _expect("B_bias", B_bias, (H, R, N))
    _expect("C_bias", C_bias, (H, R, N))
    if D is not None:
        _expect("D", D, (H,))
    if mimo_x is not None:
        _expect("mimo_x", mimo_x, (H, R, P))
    elif R != 1:
        raise ValueError(f"mimo_x: expected (nheads, rank, headdim) = ({H}, {R}, {P}) for rank {R}, got None")
    nseq = b
    if cu_seqlens is not None:
        if b != 1:
            raise ValueError(f"x: expected batch 1 with cu_seqlens, got {_shape(x)}")
        if seq_idx is not None:
            raise ValueError("seq_idx and cu_seqlens: expected one of them, got both")
        if (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2
                or cu_seqlens.is_floating_point()):
            raise ValueError(f"cu_seqlens: expected an integer tensor (nseq + 1,), got {_shape(cu_seqlens)}")
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != L or any(e <= s for s, e in zip(cu[:-1], cu[1:])):
            raise ValueError(f"cu_seqlens: expected 0 = c_0 < c_1 < ... < c_n = L = {L}, got {cu}")
        nseq = len(cu) - 1
    if seq_idx is not None and (not isinstance(seq_idx, torch.Tensor) or tuple(seq_idx.shape) != (b, L)
                                or seq_idx.is_floating_point()):
        raise ValueError(f"seq_idx: expected an integer tensor (batch, L) = ({b}, {L}), got {_shape(seq_idx)}")
    if initial_states is not None:
        if not isinstance(initial_states, (tuple, list)) or len(initial_states) != 4:
            raise ValueError("initial_states: expected a tuple (angle, ssm, k, v), got "
                             f"{type(initial_states).__name__}")
        for name, t, shape in zip(("angle", "ssm", "k", "v"), initial_states,
                                  ((nseq, H, S), (nseq, H, P, N), (nseq, R, H, N), (nseq, H, P))):
            _expect(f"initial_states[{name}]", t, shape)
    return b, L, H, P, R, G, N, S


# ----------------------------------------------------------------------------------------------------------
# shared pieces


def rotate(t: torch.Tensor, theta: torch.Tensor, pairwise: bool = True) -> torch.Tensor:
    """Rotate the first S pairs of t's last axis by theta: t (..., N), theta (..., S) broadcastable -> (..., N).
    pairwise: pairs (2i, 2i+1); else pairs (i, i + N/2). Pairs beyond S pass through unchanged."""
    N, S = t.shape[-1], theta.shape[-1]
    cos, sin = torch.cos(theta), torch.sin(theta)
    if S < N // 2:  # pass-through pairs: cos 1, sin 0
        pad = N // 2 - S
        cos = F.pad(cos, (0, pad), value=1.0)
        sin = F.pad(sin, (0, pad), value=0.0)
    if pairwise:
        t0, t1 = t[..., 0::2], t[..., 1::2]
        return torch.stack((t0 * cos - t1 * sin, t0 * sin + t1 * cos), dim=-1).flatten(-2)
    t0, t1 = t[..., : N // 2], t[..., N // 2:]
    return torch.cat((t0 * cos - t1 * sin, t0 * sin + t1 * cos), dim=-1)


def angle_increment(angles: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """Per-step rotation: pi * tanh(angles) * dt. angles (..., H, S), dt (..., H) -> (..., H, S)."""
    return torch.tanh(angles) * (math.pi * dt)[..., None]


def expand_groups(BC: torch.Tensor, H: int) -> torch.Tensor:
    """(..., R, G, N) -> (..., R, H, N): each group's row shared by its H / G heads."""
    G = BC.shape[-2]
    return BC if G == H else BC.repeat_interleave(H // G, dim=-2)


def rank_values(x: torch.Tensor, mimo_x: torch.Tensor | None) -> torch.Tensor:
    """v = x * mimo_x per rank: x (..., H, P), mimo_x (H, R, P) -> (..., R, H, P); SISO (..., 1, H, P)."""
    if mimo_x is None:
        return x.unsqueeze(-3)
    return x.unsqueeze(-3) * mimo_x.transpose(0, 1)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def zero_states(nseq: int, H: int, P: int, N: int, S: int, R: int, device=None, dtype=torch.float32):
    """Zero (angle (nseq, H, S), ssm (nseq, H, P, N), k (nseq, R, H, N), v (nseq, H, P)) in ``dtype``."""
    return (torch.zeros(nseq, H, S, device=device, dtype=dtype), torch.zeros(nseq, H, P, N, device=device, dtype=dtype),
            torch.zeros(nseq, R, H, N, device=device, dtype=dtype), torch.zeros(nseq, H, P, device=device, dtype=dtype))


# ----------------------------------------------------------------------------------------------------------
# the one-token step and the sequential oracle


def mamba3_step_ref(x, dt, adt, trap, B, C, angles, B_bias, C_bias, D=None, mimo_x=None, states=None,
                    pairwise=True):
    """One step of the recurrence (module docstring), functional (no tensor is written).

    x (b, H, P); dt, adt, trap (b, H); B, C (b, R, G, N); angles (b, H, S); B_bias, C_bias (H, R, N); D (H,);
    mimo_x (H, R, P) or None; states (angle (b, H, S), ssm (b, H, P, N), k (b, R, H, N), v (b, H, P)) or None
    (zeros). Returns y (b, R, H, P) in the compute dtype (fp32 or wider) and the new states in that dtype."""
    b, H, P = x.shape
    R, G, N = B.shape[1:]
    S = angles.shape[-1]
    ct = _compute_dtype(x)
    if states is None:
        states = zero_states(b, H, P, N, S, R, device=x.device, dtype=ct)
    theta0, h, k_prev, x_prev = (s.to(ct) for s in states)
    x, dt, adt, trap, angles = x.to(ct), dt.to(ct), adt.to(ct), trap.to(ct), angles.to(ct)
    theta = theta0 + angle_increment(angles, dt)  # (b, H, S)
    rot = theta.unsqueeze(1)  # (b, 1, H, S): every rank turns by the head's angle
    k = rotate(expand_groups(B.to(ct), H) + B_bias.to(ct).transpose(0, 1), rot, pairwise)  # (b, R, H, N)
    q = rotate(expand_groups(C.to(ct), H) + C_bias.to(ct).transpose(0, 1), rot, pairwise)
    mx = None if mimo_x is None else mimo_x.to(ct)
    v, v_prev = rank_values(x, mx), rank_values(x_prev, mx)  # (b, R, H, P)
    alpha = torch.exp(adt)
    beta = alpha * dt * (1 - trap)
    gamma = dt * trap
    u = torch.einsum("brhp,brhn->bhpn", v, k)
    u_prev = torch.einsum("brhp,brhn->bhpn", v_prev, k_prev)
    h = alpha[..., None, None] * h + beta[..., None, None] * u_prev + gamma[..., None, None] * u
    y = torch.einsum("bhpn,brhn->brhp", h, q)
    if D is not None:
        y = y + D.to(ct)[:, None] * v
    return y, (torch.remainder(theta, TWO_PI), h, k, x)


def _split_packed(fn, cu_seqlens, x, dt, adt, trap, B, C, angles, initial_states, **kw):
    """Run fn on each packed sequence of a (1, L, ...) batch; y concatenated, states stacked (nseq, ...)."""
    cu = cu_seqlens.tolist()
    ys, finals = [], []
    for i, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
        init = None if initial_states is None else tuple(t[i:i + 1] for t in initial_states)
        y, fin = fn(x[:, s:e], dt[:, s:e], adt[:, s:e], trap[:, s:e], B[:, s:e], C[:, s:e], angles[:, s:e],
                    initial_states=init, **kw)
        ys.append(y)
        finals.append(fin)
    return torch.cat(ys, dim=1), tuple(torch.cat(parts, dim=0) for parts in zip(*finals))


def _segment_starts(seq_idx: torch.Tensor) -> torch.Tensor:
    """(b, L) bool: True where seq_idx differs from the step before (never at step 0)."""
    starts = torch.zeros(seq_idx.shape, dtype=torch.bool, device=seq_idx.device)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return starts


def mamba3_scan_ref(x, dt, adt, trap, B, C, angles, B_bias, C_bias, D=None, mimo_x=None, initial_states=None,
                    seq_idx=None, cu_seqlens=None, return_final_states=False, pairwise=True):
    """The sequential oracle: ``mamba3_step_ref`` over t, the states restarting where seq_idx changes.

    Shapes in the module docstring. Returns y (b, L, R, H, P) in x's dtype, and with return_final_states the
    final states (angle, ssm, k, v) (one per sequence with cu_seqlens) in the compute dtype."""
    b, L, H, P, R, G, N, S = check_mamba3_inputs(x, dt, adt, trap, B, C, angles, B_bias, C_bias, D, mimo_x,
                                                 initial_states, seq_idx, cu_seqlens)
    kw = dict(B_bias=B_bias, C_bias=C_bias, D=D, mimo_x=mimo_x, pairwise=pairwise)
    if cu_seqlens is not None:
        y, fin = _split_packed(_scan_ref_one, cu_seqlens, x, dt, adt, trap, B, C, angles, initial_states, **kw)
    else:
        y, fin = _scan_ref_one(x, dt, adt, trap, B, C, angles, initial_states=initial_states, seq_idx=seq_idx, **kw)
    y = y.to(x.dtype)
    return (y, fin) if return_final_states else y


def _scan_ref_one(x, dt, adt, trap, B, C, angles, B_bias, C_bias, D, mimo_x, pairwise, initial_states=None,
                  seq_idx=None):
    b, L, H, P = x.shape
    R, G, N = B.shape[2:]
    ct = _compute_dtype(x)
    zeros = zero_states(b, H, P, N, angles.shape[-1], R, device=x.device, dtype=ct)
    states = zeros if initial_states is None else tuple(s.to(ct) for s in initial_states)
    starts = None if seq_idx is None else _segment_starts(seq_idx)
    ys = []
    for t in range(L):
        if starts is not None and t > 0:
            keep = ~starts[:, t]  # (b,)
            states = tuple(torch.where(keep.view(-1, *[1] * (s.dim() - 1)), s, z) for s, z in zip(states, zeros))
        y, states = mamba3_step_ref(x[:, t], dt[:, t], adt[:, t], trap[:, t], B[:, t], C[:, t], angles[:, t],
                                    B_bias, C_bias, D, mimo_x, states, pairwise)
        ys.append(y)
    return torch.stack(ys, dim=1), states


# ----------------------------------------------------------------------------------------------------------
# the chunked form


def mamba3_scan_chunked(x, dt, adt, trap, B, C, angles, B_bias, C_bias, D=None, mimo_x=None, initial_states=None,
                        seq_idx=None, cu_seqlens=None, return_final_states=False, pairwise=True, chunk_size=64):
    """The recurrence in chunks of ``chunk_size`` steps (module docstring): the same results as
    ``mamba3_scan_ref`` up to rounding, in O(L / T) sequential steps; differentiable by autograd in every
    input and initial state. Shapes and returns as ``mamba3_scan_ref``."""
    b, L, H, P, R, G, N, S = check_mamba3_inputs(x, dt, adt, trap, B, C, angles, B_bias, C_bias, D, mimo_x,
                                                 initial_states, seq_idx, cu_seqlens)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    kw = dict(B_bias=B_bias, C_bias=C_bias, D=D, mimo_x=mimo_x, pairwise=pairwise, chunk_size=chunk_size)
    if cu_seqlens is not None:
        y, fin = _split_packed(_scan_chunked_one, cu_seqlens, x, dt, adt, trap, B, C, angles, initial_states, **kw)
    else:
        y, fin = _scan_chunked_one(x, dt, adt, trap, B, C, angles, initial_states=initial_states, seq_idx=seq_idx,
                                   **kw)
    y = y.to(x.dtype)
    return (y, fin) if return_final_states else y


def _scan_chunked_one(x, dt, adt, trap, B, C, angles, B_bias, C_bias, D, mimo_x, pairwise, chunk_size,
                      initial_states=None, seq_idx=None):
    b, L, H, P = x.shape
    R, G, N = B.shape[2:]
    S = angles.shape[-1]
    ct = _compute_dtype(x)
    dev = x.device
    x, dt, adt, trap, angles = x.to(ct), dt.to(ct), adt.to(ct), trap.to(ct), angles.to(ct)
    mx = None if mimo_x is None else mimo_x.to(ct)
    if initial_states is None:
        initial_states = zero_states(b, H, P, N, S, R, device=dev, dtype=ct)
    theta0, h0, k0, x0 = (s.to(ct) for s in initial_states)

    # packed sequences: segment id (b, L) counting the restarts; `first` marks the initial state's sequence
    if seq_idx is None:
        starts = torch.zeros(b, L, dtype=torch.bool, device=dev)
    else:
        starts = _segment_starts(seq_idx)
    seg = torch.cumsum(starts.long(), dim=1)  # (b, L)
    first = (seg == 0).to(ct)  # (b, L)

    # angles: a cumulative sum restarting at every segment start, offset by the initial angle in the first one
    inc = angle_increment(angles, dt)  # (b, L, H, S)
    cum = torch.cumsum(inc, dim=1)
    pos = torch.arange(L, device=dev).expand(b, L)
    start_idx = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), dim=1).values  # (b, L)
    excl = cum - inc
    base = torch.gather(excl, 1, start_idx[:, :, None, None].expand(b, L, H, S))
    theta = cum - base + first[:, :, None, None] * theta0[:, None]  # (b, L, H, S)

    rot = theta.unsqueeze(2)  # (b, L, 1, H, S)
    k = rotate(expand_groups(B.to(ct), H) + B_bias.to(ct).transpose(0, 1), rot, pairwise)  # (b, L, R, H, N)
    q = rotate(expand_groups(C.to(ct), H) + C_bias.to(ct).transpose(0, 1), rot, pairwise)
    v = rank_values(x, mx)  # (b, L, R, H, P)

    # trapezoid weights: gamma_s on the diagonal, e_s = gamma_s + delta_{s+1} below; delta = 0 at restarts
    notstart = (~starts).to(ct)
    gamma = dt * trap  # (b, L, H)
    delta = dt * (1 - trap) * notstart[:, :, None]
    e = gamma + F.pad(delta[:, 1:], (0, 0, 0, 1))  # delta beyond the end: 0 (the final state is the true h)
    a = adt * notstart[:, :, None]  # the decay into a restart is cut by the masks below, not by a

    # initial state with the previous step's trapezoid share: h0 + delta_0 u_{-1}
    u_prev = torch.einsum("brhp,brhn->bhpn", rank_values(x0, mx), k0)
    h_carry = h0 + delta[:, 0, :, None, None] * u_prev  # (b, H, P, N)

    # pad to whole chunks: padded steps decay by 1 and add nothing; they share the last segment
    T = min(chunk_size, L)
    nc = -(-L // T)
    pad = nc * T - L

    def chunks(t, last=False):  # (b, L, ...) -> (b, nc, T, ...); padded with zeros or the last step
        if pad:
            tail = t[:, -1:].expand(b, pad, *t.shape[2:]) if last else t.new_zeros(b, pad, *t.shape[2:])
            t = torch.cat([t, tail], dim=1)
        return t.reshape(b, nc, T, *t.shape[2:])

    qc, kc, vc = chunks(q), chunks(k), chunks(v)  # (b, c, T, R, H, .)
    ac, gc, ec = chunks(a), chunks(gamma), chunks(e)  # (b, c, T, H)
    segc = chunks(seg, last=True)  # (b, c, T)

    acs = torch.cumsum(ac, dim=2)  # (b, c, T, H)
    # intra-chunk weights W[t, s] = exp(acs_t - acs_s) * same segment * (gamma_s if t == s, e_s if t > s)
    diff = acs[:, :, :, None, :] - acs[:, :, None, :, :]  # (b, c, t, s, H)
    tri = torch.tril(torch.ones(T, T, dtype=torch.bool, device=dev))
    same = segc[:, :, :, None] == segc[:, :, None, :]  # (b, c, t, s)
    mask = (tri & same)[..., None]
    decay = torch.exp(torch.where(mask, diff, torch.full_like(diff, float("-inf"))))
    eye = torch.eye(T, dtype=torch.bool, device=dev)[None, None, :, :, None]
    coef = torch.where(eye, gc[:, :, None, :, :], ec[:, :, None, :, :])  # (b, c, t, s, H)
    W = decay * coef
    # two-operand contractions (batched matmuls; a three-operand einsum ran as elementwise products on the CPU)
    scores = torch.einsum("bctrhn,bcsuhn->bchtrsu", qc, kc) * W.permute(0, 1, 4, 2, 3)[:, :, :, :, None, :, None]
    y = torch.einsum("bchtrsu,bcsuhp->bctrhp", scores, vc)

    # chunk states: what each chunk adds to the carry at its end (positions of the end's segment only)
    to_end = torch.exp(acs[:, :, -1:, :] - acs) * (segc == segc[:, :, -1:])[..., None] * ec  # (b, c, T, H)
    local = torch.einsum("bcsrhp,bcsrhn->bchpn", vc * to_end[:, :, :, None, :, None], kc)
    total = torch.exp(acs[:, :, -1, :])  # (b, c, H)
    prev_seg = torch.cat([seg[:, :1], segc[:, :-1, -1]], dim=1)  # (b, c): segment of the carry entering chunk c
    carries = []
    for c in range(nc):
        carries.append(h_carry)
        keep = (prev_seg[:, c] == segc[:, c, -1]).to(ct)[:, None, None, None]
        h_carry = keep * total[:, c, :, None, None] * h_carry + local[:, c]
    carry_in = torch.stack(carries, dim=1)  # (b, c, H, P, N)
    enter = torch.exp(acs) * (segc == prev_seg[:, :, None])[..., None]  # (b, c, T, H)
    y = y + torch.einsum("bchpn,bctrhn->bctrhp", carry_in, qc * enter[:, :, :, None, :, None])
    y = y.reshape(b, nc * T, R, H, P)[:, :L]
    if D is not None:
        y = y + D.to(ct)[:, None] * v
    final = (torch.remainder(theta[:, -1], TWO_PI), h_carry, k[:, -1], x[:, -1])
    return y, final


# ----------------------------------------------------------------------------------------------------------
# dispatch


def mamba3_backend(device: torch.device) -> str:
    """Which implementation runs the scan and the decode step: 'triton' (mambazoo.kernels.mamba3: forward,
    backward and step kernels) on CUDA, 'chunked' (mamba3_scan_chunked / mamba3_step_ref) elsewhere, unless the
    backend's ``mamba3`` choice (MAMBAZOO_MAMBA3=chunked|triton, or ``with backend(mamba3=...)``) names one
    (triton off CUDA runs the Triton interpreter)."""
    return mamba3_impl(device)


def mamba3_scan(x, dt, adt, trap, B, C, angles, B_bias, C_bias, D=None, mimo_x=None, initial_states=None,
                seq_idx=None, cu_seqlens=None, return_final_states=False, pairwise=True, chunk_size=64):
    """The scan through the backend ``mamba3_backend`` picks (seq_idx always runs the chunked reference; the
    kernels take cu_seqlens). Shapes and returns as ``mamba3_scan_ref``; differentiable either way."""
    if mamba3_backend(x.device) == "triton" and seq_idx is None:
        from mambazoo.kernels.mamba3 import mamba3_scan_triton

        return mamba3_scan_triton(x, dt, adt, trap, B, C, angles, B_bias, C_bias, D, mimo_x, initial_states,
                                  cu_seqlens=cu_seqlens, return_final_states=return_final_states,
                                  pairwise=pairwise)
    return mamba3_scan_chunked(x, dt, adt, trap, B, C, angles, B_bias, C_bias, D, mimo_x, initial_states, seq_idx,
                               cu_seqlens, return_final_states, pairwise, chunk_size)


def mamba3_step(x, dt, adt, trap, B, C, angles, B_bias, C_bias, D=None, mimo_x=None, states=None, pairwise=True):
    """One decode step that advances ``states`` (angle, ssm, k, v) IN PLACE; returns y (b, R, H, P) in the
    compute dtype. The kernel (mambazoo.kernels.mamba3.mamba3_step_triton) where ``mamba3_backend`` picks
    'triton', no gradient is recorded and the states are contiguous with fp32 angle / ssm, else
    ``mamba3_step_ref`` and a copy back."""
    tensors = [x, dt, adt, trap, B, C, angles, B_bias, C_bias, D, mimo_x]
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if mamba3_backend(x.device) == "triton" and not needs_grad:
        from mambazoo.kernels.mamba3 import mamba3_step_triton, step_state_fits

        if step_state_fits(states):
            return mamba3_step_triton(x, dt, adt, trap, B, C, angles, B_bias, C_bias, D, mimo_x, states, pairwise)
    y, new = mamba3_step_ref(x, dt, adt, trap, B, C, angles, B_bias, C_bias, D, mimo_x, states, pairwise)
    for dst, src in zip(states, new):
        dst.copy_(src.detach())
    return y
