"""Depthwise causal conv1d + SiLU of the Mamba mixer as Triton kernels (forward and backward).

    causal_conv1d(x, weight, bias=None, silu=True, reverse=False) -> y

x (b, d, L) with any strides (the mixer passes its (b, L, d) in_proj view as is; a channel stride other than 1
is copied once to that layout, so the kernels load whole rows of channels); weight (d, W); bias (d,).
y[:, c, t] = act(bias[c] + sum_k weight[c, k] x[:, c, t - (W-1) + k]) (zero before the start); with
reverse=True the window looks ahead instead, x[:, c, t + (W-1) - k] (the causal conv of the reversed
sequence, read in place: Vim's backward direction). y is returned as a (b, d, L) view of a (b, L, d)
buffer: the layout x_proj reads and the scan kernel reads through strides, so neither copies.

The mixer's conv on CUDA (mambazoo.core.backend's conv choice; its oracle is mambazoo.core.conv_ref; timings in
docs/kernel_notes.md, "Tile choices").
The backward runs two kernels: dpre = dy act'(pre) (fp32 buffer) with dw / db summed per program over
DW_TILES tiles, then dx from the shifted dpre tiles.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from mambazoo.kernels._host import cdiv, interpreting
from mambazoo.kernels._math import sigmoid

__all__ = ["causal_conv1d", "causal_conv1d_pair"]

BLOCK_L, BLOCK_D = 32, 64  # the backward's (steps, channels) tile per program; channels are contiguous in (b, L, d)
# the forward's (steps, channels, warps) and causal_conv1d_pair's, from scripts/bench_scan.py --tune-conv
FWD_BLOCK_L, FWD_BLOCK_D, FWD_WARPS = 16, 128, 4
PAIR_BLOCK_L, PAIR_BLOCK_D, PAIR_WARPS = 32, 128, 4
DW_TILES = 8  # backward: tiles per program summed in registers before the dw / db atomics


@triton.jit
def _src(t, k, W: tl.constexpr, REVERSE: tl.constexpr):
    """The input step read by output step t through tap k."""
    s = t - (W - 1) + k
    if REVERSE:
        s = t + (W - 1) - k
    return s


@triton.jit
def _pre(x_ptr, w_ptr, bias_ptr, b, t, offs_d, mask_d, L, sxb, sxl,
         W: tl.constexpr, HAS_BIAS: tl.constexpr, REVERSE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """The conv before the activation at steps t (BLOCK_L,) and channels offs_d: (BLOCK_L, BLOCK_D) fp32."""
    acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    base = x_ptr + b.to(tl.int64) * sxb
    for k in tl.static_range(W):
        s = _src(t, k, W, REVERSE)
        m = ((s >= 0) & (s < L))[:, None] & mask_d[None, :]
        xv = tl.load(base + s[:, None] * sxl + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
        wk = tl.load(w_ptr + offs_d * W + k, mask=mask_d, other=0.0).to(tl.float32)
        acc += xv * wk[None, :]
    return acc


@triton.jit
def conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, L, dim, sxb, sxl,
                    W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, REVERSE: tl.constexpr,
                    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, FAST: tl.constexpr = False):
    """Grid (batch, cdiv(L, BLOCK_L), cdiv(dim, BLOCK_D)); y is a contiguous (b, L, d) buffer."""
    b = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    pre = _pre(x_ptr, w_ptr, bias_ptr, b, t, offs_d, mask_d, L, sxb, sxl, W, HAS_BIAS, REVERSE, BLOCK_L, BLOCK_D)
    y = pre
    if SILU:
        y = pre * sigmoid(pre, FAST)
    m = (t < L)[:, None] & mask_d[None, :]
    tl.store(y_ptr + b.to(tl.int64) * L * dim + t[:, None] * dim + offs_d[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m)


@triton.jit
def conv_pair_fwd_kernel(x_ptr, wf_ptr, bf_ptr, wb_ptr, bb_ptr, yf_ptr, yb_ptr, L, dim, sxb, sxl,
                         W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                         BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, FAST: tl.constexpr = False):
    """Both directions of a bidirectional mixer from one read of x: yf the causal conv with (wf, bf), yb the
    anti-causal one with (wb, bb) (REVERSE). Grid and layouts as conv_fwd_kernel; the second window's loads hit
    the cache lines the first brought in."""
    b = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    m = (t < L)[:, None] & mask_d[None, :]
    out = b.to(tl.int64) * L * dim + t[:, None] * dim + offs_d[None, :]
    pre = _pre(x_ptr, wf_ptr, bf_ptr, b, t, offs_d, mask_d, L, sxb, sxl, W, HAS_BIAS, False, BLOCK_L, BLOCK_D)
    if SILU:
        pre = pre * sigmoid(pre, FAST)
    tl.store(yf_ptr + out, pre.to(yf_ptr.dtype.element_ty), mask=m)
    pre = _pre(x_ptr, wb_ptr, bb_ptr, b, t, offs_d, mask_d, L, sxb, sxl, W, HAS_BIAS, True, BLOCK_L, BLOCK_D)
    if SILU:
        pre = pre * sigmoid(pre, FAST)
    tl.store(yb_ptr + out, pre.to(yb_ptr.dtype.element_ty), mask=m)


@triton.jit
def conv_dpre_kernel(x_ptr, w_ptr, bias_ptr, dy_ptr, dp_ptr, dw_ptr, db_ptr, L, dim, sxb, sxl,
                     sdb, sdl, tiles_per_prog,
                     W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, REVERSE: tl.constexpr,
                     BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, FAST: tl.constexpr = False):
    """Grid (batch, cdiv(L, BLOCK_L * tiles_per_prog), cdiv(dim, BLOCK_D)).  dpre = dy act'(pre) into the fp32
    (b, L, d) buffer dp; dw[:, k] = sum_t x[_src(t, k)] dpre[t] and db = sum_t dpre[t] over the program's
    tiles_per_prog tiles, kept in registers and added with one relaxed atomic each (few programs share an
    address).  dy is read through its strides (b, d, L)."""
    b = tl.program_id(0)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    xbase = x_ptr + b.to(tl.int64) * sxb
    dybase = dy_ptr + b.to(tl.int64) * sdb
    dpbase = dp_ptr + b.to(tl.int64) * L * dim
    db = tl.zeros([BLOCK_D], dtype=tl.float32)
    dw0 = tl.zeros([BLOCK_D], dtype=tl.float32)
    dw1 = tl.zeros([BLOCK_D], dtype=tl.float32)
    dw2 = tl.zeros([BLOCK_D], dtype=tl.float32)
    dw3 = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(tiles_per_prog):
        t = (tl.program_id(1) * tiles_per_prog + i) * BLOCK_L + tl.arange(0, BLOCK_L)
        m = (t < L)[:, None] & mask_d[None, :]
        dp = tl.load(dybase + t[:, None] * sdl + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
        if SILU:
            pre = _pre(x_ptr, w_ptr, bias_ptr, b, t, offs_d, mask_d, L, sxb, sxl, W, HAS_BIAS, REVERSE,
                       BLOCK_L, BLOCK_D)
            sg = sigmoid(pre, FAST)
            dp = dp * sg * (1.0 + pre * (1.0 - sg))
        tl.store(dpbase + t[:, None] * dim + offs_d[None, :], dp, mask=m)
        db += tl.sum(dp, axis=0)
        for k in tl.static_range(W):
            src = _src(t, k, W, REVERSE)
            mk = ((src >= 0) & (src < L))[:, None] & mask_d[None, :]
            xv = tl.load(xbase + src[:, None] * sxl + offs_d[None, :], mask=mk, other=0.0).to(tl.float32)
            part = tl.sum(xv * dp, axis=0)
            if k == 0:
                dw0 += part
            elif k == 1:
                dw1 += part
            elif k == 2:
                dw2 += part
            else:
                dw3 += part
    if HAS_BIAS:
        tl.atomic_add(db_ptr + offs_d, db, mask=mask_d, sem="relaxed")
    tl.atomic_add(dw_ptr + offs_d * W + 0, dw0, mask=mask_d, sem="relaxed")
    if W > 1:
        tl.atomic_add(dw_ptr + offs_d * W + 1, dw1, mask=mask_d, sem="relaxed")
    if W > 2:
        tl.atomic_add(dw_ptr + offs_d * W + 2, dw2, mask=mask_d, sem="relaxed")
    if W > 3:
        tl.atomic_add(dw_ptr + offs_d * W + 3, dw3, mask=mask_d, sem="relaxed")


@triton.jit
def conv_dx_kernel(w_ptr, dp_ptr, dx_ptr, L, dim, W: tl.constexpr, REVERSE: tl.constexpr,
                   BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (batch, cdiv(L, BLOCK_L), cdiv(dim, BLOCK_D)).  x[s] feeds y[t] through tap k where
    _src(t, k) = s, so dx[s] = sum_k w[k] dpre[t(s, k)]; dp and dx are (b, L, d) buffers."""
    b = tl.program_id(0)
    s = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    dpbase = dp_ptr + b.to(tl.int64) * L * dim
    dx = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    for k in tl.static_range(W):
        t = s + (W - 1) - k
        if REVERSE:
            t = s - (W - 1) + k
        m = ((t >= 0) & (t < L))[:, None] & mask_d[None, :]
        dp = tl.load(dpbase + t[:, None] * dim + offs_d[None, :], mask=m, other=0.0)
        wk = tl.load(w_ptr + offs_d * W + k, mask=mask_d, other=0.0).to(tl.float32)
        dx += dp * wk[None, :]
    m = (s < L)[:, None] & mask_d[None, :]
    tl.store(dx_ptr + b.to(tl.int64) * L * dim + s[:, None] * dim + offs_d[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=m)


def _channels_contiguous(t: Tensor) -> Tensor:
    """t (b, d, L) with unit channel stride, as the kernels read it (vector loads along the channels; Triton
    does not specialize a runtime stride of 1). The mixer's views already are; others are copied once."""
    return t if t.stride(1) == 1 else t.transpose(1, 2).contiguous().transpose(1, 2)


def _grid(batch: int, L: int, dim: int, block_l: int = BLOCK_L, block_d: int = BLOCK_D):
    return (batch, cdiv(L, block_l), cdiv(dim, block_d))


def conv_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool, reverse: bool) -> Tensor:
    """The forward launch: x (b, d, L) any strides, weight (d, W) -> y as a contiguous (b, L, d) buffer."""
    batch, dim, L = x.shape
    W = weight.shape[1]
    w = weight.contiguous()
    x = _channels_contiguous(x)
    y = x.new_empty(batch, L, dim)
    grid = _grid(batch, L, dim, FWD_BLOCK_L, FWD_BLOCK_D)
    conv_fwd_kernel[grid](x, w, bias, y, L, dim, x.stride(0), x.stride(2), W=W, HAS_BIAS=bias is not None,
                          SILU=silu, REVERSE=reverse, FAST=not interpreting(), BLOCK_L=FWD_BLOCK_L, BLOCK_D=FWD_BLOCK_D,
                          num_warps=FWD_WARPS)
    return y


