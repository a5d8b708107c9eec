"""Plain-PyTorch oracles of the fused projection kernels (kernels/gated_proj/ops.py, kernels/patch_embed/ops.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gated_out_proj_ref", "patch_tokens_ref"]


def gated_out_proj_ref(y: torch.Tensor, h: torch.Tensor, wz: torch.Tensor, wo: torch.Tensor,
                       bz: torch.Tensor | None = None, bo: torch.Tensor | None = None) -> torch.Tensor:
    """The bidirectional mixer's gate and out_proj with z formed from the mixer's input rows: y (rows, d_inner) the
    ungated scan output, h (rows, d_model) the mixer input, wz (d_inner, d_model) in_proj's z rows, bz (d_inner,),
    wo (d_model, d_inner) out_proj's weight, bo (d_model,) -> (rows, d_model) fp32:
    out_proj(y * silu(h wz^T + bz)), all in fp32 on the given (half-precision) values."""
    z = F.linear(h.float(), wz.float(), bz.float() if bz is not None else None)
    return F.linear(y.float() * F.silu(z), wo.float(), bo.float() if bo is not None else None)


def patch_tokens_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pos: torch.Tensor,
                     patch: tuple[int, int], mid: int, dtype: torch.dtype) -> torch.Tensor:
    """Vim's unfused inference patch embedding: image x (batch, C, H, W), weight (dim, C, ph, pw), bias (dim,),
    pos (patches, dim) fp32 -> tokens (batch, 1 + patches, dim) fp32: non-overlapping patches cast to ``dtype``,
    projected (rounded to ``dtype``), pos added in fp32, a zero row at ``mid`` for the class token."""
    b, C, H, W = x.shape
    ph, pw = patch
    gh, gw = H // ph, W // pw
    p = x[:, :, :gh * ph, :gw * pw].reshape(b, C, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, -1)
    w = weight.reshape(weight.shape[0], -1)
    y = F.linear(p.to(dtype).float(), w.to(dtype).float(), bias.to(dtype).float() if bias is not None else None)
    y = y.to(dtype).float() + pos
    return torch.cat([y[:, :mid], y.new_zeros(b, 1, y.shape[-1]), y[:, mid:]], dim=1)
