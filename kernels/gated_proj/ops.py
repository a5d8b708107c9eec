"""The Mamba mixer's gate and out_proj in one kernel, with the gate's z computed on chip (inference only).

    gated_out_proj(y, h, wz, wo)    out = (y * silu(h @ wz^T)) @ wo^T

y (M, d_inner): the scan's output without the gate (a bidirectional mixer's two directions averaged: both share
z, so silu(z) factors out of the mean); h (M, d_model): the mixer's input (the normed tokens); wz (d_inner,
d_model): in_proj's z rows; wo (d_model, d_inner): out_proj's weight. Instead of in_proj writing z (M, d_inner)
and each direction's scan reading it back, the z tile of a row block is one GEMM of h's rows (which the block
reads once) against wz's rows, chunk by chunk of d_inner; the gated chunk goes straight into out_proj's
accumulators. vim-tiny at 1024 px (M = 262,208, d_model 192, d_inner 384): z's write and two reads, 3 x 201 MB
per layer, become one read of h (100 MB).

Grid (cdiv(M, BLOCK_M),): a program owns BLOCK_M rows and all d_model outputs (split as two power-of-two parts
P1 + P2 = d_model, like the K axis of z's GEMM: 192 = 128 + 64). Per chunk of BLOCK_C channels (the loop's
software pipeline copies the next chunks of y and the weights ahead): zc = h @ wz[chunk]^T (fp32), p = y *
zc * sigmoid(zc) rounded to the weights' dtype, acc += p @ wo[:, chunk]^T (fp32).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from mambazoo.kernels._args import shape_str as _shape
from mambazoo.kernels._host import cdiv, interpreting, pow2_parts
from mambazoo.kernels._math import gate as _gate  # silu(z), optionally through one tanh.approx

__all__ = ["gated_out_proj", "gated_out_proj_fits", "CONFIG"]

# block_m rows per program, block_c channels of d_inner per step, stages of the chunk loop's pipeline, warps; tanh:
# the gate's sigmoid through one tanh.approx; ahead: the next chunk's z issued before this chunk's gate
# (scripts/bench_gated_proj.py; timings in docs/kernel_notes.md, "Tile choices").
CONFIG = {
    "cuda": dict(block_m=128, block_c=64, stages=3, warps=8, tanh=True, ahead=False),
    "cpu": dict(block_m=16, block_c=16, stages=1, warps=1, tanh=False, ahead=False),
}

_MIN_DOT = 16  # tl.dot's smallest dimension on the GPU


def gated_out_proj_fits(d_model: int, d_inner: int) -> bool:
    """The widths gated_out_proj takes: 16 <= d_model <= 256 (its rows and accumulators live in registers) and
    d_inner >= 16."""
    return _MIN_DOT <= d_model <= 256 and d_inner >= _MIN_DOT


@triton.jit
def _rows(ptr, offs_m, offs_k, mask_m, stride, d, MASK_K: tl.constexpr):
    """A (BLOCK_M, K) tile of a row-major (M, d) tensor (zero past M and past d)."""
    mask = mask_m[:, None] & (offs_k[None, :] < d) if MASK_K else mask_m[:, None]
    return tl.load(ptr + offs_m[:, None] * stride + offs_k[None, :], mask=mask, other=0.0)


@triton.jit
def _cols(ptr, offs_k, offs_c, d, ld, n_c, MASK_K: tl.constexpr):
    """The (K, C) transposed tile of a row-major (n_c, ld) weight: element (k, c) is weight[c, k] (zero past d and
    past n_c)."""
    mask = (offs_c[None, :] < n_c) & (offs_k[:, None] < d) if MASK_K else offs_c[None, :] < n_c
    return tl.load(ptr + offs_c[None, :] * ld + offs_k[:, None], mask=mask, other=0.0)


@triton.jit
def _z_chunk(h1, h2, wz_ptr, bz_ptr, offs_p1, offs_p2, offs_c, d_model, d_inner, stride_wz,
             HAS_BZ: tl.constexpr, P2: tl.constexpr, MASK_P2: tl.constexpr):
    """z of a row block's channel chunk: h @ wz[chunk]^T (+ bz), fp32 (BLOCK_M, BLOCK_C); zero past d_inner."""
    zc = tl.dot(h1, _cols(wz_ptr, offs_p1, offs_c, d_model, stride_wz, d_inner, False))
    if P2 > 0:
        zc = tl.dot(h2, _cols(wz_ptr, offs_p2, offs_c, d_model, stride_wz, d_inner, MASK_P2), zc)
    if HAS_BZ:
        zc += tl.load(bz_ptr + offs_c, mask=offs_c < d_inner, other=0.0).to(tl.float32)[None, :]
    return zc


