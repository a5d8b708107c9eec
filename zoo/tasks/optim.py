"""Optimizer rules shared by every task: AdamW with weight decay on matrices only, and a cosine
schedule with linear warmup.

Weight decay applies to the weights of Linear / Conv layers (>= 2 dims). It does not apply to
biases, norms, embeddings (token tables, position tables, class tokens), the SSM parameters
(A_log, D, dt bias, the LTI SSM's B, C, log_dt) or any parameter that core flags with
``_no_weight_decay = True``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# parameter-name endings that never get weight decay, whatever their shape
NO_DECAY_NAMES = ("A_log", "D", "log_dt", "pos_embed", "pos_embedding", "position_embedding",
                  "cls_token", "class_token", "absolute_pos_embed")
_DECAY_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)


def _module_is_norm_or_ssm(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, _NO_DECAY_MODULES) or "Norm" in name or name == "LTISSM"


def _classify(model: nn.Module) -> list[tuple[str, nn.Parameter, bool]]:
    """(name, parameter, gets_decay) for every parameter once (a head tied to the embedding
    counts as the embedding, so it gets none)."""
    out, seen = [], set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            # Linear / Conv weights are recognized by their module, so the rule also holds when a
            # sharding strategy (FSDP) hands out flattened views; other matrices by their shape
            layer_weight = isinstance(module, _DECAY_MODULES) and p_name == "weight"
            skip = (getattr(p, "_no_weight_decay", False) or _module_is_norm_or_ssm(module)
                    or p_name in NO_DECAY_NAMES or p_name.endswith("bias") or (p.ndim < 2 and not layer_weight))
            out.append((f"{mod_name}.{p_name}" if mod_name else p_name, p, not skip))
    return out


def split_decay(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the parameters that get weight decay and of those that do not."""
    cls = _classify(model)
    return [n for n, _, d in cls if d], [n for n, _, d in cls if not d]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: matrices with ``weight_decay``, everything else with 0."""
    cls = [(p, d) for _, p, d in _classify(model) if p.requires_grad]
    return [{"params": [p for p, d in cls if d], "weight_decay": weight_decay},
            {"params": [p for p, d in cls if not d], "weight_decay": 0.0}]


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """LR multiplier: linear warmup 0 -> 1 over ``warmup_steps``, then cosine 1 -> ``min_ratio``
    at ``total_steps`` (held there afterwards)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class CosineWithWarmup:
    """``cosine_with_warmup`` as a LambdaLR multiplier object: unlike a lambda, its settings are saved in the
    scheduler's state (a checkpoint), so a resumed run knows the schedule it was trained with."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float):
        self.warmup_steps, self.total_steps, self.min_ratio = int(warmup_steps), int(total_steps), float(min_ratio)

    def __call__(self, step: int) -> float:
        return cosine_with_warmup(step, self.warmup_steps, self.total_steps, self.min_ratio)

    def settings(self) -> tuple[int, int, float]:
        return self.warmup_steps, self.total_steps, self.min_ratio


def check_optim_args(lr: float, weight_decay: float, betas, warmup_steps: int, min_lr_ratio: float,
                     schedule_steps: int | None = None) -> None:
    """ValueError naming the first setting out of range (a zero learning rate would train nothing)."""
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr: expected a finite number > 0, got {lr!r} (0 would train nothing)")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay: expected a finite number >= 0, got {weight_decay!r}")
    betas = tuple(betas)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"betas: expected two numbers in [0, 1), got {betas!r}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps: expected an int >= 0, got {warmup_steps!r}")
    if not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio: expected a number in [0, 1], got {min_lr_ratio!r}")
    if schedule_steps is not None and schedule_steps < 1:
        raise ValueError(f"schedule_steps: expected a positive int or null, got {schedule_steps!r}")


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95),
                    warmup_steps: int = 100, total_steps: int = 1000, min_lr_ratio: float = 0.1,
                    fused: bool = False):
    """AdamW + step-wise LambdaLR in Lightning's ``configure_optimizers`` format. fused: PyTorch's fused
    CUDA AdamW, whose step can be skipped on the device (``found_inf``) without a host synchronization."""
    if not math.isfinite(total_steps) or total_steps <= 0:
        raise ValueError(f"the cosine schedule needs a finite number of steps, got {total_steps}: "
                         "set --trainer.max_steps (or the task's schedule_steps)")
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), fused=fused or None)
    total = int(total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, CosineWithWarmup(warmup_steps, total, min_lr_ratio))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
