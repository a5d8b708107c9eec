"""Elementwise math shared by the Triton kernels.

``gate(z, TANH, FAST)``: silu(z), optionally through one tanh.approx (the scans' and gated_proj's gate).
``sigmoid(x, FAST)``: with FAST (the GPU; the interpreter has no PTX) one ex2.approx.ftz and one
rcp.approx.ftz instead of tl.sigmoid's lowering, which guards the exponent's range and divides with full IEEE
rounding (~12 instructions per value in the scan forward's SASS, sm_90). Relative error ~2^-21: below what
fp32 accumulation already loses over a scan.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _ex2_ftz(x):
    return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def _rcp_ftz(x):
    return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def sigmoid(x, FAST: tl.constexpr):
    """1 / (1 + exp(-x)) of an fp32 tensor; x -> -inf gives 0 (exp overflows to inf, its reciprocal is 0)."""
    if FAST:
        return _rcp_ftz(1.0 + _ex2_ftz(x * -1.4426950408889634))
    else:
        return tl.sigmoid(x)


@triton.jit
def gate(z, TANH: tl.constexpr, FAST: tl.constexpr):
    """silu(z) = z sigmoid(z); TANH (GPU only): sigmoid(z) = (1 + tanh(z / 2)) / 2 with one tanh.approx, one
    special-function op instead of ex2 + rcp (relative error of tanh ~2^-11: for half-precision outputs)."""
    if TANH:
        th = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [z * 0.5], dtype=tl.float32,
                                       is_pure=True, pack=1)
        g = z * (0.5 + 0.5 * th)
    else:
        g = z * sigmoid(z, FAST)
    return g
