"""Fused one-token decode step of the selective scan.

    state (b, d, N) fp32, fp16 or bf16, updated in place (the step in fp32, stored back in the state's dtype);
    x, dt, z, y (b, d);  A (d, N);  B, C (b, G, N) (G = 1 for (b, N));  D, dt_bias (d,)

    dt <- softplus(dt + dt_bias);  state <- exp(dt A) state + dt B x;  y = C . state + D x;  y *= silu(z)

``launch_state_update(..., A_is_log=True)`` takes A_log in place of A (A = -exp(A_log) in the kernel):
the model's decode step passes its parameters as they are, with no per-step cast or exp kernels.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from mambazoo.kernels._args import shape_str as _shape
from mambazoo.kernels._host import cdiv, next_power_of_2


@triton.jit
def state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
    dim, N, G, dpg,
    stride_x, stride_dt, stride_z, stride_bb, stride_bg, stride_bn, stride_cb, stride_cg, stride_cn,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    A_IS_LOG: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (b, cdiv(d, BLOCK_D)); channels of one program share one group (BLOCK_D divides dpg).
    x, dt, z, B, C are read through their strides (row slices of a projection need no copy);
    with A_IS_LOG, A_ptr holds A_log and A = -exp(A_log) is formed here in fp32."""
    b = tl.program_id(0)
    d0 = tl.program_id(1) * BLOCK_D
    offs_d = d0 + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_n = offs_n < N
    mask = mask_d[:, None] & mask_n[None, :]
    g = d0 // dpg
    dn = offs_d[:, None] * N + offs_n[None, :]
    st_ptr = state_ptr + b * dim * N + dn
    h = tl.load(st_ptr, mask=mask, other=0.0).to(tl.float32)  # a no-op for an fp32 state
    A = tl.load(A_ptr + dn, mask=mask, other=0.0).to(tl.float32)
    if A_IS_LOG:
        A = -tl.exp(A)
    x = tl.load(x_ptr + b * stride_x + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + b * stride_dt + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))
    Bv = tl.load(B_ptr + b * stride_bb + g * stride_bg + offs_n * stride_bn, mask=mask_n, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * stride_cb + g * stride_cg + offs_n * stride_cn, mask=mask_n, other=0.0).to(tl.float32)
    a = tl.exp2(dt[:, None] * A * 1.4426950408889634)
    h = a * h + (dt * x)[:, None] * Bv[None, :]
    tl.store(st_ptr, h.to(state_ptr.dtype.element_ty), mask=mask)  # y below reads the unrounded fp32 h
    y = tl.sum(h * Cv[None, :], axis=1)
    if HAS_D:
        y += tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) * x
    if HAS_Z:
        z = tl.load(z_ptr + b * stride_z + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        y = y * z * tl.sigmoid(z)
    tl.store(y_ptr + b * dim + offs_d, y.to(y_ptr.dtype.element_ty), mask=mask_d)


def _pow2_divisor(n: int, cap: int) -> int:
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def _rows(t: Tensor) -> Tensor:
    """t with a dense last axis (a row slice of a projection stays a view; anything else is copied)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def launch_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                        D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor],
                        dt_softplus: bool, A_is_log: bool = False) -> Tensor:
    """One decode step; ``state`` must be contiguous fp32, fp16 or bf16 (updated in place, in its dtype); returns
    y (b, d) in x's dtype.

    x, dt, z (b, d) and B, C (b, N) | (b, G, N) may be strided views (e.g. slices of in_proj's and
    x_proj's outputs); A, D, dt_bias may be of any float dtype. With ``A_is_log`` the A argument is
    A_log and the kernel uses A = -exp(A_log) (no per-step exp/cast kernels in the decode step)."""
    batch, dim, N = state.shape
    Bk = B if B.dim() == 3 else B.unsqueeze(1)
    Ck = C if C.dim() == 3 else C.unsqueeze(1)
    if Bk.shape[1] != Ck.shape[1]:
        G = max(Bk.shape[1], Ck.shape[1])
        Bk = Bk.repeat_interleave(G // Bk.shape[1], dim=1)
        Ck = Ck.repeat_interleave(G // Ck.shape[1], dim=1)
    G = Bk.shape[1]
    dpg = dim // G
    cap = 32 if state.is_cuda else 128  # the interpreter pays per program: larger tiles on CPU
    block_d = _pow2_divisor(dpg, cap) if G > 1 else cap
    x, dt = _rows(x), _rows(dt)
    z = _rows(z) if z is not None else None
    y = torch.empty(batch, dim, device=x.device, dtype=x.dtype)
    grid = (batch, cdiv(dim, block_d))
    state_update_kernel[grid](
        state, x, dt, A.contiguous(), Bk, Ck, D.contiguous() if D is not None else None,
        z, dt_bias.contiguous() if dt_bias is not None else None, y,
        dim, N, G, dpg,
        x.stride(0), dt.stride(0), z.stride(0) if z is not None else 0,
        Bk.stride(0), Bk.stride(1), Bk.stride(2), Ck.stride(0), Ck.stride(1), Ck.stride(2),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
        A_IS_LOG=bool(A_is_log), BLOCK_D=block_d, BLOCK_N=next_power_of_2(N),
        num_warps=4 if state.is_cuda else 1,
    )
    return y


@torch.library.custom_op("mambazoo::state_update", mutates_args=("state",))
def state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                 z: Optional[Tensor], dt_bias: Optional[Tensor], dt_softplus: bool) -> Tensor:
    """The decode step as a registered op (what torch.compile traces)."""
    return launch_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


@state_update.register_fake
def _state_update_fake(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    return torch.empty_like(x)



def check_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None):
    """Minimal boundary checks; raises ValueError naming the expected layout."""
    if (state.dim() != 3 or state.dtype not in (torch.float32, torch.float16, torch.bfloat16)
            or not state.is_contiguous()):
        raise ValueError(f"state: expected a contiguous float32, float16 or bfloat16 (batch, dim, N), got "
                         f"{state.dtype} {_shape(state)} with strides {tuple(state.stride())}")
    batch, dim, N = state.shape
    for name, t in (("x", x), ("dt", dt), ("z", z)):
        if t is not None and tuple(t.shape) != (batch, dim):
            raise ValueError(f"{name}: expected (batch, dim) = ({batch}, {dim}), got {_shape(t)}")
    if tuple(A.shape) != (dim, N):
        raise ValueError(f"A: expected (dim, N) = ({dim}, {N}), got {_shape(A)}")
    for name, t in (("B", B), ("C", C)):
        ok = (t.dim() == 2 and tuple(t.shape) == (batch, N)) or (
            t.dim() == 3 and t.shape[0] == batch and t.shape[2] == N and dim % t.shape[1] == 0)
        if not ok:
            raise ValueError(f"{name}: expected (batch, N) = ({batch}, {N}) or (batch, groups, N), got {_shape(t)}")
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            raise ValueError(f"{name}: expected (dim,) = ({dim},), got {_shape(t)}")
