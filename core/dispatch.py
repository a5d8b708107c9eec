"""Every op a model runs, routed to its Triton kernel or its PyTorch reference by mambazoo.core.backend.

One function per op; each asks the backend once and calls either the kernel (imported on first use: Triton is
optional) or the reference in core. Models call these and never read flags or import mambazoo.kernels.

    selective_scan / selective_scan_bidirectional    full-sequence scans (kernels/scan/ | scan_ref, scan chunked)
    causal_conv1d                                    the mixer's conv1d + SiLU (kernels/conv1d/ | conv_ref)
    conv_step / ssm_step / add_rms_norm              the decode step (kernels/decode/ | core decode, scan_ref)
    patch_tokens                                     Vim's patch + position embedding (kernels/patch_embed/)
"""

from __future__ import annotations

import torch

from mambazoo.core.backend import conv_impl, current, fused_decode, scan_impl
from mambazoo.core.conv_ref import causal_conv1d_ref
from mambazoo.core.decode import conv_step_ref
from mambazoo.core.scan import selective_scan_chunked
from mambazoo.core.scan_ref import (
    _shape,
    check_low_rank_delta,
    check_scan_inputs,
    direction_pairs,
    low_rank_delta,
    selective_scan_ref,
    selective_state_update_ref,
)

__all__ = ["selective_scan", "selective_scan_bidirectional", "scan_backend", "causal_conv1d", "conv_step",
           "ssm_step", "add_rms_norm", "fused_decode_enabled", "patch_tokens", "patch_tokens_fit"]

fused_decode_enabled = fused_decode


def scan_backend(device: torch.device) -> str:
    """Which implementation ``selective_scan`` uses on ``device``: 'triton', 'chunked' or 'ref' (backend.scan_impl)."""
    return scan_impl(device)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, initial_state=None, seq_idx=None, reverse=False, average_with=None,
                   average_in_place=False, out=None, dt_weight=None):
    """The selective scan: the Triton kernel on CUDA, the chunked reference elsewhere (backend.scan_impl).

    Shapes as in ``selective_scan_ref`` (seq_idx (batch, L) int packs several sequences in one row).
    reverse=True scans from position L-1 down to 0: the same as flipping u, delta, z, B, C and seq_idx
    along L, scanning, and flipping y back (the kernel does it without the copies; the last state is
    then the state after position 0). average_with (batch, dim, L): y is returned as (average_with + y) / 2
    (a bidirectional mixer's mean of its two directions; the kernel does it as it stores y).
    average_in_place=True lets the result overwrite average_with (returned) where no gradient is recorded
    (inference: one activation-sized buffer less); elsewhere it is ignored. out (batch, dim, L) in u's dtype, not
    overlapping the inputs: y is stored there (and out returned) where no gradient is recorded.
    dt_weight (dim, R): delta is given low-rank, as dt (batch, R, L), and the scan runs on dt_weight @ dt (the
    Triton inference kernel forms it tile by tile: no (batch, dim, L) delta is written; elsewhere it is formed first).
    ``with backend(scan='ref')`` (or MAMBAZOO_SCAN=ref) forces the sequential oracle.
    """
    backend = scan_impl(u.device)
    if dt_weight is not None:
        check_low_rank_delta(u, delta, dt_weight)
        if backend != "triton":
            delta, dt_weight = low_rank_delta(delta, dt_weight), None
    if backend == "triton":
        check_scan_inputs(u, delta if dt_weight is None else u, A, B, C, D, z, delta_bias, initial_state, seq_idx)
        from mambazoo.kernels import selective_scan_triton

        return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                     initial_state, seq_idx, reverse, average_with, average_in_place, out,
                                     dt_weight=dt_weight)
    if average_with is not None and tuple(average_with.shape) != tuple(u.shape):  # (kernels checks its own)
        raise ValueError(f"average_with: expected u's shape {_shape(u)}, got {_shape(average_with)}")
    if out is not None and (out.shape != u.shape or out.dtype != u.dtype or out.device != u.device):
        raise ValueError(f"out: expected u's shape {_shape(u)}, dtype {u.dtype} and device {u.device}, got "
                         f"{out.dtype} {_shape(out)} on {out.device}")
    fn = selective_scan_ref if backend == "ref" else selective_scan_chunked
    if not reverse:
        out_ = fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state, seq_idx)
    else:
        check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
        flip = lambda t: t.flip(-1) if t is not None and t.dim() > 2 else t  # noqa: E731  ((d, N) B/C stay)
        out_ = fn(flip(u), flip(delta), A, flip(B), flip(C), D, flip(z), delta_bias, delta_softplus,
                  return_last_state, initial_state, seq_idx.flip(-1) if seq_idx is not None else None)
        out_ = (out_[0].flip(-1), out_[1]) if return_last_state else out_.flip(-1)
    res, y = (out_, out_[0]) if return_last_state else (out_, out_)
    if average_with is not None:
        if average_in_place and not torch.is_grad_enabled() and average_with.dtype == y.dtype:
            y = average_with.lerp_(y, 0.5)
        else:
            y = torch.lerp(average_with.to(y.dtype), y, 0.5)
    if out is not None and y is not out and not torch.is_grad_enabled():
        y = out.copy_(y)
    return (y, res[1]) if return_last_state else y



