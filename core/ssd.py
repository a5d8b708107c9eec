"""The SSD layer of Mamba-2 (Gu & Dao, 2024): input checks, two plain-PyTorch references, the one-token
step and the backend choice.

Math, for every batch b, head h (of group g = h // (heads / groups)), head channel p and state index n:

    dt_t  = clamp(softplus(dt_t + dt_bias), *dt_limit)     (softplus only if dt_softplus)
    S_t   = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T       S (heads, headdim, N): one scalar decay per head
    y_t   = S_t C_t + D * x_t
    y_t  *= silu(z_t)                                        (only if z is given)

A sequence boundary of ``seq_idx`` (packed sequences) resets S to zero before the step, so no state leaks
from one sequence into the next; ``initial_states`` belongs to the first sequence of each row.

Layouts follow mamba_ssm's ``mamba_chunk_scan_combined`` so users can swap it in:
x, z (batch, L, heads, headdim); dt (batch, L, heads); A, dt_bias (heads,); B, C (batch, L, groups, N);
D (heads,) or (heads, headdim); initial_states and the final state (batch, heads, headdim, N) fp32;
seq_idx (batch, L) integer; cu_seqlens (n_seq + 1,) integer offsets of packed sequences in a batch of 1.

``ssd_ref`` is the sequential oracle (one step per token, short enough to check by eye).
``ssd_chunked`` computes the same function chunk by chunk: inside a chunk of Q tokens the quadratic
("attention-like") form y = (C B^T o decay) (dt x), across chunks the recurrence on the chunk-end states.
Only decays exp(<= 0) are formed, so it is stable. It is what CPU training uses. ``ssd`` dispatches (see
``ssd_backend``: the one place that chooses between the Triton kernels and the references). ``ssd_step_ref``
advances a state by one token (decoding); ``ssd_step`` dispatches it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mambazoo.core.backend import ssd_impl

__all__ = [
    "check_ssd_inputs",
    "process_dt",
    "seq_idx_from_cu_seqlens",
    "ssd",
    "ssd_backend",
    "ssd_chunked",
    "ssd_ref",
    "ssd_step",
    "ssd_step_ref",
    "check_ssd_step_inputs",
]

INF = float("inf")


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def check_ssd_inputs(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
                     cu_seqlens=None, dt_limit=(0.0, INF)) -> tuple[int, int, int, int, int, int]:
    """Validate the arguments of an SSD call; raise ValueError naming the expected shape.

    Returns (batch, L, heads, headdim, groups, N)."""
    for name, t in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x: expected (batch, L, heads, headdim), got a {x.dim()}-d tensor {_shape(x)}")
    b, L, h, p = x.shape
    if L < 1:
        raise ValueError(f"x: expected at least one token (batch, L >= 1, heads, headdim), got {_shape(x)}")
    if dt.shape != (b, L, h):
        raise ValueError(f"dt: expected (batch, L, heads) = ({b}, {L}, {h}), got {_shape(dt)}")
    if A.shape != (h,):
        raise ValueError(f"A: expected (heads,) = ({h},), got {_shape(A)}")
    if B.dim() != 4 or B.shape[:2] != (b, L):
        raise ValueError(f"B: expected (batch, L, groups, N) = ({b}, {L}, groups, N), got {_shape(B)}")
    g, n = B.shape[2], B.shape[3]
    if C.shape != B.shape:
        raise ValueError(f"C: expected (batch, L, groups, N) = {tuple(B.shape)} like B, got {_shape(C)}")
    if g < 1 or h % g:
        raise ValueError(f"B, C: expected a group count that divides heads = {h}, got groups = {g}")
    if D is not None:
        if not isinstance(D, torch.Tensor) or D.shape not in ((h,), (h, p)):
            raise ValueError(f"D: expected (heads,) = ({h},) or (heads, headdim) = ({h}, {p}), got {_shape(D)}")
    if z is not None and (not isinstance(z, torch.Tensor) or z.shape != x.shape):
        raise ValueError(f"z: expected (batch, L, heads, headdim) = {tuple(x.shape)} like x, got {_shape(z)}")
    if dt_bias is not None and (not isinstance(dt_bias, torch.Tensor) or dt_bias.shape != (h,)):
        raise ValueError(f"dt_bias: expected (heads,) = ({h},), got {_shape(dt_bias)}")
    if initial_states is not None and (not isinstance(initial_states, torch.Tensor)
                                       or initial_states.shape != (b, h, p, n)):
        raise ValueError(f"initial_states: expected (batch, heads, headdim, N) = ({b}, {h}, {p}, {n}), "
                         f"got {_shape(initial_states)}")
    for name, t in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("dt_bias", dt_bias),
                    ("initial_states", initial_states)):
        if t is not None and not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if seq_idx is not None and (not isinstance(seq_idx, torch.Tensor) or seq_idx.shape != (b, L)
                                or seq_idx.is_floating_point()):
        got = f"{seq_idx.dtype} {_shape(seq_idx)}" if isinstance(seq_idx, torch.Tensor) else _shape(seq_idx)
        raise ValueError(f"seq_idx: expected an integer tensor (batch, L) = ({b}, {L}), got {got}")
    if cu_seqlens is not None:
        if seq_idx is not None:
            raise ValueError("cu_seqlens, seq_idx: expected at most one of them, got both")
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
            raise ValueError(f"cu_seqlens: expected a 1-d integer tensor (n_seq + 1,), got {_shape(cu_seqlens)}")
        if b != 1:
            raise ValueError(f"cu_seqlens: expected packed sequences in a batch of 1, got x of batch {b}")
        if cu_seqlens.device.type != "meta":
            c = cu_seqlens.tolist()
            if len(c) < 2 or c[0] != 0 or c[-1] != L or any(u > v for u, v in zip(c, c[1:])):
                raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to L = {L}, got {c}")
    lo, hi = dt_limit
    if not lo <= hi:
        raise ValueError(f"dt_limit: expected (min, max) with min <= max, got {dt_limit}")
    devices = {t.device for t in (x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(str(d) for d in devices)}")
    return b, L, h, p, g, n


def process_dt(dt: torch.Tensor, dt_bias: torch.Tensor | None = None, dt_softplus: bool = False,
               dt_limit: tuple[float, float] = (0.0, INF)) -> torch.Tensor:
    """dt (..., heads) -> clamp(softplus(dt + dt_bias), *dt_limit) in fp32 (softplus only if dt_softplus; the
    clamp only for a limit other than (0, inf), as mamba_ssm)."""
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != (0.0, INF):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def seq_idx_from_cu_seqlens(cu_seqlens: torch.Tensor, L: int) -> torch.Tensor:
    """cu_seqlens (n_seq + 1,) offsets -> seq_idx (1, L) int32: token t belongs to sequence i when
    cu_seqlens[i] <= t < cu_seqlens[i + 1]."""
    t = torch.arange(L, device=cu_seqlens.device)
    return (torch.searchsorted(cu_seqlens[1:].contiguous(), t, right=True)).to(torch.int32)[None]


def _per_head(X: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., groups, N) -> (..., heads, N) fp32: head h reads group h // (heads / groups)."""
    return X.float().repeat_interleave(heads // X.shape[-2], dim=-2)


def _finish(y, x, D, z, out_dtype):
    """y (b, L, h, p) fp32 -> y + D x, gated by silu(z), in out_dtype."""
    if D is not None:
        y = y + x.float() * (D.float()[:, None] if D.dim() == 1 else D.float())
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(out_dtype)


def ssd_ref(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, INF),
            initial_states=None, seq_idx=None, cu_seqlens=None, return_final_states=False):
    """Sequential oracle. x (b, L, h, p), dt (b, L, h), A (h,), B, C (b, L, g, N) -> y (b, L, h, p) in x's dtype
    [, final state (b, h, p, N) fp32]. Differentiable in every floating input. See the module docstring."""
    b, L, h, p, g, n = check_ssd_inputs(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
                                        dt_limit)
    if cu_seqlens is not None:
        seq_idx = seq_idx_from_cu_seqlens(cu_seqlens, L)
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit)
    Bh, Ch, xf, Af = _per_head(B, h), _per_head(C, h), x.float(), A.float()
    S = x.new_zeros(b, h, p, n, dtype=torch.float32) if initial_states is None else initial_states.float()
    ys = []
    for t in range(L):
        a = torch.exp(dt[:, t] * Af)  # (b, h)
        if seq_idx is not None and t > 0:
            a = a * (seq_idx[:, t] == seq_idx[:, t - 1]).float()[:, None]  # a new sequence starts from zero
        S = a[..., None, None] * S + (dt[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", S, Ch[:, t]))
    y = _finish(torch.stack(ys, dim=1), x, D, z, x.dtype)
    return (y, S) if return_final_states else y


def ssd_chunked(x, dt, A, B, C, chunk_size: int = 64, D=None, z=None, dt_bias=None, dt_softplus=False,
                dt_limit=(0.0, INF), initial_states=None, seq_idx=None, cu_seqlens=None, return_final_states=False):
    """Chunked SSD, equal to ``ssd_ref``. Same arguments and returns, plus chunk_size (any positive int; L need
    not be a multiple: the tail is padded with dt = 0, which leaves the state unchanged).

    Per chunk c of Q tokens, with a_cum[i] = sum_{k <= i} dt_k A the in-chunk log decay:
      y_diag[i] = sum_{j <= i, same seq} (C_i . B_j) exp(a_cum[i] - a_cum[j]) dt_j x_j     (quadratic in Q)
      y_off[i]  = exp(a_cum[i]) C_i S_{c-1}            (if token i continues the sequence of the carry)
      S_c       = exp(a_cum[Q-1]) S_{c-1} + sum_j exp(a_cum[Q-1] - a_cum[j]) dt_j x_j B_j^T
    Memory O(b L Q h) for the decay matrices; time O(b L Q h (p + N))."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    b, L, h, p, g, n = check_ssd_inputs(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
                                        dt_limit)
    if cu_seqlens is not None:
        seq_idx = seq_idx_from_cu_seqlens(cu_seqlens, L)
    Q, r = chunk_size, h // g  # r heads per group share B and C: C_i . B_j is formed once per group
    pad = (-L) % Q
    nc = (L + pad) // Q
    dtp = process_dt(dt, dt_bias, dt_softplus, dt_limit)
    xf, Bf, Cf = x.float(), B.float(), C.float()
    if pad:
        dtp = F.pad(dtp, (0, 0, 0, pad))
        xf, Bf, Cf = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (xf, Bf, Cf))
    xc = xf.view(b, nc, Q, g, r, p)
    Bc, Cc = Bf.view(b, nc, Q, g, n), Cf.view(b, nc, Q, g, n)
    dtc = dtp.view(b, nc, Q, g, r)
    a_cum = torch.cumsum(dtc * A.float().view(g, r), dim=2)  # (b, nc, Q, g, r)
    same = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()  # causal pairs (i >= j) ...
    if seq_idx is not None:  # ... of one sequence
        s = seq_idx.long()
        if pad:
            s = torch.cat([s, s[:, -1:].expand(b, pad)], dim=1)
        sc = s.view(b, nc, Q)
        same = (sc[..., :, None] == sc[..., None, :]) & same  # (b, nc, Q_i, Q_j)
    else:
        same = same.expand(b, nc, Q, Q)
    seg = a_cum[:, :, :, None] - a_cum[:, :, None, :]  # (b, nc, Q_i, Q_j, g, r)
    decay = torch.exp(torch.where(same[..., None, None], seg, -INF))
    scores = torch.einsum("bcign,bcjgn->bcijg", Cc, Bc)[..., None] * decay
    y = torch.einsum("bcijgr,bcjgrp->bcigrp", scores, dtc[..., None] * xc)
    # each chunk's own contribution to its end state
    to_end = torch.where(same[:, :, -1, :, None, None], a_cum[:, :, -1:] - a_cum, -INF)  # (b, nc, Q, g, r)
    chunk_states = torch.einsum("bcjgrp,bcjgn->bcgrpn", (torch.exp(to_end) * dtc)[..., None] * xc, Bc)
    # the carry: token i of chunk c sees the previous chunk's end state if it continues that sequence
    carry = torch.exp(a_cum)  # (b, nc, Q, g, r)
    if seq_idx is not None:
        prev = torch.cat([sc[:, :1, 0], sc[:, :-1, -1]], dim=1)  # (b, nc): the sequence of the carried state
        carry = carry * (sc == prev[..., None]).float()[..., None, None]
    S = x.new_zeros(b, h, p, n, dtype=torch.float32) if initial_states is None else initial_states.float()
    S = S.view(b, g, r, p, n)
    before = []
    # unbind once: indexing inside the loop would make autograd write a full-size zero gradient per chunk
    for dec, own in zip(carry[:, :, -1, :, :, None, None].unbind(1), chunk_states.unbind(1)):
        before.append(S)
        S = dec * S + own
    y = y + torch.einsum("bcign,bcgrpn->bcigrp", Cc, torch.stack(before, dim=1)) * carry[..., None]
    S = S.reshape(b, h, p, n)
    y = _finish(y.reshape(b, nc * Q, h, p)[:, :L], x, D, z, x.dtype)
    return (y, S) if return_final_states else y


def ssd_backend(device: torch.device) -> str:
    """Which implementation ``ssd`` uses on ``device``: 'triton' (mambazoo.kernels.ssd) on CUDA, 'chunked'
    elsewhere, unless the backend's ``ssd`` choice (``MAMBAZOO_SSD`` = ref | chunked | triton, or
    ``with mambazoo.core.backend.backend(ssd=...)``) names one (triton on CPU tensors needs TRITON_INTERPRET=1)."""
    return ssd_impl(device)


def ssd(x, dt, A, B, C, chunk_size: int = 256, D=None, z=None, dt_bias=None, dt_softplus=False,
        dt_limit=(0.0, INF), initial_states=None, seq_idx=None, cu_seqlens=None, return_final_states=False):
    """The SSD layer on the backend ``ssd_backend`` picks; arguments and returns as ``ssd_chunked``.

    chunk_size is the model's (the published 256). The result does not depend on it, only the cost does: the
    chunked reference runs chunks of at most 64 tokens (its decay matrices take O(L * chunk) memory), the kernels
    theirs (mambazoo.kernels.ssd.kernel_chunk_size)."""
    kw = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit, initial_states=initial_states,
              seq_idx=seq_idx, cu_seqlens=cu_seqlens, return_final_states=return_final_states)
    backend = ssd_backend(x.device)
    if backend == "ref":
        return ssd_ref(x, dt, A, B, C, **kw)
    if backend == "triton":
        from mambazoo.kernels.ssd import ssd_triton

        return ssd_triton(x, dt, A, B, C, chunk_size=chunk_size, **kw)
    return ssd_chunked(x, dt, A, B, C, chunk_size=min(chunk_size, 64), **kw)


def ssd_step(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, INF)):
    """One token on the backend ``ssd_backend`` picks (the Triton kernel only without autograd: it has no
    backward); arguments and return as ``ssd_step_ref``."""
    if ssd_backend(x.device) == "triton" and not torch.is_grad_enabled() and state.is_contiguous():
        from mambazoo.kernels.ssd import ssd_step_triton

        return ssd_step_triton(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                               dt_limit=dt_limit)
    return ssd_step_ref(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit)


def check_ssd_step_inputs(state, x, dt, A, B, C, D=None, z=None, dt_bias=None):
    """Validate the arguments of a one-token SSD step; raise ValueError naming the expected shape."""
    if not isinstance(state, torch.Tensor) or state.dim() != 4:
        raise ValueError(f"state: expected (batch, heads, headdim, N), got {_shape(state)}")
    if state.dtype != torch.float32:
        raise ValueError(f"state: expected float32, got {state.dtype}")
    b, h, p, n = state.shape
    if not isinstance(x, torch.Tensor) or x.shape != (b, h, p):
        raise ValueError(f"x: expected (batch, heads, headdim) = ({b}, {h}, {p}), got {_shape(x)}")
    if not isinstance(dt, torch.Tensor) or dt.shape != (b, h):
        raise ValueError(f"dt: expected (batch, heads) = ({b}, {h}), got {_shape(dt)}")
    if not isinstance(A, torch.Tensor) or A.shape != (h,):
        raise ValueError(f"A: expected (heads,) = ({h},), got {_shape(A)}")
    for name, t in (("B", B), ("C", C)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[0] != b or t.shape[2] != n or h % t.shape[1]:
            raise ValueError(f"{name}: expected (batch, groups, N) = ({b}, groups dividing {h}, {n}), got {_shape(t)}")
    if D is not None and (not isinstance(D, torch.Tensor) or D.shape not in ((h,), (h, p))):
        raise ValueError(f"D: expected (heads,) = ({h},) or (heads, headdim) = ({h}, {p}), got {_shape(D)}")
    if z is not None and (not isinstance(z, torch.Tensor) or z.shape != (b, h, p)):
        raise ValueError(f"z: expected (batch, heads, headdim) = ({b}, {h}, {p}), got {_shape(z)}")
    if dt_bias is not None and (not isinstance(dt_bias, torch.Tensor) or dt_bias.shape != (h,)):
        raise ValueError(f"dt_bias: expected (heads,) = ({h},), got {_shape(dt_bias)}")


def ssd_step_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, INF)):
    """One token: state (b, h, p, N) fp32 advanced in place; x (b, h, p), dt (b, h), A (h,), B, C (b, g, N),
    z (b, h, p) -> y (b, h, p) in x's dtype. The oracle of the decode kernel."""
    check_ssd_step_inputs(state, x, dt, A, B, C, D, z, dt_bias)
    h = x.shape[1]
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit)
    a = torch.exp(dt * A.float())
    Bh, Ch = _per_head(B, h), _per_head(C, h)
    new = a[..., None, None] * state + (dt[..., None] * x.float())[..., None] * Bh[:, :, None, :]
    state.copy_(new)
    y = torch.einsum("bhpn,bhn->bhp", new, Ch)
    return _finish(y[:, None], x[:, None], D, None if z is None else z[:, None], x.dtype)[:, 0]
