"""Fused Triton kernels for the selective scan; mambazoo.core.scan holds their reference.

    selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, initial_state=None, seq_idx=None)
    selective_scan_bidirectional_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                                        out=None, dt_weight=None)
    selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False)

The one-direction scan and the decode step call ops registered with torch.library (``torch.ops.mambazoo.scan_fwd`` /
``scan_bwd`` / ``state_update``), so torch.compile traces them without graph breaks; the bidirectional scan, while
compiling or recording a gradient, runs as two of those scans.
"""

from __future__ import annotations

import torch

from mambazoo.kernels import _interpret

_interpret.apply()

from mambazoo.kernels._args import check_low_rank_delta, direction_pairs, low_rank_delta, shape_str as _shape
from mambazoo.kernels.scan import ops
from mambazoo.kernels.scan.ops import EagerScan, output_fits, scan_forward, scan_fwd
from mambazoo.kernels.decode.state_update import check_state_update, launch_state_update, state_update

__all__ = ["selective_scan_triton", "selective_scan_bidirectional_triton", "selective_state_update"]


def _check_scan(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx):
    """Minimal boundary checks (mambazoo.core.scan.check_scan_inputs is the full version)."""
    if u.dim() != 3:
        raise ValueError(f"u: expected (batch, dim, L), got {_shape(u)}")
    batch, dim, L = u.shape
    for name, t in (("delta", delta), ("z", z)):
        if t is not None and tuple(t.shape) != (batch, dim, L):
            raise ValueError(f"{name}: expected (batch, dim, L) = ({batch}, {dim}, {L}), got {_shape(t)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A: expected (dim, N) = ({dim}, N), got {_shape(A)}")
    N = A.shape[1]
    for name, X in (("B", B), ("C", C)):
        ok = (X.dim() == 2 and tuple(X.shape) == (dim, N)) or (X.dim() == 3 and tuple(X.shape) == (batch, N, L)) or (
            X.dim() == 4 and X.shape[0] == batch and X.shape[2:] == (N, L) and dim % X.shape[1] == 0)
        if not ok:
            raise ValueError(f"{name}: expected (batch, N, L), (batch, groups, N, L) or (dim, N) with N = {N}, "
                             f"L = {L}, got {_shape(X)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            raise ValueError(f"{name}: expected (dim,) = ({dim},), got {_shape(t)}")
    if initial_state is not None and tuple(initial_state.shape) != (batch, dim, N):
        raise ValueError(f"initial_state: expected (batch, dim, N) = ({batch}, {dim}, {N}), "
                         f"got {_shape(initial_state)}")
    if seq_idx is not None and (tuple(seq_idx.shape) != (batch, L) or seq_idx.is_floating_point()):
        raise ValueError(f"seq_idx: expected an integer (batch, L) = ({batch}, {L}), got {seq_idx.dtype} "
                         f"{_shape(seq_idx)}")


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, initial_state=None, seq_idx=None, reverse=False,
                          average_with=None, average_in_place=False, out=None, dt_weight=None):
    """The selective scan (mambazoo.core.scan_ref.selective_scan_ref's function) as one fused Triton forward and a
    recomputing backward.

    u, delta, z (batch, dim, L); A (dim, N) fp32; B, C (batch, N, L) | (batch, G, N, L) | (dim, N);
    D, delta_bias (dim,); initial_state (batch, dim, N); seq_idx (batch, L) int: the state restarts
    from zero wherever seq_idx changes (packed sequences). reverse=True scans from position L-1 down to 0
    (the result of flipping every input along L, scanning and flipping y back, without the copies).
    average_with (batch, dim, L): return (average_with + y) / 2 instead of y, averaged in the kernel's store;
    with average_in_place, written over average_with (and that tensor returned) where no gradient is recorded
    and average_with has a layout the kernel stores to (a bidirectional mixer's own buffer: one (batch, L, dim)
    less). out (batch, dim, L) in u's dtype, unit stride along dim or L, not overlapping the inputs: y is stored
    there (and out returned) where no gradient is recorded; elsewhere a new tensor is returned.
    dt_weight (dim, R): delta is low-rank dt (batch, R, L) and the scan runs on dt_weight @ dt; the inference kernel
    forms it per tile (R a power of two >= 16, B / C pairs: kernels/scan/infer.py), other calls from a
    (batch, dim, L) product first. Returns y (batch, dim, L) in u's dtype and,
    with return_last_state, the final state (batch, dim, N) fp32; both are differentiable.
    """
    low_rank = dt_weight is not None
    if low_rank:
        check_low_rank_delta(u, delta, dt_weight)
    _check_scan(u, u if low_rank else delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
    if average_with is not None and tuple(average_with.shape) != tuple(u.shape):
        raise ValueError(f"average_with: expected u's shape {_shape(u)}, got {_shape(average_with)}")
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state, average_with, dt_weight)
    # the backward's tile states only where a gradient can flow (inference skips their stores)
    store_states = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    direct = not store_states and not torch.compiler.is_compiling() and not torch.is_grad_enabled()
    if low_rank and not direct:  # autograd or a graph: the (batch, dim, L) delta, then the usual ops
        delta, dt_weight = low_rank_delta(delta, dt_weight), None
    if out is not None and not output_fits(out, u):
        raise ValueError(f"out: expected u's shape {_shape(u)}, dtype {u.dtype} and device {u.device} with a unit "
                         f"stride along dim or L, got {out.dtype} {_shape(out)} strides {tuple(out.stride())}")
    target = out if out is not None else average_with if average_in_place else None
    target = target if target is not None and output_fits(target, u) else None
    if direct and (target is not None or dt_weight is not None):
        y, last, _ = scan_forward(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, bool(delta_softplus),
                                  bool(reverse), average_with, False, y_out=target, dt_weight=dt_weight)
        return (y, last) if return_last_state else y
    # eager: an autograd.Function around the same launchers (the custom-op dispatcher costs host time per call)
    op = scan_fwd if torch.compiler.is_compiling() else EagerScan.apply
    y, last, _ = op(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, bool(delta_softplus), bool(reverse),
                    average_with, store_states)
    return (y, last) if return_last_state else y


