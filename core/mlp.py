"""Dense feed-forward layers: SwiGLU (Llama / Jamba) and the two-layer GELU MLP (GPT, Switch experts)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """x (..., d_model) -> (..., d_model).

    kind="swiglu": down_proj(silu(gate_proj(x)) * up_proj(x)) (parameter names as Jamba/Llama);
    kind="gelu": fc2(gelu(fc1(x))).
    """

    KINDS = ("swiglu", "gelu")

    def __init__(self, d_model: int, d_hidden: int, kind: str = "swiglu", bias: bool = False):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"kind: expected one of {self.KINDS}, got {kind!r}")
        if d_model < 1 or d_hidden < 1:
            raise ValueError(f"d_model, d_hidden: expected positive ints, got {d_model}, {d_hidden}")
        self.kind = kind
        if kind == "swiglu":
            self.gate_proj = nn.Linear(d_model, d_hidden, bias=bias)
            self.up_proj = nn.Linear(d_model, d_hidden, bias=bias)
            self.down_proj = nn.Linear(d_hidden, d_model, bias=bias)
        else:
            self.fc1 = nn.Linear(d_model, d_hidden, bias=bias)
            self.fc2 = nn.Linear(d_hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(F.gelu(self.fc1(x)))

    def residual_out(self) -> nn.Linear:
        """The projection that writes into the residual stream (rescaled at init)."""
        return self.down_proj if self.kind == "swiglu" else self.fc2
