"""Inference caches: per-layer recurrent states whose size does not grow with the sequence."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class MambaState:
    """Recurrent state of one Mamba mixer.

    conv: (batch, d_inner, d_conv), the last d_conv inputs of the causal conv (model dtype);
    ssm: (batch, d_inner, N) fp32. A bidirectional mixer has no state (it is not causal).
    """

    conv: torch.Tensor
    ssm: torch.Tensor

    def reset(self) -> None:
        self.conv.zero_()
        self.ssm.zero_()

    def nbytes(self) -> int:
        return self.conv.numel() * self.conv.element_size() + self.ssm.numel() * self.ssm.element_size()


@dataclass
class InferenceCache:
    """States of every layer of a model (index = layer index) and the number of tokens seen so far.

    A layer's entry is whatever its mixer's ``allocate_state`` returns (MambaState for Mamba,
    a key/value cache for attention)."""

    layers: list = field(default_factory=list)
    seqlen_offset: int = 0

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.layers if s is not None)