@triton.jit
def gated_out_proj_kernel(
    y_ptr, h_ptr, wz_ptr, wo_ptr, bz_ptr, bo_ptr, out_ptr,
    M, d_model, d_inner, stride_y, stride_h, stride_wz, stride_wo, stride_out,
    HAS_BZ: tl.constexpr, HAS_BO: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, MASK_P2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, STAGES: tl.constexpr, FAST: tl.constexpr, TANH: tl.constexpr,
    AHEAD: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_M),). out[rows] = sum over chunks of (y * silu(h @ wz^T + bz))[rows, chunk] @
    wo[:, chunk]^T (+ bo), fp32 sums, stored in out's dtype. TANH: the gate's sigmoid through one tanh.approx (GPU,
    half-precision outputs). AHEAD: the next chunk's z product is issued before this chunk's gate (the tensor
    cores then work while the gate is computed)."""
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M  # 64-bit block base, 32-bit offsets inside it
    y_blk, h_blk, o_blk = y_ptr + row0 * stride_y, h_ptr + row0 * stride_h, out_ptr + row0 * stride_out
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M - row0
    offs_p1 = tl.arange(0, P1)
    h1 = _rows(h_blk, offs_m, offs_p1, mask_m, stride_h, d_model, False)
    acc1 = tl.zeros([BLOCK_M, P1], dtype=tl.float32)
    offs_p2, h2 = offs_p1, h1  # unused unless P2 > 0 (a static branch: then the second part's)
    if P2 > 0:
        offs_p2 = P1 + tl.arange(0, P2)
        h2 = _rows(h_blk, offs_m, offs_p2, mask_m, stride_h, d_model, MASK_P2)
        acc2 = tl.zeros([BLOCK_M, P2], dtype=tl.float32)
    if AHEAD:
        zn = _z_chunk(h1, h2, wz_ptr, bz_ptr, offs_p1, offs_p2, tl.arange(0, BLOCK_C), d_model, d_inner, stride_wz,
                      HAS_BZ, P2, MASK_P2)
    for c0 in tl.range(0, d_inner, BLOCK_C, num_stages=STAGES):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        if AHEAD:  # the next chunk's z (zero past d_inner: the last one is wasted work)
            zc = zn
            zn = _z_chunk(h1, h2, wz_ptr, bz_ptr, offs_p1, offs_p2, offs_c + BLOCK_C, d_model, d_inner, stride_wz,
                          HAS_BZ, P2, MASK_P2)
        else:
            zc = _z_chunk(h1, h2, wz_ptr, bz_ptr, offs_p1, offs_p2, offs_c, d_model, d_inner, stride_wz,
                          HAS_BZ, P2, MASK_P2)
        yc = _rows(y_blk, offs_m, offs_c, mask_m, stride_y, d_inner, True).to(tl.float32)
        p = (yc * _gate(zc, TANH, FAST)).to(wo_ptr.dtype.element_ty)
        # wo (d_model, d_inner): its (chunk, P) tile is wo[P, chunk]^T
        acc1 = tl.dot(p, _cols(wo_ptr, offs_c, offs_p1, d_inner, stride_wo, d_model, True), acc1)
        if P2 > 0:
            acc2 = tl.dot(p, _cols(wo_ptr, offs_c, offs_p2, d_inner, stride_wo, d_model, True), acc2)
    if HAS_BO:
        acc1 += tl.load(bo_ptr + offs_p1).to(tl.float32)[None, :]
    tl.store(o_blk + offs_m[:, None] * stride_out + offs_p1[None, :], acc1.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None])
    if P2 > 0:
        if HAS_BO:
            acc2 += tl.load(bo_ptr + offs_p2, mask=offs_p2 < d_model, other=0.0).to(tl.float32)[None, :]
        tl.store(o_blk + offs_m[:, None] * stride_out + offs_p2[None, :], acc2.to(out_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & (offs_p2[None, :] < d_model))



def _check(name: str, t: Tensor, shape: tuple, dense_rows: bool = True) -> None:
    if not isinstance(t, Tensor) or tuple(t.shape) != shape or (dense_rows and t.stride(-1) != 1):
        got = f"{_shape(t)} strides {tuple(t.stride())}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected {shape} with a dense last axis, got {got}")


def gated_out_proj(y: Tensor, h: Tensor, wz: Tensor, wo: Tensor, bz: Optional[Tensor] = None,
                   bo: Optional[Tensor] = None, *, block_m: Optional[int] = None, block_c: Optional[int] = None,
                   stages: Optional[int] = None, warps: Optional[int] = None, tanh: Optional[bool] = None,
                   ahead: Optional[bool] = None) -> Tensor:
    """out = (y * silu(h @ wz^T + bz)) @ wo^T + bo in one kernel (inference; no autograd).

    y (M, d_inner), h (M, d_model): rows may be strided, last axes dense; wz (d_inner, d_model) and wo (d_model,
    d_inner) in half precision, y and h in the same dtype; bz (d_inner,), bo (d_model,) or None. Returns out (M,
    d_model) in y's dtype. z is summed in fp32 and not rounded; the gated value is rounded to the weights' dtype
    before out_proj's product (as the unfused path stores it), which sums in fp32. block_m, block_c, stages, warps,
    tanh, ahead override CONFIG (benchmark sweeps; tanh needs the GPU)."""
    if not isinstance(y, Tensor) or y.dim() != 2:
        raise ValueError(f"y: expected (M, d_inner), got {_shape(y) if isinstance(y, Tensor) else type(y).__name__}")
    M, d_inner = y.shape
    if not isinstance(wo, Tensor) or wo.dim() != 2 or wo.shape[1] != d_inner:
        raise ValueError(f"wo: expected (d_model, d_inner = {d_inner}), got "
                         f"{_shape(wo) if isinstance(wo, Tensor) else type(wo).__name__}")
    d_model = wo.shape[0]
    _check("y", y, (M, d_inner))
    _check("h", h, (M, d_model))
    _check("wz", wz, (d_inner, d_model))
    _check("wo", wo, (d_model, d_inner))
    if wz.dtype != wo.dtype or wo.dtype not in (torch.float16, torch.bfloat16) or y.dtype != wo.dtype \
            or h.dtype != wo.dtype:
        raise ValueError(f"dtypes: expected y, h, wz, wo in one half-precision dtype, got {y.dtype}, {h.dtype}, "
                         f"{wz.dtype}, {wo.dtype}")
    for name, b, n in (("bz", bz, d_inner), ("bo", bo, d_model)):
        if b is not None:
            _check(name, b, (n,))
    if not gated_out_proj_fits(d_model, d_inner):
        raise ValueError(f"gated_out_proj: expected 16 <= d_model <= 256 and d_inner >= 16 (gated_out_proj_fits), "
                         f"got d_model = {d_model}, d_inner = {d_inner}")
    out = torch.empty(M, d_model, device=y.device, dtype=y.dtype)
    if M == 0:
        return out
    cfg = CONFIG["cuda" if y.is_cuda else "cpu"]
    bm, bc = block_m or cfg["block_m"], block_c or cfg["block_c"]
    p1, p2 = pow2_parts(d_model)
    gated_out_proj_kernel[(cdiv(M, bm),)](
        y, h, wz, wo, bz if bz is not None else wo, bo if bo is not None else wo, out,
        M, d_model, d_inner, y.stride(0), h.stride(0), wz.stride(0), wo.stride(0), out.stride(0),
        HAS_BZ=bz is not None, HAS_BO=bo is not None, P1=p1, P2=p2, MASK_P2=p1 + p2 > d_model,
        BLOCK_M=bm, BLOCK_C=bc, STAGES=stages or cfg["stages"], FAST=not interpreting(),
        TANH=(cfg["tanh"] if tanh is None else tanh) and not interpreting(),
        AHEAD=cfg["ahead"] if ahead is None else ahead, num_warps=warps or cfg["warps"])
    return out
