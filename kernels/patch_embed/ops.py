"""Patch embedding + position embedding in one kernel (inference): image -> fp32 tokens with the class token's row left
for the caller.

    patch_tokens(x, weight_t, bias, pos, mid)  ->  tokens (batch, 1 + n, dim) fp32

Vision Mamba's token stream at inference otherwise took three passes: the patches gathered from the image and cast to
the GEMM's dtype (a strided copy: 0.71 ms for vim-tiny at 1024 px, batch 64), the GEMM, and the position embedding
added around the class token (2 x 0.12 ms). Here each program reads one strip of BLOCK_P patches of a patch row
straight from the image, one (channel, pixel row) of the strip at a time (BLOCK_P x PW contiguous pixels: one image
row segment), and multiplies it on the tensor cores with the matching PW rows of the transposed weight; the epilogue
adds the bias, rounds to the GEMM's dtype (as the unfused path stores its output), adds the position embedding in
fp32 and stores the tokens around the class token's row (index mid).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from mambazoo.kernels._host import cdiv, pow2_parts

__all__ = ["patch_tokens", "patch_tokens_fit", "CONFIG"]

# block_p patches per program, warps (scripts/bench_patch_embed.py; timings in docs/kernel_notes.md, "Tile choices").
CONFIG = {"cuda": dict(block_p=64, warps=4), "cpu": dict(block_p=16, warps=1)}


def patch_tokens_fit(patch: tuple[int, int], stride: tuple[int, int], dim: int) -> bool:
    """Non-overlapping patches whose rows are 16 or 32 pixels (one tensor-core K step per pixel row) and 16 <= dim <=
    512."""
    return tuple(patch) == tuple(stride) and patch[1] in (16, 32) and 16 <= dim <= 512


@triton.jit
def patch_tokens_kernel(
    x_ptr, w_ptr, b_ptr, pos_ptr, out_ptr,
    C, gh, gw, mid, dim, sxb, sxc, sxh, sob, sol,
    PH: tl.constexpr, PW: tl.constexpr, BLOCK_P: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    MASK_D2: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """Grid (batch * gh * cdiv(gw, BLOCK_P),): patches gx0 .. gx0 + BLOCK_P of patch row gy of image b.
    acc[p, :] = sum over (c, py) of x[b, c, gy PH + py, (gx0 + p) PW : + PW] @ w[(c PH + py) PW : + PW, :]; token
    t = gy gw + gx lands at row t + (t >= mid)."""
    pid = tl.program_id(0)
    n_blk = tl.cdiv(gw, BLOCK_P)
    b = pid // (gh * n_blk)
    gy = (pid // n_blk) % gh
    offs_p = (pid % n_blk) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < gw
    offs_px = tl.arange(0, PW)
    offs_d1 = tl.arange(0, D1)
    acc1 = tl.zeros([BLOCK_P, D1], dtype=tl.float32)
    offs_d2, acc2 = offs_d1, acc1  # unused unless D2 > 0 (a static branch: then the second part's)
    if D2 > 0:
        offs_d2 = D1 + tl.arange(0, D2)
        acc2 = tl.zeros([BLOCK_P, D2], dtype=tl.float32)
    img = x_ptr + b.to(tl.int64) * sxb + (gy * PH).to(tl.int64) * sxh
    pix = offs_p[:, None] * PW + offs_px[None, :]  # (BLOCK_P, PW): a row segment of the image
    for k in range(0, C * PH):
        c = k // PH
        py = k % PH
        a = tl.load(img + c.to(tl.int64) * sxc + py * sxh + pix, mask=mask_p[:, None], other=0.0)
        a = a.to(w_ptr.dtype.element_ty)
        rows = (k * PW + offs_px)[:, None] * dim  # the weight's (PW, dim) rows of this (channel, pixel row)
        acc1 = tl.dot(a, tl.load(w_ptr + rows + offs_d1[None, :]), acc1)
        if D2 > 0:
            w2 = tl.load(w_ptr + rows + offs_d2[None, :], mask=offs_d2[None, :] < dim, other=0.0) if MASK_D2 else \
                tl.load(w_ptr + rows + offs_d2[None, :])
            acc2 = tl.dot(a, w2, acc2)
    t = gy * gw + offs_p  # token index among the patches
    pos_rows = pos_ptr + t[:, None] * dim
    out_rows = out_ptr + b.to(tl.int64) * sob + (t + (t >= mid).to(tl.int32))[:, None] * sol
    if HAS_BIAS:
        acc1 += tl.load(b_ptr + offs_d1).to(tl.float32)[None, :]
    v1 = acc1.to(w_ptr.dtype.element_ty).to(tl.float32) + tl.load(pos_rows + offs_d1[None, :], mask=mask_p[:, None])
    tl.store(out_rows + offs_d1[None, :], v1, mask=mask_p[:, None])
    if D2 > 0:
        m2 = mask_p[:, None] & (offs_d2[None, :] < dim)
        if HAS_BIAS:
            acc2 += tl.load(b_ptr + offs_d2, mask=offs_d2 < dim, other=0.0).to(tl.float32)[None, :]
        v2 = acc2.to(w_ptr.dtype.element_ty).to(tl.float32) + tl.load(pos_rows + offs_d2[None, :], mask=m2)
        tl.store(out_rows + offs_d2[None, :], v2, mask=m2)


def patch_tokens(x: Tensor, weight_t: Tensor, bias: Optional[Tensor], pos: Tensor, patch: tuple[int, int],
                 mid: int, block_p: Optional[int] = None, warps: Optional[int] = None) -> Tensor:
    """x (batch, C, H, W) any float dtype (last axis dense); weight_t (C * PH * PW, dim): the patch projection's weight
    transposed, in the GEMM's (half-precision) dtype, contiguous; bias (dim,) in that dtype or None; pos (n, dim) fp32
    contiguous, the patches' position embedding rows; patch (PH, PW) (patch_tokens_fit). Returns tokens (batch, n + 1,
    dim) fp32: row t + (t >= mid) holds patch t's projection (rounded to weight_t's dtype) plus pos[t]; row mid (the
    class token's) is left unset. block_p (patches per program), warps override CONFIG (benchmark sweeps)."""
    ph, pw = patch
    b, C, H, W = x.shape
    gh, gw = H // ph, W // pw
    K, dim = weight_t.shape
    if x.stride(-1) != 1:
        raise ValueError(f"x: expected a dense last axis, got strides {tuple(x.stride())}")
    if K != C * ph * pw or not weight_t.is_contiguous() or weight_t.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"weight_t: expected a contiguous half-precision (C * PH * PW = {C * ph * pw}, dim), got "
                         f"{weight_t.dtype} {tuple(weight_t.shape)}")
    if tuple(pos.shape) != (gh * gw, dim) or pos.dtype != torch.float32 or not pos.is_contiguous():
        raise ValueError(f"pos: expected contiguous float32 ({gh * gw}, {dim}), got {pos.dtype} {tuple(pos.shape)}")
    if not patch_tokens_fit(patch, patch, dim):
        raise ValueError(f"patch_tokens: expected 16- or 32-pixel patch rows and 16 <= dim <= 512 "
                         f"(patch_tokens_fit), got patch {tuple(patch)}, dim {dim}")
    out = torch.empty(b, gh * gw + 1, dim, device=x.device, dtype=torch.float32)
    cfg = CONFIG["cuda" if x.is_cuda else "cpu"]
    bp = block_p or cfg["block_p"]
    d1, d2 = pow2_parts(dim)
    patch_tokens_kernel[(b * gh * cdiv(gw, bp),)](
        x, weight_t, bias if bias is not None else weight_t, pos, out,
        C, gh, gw, mid, dim, x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1),
        PH=ph, PW=pw, BLOCK_P=bp, D1=d1, D2=d2, MASK_D2=d1 + d2 > dim, HAS_BIAS=bias is not None,
        num_warps=warps or cfg["warps"])
    return out
