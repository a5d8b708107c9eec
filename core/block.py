"""The residual block: x = x + Mixer(Norm(x)); optionally x = x + FFN(Norm(x)). Residual stream in fp32."""

from __future__ import annotations

import torch
from torch import nn

from core.norm import RMSNorm


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability p, rescale the rest."""
    if p == 0.0 or not training:
        return x
    keep = torch.empty(x.shape[0], *([1] * (x.dim() - 1)), device=x.device).bernoulli_(1 - p)
    return x * keep.to(x.dtype) / (1 - p)


class Block(nn.Module):
    """One residual block around a mixer (Mamba, bidirectional Mamba or attention) and an optional
    feed-forward (MLP or MoE). x (batch, L, d_model) fp32 -> (batch, L, d_model) fp32.

    The mixer's and the FFN's outputs (bf16 under autocast) are added to an fp32 residual stream.
    An FFN may return (out, aux_loss); the last aux loss is kept in ``self.aux_loss``.
    """

    def __init__(self, d_model: int, mixer: nn.Module, ffn: nn.Module | None = None,
                 norm_eps: float = 1e-5, drop_path: float = 0.0):
        super().__init__()
        self.norm = RMSNorm(d_model, eps=norm_eps)
        self.mixer = mixer
        self.ffn_norm = RMSNorm(d_model, eps=norm_eps) if ffn is not None else None
        self.ffn = ffn
        self.drop_path = drop_path
        self.aux_loss: torch.Tensor | None = None

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        out = self.ffn(self.ffn_norm(x))
        if isinstance(out, tuple):
            out, self.aux_loss = out
        return out

    def forward(self, x: torch.Tensor, state=None) -> torch.Tensor:
        x = x.float()
        h = self.mixer(self.norm(x)) if state is None else self.mixer(self.norm(x), state)
        x = x + drop_path(h, self.drop_path, self.training).float()
        if self.ffn is not None:
            x = x + drop_path(self._ffn(x), self.drop_path, self.training).float()
        return x

    def step(self, x: torch.Tensor, state) -> torch.Tensor:
        """One token: x (batch, d_model) fp32 -> (batch, d_model) fp32, advancing the mixer's state."""
        x = x.float()
        x = x + self.mixer.step(self.norm(x), state).float()
        if self.ffn is not None:
            x = x + self._ffn(x[:, None])[:, 0].float()
        return x