def selective_scan_bidirectional_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                                        out=None, dt_weight=None, both_in_one=True):
    """A bidirectional mixer's two scans and their mean: (y_fwd + y_bwd) / 2 (batch, dim, L) in u's dtype.

    u, delta, A, B, C, D, delta_bias, dt_weight: (forward, backward) pairs, each what selective_scan_triton takes for
    one direction (D, delta_bias, dt_weight may be None for both); the backward direction scans from position L - 1
    down to 0 (reverse=True). z (batch, dim, L) or None gates both (silu(z) y, per direction as selective_scan does).
    out as selective_scan_triton's. Inference (no gradient recorded, not compiling) on inputs the inference kernel
    takes per direction, with both directions laid out alike (the Vim mixer's B / C pair projections): both scans in
    two launches of twice one direction's programs (kernels/scan/infer.py, scan_bidir_infer_kernel);
    both_in_one=False turns that off (the backend's scan_bidir, for A/B timing). Elsewhere: the forward scan, then the
    backward one averaging into it (differentiable)."""
    u, delta, A, B, C, D, delta_bias, dt_weight = direction_pairs(u=u, delta=delta, A=A, B=B, C=C, D=D,
                                                                  delta_bias=delta_bias, dt_weight=dt_weight)
    for k in range(2):
        if dt_weight[k] is not None:
            check_low_rank_delta(u[k], delta[k], dt_weight[k])
        _check_scan(u[k], u[k] if dt_weight[k] is not None else delta[k], A[k], B[k], C[k], D[k], z,
                    delta_bias[k], None, None)
    direct = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
    if out is not None and not output_fits(out, u[0]):
        raise ValueError(f"out: expected u's shape {_shape(u[0])}, dtype {u[0].dtype} and device {u[0].device} with a "
                         f"unit stride along dim or L, got {out.dtype} {_shape(out)} strides {tuple(out.stride())}")
    if direct and both_in_one:
        y = ops.scan_bidirectional_infer(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), dt_weight, out)
        if y is not None:
            return y
    y = selective_scan_triton(u[0], delta[0], A[0], B[0], C[0], D[0], z, delta_bias[0], delta_softplus, out=out,
                              dt_weight=dt_weight[0])
    return selective_scan_triton(u[1], delta[1], A[1], B[1], C[1], D[1], z, delta_bias[1], delta_softplus,
                                 reverse=True, average_with=y, average_in_place=True, dt_weight=dt_weight[1])


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One fused decode step (mambazoo.core.scan_ref.selective_state_update_ref's function): updates ``state``
    (batch, dim, N) in place in its own dtype (fp32, fp16 or bf16; the step runs in fp32) and returns y (batch, dim)
    in x's dtype. x, dt, z (batch, dim); A (dim, N); B, C (batch, N) | (batch, G, N); D, dt_bias (dim,)."""
    check_state_update(state, x, dt, A, B, C, D, z, dt_bias)
    if torch.compiler.is_compiling():
        return state_update(state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus))
    # eager decoding is launch-bound: skip the custom-op dispatcher (tens of microseconds a call)
    return launch_state_update(state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus))
