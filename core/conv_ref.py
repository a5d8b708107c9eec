"""The mixer's causal depthwise conv1d in plain PyTorch: the oracle of mambazoo.kernels.conv1d.

    y[:, c, t] = act(bias[c] + sum_k weight[c, k] x[:, c, t - (W-1) + k])   (zero before the start)

reverse=True looks ahead instead, x[:, c, t + (W-1) - k]: the causal conv of the reversed sequence, flipped back
(Vision Mamba's backward direction), computed here with the padding on the right and the taps reversed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["causal_conv1d_ref"]


def causal_conv1d_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, silu: bool = True,
                      reverse: bool = False) -> torch.Tensor:
    """x (batch, d, L); weight (d, 1, W) (nn.Conv1d's) or (d, W); bias (d,) or None -> y (batch, d, L) in x's dtype,
    SiLU applied when ``silu``."""
    if x.dim() != 3:
        raise ValueError(f"x: expected (batch, d, L), got shape {tuple(x.shape)}")
    d, L = x.shape[1], x.shape[-1]
    w = weight if weight.dim() == 3 else weight[:, None, :]
    if w.shape[0] != d or w.shape[1] != 1:
        raise ValueError(f"weight: expected (d, 1, W) or (d, W) with d = {d}, got shape {tuple(weight.shape)}")
    W = w.shape[-1]
    if reverse:
        xp, w = F.pad(x, (0, W - 1)), w.flip(-1)
    else:
        xp = F.pad(x, (W - 1, 0))
    y = F.conv1d(xp, w, bias, groups=d)[..., :L]
    return F.silu(y) if silu else y
