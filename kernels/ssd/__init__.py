"""Triton kernels of the SSD layer (Mamba-2); mambazoo.core.ssd holds their reference and the backend choice.

    ssd_triton(x, dt, A, B, C, chunk_size=64, D=None, z=None, dt_bias=None, dt_softplus=False,
               dt_limit=(0, inf), initial_states=None, seq_idx=None, cu_seqlens=None, return_final_states=False)
    ssd_step_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0, inf))

Both call ops registered with torch.library (``torch.ops.mambazoo.ssd_fwd`` / ``ssd_bwd`` / ``ssd_step``) with
fake implementations, so torch.compile traces them without graph breaks. The forward and the step are in
kernels/ssd/chunked.py; the backward (kernels/ssd/backward.py) recomputes the chunk states from the inputs,
which are all the forward saves.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

import mambazoo.kernels  # noqa: F401  (applies the interpreter shims before any launch)
from mambazoo.kernels._host import next_power_of_2
from mambazoo.kernels.ssd.backward import ssd_backward
from mambazoo.kernels.ssd.chunked import ssd_forward, ssd_step_launch

__all__ = ["ssd_triton", "ssd_step_triton", "kernel_chunk_size"]

INF = float("inf")


def kernel_chunk_size(chunk_size: int) -> int:
    """The kernels' chunk (their in-chunk GEMM tile): a power of two in [16, 64] nearest above chunk_size.
    The chunk is a computational choice only: the result does not depend on it (up to rounding)."""
    return max(16, min(64, next_power_of_2(int(chunk_size))))


@torch.library.custom_op("mambazoo::ssd_fwd", mutates_args=())
def ssd_fwd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
            dt_bias: Optional[Tensor], initial_states: Optional[Tensor], seq_idx: Optional[Tensor],
            chunk_size: int, dt_softplus: bool, dt_min: float, dt_max: float) -> tuple[Tensor, Tensor]:
    """(y (b, L, h, p) in x's dtype, final state (b, h, p, N) fp32); see mambazoo.kernels.ssd.chunked."""
    return ssd_forward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size, dt_softplus,
                       dt_min, dt_max)


@ssd_fwd.register_fake
def _ssd_fwd_fake(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size, dt_softplus, dt_min, dt_max):
    b, L, h, p = x.shape
    return torch.empty_like(x), x.new_empty(b, h, p, B.shape[-1], dtype=torch.float32)


@torch.library.custom_op("mambazoo::ssd_bwd", mutates_args=())
def ssd_bwd(dy: Optional[Tensor], dfinal: Optional[Tensor], x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
            D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor], initial_states: Optional[Tensor],
            seq_idx: Optional[Tensor], chunk_size: int, dt_softplus: bool, dt_min: float,
            dt_max: float) -> list[Tensor]:
    """[dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_states] (an empty tensor for each absent input);
    see mambazoo.kernels.ssd.backward."""
    grads = ssd_backward(dy, dfinal, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size,
                         dt_softplus, dt_min, dt_max)
    return [gr if gr is not None else x.new_empty(0) for gr in grads]


@ssd_bwd.register_fake
def _ssd_bwd_fake(dy, dfinal, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size, dt_softplus,
                  dt_min, dt_max):
    like = lambda t: torch.empty_like(t) if t is not None else x.new_empty(0)  # noqa: E731
    return [like(t) for t in (x, dt, A, B, C, D, z, dt_bias, initial_states)]


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size, softplus, lo, hi = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx)
    ctx.args = (chunk_size, softplus, lo, hi)
    ctx.present = [t is not None for t in (D, z, dt_bias, initial_states)]


def _backward(ctx, dy, dfinal):
    x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx = ctx.saved_tensors
    g = ssd_bwd(dy, dfinal, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, *ctx.args)
    opt = [gi if present else None for gi, present in zip(g[5:], ctx.present)]
    return (*g[:5], *opt, None, None, None, None, None)


ssd_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("mambazoo::ssd_step", mutates_args=("state",))
def ssd_step(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
             z: Optional[Tensor], dt_bias: Optional[Tensor], dt_softplus: bool, dt_min: float,
             dt_max: float) -> Tensor:
    """The one-token step as a registered op: state updated in place, returns y (b, h, p)."""
    return ssd_step_launch(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_min, dt_max)


@ssd_step.register_fake
def _ssd_step_fake(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_min, dt_max):
    return torch.empty_like(x)


def ssd_triton(x, dt, A, B, C, chunk_size: int = 64, D=None, z=None, dt_bias=None, dt_softplus=False,
               dt_limit=(0.0, INF), initial_states=None, seq_idx=None, cu_seqlens=None, return_final_states=False):
    """The SSD layer on the Triton kernels; arguments and returns as mambazoo.core.ssd.ssd_chunked (chunk_size is
    rounded by ``kernel_chunk_size``). Differentiable in every floating input."""
    from mambazoo.core.ssd import check_ssd_inputs, seq_idx_from_cu_seqlens

    L = check_ssd_inputs(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, dt_limit)[1]
    if cu_seqlens is not None:
        seq_idx = seq_idx_from_cu_seqlens(cu_seqlens, L)
    y, final = ssd_fwd(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, kernel_chunk_size(chunk_size),
                       bool(dt_softplus), float(dt_limit[0]), float(dt_limit[1]))
    return (y, final) if return_final_states else y


def ssd_step_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, INF)):
    """One token on the Triton kernel; arguments and return as mambazoo.core.ssd.ssd_step_ref (state, a contiguous
    fp32 (b, h, p, N), advanced in place). No autograd (decoding)."""
    from mambazoo.core.ssd import check_ssd_step_inputs

    check_ssd_step_inputs(state, x, dt, A, B, C, D, z, dt_bias)
    if not state.is_contiguous():
        raise ValueError(f"state: expected a contiguous (batch, heads, headdim, N), got strides {state.stride()}")
    return ssd_step(state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus), float(dt_limit[0]), float(dt_limit[1]))
