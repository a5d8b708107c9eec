"""The residual block: x = x + Mixer(Norm(x)); optionally x = x + FFN(Norm(x)). Residual stream in fp32."""

from __future__ import annotations

import torch
from torch import nn

from mambazoo.core.dispatch import add_rms_norm, fused_decode_enabled
from mambazoo.core.mamba import Mamba
from mambazoo.core.mamba2 import Mamba2
from mambazoo.core.norm import RMSNorm


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability p, rescale the rest."""
    if p == 0.0 or not training:
        return x
    keep = torch.empty(x.shape[0], *([1] * (x.dim() - 1)), device=x.device).bernoulli_(1 - p)
    return x * keep.to(x.dtype) / (1 - p)


class Block(nn.Module):
    """One residual block around a mixer (Mamba, bidirectional Mamba, Mamba-2 or attention) and an optional
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
        return self._ffn_out(self.ffn(self.ffn_norm(x)))

    def _ffn_out(self, out) -> torch.Tensor:
        if isinstance(out, tuple):
            out, self.aux_loss = out
        return out

    def forward(self, x: torch.Tensor, state=None) -> torch.Tensor:
        x = x.float()
        h = self.mixer(self.norm(x)) if state is None else self.mixer(self.norm(x), state)
        # fp32 + bf16 promotes to fp32 in one kernel (no separate upcast of the branch output)
        x = x + drop_path(h, self.drop_path, self.training)
        if self.ffn is not None:
            x = x + drop_path(self._ffn(x), self.drop_path, self.training)
        return x

    def step(self, x: torch.Tensor, state) -> torch.Tensor:
        """One token: x (batch, d_model) fp32 -> (batch, d_model) fp32, advancing the mixer's state."""
        if fused_decode_enabled(x.device):
            h, residual = self.step_residual(x, None, state)
            return residual + h  # fp32 (type promotion), as x + h.float()
        x = x.float()
        x = x + self.mixer.step(self.norm(x), state).float()
        if self.ffn is not None:
            x = x + self._ffn(x[:, None])[:, 0].float()
        return x

    def step_residual(self, hidden: torch.Tensor, residual: torch.Tensor | None, state):
        """One token with the residual add deferred to the next norm (mamba_ssm's fused add + norm).

        The block's input is residual + hidden: residual (batch, d_model) fp32, or None for the first
        block (the input is then hidden alone); hidden (batch, d_model) is the previous block's last
        branch output, not yet added. Returns (hidden', residual') with residual' + hidden' equal to
        ``step(residual + hidden)``. On the fused path (CUDA; mambazoo.core.backend.fused_decode) each add +
        RMSNorm is one kernel and ``residual`` is updated in place; elsewhere plain PyTorch, as ``step``.
        """
        if fused_decode_enabled(hidden.device):
            normed, residual = add_rms_norm(hidden, residual, self.norm.weight, self.norm.eps,
                                            out_dtype=self._mixer_input_dtype(hidden.device))
            h = self.mixer.step(normed, state)
            if self.ffn is not None:
                normed, residual = add_rms_norm(h, residual, self.ffn_norm.weight, self.ffn_norm.eps,
                                                out_dtype=torch.float32)
                h = self._ffn_out(self.ffn(normed[:, None]))[:, 0]
            return h, residual
        x = hidden.float() if residual is None else residual + hidden.float()
        h = self.mixer.step(self.norm(x), state)
        if self.ffn is not None:
            x = x + h.float()
            h = self._ffn(x[:, None])[:, 0]
        return h, x

    def forward_residual(self, hidden: torch.Tensor | None, residual: torch.Tensor | None, consume: bool = False):
        """A whole sequence with the residual add deferred to the next norm, for inference on the fused
        path (``fused_decode_enabled``: CUDA, no autograd). hidden (batch, L, d_model): the previous block's
        branch output (or the input tokens, with residual None; or None, with the fp32 input tokens as the
        residual: the first block then makes no copy of them); residual (batch, L, d_model) fp32, updated in
        place. consume=True: the normed mixer input may be written over hidden (the caller's own buffer).
        Returns (hidden', residual') with residual' + hidden' equal to ``forward(residual + hidden)``:
        each residual add + RMSNorm (+ the cast to the mixer's autocast dtype) is one pass over the tokens
        instead of three (add, norm, cast)."""
        ref = hidden if hidden is not None else residual
        b, L, d = ref.shape
        flat = lambda t: t.reshape(b * L, d) if t is not None else None  # noqa: E731
        normed, res = add_rms_norm(flat(hidden), flat(residual), self.norm.weight, self.norm.eps,
                                   out_dtype=self._mixer_input_dtype(ref.device), out_into_x=consume)
        h = self.mixer(normed.view(b, L, d))
        if self.ffn is not None:
            normed, res = add_rms_norm(flat(h), res, self.ffn_norm.weight, self.ffn_norm.eps, out_dtype=torch.float32)
            h = self._ffn_out(self.ffn(normed.view(b, L, d)))
        return h, res.view(b, L, d)

    def _mixer_input_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype of the normed mixer input. The norm's output is fp32 (the residual's dtype); a
        Mamba mixer's first op, in_proj, casts it to the autocast dtype anyway, so the fused norm
        writes that dtype directly (the same rounding, one cast kernel fewer). Other mixers get fp32."""
        if isinstance(self.mixer, (Mamba, Mamba2)) and torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return torch.float32