def conv_backward(x: Tensor, weight: Tensor, bias: Optional[Tensor], dy: Tensor, silu: bool, reverse: bool):
    """The backward launches: dy (b, d, L) any strides -> dx as a contiguous (b, L, d) buffer, dw (d, W) and db (d,)
    (None without a bias) in the parameters' dtypes."""
    batch, dim, L = x.shape
    W = weight.shape[1]
    w = weight.contiguous()
    x = _channels_contiguous(x)
    dy = _channels_contiguous(dy)
    dx = x.new_empty(batch, L, dim)
    dp = x.new_empty(batch, L, dim, dtype=torch.float32)
    dw = torch.zeros(dim, W, device=x.device, dtype=torch.float32)
    db = torch.zeros(dim, device=x.device, dtype=torch.float32) if bias is not None else None
    n_tiles = cdiv(L, BLOCK_L)
    per_prog = min(n_tiles, DW_TILES)
    grid = (batch, cdiv(n_tiles, per_prog), cdiv(dim, BLOCK_D))
    conv_dpre_kernel[grid](x, w, bias, dy, dp, dw, db, L, dim, x.stride(0), x.stride(2), dy.stride(0),
                           dy.stride(2), per_prog, W=W,
                           HAS_BIAS=bias is not None, SILU=silu, REVERSE=reverse, FAST=not interpreting(),
                           BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D)
    conv_dx_kernel[_grid(batch, L, dim)](w, dp, dx, L, dim, W=W, REVERSE=reverse, BLOCK_L=BLOCK_L,
                                         BLOCK_D=BLOCK_D)
    return dx, dw.to(weight.dtype), db.to(bias.dtype) if bias is not None else None


