"""Fused kernels of the one-token decode step (besides the state update, kernels/decode/state_update.py).

    add_rms_norm(x, residual, weight, eps)      residual += x (fp32, in place); out = RMSNorm(residual) * weight
    conv_state_update(conv_state, x, w, bias)   conv_state <- [conv_state[..., 1:], x]; y = silu(conv_state . w + bias)

Each is one kernel launch. A decode step is launch-bound (a few KB of activations per layer), so
what these save is the ~6 elementwise PyTorch kernels each would otherwise take. Their PyTorch
references are mambazoo.core.norm.RMSNorm on the fp32 residual stream and mambazoo.core.mamba.conv_step_ref.
Row strides are honoured (x may be a slice of in_proj's output): no .contiguous() copies.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from mambazoo.kernels._args import shape_str as _shape
from mambazoo.kernels._host import cdiv, next_power_of_2

__all__ = ["add_rms_norm", "conv_state_update"]

_MAX_BLOCK_NORM = 8192  # one program holds a whole row up to this width, else it loops over chunks


@triton.jit
def _residual_chunk(x_row, r_row, offs, mask, HAS_X: tl.constexpr, LOAD_RES: tl.constexpr,
                    STORE_RES: tl.constexpr, BLOCK: tl.constexpr):
    """(residual + x) at offs of one row, fp32 (BLOCK,); written back to the residual if STORE_RES."""
    r = tl.zeros([BLOCK], dtype=tl.float32)
    if LOAD_RES:
        r += tl.load(r_row + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_X:
        r += tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
    if STORE_RES:
        tl.store(r_row + offs, r, mask=mask)
    return r


@triton.jit
def add_rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr,
    d, stride_x, stride_res, stride_out, eps,
    HAS_X: tl.constexpr, LOAD_RES: tl.constexpr, STORE_RES: tl.constexpr,
    BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
):
    """Grid (batch,): one row per program. r = residual (+ x), stored back if STORE_RES;
    out = r * rsqrt(mean(r^2) + eps) * w, all in fp32, stored in out's dtype."""
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_x
    r_row = res_ptr + row * stride_res
    o_row = out_ptr + row * stride_out
    if ONE_PASS:
        offs = tl.arange(0, BLOCK)
        mask = offs < d
        r = _residual_chunk(x_row, r_row, offs, mask, HAS_X, LOAD_RES, STORE_RES, BLOCK)
        rstd = 1.0 / tl.sqrt(tl.sum(r * r, axis=0) / d + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(o_row + offs, (r * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, d, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < d
            r = _residual_chunk(x_row, r_row, offs, mask, HAS_X, LOAD_RES, STORE_RES, BLOCK)
            acc += r * r
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / d + eps)
        tl.debug_barrier()  # the row written above is read back by the same program
        for start in range(0, d, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < d
            r = tl.load(r_row + offs, mask=mask, other=0.0)
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(o_row + offs, (r * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)



def add_rms_norm(x: Optional[Tensor], residual: Optional[Tensor], weight: Tensor, eps: float = 1e-5,
                 out_dtype: Optional[torch.dtype] = None, out_into_x: bool = False,
                 keep_residual: bool = True) -> tuple[Tensor, Tensor]:
    """Fused residual add + RMSNorm of one decode step (one kernel).

    x (batch, d) any float dtype, or None; residual (batch, d) fp32, or None; weight (d,).
    - both given: residual += x in place (fp32);
    - residual None: a new fp32 residual = x.float() is made (the first block);
    - x None: residual is only read.
    Returns (out, residual) with out = residual * rsqrt(mean(residual^2) + eps) * weight computed in
    fp32 (exactly mambazoo.core.norm.RMSNorm applied to the fp32 residual) and stored in ``out_dtype``
    (default: x's dtype, or weight's without x). Rows may be strided; the last axis must be dense.
    out_into_x: out is written over x where x has out's dtype (each row is read before it is written; the
    caller owns x): no new (batch, d) buffer.
    keep_residual=False (both given): the sum is normed but need not be written back (a last norm: the returned
    residual may be stale).
    """
    if x is None and residual is None:
        raise ValueError("add_rms_norm: expected x or residual (or both), got neither")
    ref = x if x is not None else residual
    if ref.dim() != 2 or ref.stride(-1) != 1:
        raise ValueError(f"add_rms_norm: expected (batch, d) with a dense last axis, got {_shape(ref)} "
                         f"strides {tuple(ref.stride())}")
    batch, d = ref.shape
    if weight.shape != (d,) or not weight.is_contiguous():
        raise ValueError(f"weight: expected a contiguous (d,) = ({d},), got {_shape(weight)}")
    if residual is not None:
        if residual.dtype != torch.float32 or tuple(residual.shape) != (batch, d) or residual.stride(-1) != 1:
            raise ValueError(f"residual: expected float32 (batch, d) = ({batch}, {d}) with a dense last axis, "
                             f"got {residual.dtype} {_shape(residual)}")
    if x is not None and not x.is_floating_point():
        raise ValueError(f"x: expected a floating-point tensor, got {x.dtype}")
    if out_dtype is None:
        out_dtype = x.dtype if x is not None else weight.dtype
    load_res = residual is not None
    if residual is None:
        residual = torch.empty(batch, d, device=ref.device, dtype=torch.float32)
    if out_into_x and x is not None and x.dtype == out_dtype:
        out = x
    else:
        out = torch.empty(batch, d, device=ref.device, dtype=out_dtype)
    block = min(next_power_of_2(d), _MAX_BLOCK_NORM)
    # the sum is stored unless a last norm does without it (a row wider than one block is read back: stored then)
    store_res = x is not None and (keep_residual or not load_res or block < d)
    add_rms_norm_kernel[(batch,)](
        x if x is not None else residual,  # never read without x (pointer arithmetic needs a tensor)
        residual, weight, out, d, x.stride(0) if x is not None else 0, residual.stride(0), out.stride(0),
        float(eps), HAS_X=x is not None, LOAD_RES=load_res, STORE_RES=store_res,
        BLOCK=block, ONE_PASS=block >= d,
        num_warps=(1 if not ref.is_cuda else 4 if block <= 2048 else 8),
    )
    return out, residual


@triton.jit
def conv_state_update_kernel(
    state_ptr, x_ptr, w_ptr, bias_ptr, y_ptr,
    dim, W, stride_sb, stride_sd, stride_sw, stride_xb, stride_wd, stride_ww, stride_yb,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Grid (batch, cdiv(dim, BLOCK_D)). Shift the conv window left by one, append x (rounded to the
    state's dtype, as the state stores it), y = sum_w state[w] * w[w] (+ bias) (SiLU) in fp32."""
    b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_w = tl.arange(0, BLOCK_W)
    mask_d = offs_d < dim
    st = state_ptr + b * stride_sb + offs_d[:, None] * stride_sd
    nxt = offs_w[None, :] + 1  # the new window's slot w holds the old slot w + 1
    old = tl.load(st + nxt * stride_sw, mask=mask_d[:, None] & (nxt < W), other=0.0)
    x = tl.load(x_ptr + b * stride_xb + offs_d, mask=mask_d, other=0.0).to(state_ptr.dtype.element_ty)
    win = tl.where(offs_w[None, :] == W - 1, x[:, None], old)
    mask = mask_d[:, None] & (offs_w[None, :] < W)
    tl.store(st + offs_w[None, :] * stride_sw, win, mask=mask)
    # the reference multiplies in the state's dtype: the weight is rounded to it first
    w = tl.load(w_ptr + offs_d[:, None] * stride_wd + offs_w[None, :] * stride_ww, mask=mask, other=0.0)
    w = w.to(state_ptr.dtype.element_ty).to(tl.float32)
    y = tl.sum(win.to(tl.float32) * w, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(state_ptr.dtype.element_ty).to(tl.float32)
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + b * stride_yb + offs_d, y.to(y_ptr.dtype.element_ty), mask=mask_d)


def conv_state_update(conv_state: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                      silu: bool = True) -> Tensor:
    """One step of the causal depthwise conv1d (one kernel).

    conv_state (batch, d, W), any float dtype, updated in place: shifted left by one with x appended
    (x rounded to conv_state's dtype). x (batch, d), rows may be strided (a slice of in_proj's output).
    weight (d, W) or nn.Conv1d's (d, 1, W); bias (d,) or None. Returns y (batch, d) in x's dtype:
    y = silu(sum_w conv_state[..., w] * weight[:, w] + bias), accumulated in fp32.
    """
    if conv_state.dim() != 3 or not conv_state.is_floating_point():
        raise ValueError(f"conv_state: expected a float (batch, d, W), got {conv_state.dtype} {_shape(conv_state)}")
    batch, d, W = conv_state.shape
    if x.dim() != 2 or tuple(x.shape) != (batch, d) or x.stride(-1) != 1:
        raise ValueError(f"x: expected (batch, d) = ({batch}, {d}) with a dense last axis, got {_shape(x)}")
    w = weight[:, 0] if weight.dim() == 3 and weight.shape[1] == 1 else weight
    if tuple(w.shape) != (d, W):
        raise ValueError(f"weight: expected (d, W) = ({d}, {W}) or (d, 1, W), got {_shape(weight)}")
    if bias is not None and tuple(bias.shape) != (d,):
        raise ValueError(f"bias: expected (d,) = ({d},), got {_shape(bias)}")
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    y = torch.empty(batch, d, device=x.device, dtype=x.dtype)
    block_w = next_power_of_2(W)
    block_d = 128 if conv_state.is_cuda else min(next_power_of_2(d), 1024)
    grid = (batch, cdiv(d, block_d))
    conv_state_update_kernel[grid](
        conv_state, x, w, bias, y,
        d, W, conv_state.stride(0), conv_state.stride(1), conv_state.stride(2), x.stride(0),
        w.stride(0), w.stride(1), y.stride(0),
        HAS_BIAS=bias is not None, SILU=bool(silu), BLOCK_D=block_d, BLOCK_W=block_w,
        num_warps=4 if conv_state.is_cuda else 1,
    )
    return y
