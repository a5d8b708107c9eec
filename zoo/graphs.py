"""Inference through CUDA graphs: a model function captured once per input shape and replayed.

    fast = GraphedInference(model.forward_features)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        feats = fast(images)          # first call per shape: warm-up + capture; later calls: one graph replay

Eager inference launches every kernel from Python; at small inputs the host, not the GPU, sets the pace. vim-tiny
at 224 px, batch 64, bf16, on an H100 spends 3.5 ms of GPU time per batch but ~24 ms issuing its ~200 launches
(2,700 images/s eager against 18,400 replayed from a graph; DeiT-Ti 9,600 against 27,500); at 1024 px the GPU
dominates and the two are the same (docs/benchmarks.md). A graph replays the recorded launches with fixed addresses,
so each captured shape keeps its own input buffer, output and activation memory (a private pool) until dropped.

Per call the key is (shape, dtype, device of the input, and the autocast state): a new key captures a new graph (up
to ``max_graphs``, the oldest dropped first). Capturing runs the function under the caller's autocast settings with
autocast's weight-cast cache off, so the graph holds its casts rather than tensors that leave with the caller's
context. The function must be a pure function of its one tensor argument and the module's weights, and a replay runs
the kernels as captured: weights changed after the capture (and the half-precision copies the models cache from
them), modules replaced, or code paths chosen by anything but the input's key are not seen; call ``reset()`` after
such a change. Off CUDA the function runs eagerly. Inference only: autograd must be off.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import nullcontext
from typing import Callable, ContextManager, TypeVar

import torch
from torch import Tensor

__all__ = ["GraphedInference", "capture"]

T = TypeVar("T")


def capture(fn: Callable[[], T], device: torch.device, warmup: int = 2,
            context: Callable[[], ContextManager] = nullcontext) -> tuple[torch.cuda.CUDAGraph, T]:
    """Runs ``fn()`` ``warmup`` times on a side stream (kernels compiled, caches and workspaces built), then captures
    one call in a CUDA graph, each under a fresh ``context()``: (the graph, what the captured call returned, in the
    graph's memory). Replaying the graph reruns the captured kernels on the same addresses."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), context():
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), context():
        out = fn()
    return graph, out


class GraphedInference:
    """``fn(x)`` replayed from a CUDA graph per input key; ``fn`` eager off CUDA.

    Args:
        fn: a function of one tensor (a model's ``forward`` or ``forward_features``).
        max_graphs: captured graphs kept at once (each holds its activations' memory).
        clone: return a copy of the graph's output (True) or the output buffer itself, overwritten by the next replay
            of the same key (False: one copy less).
        warmup: eager calls before a capture (on a side stream: compiles kernels, builds weight caches).
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], max_graphs: int = 4, clone: bool = True, warmup: int = 2):
        if not callable(fn):
            raise ValueError(f"fn: expected a callable, got {type(fn).__name__}")
        if max_graphs < 1 or warmup < 1:
            raise ValueError(f"max_graphs and warmup: expected >= 1, got {max_graphs} and {warmup}")
        self.fn, self.max_graphs, self.clone, self.warmup = fn, max_graphs, clone, warmup
        self.graphs: OrderedDict = OrderedDict()  # key -> (static input, graph, static output)

    def __call__(self, x: Tensor) -> Tensor:
        """x: the function's input, a tensor of any shape -> fn(x)."""
        if not isinstance(x, Tensor):
            raise ValueError(f"x: expected a tensor, got {type(x).__name__}")
        if torch.is_grad_enabled():
            raise RuntimeError("GraphedInference is for inference: call it under torch.inference_mode() or "
                               "torch.no_grad()")
        if not self._capturable(x):
            return self.fn(x)
        key = self._key(x)
        entry = self.graphs.get(key)
        if entry is None:
            while len(self.graphs) >= self.max_graphs:
                self.graphs.popitem(last=False)
            entry = self.graphs[key] = self._capture(x)
        else:
            self.graphs.move_to_end(key)
        static_x, graph, out = entry
        static_x.copy_(x)
        graph.replay()
        return out.clone() if self.clone else out

    def reset(self) -> None:
        """Drops every captured graph (and the memory it holds)."""
        self.graphs.clear()

    def _capturable(self, x: Tensor) -> bool:
        return x.is_cuda

    @staticmethod
    def _key(x: Tensor) -> tuple:
        autocast = torch.is_autocast_enabled(x.device.type)
        return (tuple(x.shape), x.dtype, str(x.device), autocast,
                torch.get_autocast_dtype(x.device.type) if autocast else None, torch.is_inference_mode_enabled())

    def _capture(self, x: Tensor) -> tuple:
        """Warm-up calls on a side stream, then one captured call on a static copy of x, under the caller's autocast
        settings with the cast cache off."""
        device = x.device
        static_x = x.clone()
        autocast = torch.is_autocast_enabled(device.type)
        cast = dict(device_type=device.type, enabled=autocast, cache_enabled=False)
        if autocast:
            cast["dtype"] = torch.get_autocast_dtype(device.type)
        graph, out = capture(lambda: self.fn(static_x), device, self.warmup, lambda: torch.autocast(**cast))
        if not isinstance(out, Tensor):
            raise ValueError(f"fn: expected it to return one tensor, got {type(out).__name__}")
        return static_x, graph, out