class _CausalConv1d(torch.autograd.Function):
    """Eager path: the launchers without the custom-op dispatcher (torch.compile uses the ops below)."""

    @staticmethod
    def forward(ctx, x, weight, bias, silu, reverse):
        ctx.save_for_backward(x, weight, bias)
        ctx.silu, ctx.reverse = silu, reverse
        return conv_forward(x, weight, bias, silu, reverse).transpose(1, 2)

    @staticmethod
    def backward(ctx, dy):
        x, w, bias = ctx.saved_tensors
        dx, dw, db = conv_backward(x, w, bias, dy, ctx.silu, ctx.reverse)
        return dx.transpose(1, 2), dw, db, None, None


# torch.compile sees the conv as two opaque custom ops (like the scan): tracing into the autograd.Function's
# Triton launches split vim-tiny's compiled graph at every mixer.
@torch.library.custom_op("mambazoo::conv1d_fwd", mutates_args=())
def conv1d_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool, reverse: bool) -> Tensor:
    """y as a (b, L, d) buffer (see conv_forward)."""
    return conv_forward(x, weight, bias, silu, reverse)


@conv1d_fwd.register_fake
def _conv1d_fwd_fake(x, weight, bias, silu, reverse):
    return x.new_empty(x.shape[0], x.shape[2], x.shape[1])


