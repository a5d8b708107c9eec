"""The Mamba mixer's inference fast paths, beside mambazoo.core.dispatch: what runs instead of the plain mixer when
no gradient is recorded, and the weight caches they read. Each is a speed choice with a backend switch
(mambazoo.core.backend); the values equal the plain path's up to rounding (tests/core/test_mamba.py,
tests/kernels/test_conv1d.py). Figures: docs/kernel_notes.md.

    folded_ssm_inputs(direction, x)     dt_proj folded into x_proj: one GEMM (backend fold_dt)
    bidirectional_forward(mixer, x)     Vision Mamba's mixer at inference on the Triton conv: both directions'
                                        convs in one kernel (conv_pair), x_proj to B / C pairs + low-rank dt with
                                        dt_proj inside the scan (low_rank_dt, bc_fp32), both scans in one kernel
                                        (scan_bidir), the gate inside out_proj's kernel (gate_out_proj)
    cached(module, name, build, tensors)   values derived from weights, kept until the weights change
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mambazoo.core.backend import conv_impl, current
from mambazoo.core.dispatch import selective_scan_bidirectional

__all__ = ["FOLD_DT_MAX_DIM", "bidirectional_forward", "cached", "folded_ssm_inputs", "low_rank_weights",
           "pair_projection", "projected_inputs"]

# The fold trades dt_proj's (tokens, d_inner) write and read for d_inner^2 more multiply-adds per token: free while
# the folded GEMM stays memory bound (about d_inner / 2 FLOPs per byte, far below a GPU's bf16 ridge for the
# widths below). Decoding never folds.
FOLD_DT_MAX_DIM = 512


def cached(module, name: str, build, tensors, extra=()):
    """build(*tensors), kept in attribute ``name`` of ``module`` until one of the tensors changes (version, storage,
    dtype or device) or ``extra`` does. Not cached while autograd records (the result must stay in the graph) or
    under torch.compile."""
    # inference tensors (weights made under torch.inference_mode) have no version counter: no cache then
    cache = (not torch.compiler.is_compiling() and not any(t.is_inference() for t in tensors)
             and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))
    if cache:
        key = (tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in tensors), extra)
        hit = getattr(module, name, None)
        if hit is not None and hit[0] == key:
            return hit[1]
    value = build(*tensors)
    if cache:
        setattr(module, name, (key, value))
    return value


def _projection_weights(direction):
    return direction.x_proj.weight, direction.dt_proj.weight


def _bc_rows(direction, wx: torch.Tensor) -> torch.Tensor:
    """x_proj's B and C rows interleaved: B_0, C_0, B_1, C_1, ... (2 N, d_inner)."""
    r, n = direction.dt_rank, direction.d_state
    return torch.stack([wx[r:r + n], wx[r + n:]], dim=1).reshape(2 * n, -1)


def folded_ssm_inputs(direction, x: torch.Tensor):
    """direction.ssm_inputs(x) as one GEMM, or None where the fold does not apply (autograd on, inner norms, d_inner >
    FOLD_DT_MAX_DIM, backend fold_dt off). x (batch, L, d_inner) -> delta (batch, L, d_inner), B, C (batch, L, N):
    delta = x (W_dt W_x,dt)^T; B and C are views of alternating columns of the output (strides 2 along N), which the
    scan reads in pairs."""
    d_inner = direction.dt_proj.weight.shape[0]
    if direction.inner_norm or d_inner > FOLD_DT_MAX_DIM or torch.is_grad_enabled() or not current().fold_dt:
        return None
    out = F.linear(x, _folded_weight(direction))
    return out[..., :d_inner], out[..., d_inner::2], out[..., d_inner + 1::2]


def _folded_weight(direction) -> torch.Tensor:
    """cat(W_dt W_x[:dt_rank], rows of B and C alternating): (d_inner + 2 N, d_inner), the product taken in fp32.
    One GEMM of the token stream instead of two (x_proj's output and dt_proj's (b, L, d_inner) result are memory
    bound); B_n and C_n side by side let the scan load both with one 4-byte read (mambazoo.kernels.scan.ops.bc_pairs)
    and skip their fp32 copies. Cached against the weights' versions."""
    def build(wx, wdt):
        return torch.cat([(wdt.float() @ wx[:direction.dt_rank].float()).to(wx.dtype), _bc_rows(direction, wx)])

    return cached(direction, "_folded", build, _projection_weights(direction))


