"""PyTorch references of the one-token decode step's fused kernels (kernels/decode/).

On CUDA a Mamba block's decode step is 7 launches: fused residual add + RMSNorm, in_proj, conv-state update,
x_proj, dt_proj, state update (A = -exp(A_log) inside) and out_proj. The residual add is deferred to the next
block's norm (Block.step_residual), as in mamba_ssm. Whether the fused kernels run is
mambazoo.core.backend.fused_decode (re-exported here as ``fused_decode_enabled``); the oracle of the state update
is mambazoo.core.scan_ref.selective_state_update_ref.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mambazoo.core.backend import fused_decode as fused_decode_enabled  # noqa: F401  (re-exported)

__all__ = ["fused_decode_enabled", "conv_step_ref", "add_rms_norm_ref"]


def conv_step_ref(conv_state: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  silu: bool = True) -> torch.Tensor:
    """One step of the causal depthwise conv1d in PyTorch (the oracle of mambazoo.kernels.decode.conv_state_update).

    conv_state (batch, d, W) shifted left in place with x (batch, d) appended in conv_state's dtype;
    the products and sum in conv_state's dtype, bias added in it; returns silu(.) in x's dtype.
    weight (d, 1, W) (nn.Conv1d's) or (d, W)."""
    conv = torch.cat([conv_state[..., 1:], x[..., None].to(conv_state.dtype)], dim=-1)
    conv_state.copy_(conv)
    w = weight[:, 0] if weight.dim() == 3 else weight
    y = (conv * w.to(conv.dtype)).sum(-1)
    if bias is not None:
        y = y + bias.to(y.dtype)
    y = y.to(x.dtype)
    return F.silu(y) if silu else y


def add_rms_norm_ref(x: torch.Tensor | None, residual: torch.Tensor | None, weight: torch.Tensor,
                     eps: float = 1e-5, out_dtype: torch.dtype | None = None):
    """PyTorch oracle of mambazoo.kernels.decode.add_rms_norm: returns (out, residual); residual += x in place
    (a new fp32 residual when None); out = mambazoo.core.norm.RMSNorm of the fp32 residual, in ``out_dtype``."""
    if residual is None:
        residual = x.float().clone()
    elif x is not None:
        residual.add_(x.float())
    rf = residual
    out = rf * torch.rsqrt(rf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    if out_dtype is None:
        out_dtype = x.dtype if x is not None else weight.dtype
    return out.to(out_dtype), residual