@torch.library.custom_op("mambazoo::conv1d_bwd", mutates_args=())
def conv1d_bwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], dy: Tensor, silu: bool,
               reverse: bool) -> list[Tensor]:
    """[dx (b, L, d) buffer, dw, db (empty without a bias)] (see conv_backward)."""
    dx, dw, db = conv_backward(x, weight, bias, dy, silu, reverse)
    return [dx, dw, db if db is not None else x.new_empty(0)]


@conv1d_bwd.register_fake
def _conv1d_bwd_fake(x, weight, bias, dy, silu, reverse):
    return [x.new_empty(x.shape[0], x.shape[2], x.shape[1]), torch.empty_like(weight, memory_format=torch.contiguous_format),
            torch.empty_like(bias) if bias is not None else x.new_empty(0)]


def _conv1d_setup(ctx, inputs, output):
    x, weight, bias, silu, reverse = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.silu, ctx.reverse, ctx.has_bias = silu, reverse, bias is not None


def _conv1d_grads(ctx, dy):
    x, weight, bias = ctx.saved_tensors
    dx, dw, db = conv1d_bwd(x, weight, bias, dy.transpose(1, 2), ctx.silu, ctx.reverse)
    return dx.transpose(1, 2), dw, db if ctx.has_bias else None, None, None


conv1d_fwd.register_autograd(_conv1d_grads, setup_context=_conv1d_setup)


def causal_conv1d_pair(x: Tensor, weight_f: Tensor, bias_f: Optional[Tensor], weight_b: Tensor,
                       bias_b: Optional[Tensor], silu: bool = True) -> tuple[Tensor, Tensor]:
    """Inference only: (causal_conv1d(x, weight_f, bias_f, silu), causal_conv1d(x, weight_b, bias_b, silu,
    reverse=True)) from one pass over x (b, d, L), as a bidirectional mixer needs them: x is read once instead of
    twice. Weights (d, W) or (d, 1, W); biases both given or both None. Outputs as causal_conv1d's. No autograd."""
    params = (x, weight_f, bias_f, weight_b, bias_b)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params):
        raise RuntimeError("causal_conv1d_pair has no backward: call causal_conv1d per direction when training")
    wf, wb = (_check_conv(x, w, b) for w, b in ((weight_f, bias_f), (weight_b, bias_b)))
    if wf.shape != wb.shape or (bias_f is None) != (bias_b is None):
        raise ValueError(f"weights {tuple(wf.shape)} / {tuple(wb.shape)} and biases of the two directions must "
                         f"match in shape and presence")
    batch, dim, L = x.shape
    x = _channels_contiguous(x)
    yf, yb = x.new_empty(batch, L, dim), x.new_empty(batch, L, dim)
    conv_pair_fwd_kernel[_grid(batch, L, dim, PAIR_BLOCK_L, PAIR_BLOCK_D)](
        x, wf.contiguous(), bias_f, wb.contiguous(), bias_b, yf, yb, L, dim, x.stride(0), x.stride(2),
        W=wf.shape[1], HAS_BIAS=bias_f is not None, SILU=silu, FAST=not interpreting(), BLOCK_L=PAIR_BLOCK_L,
        BLOCK_D=PAIR_BLOCK_D, num_warps=PAIR_WARPS)
    return yf.transpose(1, 2), yb.transpose(1, 2)


def _check_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Validates x (b, d, L), weight (d, W) or (d, 1, W) with 1 <= W <= 4 and bias (d,); returns weight (d, W)."""
    if x.dim() != 3:
        raise ValueError(f"x: expected (batch, dim, L), got {tuple(x.shape)}")
    dim = x.shape[1]
    if weight.dim() == 3:
        weight = weight[:, 0]
    if weight.dim() != 2 or weight.shape[0] != dim:
        raise ValueError(f"weight: expected (dim, W) or (dim, 1, W) with dim = {dim}, got {tuple(weight.shape)}")
    if not 1 <= weight.shape[1] <= 4:
        raise ValueError(f"weight: the Triton conv handles widths 1 to 4, got {weight.shape[1]} "
                         f"(the backend's conv=torch runs any width)")
    if bias is not None and tuple(bias.shape) != (dim,):
        raise ValueError(f"bias: expected ({dim},), got {tuple(bias.shape)}")
    return weight


def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, silu: bool = True,
                  reverse: bool = False) -> Tensor:
    """Depthwise causal (or, with reverse, anti-causal) conv1d + optional SiLU: x (b, d, L) any strides,
    weight (d, W) or (d, 1, W), bias (d,) -> y (b, d, L) in x's dtype (a view of a (b, L, d) buffer)."""
    weight = _check_conv(x, weight, bias)
    if torch.compiler.is_compiling():
        return conv1d_fwd(x, weight, bias, bool(silu), bool(reverse)).transpose(1, 2)
    return _CausalConv1d.apply(x, weight, bias, bool(silu), bool(reverse))
