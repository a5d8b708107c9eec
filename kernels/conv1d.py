"""Depthwise causal conv1d + SiLU of the Mamba mixer as Triton kernels (forward and backward).

    causal_conv1d(x, weight, bias=None, silu=True, reverse=False) -> y

x (b, d, L) with any strides (the mixer passes its (b, L, d) in_proj view as is); weight (d, W); bias (d,).
y[:, c, t] = act(bias[c] + sum_k weight[c, k] x[:, c, t - (W-1) + k]) (zero before the start); with
reverse=True the window looks ahead instead, x[:, c, t + (W-1) - k] (the causal conv of the reversed
sequence, read in place: Vim's backward direction). y is returned as a (b, d, L) view of a (b, L, d)
buffer: the layout x_proj reads and the scan kernel reads through strides, so neither copies.

Opt-in (``MAMBAZOO_CONV=triton``; core.mamba uses PyTorch's conv1d otherwise): the GPU timing of these
kernels is still to be taken (docs/benchmarks.md, Vision: PyTorch's conv and the copies around it are
28% of vim-tiny's inference time at 1248 px).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["causal_conv1d", "conv_backend"]

BLOCK_L, BLOCK_D = 32, 64  # a (steps, channels) tile per program; channels are contiguous in (b, L, d)


def conv_backend(device: torch.device) -> str:
    """'triton' when MAMBAZOO_CONV=triton and the kernels can run (CUDA, or the CPU interpreter), else 'torch'."""
    want = os.environ.get("MAMBAZOO_CONV", "torch").strip().lower()
    if want not in ("torch", "triton"):
        raise ValueError(f"MAMBAZOO_CONV: expected torch or triton, got {want!r}")
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return "triton" if want == "triton" and (device.type == "cuda" or interpreting) else "torch"


@triton.jit
def _src(t, k, W: tl.constexpr, REVERSE: tl.constexpr):
    """The input step read by output step t through tap k."""
    s = t - (W - 1) + k
    if REVERSE:
        s = t + (W - 1) - k
    return s


@triton.jit
def _pre(x_ptr, w_ptr, bias_ptr, b, t, offs_d, mask_d, L, sxb, sxd, sxl,
         W: tl.constexpr, HAS_BIAS: tl.constexpr, REVERSE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """The conv before the activation at steps t (BLOCK_L,) and channels offs_d: (BLOCK_L, BLOCK_D) fp32."""
    acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    base = x_ptr + b.to(tl.int64) * sxb
    for k in tl.static_range(W):
        s = _src(t, k, W, REVERSE)
        m = ((s >= 0) & (s < L))[:, None] & mask_d[None, :]
        xv = tl.load(base + s[:, None] * sxl + offs_d[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
        wk = tl.load(w_ptr + offs_d * W + k, mask=mask_d, other=0.0).to(tl.float32)
        acc += xv * wk[None, :]
    return acc


@triton.jit
def conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, L, dim, sxb, sxd, sxl,
                    W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, REVERSE: tl.constexpr,
                    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (batch, cdiv(L, BLOCK_L), cdiv(dim, BLOCK_D)); y is a contiguous (b, L, d) buffer."""
    b = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    pre = _pre(x_ptr, w_ptr, bias_ptr, b, t, offs_d, mask_d, L, sxb, sxd, sxl, W, HAS_BIAS, REVERSE, BLOCK_L, BLOCK_D)
    y = pre
    if SILU:
        y = pre * tl.sigmoid(pre)
    m = (t < L)[:, None] & mask_d[None, :]
    tl.store(y_ptr + b.to(tl.int64) * L * dim + t[:, None] * dim + offs_d[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m)


@triton.jit
def _dpre(x_ptr, w_ptr, bias_ptr, dy_ptr, b, t, offs_d, mask_d, L, dim, sxb, sxd, sxl,
          W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, REVERSE: tl.constexpr,
          BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """dL/d(pre-activation) at steps t: dy * act'(pre), 0 outside [0, L)."""
    m = ((t >= 0) & (t < L))[:, None] & mask_d[None, :]
    dy = tl.load(dy_ptr + b.to(tl.int64) * L * dim + t[:, None] * dim + offs_d[None, :], mask=m,
                 other=0.0).to(tl.float32)
    if SILU:
        pre = _pre(x_ptr, w_ptr, bias_ptr, b, t, offs_d, mask_d, L, sxb, sxd, sxl, W, HAS_BIAS, REVERSE,
                   BLOCK_L, BLOCK_D)
        sg = tl.sigmoid(pre)
        dy = dy * sg * (1.0 + pre * (1.0 - sg))
    return dy


@triton.jit
def conv_bwd_kernel(x_ptr, w_ptr, bias_ptr, dy_ptr, dx_ptr, dw_ptr, db_ptr, L, dim, sxb, sxd, sxl,
                    W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, REVERSE: tl.constexpr,
                    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid as the forward. dx (b, L, d) contiguous; dw (d, W) and db (d,) fp32, added with atomics.
    x[s] feeds y[t] through tap k where _src(t, k) = s, so dx[s] = sum_k w[k] dpre[t(s, k)]."""
    b = tl.program_id(0)
    s = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    own = _dpre(x_ptr, w_ptr, bias_ptr, dy_ptr, b, s, offs_d, mask_d, L, dim, sxb, sxd, sxl, W, HAS_BIAS, SILU,
                REVERSE, BLOCK_L, BLOCK_D)
    if HAS_BIAS:
        tl.atomic_add(db_ptr + offs_d, tl.sum(own, axis=0), mask=mask_d, sem="relaxed")
    dx = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    base = x_ptr + b.to(tl.int64) * sxb
    for k in tl.static_range(W):
        # dw[:, k] = sum_t x[_src(t, k)] dpre[t], over this program's own steps t = s
        src = _src(s, k, W, REVERSE)
        m = ((src >= 0) & (src < L))[:, None] & mask_d[None, :]
        xv = tl.load(base + src[:, None] * sxl + offs_d[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
        tl.atomic_add(dw_ptr + offs_d * W + k, tl.sum(xv * own, axis=0), mask=mask_d, sem="relaxed")
        # dx[s] += w[k] dpre[t] with _src(t, k) = s
        t = s + (W - 1) - k
        if REVERSE:
            t = s - (W - 1) + k
        dp = _dpre(x_ptr, w_ptr, bias_ptr, dy_ptr, b, t, offs_d, mask_d, L, dim, sxb, sxd, sxl, W, HAS_BIAS,
                   SILU, REVERSE, BLOCK_L, BLOCK_D)
        wk = tl.load(w_ptr + offs_d * W + k, mask=mask_d, other=0.0).to(tl.float32)
        dx += dp * wk[None, :]
    m = (s < L)[:, None] & mask_d[None, :]
    tl.store(dx_ptr + b.to(tl.int64) * L * dim + s[:, None] * dim + offs_d[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=m)


def _grid(batch: int, L: int, dim: int):
    return (batch, triton.cdiv(L, BLOCK_L), triton.cdiv(dim, BLOCK_D))


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu, reverse):
        batch, dim, L = x.shape
        W = weight.shape[1]
        w = weight.contiguous()
        y = x.new_empty(batch, L, dim)
        conv_fwd_kernel[_grid(batch, L, dim)](x, w, bias, y, L, dim, *x.stride(), W=W, HAS_BIAS=bias is not None,
                                              SILU=silu, REVERSE=reverse, BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D)
        ctx.save_for_backward(x, w, bias)
        ctx.silu, ctx.reverse = silu, reverse
        return y.transpose(1, 2)

    @staticmethod
    def backward(ctx, dy):
        x, w, bias = ctx.saved_tensors
        batch, dim, L = x.shape
        W = w.shape[1]
        dy = dy.transpose(1, 2).contiguous()  # (b, L, d), as the forward wrote y
        dx = x.new_empty(batch, L, dim)
        dw = torch.zeros(dim, W, device=x.device, dtype=torch.float32)
        db = torch.zeros(dim, device=x.device, dtype=torch.float32) if bias is not None else None
        conv_bwd_kernel[_grid(batch, L, dim)](x, w, bias, dy, dx, dw, db, L, dim, *x.stride(), W=W,
                                              HAS_BIAS=bias is not None, SILU=ctx.silu, REVERSE=ctx.reverse,
                                              BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D)
        return (dx.transpose(1, 2), dw.to(w.dtype), db.to(bias.dtype) if bias is not None else None, None, None)


def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, silu: bool = True,
                  reverse: bool = False) -> Tensor:
    """Depthwise causal (or, with reverse, anti-causal) conv1d + optional SiLU: x (b, d, L) any strides,
    weight (d, W) or (d, 1, W), bias (d,) -> y (b, d, L) in x's dtype (a view of a (b, L, d) buffer)."""
    if x.dim() != 3:
        raise ValueError(f"x: expected (batch, dim, L), got {tuple(x.shape)}")
    dim = x.shape[1]
    if weight.dim() == 3:
        weight = weight[:, 0]
    if weight.dim() != 2 or weight.shape[0] != dim:
        raise ValueError(f"weight: expected (dim, W) or (dim, 1, W) with dim = {dim}, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (dim,):
        raise ValueError(f"bias: expected ({dim},), got {tuple(bias.shape)}")
    return _CausalConv1d.apply(x, weight, bias, bool(silu), bool(reverse))
