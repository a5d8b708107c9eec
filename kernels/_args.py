"""Argument helpers of the kernels' entry points, in plain PyTorch (the kernels import nothing from mambazoo.core;
core/scan_ref.py holds the same contract as the reference)."""

from __future__ import annotations

import torch


def shape_str(t: torch.Tensor) -> str:
    """'(2, 3, 4)' for a tensor of that shape (error messages)."""
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_low_rank_delta(u: torch.Tensor, dt: torch.Tensor, dt_weight: torch.Tensor) -> None:
    """Validates a low-rank delta: dt (batch, R, L) and dt_weight (dim, R) for u (batch, dim, L)."""
    if u.dim() != 3:
        raise ValueError(f"u: expected (batch, dim, L), got a {u.dim()}-d tensor {shape_str(u)}")
    batch, dim, L = u.shape
    if not isinstance(dt_weight, torch.Tensor) or dt_weight.dim() != 2 or dt_weight.shape[0] != dim:
        got = shape_str(dt_weight) if isinstance(dt_weight, torch.Tensor) else type(dt_weight).__name__
        raise ValueError(f"dt_weight: expected (dim, R) = ({dim}, R), got {got}")
    R = dt_weight.shape[1]
    if not isinstance(dt, torch.Tensor) or tuple(dt.shape) != (batch, R, L) or not dt.is_floating_point():
        got = f"{dt.dtype} {shape_str(dt)}" if isinstance(dt, torch.Tensor) else type(dt).__name__
        raise ValueError(f"delta: with dt_weight (dim, R = {R}) expected low-rank dt (batch, R, L) = ({batch}, {R}, "
                         f"{L}) floating point, got {got}")


def low_rank_dtype(dt: torch.Tensor, dt_weight: torch.Tensor) -> torch.dtype:
    """The dtype a low-rank delta's product takes its operands in: the narrower of dt's and dt_weight's."""
    return dt_weight.dtype if dt_weight.element_size() < dt.element_size() else dt.dtype


def low_rank_delta(dt: torch.Tensor, dt_weight: torch.Tensor) -> torch.Tensor:
    """delta = dt_weight @ dt: dt (batch, R, L), dt_weight (dim, R) -> (batch, dim, L) in dt's dtype; both operands
    in low_rank_dtype, the sum in fp32 (what the general kernels take where the inference kernel does not)."""
    ct = low_rank_dtype(dt, dt_weight)
    return torch.matmul(dt_weight.to(ct).float(), dt.to(ct).float()).to(dt.dtype)


def direction_pairs(**named) -> list[tuple]:
    """The per-direction arguments of a bidirectional scan, in order, each as a (forward, backward) pair (None: both
    absent); the first must be a pair of tensors. Raises ValueError naming the first argument that is not a pair."""
    pairs = []
    for name, v in named.items():
        v = (None, None) if v is None else v
        if not (isinstance(v, (tuple, list)) and len(v) == 2):
            raise ValueError(f"{name}: expected a (forward, backward) pair, got {type(v).__name__}")
        pairs.append(tuple(v))
    if not all(isinstance(t, torch.Tensor) for t in pairs[0]):
        raise ValueError(f"{next(iter(named))}: expected a pair of tensors, got {[type(t).__name__ for t in pairs[0]]}")
    return pairs
