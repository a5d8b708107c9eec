"""The chunked reference of the selective scan (what CPU training runs) and, for existing imports, the names that
moved: the oracle and input checks to mambazoo.core.scan_ref, the dispatcher to mambazoo.core.dispatch.

``selective_scan_chunked`` computes ``selective_scan_ref``'s function chunk by chunk (exact, stable: only decays
exp(<= 0) are ever formed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mambazoo.core.scan_ref import (  # noqa: F401  (re-exported)
    ScanShape,
    _bc_per_channel,
    _discretize,
    _finish,
    _segment_starts,
    _shape,
    check_low_rank_delta,
    check_scan_inputs,
    check_state_update_inputs,
    direction_pairs,
    low_rank_delta,
    low_rank_dtype,
    selective_scan_ref,
    selective_state_update_ref,
)

__all__ = [
    "ScanShape",
    "check_scan_inputs",
    "selective_scan_ref",
    "selective_scan_chunked",
    "selective_state_update_ref",
    "check_state_update_inputs",
]

_DISPATCH = ("selective_scan", "selective_scan_bidirectional", "scan_backend")


def __getattr__(name):
    """selective_scan, selective_scan_bidirectional and scan_backend live in mambazoo.core.dispatch (which imports
    this module: looked up on first use, not at import)."""
    if name in _DISPATCH:
        from mambazoo.core import dispatch

        return getattr(dispatch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _LinearRecurrence(torch.autograd.Function):
    """h_t = a_t * h_{t-1} + x_t along axis 0 from h_{-1} = h0, written in place into one buffer.

    a, x (T, ...), h0 (...) -> h (T, ...). The backward is the reverse recurrence
    g_t = dh_t + a_{t+1} g_{t+1}, with dx = g, da = g * h_{t-1}, dh0 = a_0 g_0: one fused op per step
    each way and no per-step autograd nodes."""

    @staticmethod
    def forward(ctx, a, x, h0):
        h = torch.empty_like(x)
        prev = h0
        for t in range(x.shape[0]):
            prev = torch.addcmul(x[t], a[t], prev, out=h[t])
        ctx.save_for_backward(a, h, h0)
        return h

    @staticmethod
    def backward(ctx, dh):
        a, h, h0 = ctx.saved_tensors
        g = torch.empty_like(dh)
        nxt = g[-1].copy_(dh[-1])
        for t in range(dh.shape[0] - 2, -1, -1):
            nxt = torch.addcmul(dh[t], a[t + 1], nxt, out=g[t])
        h_prev = torch.cat([h0[None], h[:-1]])
        return g * h_prev, g, a[0] * g[0]


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False, initial_state=None, seq_idx=None, chunk_size=None):
    """Chunked reference: same contract and result as ``selective_scan_ref``, for CPU training.

    The sequence is cut into nc chunks of T steps (default T ~ sqrt(L)). All chunks are scanned at
    once from a zero state (T fused steps over (batch, dim, nc, N) slices), the decay products inside
    each chunk are exp(cumsum(dt*A)) with every exponent <= 0 (stable for any step size), the nc chunk
    carries are chained, and h = scan + decay * carry folds them back in: T + nc Python steps
    instead of L, the same arithmetic as the oracle up to rounding. With seq_idx, the decay into the
    first step of each packed sequence is zero (exp(-inf)), so no state crosses the boundary.
    """
    s = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
    batch, dim, L, N = s.batch, s.dim, s.length, s.d_state
    if chunk_size is None:
        chunk_size = max(8, min(256, round(L ** 0.5)))
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    dt, uf, Bc = _discretize(u, delta, A, B, D, z, delta_bias, delta_softplus, s)
    Cc = _bc_per_channel(C, s.c_mode, s.batch, s.dim)
    h0 = initial_state.float() if initial_state is not None else uf.new_zeros(batch, dim, N)
    if L == 0:
        y = _finish(uf.new_zeros(batch, dim, 0), u, D, z, u.dtype)
        return (y, h0) if return_last_state else y
    T = min(chunk_size, L)
    nc = -(-L // T)
    pad = nc * T - L

    def chunked(t, value=0.0):  # (b, d|1, L, N) -> (T, b, d|1, nc, N), padded steps keep the state
        t = F.pad(t, (0, 0, 0, pad), value=value) if pad else t
        return t.reshape(t.shape[0], t.shape[1], nc, T, N).permute(3, 0, 1, 2, 4)

    dtA = dt[..., None] * A.float()[None, :, None, :]  # (b, d, L, N), <= 0
    if seq_idx is not None:
        dtA = dtA.masked_fill(_segment_starts(seq_idx, L)[:, None, :, None], float("-inf"))
    log_a = chunked(dtA).contiguous()  # (T, b, d, nc, N)
    x = chunked(dt[..., None] * Bc * uf[..., None]).contiguous()
    h_local = _LinearRecurrence.apply(torch.exp(log_a), x, x.new_zeros(x.shape[1:]))
    decay = torch.exp(torch.cumsum(log_a, dim=0))  # product of a from the chunk start to t, in [0, 1]
    carries = [h0]  # the state entering each chunk
    for h_end, a_end in zip(h_local[-1].unbind(2), decay[-1].unbind(2)):
        carries.append(torch.addcmul(h_end, a_end, carries[-1]))
    h_in = torch.stack(carries[:-1], dim=2)  # (b, d, nc, N)
    h = torch.addcmul(h_local, decay, h_in[None])
    Cs = Cc.expand(-1, -1, L, -1) if Cc.shape[2] == 1 else Cc
    y = (h * chunked(Cs)).sum(-1)  # (T, b, d, nc)
    y = y.permute(1, 2, 3, 0).reshape(batch, dim, nc * T)[:, :, :L]
    y = _finish(y, u, D, z, u.dtype)
    return (y, carries[-1]) if return_last_state else y

