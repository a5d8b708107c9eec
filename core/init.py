"""Parameter initialization of a whole model, for models built on the meta device.

    with torch.device("meta"):
        model = mambazoo.create_model("mamba-130m")     # no memory, no init work
    model.to_empty(device="cuda")                      # storage, uninitialized
    mambazoo.core.init.reset_parameters(model)        # every parameter drawn as the constructor draws it
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

__all__ = ["reset_parameters"]


def _children_first(module: nn.Module) -> Iterator[nn.Module]:
    """Every submodule once, each after its children (the order constructors initialize in)."""
    seen: set[int] = set()

    def walk(m: nn.Module):
        if id(m) in seen:
            return
        seen.add(id(m))
        for child in m.children():
            yield from walk(child)
        yield m

    yield from walk(module)


@torch.no_grad()
def reset_parameters(model: nn.Module) -> nn.Module:
    """Draws every parameter of ``model`` as a direct construction does: each module's own ``reset_parameters()``
    (nn.Linear, nn.Conv1d, nn.Embedding, RMSNorm, the Mamba mixer's parameters, ...), or a model's
    ``init_weights()`` where it has that instead, children before their parents, so a model-level init (the LMs'
    residual rescaling, Vim's truncated normals) comes last as in its constructor. Tied weights (an LM head sharing
    the embedding) are tied again if moving the model broke the tie. Returns ``model``. The values differ from a
    direct build (another random stream); their distributions do not."""
    for m in _children_first(model):
        fn = getattr(m, "reset_parameters", None) or getattr(m, "init_weights", None)
        if callable(fn):
            fn()
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    return model