def low_rank_weights(direction, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(projection (2 N + R', d_inner), dt weight (d_inner, R')): x_proj's rows as B_0, C_0, B_1, C_1, ... then its R
    dt rows, zero rows up to R' = max(16, next power of two >= R); dt_proj's weight with R' - R zero columns. The
    projection's output is [B/C pairs | low-rank dt], which the inference scan reads as it is (selective_scan's
    dt_weight: delta = W_dt dt per tile, never stored). In ``dtype`` when given (the compute dtype: no cast per call
    under autocast). Cached against the weights' versions."""
    def build(wx, wdt):
        r = direction.dt_rank
        rp = max(16, 1 << (r - 1).bit_length())
        proj = torch.cat([_bc_rows(direction, wx), wx[:r], wx.new_zeros(rp - r, wx.shape[1])])
        w = torch.cat([wdt, wdt.new_zeros(wdt.shape[0], rp - r)], dim=1)
        return (proj.to(dtype), w.to(dtype)) if dtype is not None else (proj, w)

    return cached(direction, "_low_rank", build, _projection_weights(direction), extra=dtype)


def projected_inputs(direction, proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B, C (batch, N, L) and low-rank dt (batch, R', L) as views of a projection by low_rank_weights()[0]:
    proj (batch, L, 2 N + R') (x's dtype or fp32: pair_projection), B / C in interleaved pairs."""
    n = direction.d_state
    return (proj[..., 0:2 * n:2].transpose(1, 2), proj[..., 1:2 * n:2].transpose(1, 2),
            proj[..., 2 * n:].transpose(1, 2))


def pair_projection(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (batch, d_inner, L), a view of a (batch, L, d_inner) buffer, projected by low_rank_weights()[0]: (batch, L,
    2 N + R') [B/C pairs | low-rank dt], in fp32 from half-precision operands (cuBLAS's fp32 output on CUDA; the same
    fp32 sums elsewhere): the scan then reads each (B, C) pair as one 8-byte word with nothing to unpack. Backend
    bc_fp32 off: the projection in x's dtype (A/B timing)."""
    rows = x.transpose(1, 2)
    if not current().bc_fp32:
        return F.linear(rows, weight)
    if x.is_cuda:
        flat = rows.reshape(-1, rows.shape[-1])
        return torch.mm(flat, weight.t(), out_dtype=torch.float32).view(*rows.shape[:-1], weight.shape[0])
    return F.linear(rows.float(), weight.float())


def _pair_conv(mixer, device: torch.device) -> bool:
    """The bidirectional full-sequence path without autograd on the Triton conv (widths <= 4): one conv kernel for
    both directions (the (batch, L, d_inner) input read once instead of twice per layer). Backend conv_pair."""
    f, b = mixer.fwd.conv1d, mixer.bwd.conv1d
    return (not torch.is_grad_enabled() and not torch.compiler.is_compiling() and f.weight.shape[-1] <= 4
            and (f.bias is None) == (b.bias is None) and current().conv_pair and conv_impl(device) == "triton")


def _low_rank_dt(mixer, xs: torch.Tensor) -> bool:
    """On the pair-conv path, x_proj as a GEMM to [B/C pairs | low-rank dt] (2 N + R' columns) and dt_proj inside the
    scan instead of the folded GEMM's (b, L, d_inner) delta, written and read back per direction. Selective S6
    without inner norms, in half precision (the scan reads B / C as bf16 pairs). Backend low_rank_dt."""
    return (mixer.selective and not mixer.fwd.inner_norm and xs.dtype in (torch.bfloat16, torch.float16)
            and current().low_rank_dt)


def _gate_in_out_proj(mixer, x: torch.Tensor) -> bool:
    """The gate in out_proj's kernel (kernels/gated_proj/): in_proj makes only xs, the scans store y ungated (both
    directions share z, so silu(z) factors out of their mean), and out_proj forms z from the mixer's input rows on
    chip. Half-precision input (the autocast dtype) on the low-rank path. Backend gate_out_proj."""
    from mambazoo.kernels.gated_proj import gated_out_proj_fits

    return (x.dtype in (torch.bfloat16, torch.float16) and _low_rank_dt(mixer, x)
            and gated_out_proj_fits(mixer.d_model, mixer.d_inner) and current().gate_out_proj)


def bidirectional_forward(mixer, x: torch.Tensor) -> torch.Tensor | None:
    """A bidirectional mixer's forward at inference on the fast paths: x (batch, L, d_model) -> (batch, L, d_model),
    or None where they do not apply (autograd on, compiling, the PyTorch conv: the mixer's plain path runs)."""
    if not _pair_conv(mixer, x.device):
        return None
    if _gate_in_out_proj(mixer, x):
        return _forward_gated(mixer, x)
    from mambazoo.kernels.conv1d import causal_conv1d_pair

    xs, z = mixer.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # (batch, d_inner, L) views of (batch, L, 2 d_inner)
    f, b = mixer.fwd.conv1d, mixer.bwd.conv1d
    xf, xb = causal_conv1d_pair(xs, f.weight, f.bias, b.weight, b.bias, silu=True)
    if _low_rank_dt(mixer, xs):
        return mixer.out_proj(_scan_projected(mixer, xf, xb, z, out=xs).transpose(1, 2))
    y = mixer.fwd.scan(xf, z, out=xs)  # xs is read no more: y (then the average) takes its memory
    del xf
    y = mixer.bwd.scan(xb, z, reverse=True, average_with=y)
    return mixer.out_proj(y.transpose(1, 2))


def _scan_projected(mixer, xf: torch.Tensor, xb: torch.Tensor, z: torch.Tensor | None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Both directions' scans on the low-rank path: xf, xb (batch, d_inner, L) the two convs' outputs, each projected
    to [B/C pairs | low-rank dt] (pair_projection) with dt_proj left to the scan; returns their mean (batch, d_inner,
    L) (gated by z unless None), stored into out when given (selective_scan_bidirectional: both directions in the
    same launches on CUDA)."""
    fwd, bwd = mixer.fwd, mixer.bwd
    (pf, wf), (pb, wb) = low_rank_weights(fwd, xf.dtype), low_rank_weights(bwd, xf.dtype)
    (Bf, Cf, dtf), (Bb, Cb, dtb) = (projected_inputs(fwd, pair_projection(xf, pf)),
                                    projected_inputs(bwd, pair_projection(xb, pb)))
    (Af, Df, bf), (Ab, Db, bb) = fwd.scan_constants(), bwd.scan_constants()
    return selective_scan_bidirectional((xf, xb), (dtf, dtb), (Af, Ab), (Bf, Bb), (Cf, Cb), (Df, Db), z=z,
                                        delta_bias=(bf, bb), delta_softplus=True, out=out, dt_weight=(wf, wb))


def _gate_weights(mixer, dtype: torch.dtype):
    """(in_proj's x rows, their bias, its z rows, their bias, out_proj's weight, its bias) in ``dtype`` (biases None
    where absent), cached without autograd."""
    d = mixer.d_inner
    b_in, b_out = mixer.in_proj.bias, mixer.out_proj.bias

    def build(w_in, w_out, *_biases):  # the biases are in the key; read from the modules
        w_in = w_in.to(dtype)
        bi = b_in.to(dtype) if b_in is not None else None
        return (w_in[:d], bi[:d] if bi is not None else None, w_in[d:], bi[d:] if bi is not None else None,
                w_out.to(dtype), b_out.to(dtype) if b_out is not None else None)

    tensors = (mixer.in_proj.weight, mixer.out_proj.weight) + tuple(b for b in (b_in, b_out) if b is not None)
    return cached(mixer, "_gate", build, tensors, extra=dtype)


def _forward_gated(mixer, x: torch.Tensor) -> torch.Tensor:
    """bidirectional_forward with the gate in out_proj's kernel: x (batch, L, d_model) half precision ->
    (batch, L, d_model)."""
    from mambazoo.kernels.conv1d import causal_conv1d_pair
    from mambazoo.kernels.gated_proj import gated_out_proj

    batch, L, _ = x.shape
    wx, bx, wz, bz, wo, bo = _gate_weights(mixer, x.dtype)
    xs = F.linear(x, wx, bx).transpose(1, 2)  # (batch, d_inner, L) in (batch, L, d_inner) memory
    f, b = mixer.fwd.conv1d, mixer.bwd.conv1d
    xf, xb = causal_conv1d_pair(xs, f.weight, f.bias, b.weight, b.bias, silu=True)
    y = _scan_projected(mixer, xf, xb, None, out=xs)  # ungated, into xs's memory
    rows = y.transpose(1, 2).reshape(batch * L, mixer.d_inner)
    return gated_out_proj(rows, x.reshape(batch * L, mixer.d_model), wz, wo, bz, bo).view(batch, L, mixer.d_model)