def selective_scan_bidirectional(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, out=None,
                                 dt_weight=None):
    """A bidirectional mixer's two scans and their mean, (y_fwd + y_bwd) / 2 (batch, dim, L) in u's dtype.

    u, delta, A, B, C, D, delta_bias, dt_weight: (forward, backward) pairs of selective_scan's arguments (D,
    delta_bias, dt_weight may be None for both); the backward direction scans from position L - 1 down to 0
    (selective_scan's reverse=True). z (batch, dim, L) or None gates both directions. out as selective_scan's.
    On the Triton backend, inference runs both directions together where the kernel takes them
    (mambazoo.kernels.selective_scan_bidirectional_triton); elsewhere the forward scan, then the backward one
    averaging into it, as two selective_scan calls (differentiable)."""
    args = direction_pairs(u=u, delta=delta, A=A, B=B, C=C, D=D, delta_bias=delta_bias, dt_weight=dt_weight)
    if scan_impl(args[0][0].device) == "triton":
        from mambazoo.kernels import selective_scan_bidirectional_triton

        return selective_scan_bidirectional_triton(*args[:5], args[5], z, args[6], delta_softplus, out, args[7],
                                                   both_in_one=current().scan_bidir)
    (uf, ub), (df, db), (Af, Ab), (Bf, Bb), (Cf, Cb), (Df, Db), (bf, bb), (wf, wb) = args
    y = selective_scan(uf, df, Af, Bf, Cf, Df, z, bf, delta_softplus, out=out, dt_weight=wf)
    return selective_scan(ub, db, Ab, Bb, Cb, Db, z, bb, delta_softplus, reverse=True, average_with=y,
                          average_in_place=True, dt_weight=wb)



def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, reverse: bool = False):
    """SiLU of the mixer's causal depthwise conv1d from a zero state: x (batch, d, L) (any strides), weight (d, 1, W)
    (nn.Conv1d's) or (d, W), bias (d,) or None -> (batch, d, L). reverse=True: the causal conv of the reversed
    sequence, read in place. The Triton kernel (widths <= 4) where backend.conv_impl picks it, else PyTorch's."""
    if weight.shape[-1] <= 4 and conv_impl(x.device) == "triton":
        from mambazoo.kernels.conv1d import causal_conv1d as kernel

        return kernel(x, weight, bias, silu=True, reverse=reverse)
    return causal_conv1d_ref(x, weight, bias, silu=True, reverse=reverse)


def conv_step(conv_state: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              fused: bool) -> torch.Tensor:
    """One decode step of the mixer's conv1d + SiLU: conv_state (batch, d, W) shifted in place with x (batch, d)
    appended; returns (batch, d) in x's dtype. fused (``fused_step``'s answer): one Triton kernel."""
    if fused:
        from mambazoo.kernels.decode import conv_state_update

        return conv_state_update(conv_state, x, weight, bias)
    return conv_step_ref(conv_state, x, weight, bias)


def fused_step(ssm_state: torch.Tensor) -> bool:
    """Whether a mixer's decode step with this (batch, d, N) ssm state runs the fused kernels: backend.fused_decode
    on its device and a contiguous state (what allocate_state makes)."""
    return fused_decode(ssm_state.device) and ssm_state.is_contiguous()


def ssm_step(ssm_state, x, delta, A_log, B, C, D, z, dt_bias, fused: bool) -> torch.Tensor:
    """One decode step of the selective SSM with Mamba's parameters as stored: ssm_state (batch, d, N) updated in
    place; x, delta, z (batch, d); A_log (d, N); B, C (batch, N); D, dt_bias (d,); softplus(delta + dt_bias) as dt.
    Returns y (batch, d) in x's dtype. fused: one Triton kernel taking A_log, D and dt_bias as they are (no per-step
    cast or exp kernels); else the Triton step (scan 'triton') or the reference, from fp32 constants."""
    if fused:
        from mambazoo.kernels.decode.state_update import launch_state_update

        return launch_state_update(ssm_state, x, delta, A_log, B, C, D, z, dt_bias, True, A_is_log=True)
    A = -torch.exp(A_log.float())
    if scan_impl(x.device) == "triton":
        from mambazoo.kernels import selective_state_update as update
    else:
        update = selective_state_update_ref
    return update(ssm_state, x, delta, A, B, C, D=D.float(), z=z, dt_bias=dt_bias.float(), dt_softplus=True)


def add_rms_norm(x, residual, weight, eps: float = 1e-5, out_dtype=None, **kw):
    """The fused residual add + RMSNorm kernel (kernels/decode/ops.py; oracle core.decode.add_rms_norm_ref):
    residual += x in fp32 (a new residual when None), returns (RMSNorm(residual) in out_dtype, residual). x, residual
    (rows, dim); weight (dim,). Callers take this path where fused_decode_enabled(device) holds."""
    from mambazoo.kernels.decode import add_rms_norm as kernel

    return kernel(x, residual, weight, eps, out_dtype=out_dtype, **kw)


def patch_tokens_fit(patch_size, stride, dim: int) -> bool:
    """Whether the fused patch-embedding kernel takes this patch shape (kernels/patch_embed/)."""
    from mambazoo.kernels.patch_embed import patch_tokens_fit as fit

    return fit(patch_size, stride, dim)


def fused_patch(x: torch.Tensor) -> bool:
    """Whether Vim's patch + position embedding may run as one kernel for image x on the fused inference path
    (the caller's fused_decode_enabled): backend.fused_patch, no autograd, under half-precision autocast."""
    return (current().fused_patch and not torch.is_grad_enabled() and torch.is_autocast_enabled(x.device.type)
            and torch.get_autocast_dtype(x.device.type) in (torch.bfloat16, torch.float16))


def patch_tokens(x, w_t, bias, pos, patch_size, mid):
    """Image x (batch, C, H, W) -> tokens (batch, 1 + patches, dim) with the position embedding added, row ``mid``
    left for the class token (kernels/patch_embed/ops.py's patch_tokens)."""
    from mambazoo.kernels.patch_embed import patch_tokens as kernel

    return kernel(x, w_t, bias, pos, patch_size, mid)
