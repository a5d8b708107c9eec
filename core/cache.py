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


@dataclass
class KVCache:
    """Preallocated key/value cache of one attention layer, a ring of ``capacity`` slots.

    k, v: (batch, n_kv_heads, capacity, head_dim) in the model dtype; slot_pos: (capacity,) int64,
    the absolute position held by each slot (-1 = empty); pos: (1,) int64 on the device, the number
    of tokens seen so far. Keeping ``pos`` on the device makes the decode step capturable in a CUDA
    graph. Without positional embeddings attention does not depend on slot order, so a sliding
    window is simply a ring of ``window`` slots; full attention uses ``capacity = max_len``.
    """

    k: torch.Tensor
    v: torch.Tensor
    slot_pos: torch.Tensor
    pos: torch.Tensor

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()
        self.slot_pos.fill_(-1)
        self.pos.zero_()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.slot_pos, self.pos))
