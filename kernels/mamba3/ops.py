"""Launchers and torch.library registration of the Mamba-3 kernels: the chunked forward (chunk_fwd.py), its
backward in rotated space (chunk_bwd.py) and the decode step (step.py).

``torch.ops.mambazoo.mamba3_chunk_fwd`` / ``mamba3_chunk_bwd`` / ``mamba3_step`` are custom ops with fake (meta)
implementations, so torch.compile traces them without graph breaks. ``mamba3_scan_triton`` takes the scan's
inputs (core/mamba3_scan.py) and does the small host-side parts in PyTorch: cumulative angles, trapezoid weights,
the initial carry, the final key / angle; while autograd records, also the rotation and biases (so autograd
differentiates them), the kernels doing the part that grows with L * chunk.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mambazoo.core.mamba3_scan import (
    TWO_PI,
    angle_increment,
    check_mamba3_inputs,
    expand_groups,
    mamba3_scan_chunked,
    rank_values,
    rotate,
    zero_states,
)
from mambazoo.kernels._host import cdiv, next_power_of_2

# chunk length T per device: the GPU's published chunk (64); 16 on the CPU interpreter so tests cross chunks
CHUNK = {"cuda": 64, "cpu": 16}


def kernel_supports(N: int, R: int, P: int, backward: bool = False) -> bool:
    """Shapes the kernels handle: d_state N a power of two in [32, 128] (pairs of N/2 >= 16 for tl.dot), rank
    R <= 8, head dim P <= 256. With ``backward`` (training), R * N <= 256 as well: the backward unrolls R x R
    tile products, and beyond that its compile time grows to many minutes and its shared memory is unmeasured
    (rank 4 at N 128 did not finish compiling in 10 minutes on a 2-core machine); such shapes train through the
    chunked reference. Shared memory compiled for sm_90 (scripts/check_kernel_resources.py): forward 28,672 B and
    backward 49,152 B at N 128, P 64, chunk 64, ranks 1 and 2, within the H100's 232,448."""
    fits = 32 <= N <= 128 and N & (N - 1) == 0 and 1 <= R <= 8 and P <= 256
    return fits and (not backward or R * N <= 256)


def _launch(x, B, C, theta, a, gamma, e, B_bias, C_bias, D, mimo_x, h0, chunk, pairwise, y, hT, states=None):
    b, L, H, P = x.shape
    R, G, N = B.shape[2:]
    S = theta.shape[-1]
    block_p = max(16, min(64, next_power_of_2(P)))
    grid = (b * H, cdiv(P, block_p))
    from mambazoo.kernels.mamba3.chunk_fwd import mamba3_chunk_fwd_kernel

    mamba3_chunk_fwd_kernel[grid](
        x, B, C, theta, a, gamma, e, B_bias, C_bias, D if D is not None else a, mimo_x if mimo_x is not None else a,
        h0, y, hT, states if states is not None else hT,
        L, H, P, G, S,
        x.stride(0), x.stride(1), x.stride(2),
        B.stride(0), B.stride(1), B.stride(2), B.stride(3),
        theta.stride(0), theta.stride(1), theta.stride(2),
        a.stride(0), a.stride(1),
        y.stride(0), y.stride(1), y.stride(2), y.stride(3),
        R=R, N=N, T=chunk, BLOCK_P=block_p, PAIRWISE=pairwise, HAS_D=D is not None, HAS_MIMO=mimo_x is not None,
        # one stage: the default pipelining (3 stages) asked for 249,856 B of shared memory at N 128 (fp32 q / k)
        PRECISION="ieee", STORE_STATES=states is not None, num_warps=4, num_stages=1,
    )


@torch.library.custom_op("mambazoo::mamba3_chunk_fwd", mutates_args=())
def mamba3_chunk_fwd(x: Tensor, B: Tensor, C: Tensor, theta: Tensor, a: Tensor, gamma: Tensor, e: Tensor,
                     B_bias: Tensor, C_bias: Tensor, D: Optional[Tensor], mimo_x: Optional[Tensor], h0: Tensor,
                     chunk: int, pairwise: bool, store_states: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel: x (b, L, H, P); B, C (b, L, R, G, N); theta (b, L, H, S) cumulative angles; a, gamma, e
    (b, L, H) fp32; B_bias, C_bias (H, R, N) fp32; D (H,); mimo_x (H, R, P) fp32; h0 (b, H, P, N) fp32 the
    initial carry. Returns y (b, L, R, H, P) fp32, the final state (b, H, P, N) fp32 and, with store_states,
    the carry entering each chunk (b, H, ceil(L / chunk), P, N) fp32 (else an empty tensor)."""
    b, L, H, P = x.shape
    R, N = B.shape[2], B.shape[4]
    y = torch.empty(b, L, R, H, P, device=x.device, dtype=torch.float32)
    hT = torch.empty(b, H, P, N, device=x.device, dtype=torch.float32)
    nc = cdiv(L, chunk) if store_states else 0
    states = torch.empty(b, H, nc, P, N, device=x.device, dtype=torch.float32)
    _launch(x, B, C, theta, a, gamma, e, B_bias, C_bias, D, mimo_x, h0, chunk, pairwise, y, hT,
            states if store_states else None)
    return y, hT, states


@mamba3_chunk_fwd.register_fake
def _mamba3_chunk_fwd_fake(x, B, C, theta, a, gamma, e, B_bias, C_bias, D, mimo_x, h0, chunk, pairwise,
                           store_states=False):
    b, L, H, P = x.shape
    R, N = B.shape[2], B.shape[4]
    nc = cdiv(L, chunk) if store_states else 0
    return (x.new_empty(b, L, R, H, P, dtype=torch.float32), x.new_empty(b, H, P, N, dtype=torch.float32),
            x.new_empty(b, H, nc, P, N, dtype=torch.float32))


@torch.library.custom_op("mambazoo::mamba3_chunk_bwd", mutates_args=())
def mamba3_chunk_bwd(dy: Tensor, dhT: Tensor, q: Tensor, k: Tensor, v: Tensor, a: Tensor, gamma: Tensor, e: Tensor,
                     D: Optional[Tensor], states: Tensor, chunk: int
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward kernel (chunk_bwd.py) in rotated space: dy, v (b, L, R, H, P); dhT (b, H, P, N); q, k
    (b, L, R, H, N) rotated; a, gamma, e (b, L, H); D (H,); states from the forward; all fp32 contiguous.
    Returns dq, dk (b, L, R, H, N), dv (b, L, R, H, P), da, dgamma, de (b, L, H), dD (b, H) and the initial
    carry's gradient (b, H, P, N)."""
    b, L, R, H, P = v.shape
    N = q.shape[-1]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    da, dgamma, de = torch.empty_like(a), torch.empty_like(a), torch.empty_like(a)
    dD = torch.zeros(b, H, device=v.device, dtype=torch.float32)
    dh0 = torch.empty_like(dhT)
    from mambazoo.kernels.mamba3.chunk_bwd import mamba3_chunk_bwd_kernel

    mamba3_chunk_bwd_kernel[(b * H,)](
        dy, dhT, q, k, v, a, gamma, e, D if D is not None else a, states,
        dq, dk, dv, da, dgamma, de, dD, dh0,
        L, H, P, states.shape[2],
        R=R, N=N, T=chunk, BLOCK_P=max(16, next_power_of_2(P)), HAS_D=D is not None, PRECISION="ieee",
        num_warps=4, num_stages=1,
    )
    return dq, dk, dv, da, dgamma, de, dD, dh0


@mamba3_chunk_bwd.register_fake
def _mamba3_chunk_bwd_fake(dy, dhT, q, k, v, a, gamma, e, D, states, chunk):
    b, L, R, H, P = v.shape
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(a), torch.empty_like(a),
            torch.empty_like(a), v.new_empty(b, H), torch.empty_like(dhT))


class _RotatedScan(torch.autograd.Function):
    """y, hT from rotated q, k (b, L, R, H, N), x (b, L, H, P), mimo_x (H, R, P) or None, a, gamma, e (b, L, H),
    D (H,) or None, carry (b, H, P, N): the forward and backward kernels (all fp32 contiguous)."""

    @staticmethod
    def forward(ctx, q, k, x, mimo_x, a, gamma, e, D, carry, chunk):
        b, L, R, H, N = q.shape
        zeros = q.new_zeros(H, R, N)
        theta = q.new_zeros(b, L, H, 1)  # one angle, always 0: no rotation in the kernel
        y, hT, states = mamba3_chunk_fwd(x, k, q, theta, a, gamma, e, zeros, zeros, D, mimo_x, carry, chunk, False,
                                         True)
        ctx.save_for_backward(q, k, x, mimo_x, a, gamma, e, D, states)
        ctx.chunk = chunk
        return y, hT

    @staticmethod
    def backward(ctx, dy, dhT):
        q, k, x, mimo_x, a, gamma, e, D, states = ctx.saved_tensors
        v = (x.unsqueeze(2) if mimo_x is None else x.unsqueeze(2) * mimo_x.transpose(0, 1)).contiguous()
        dy = torch.zeros_like(v) if dy is None else dy.float().contiguous()
        dhT = torch.zeros(*states.shape[:2], *states.shape[3:], device=v.device) if dhT is None else dhT.contiguous()
        dq, dk, dv, da, dgamma, de, dD, dcarry = mamba3_chunk_bwd(dy, dhT, q, k, v, a, gamma, e, D, states,
                                                                  ctx.chunk)
        if mimo_x is None:
            dx, dmx = dv[:, :, 0], None
        else:
            dx = (dv * mimo_x.transpose(0, 1)).sum(2)
            dmx = torch.einsum("blrhp,blhp->hrp", dv, x)
        return dq, dk, dx, dmx, da, dgamma, de, (None if D is None else dD.sum(0)), dcarry, None


def mamba3_scan_triton_train(x, dt, adt, trap, B, C, angles, B_bias, C_bias, D=None, mimo_x=None,
                             initial_states=None, return_final_states=False, pairwise=True, chunk_size=None):
    """The scan with gradients: the rotation, biases, angle sums and trapezoid weights in PyTorch (autograd),
    the chunked part in the forward / backward kernels. Arguments and returns as core.mamba3_scan.mamba3_scan_ref
    (no seq_idx / cu_seqlens)."""
    b, L, H, P, R, G, N, S = check_mamba3_inputs(x, dt, adt, trap, B, C, angles, B_bias, C_bias, D, mimo_x,
                                                 initial_states, None, None)
    f32 = torch.float32
    if initial_states is None:
        initial_states = zero_states(b, H, P, N, S, R, device=x.device, dtype=f32)
    theta0, h0, k0, x0 = (t.to(f32) for t in initial_states)
    dt, adt, trap = dt.to(f32), adt.to(f32), trap.to(f32)
    theta = theta0[:, None] + torch.cumsum(angle_increment(angles.to(f32), dt), dim=1)  # (b, L, H, S)
    rot = theta.unsqueeze(2)
    k = rotate(expand_groups(B.to(f32), H) + B_bias.to(f32).transpose(0, 1), rot, pairwise).contiguous()
    q = rotate(expand_groups(C.to(f32), H) + C_bias.to(f32).transpose(0, 1), rot, pairwise).contiguous()
    gamma = dt * trap
    delta = dt * (1 - trap)
    e = gamma + F.pad(delta[:, 1:], (0, 0, 0, 1))
    mx = None if mimo_x is None else mimo_x.to(f32).contiguous()
    carry = h0 + delta[:, 0, :, None, None] * torch.einsum("brhp,brhn->bhpn", rank_values(x0, mx), k0)
    chunk = chunk_size or CHUNK["cuda" if x.device.type == "cuda" else "cpu"]
    chunk = max(16, next_power_of_2(chunk))
    y, hT = _RotatedScan.apply(q, k, x.to(f32).contiguous(), mx, adt.contiguous(), gamma.contiguous(),
                               e.contiguous(), None if D is None else D.to(f32).contiguous(), carry.contiguous(), chunk)
    y = y.to(x.dtype)
    if not return_final_states:
        return y
    return y, (torch.remainder(theta[:, -1], TWO_PI), hT, k[:, -1], x[:, -1].to(f32))


def mamba3_scan_triton(x, dt, adt, trap, B, C, angles, B_bias, C_bias, D=None, mimo_x=None, initial_states=None,
                       cu_seqlens=None, return_final_states=False, pairwise=True, chunk_size=None):
    """The Mamba-3 scan through the kernels; arguments and returns as core.mamba3_scan.mamba3_scan_ref (no
    seq_idx). While autograd records, the forward / backward pair (mamba3_scan_triton_train); else the forward
    alone with the rotation fused. Shapes the kernels do not take (kernel_supports) run the chunked reference."""
    b, L, H, P, R, G, N, S = check_mamba3_inputs(x, dt, adt, trap, B, C, angles, B_bias, C_bias, D, mimo_x,
                                                 initial_states, None, cu_seqlens)
    tensors = [x, dt, adt, trap, B, C, angles, B_bias, C_bias, D, mimo_x, *(initial_states or ())]
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if not kernel_supports(N, R, P, backward=training):
        return mamba3_scan_chunked(x, dt, adt, trap, B, C, angles, B_bias, C_bias, D, mimo_x, initial_states, None,
                                   cu_seqlens, return_final_states, pairwise)
    if cu_seqlens is not None:  # one launch per packed sequence
        cu = cu_seqlens.tolist()
        ys, fins = [], []
        for i, (s, e_) in enumerate(zip(cu[:-1], cu[1:])):
            init = None if initial_states is None else tuple(t[i:i + 1] for t in initial_states)
            y, fin = mamba3_scan_triton(x[:, s:e_], dt[:, s:e_], adt[:, s:e_], trap[:, s:e_], B[:, s:e_], C[:, s:e_],
                                        angles[:, s:e_], B_bias, C_bias, D, mimo_x, init, None, True, pairwise,
                                        chunk_size)
            ys.append(y)
            fins.append(fin)
        y = torch.cat(ys, dim=1)
        fin = tuple(torch.cat(p, dim=0) for p in zip(*fins))
        return (y, fin) if return_final_states else y
    if training:
        return mamba3_scan_triton_train(x, dt, adt, trap, B, C, angles, B_bias, C_bias, D, mimo_x, initial_states,
                                        return_final_states, pairwise, chunk_size)
    f32 = torch.float32
    if initial_states is None:
        initial_states = zero_states(b, H, P, N, S, R, device=x.device, dtype=f32)
    theta0, h0, k0, x0 = (t.to(f32) for t in initial_states)
    dt, adt, trap = dt.to(f32), adt.to(f32), trap.to(f32)
    theta = theta0[:, None] + torch.cumsum(angle_increment(angles.to(f32), dt), dim=1)  # (b, L, H, S)
    gamma = dt * trap
    delta = dt * (1 - trap)
    e = gamma + F.pad(delta[:, 1:], (0, 0, 0, 1))
    mx = None if mimo_x is None else mimo_x.to(f32).contiguous()
    carry = h0 + delta[:, 0, :, None, None] * torch.einsum("brhp,brhn->bhpn", rank_values(x0, mx), k0)
    chunk = chunk_size or CHUNK["cuda" if x.device.type == "cuda" else "cpu"]
    chunk = max(16, next_power_of_2(chunk))
    y, hT, _ = mamba3_chunk_fwd(x.contiguous(), B.contiguous(), C.contiguous(), theta.contiguous(),
                                adt.to(f32).contiguous(), gamma.contiguous(), e.contiguous(),
                                B_bias.to(f32).contiguous(), C_bias.to(f32).contiguous(),
                                None if D is None else D.to(f32).contiguous(), mx, carry.contiguous(), chunk, pairwise)
    y = y.to(x.dtype)
    if not return_final_states:
        return y
    last = theta[:, -1]
    k_last = rotate(expand_groups(B[:, -1].to(f32), H) + B_bias.to(f32).transpose(0, 1), last.unsqueeze(1), pairwise)
    return y, (torch.remainder(last, TWO_PI), hT, k_last, x[:, -1].to(f32))



# ---------------------------------------------------------------- decode step


@torch.library.custom_op("mambazoo::mamba3_step", mutates_args=("angle", "ssm", "k", "v"))
def mamba3_step_op(x: Tensor, dt: Tensor, adt: Tensor, trap: Tensor, B: Tensor, C: Tensor, angles: Tensor,
                   B_bias: Tensor, C_bias: Tensor, D: Optional[Tensor], mimo_x: Optional[Tensor], angle: Tensor,
                   ssm: Tensor, k: Tensor, v: Tensor, pairwise: bool) -> Tensor:
    """The step kernel (step.py), advancing angle (b, H, S) fp32, ssm (b, H, P, N) fp32, k (b, R, H, N) and
    v (b, H, P) in place. All inputs contiguous; x (b, H, P); dt, adt, trap (b, H) fp32; B, C (b, R, G, N);
    angles (b, H, S) fp32; biases (H, R, N) fp32; D (H,) fp32; mimo_x (H, R, P) fp32. Returns y (b, R, H, P)
    fp32."""
    b, H, P = x.shape
    R, G, N = B.shape[1:]
    S = angles.shape[-1]
    y = torch.empty(b, R, H, P, device=x.device, dtype=torch.float32)
    from mambazoo.kernels.mamba3.step import mamba3_step_kernel

    mamba3_step_kernel[(b * H,)](
        x, dt, adt, trap, B, C, angles, B_bias, C_bias, D if D is not None else dt,
        mimo_x if mimo_x is not None else dt, angle, ssm, k, v, y,
        H, P, G, N, S,
        R=R, BLOCK_P=next_power_of_2(P), BLOCK_N2=next_power_of_2(N // 2),
        PAIRWISE=pairwise, HAS_D=D is not None, HAS_MIMO=mimo_x is not None, num_warps=4,
    )
    return y


@mamba3_step_op.register_fake
def _mamba3_step_fake(x, dt, adt, trap, B, C, angles, B_bias, C_bias, D, mimo_x, angle, ssm, k, v, pairwise):
    b, H, P = x.shape
    return x.new_empty(b, B.shape[1], H, P, dtype=torch.float32)


def step_state_fits(states) -> bool:
    """The step kernel writes the state in place: it needs contiguous tensors, angle and ssm in fp32."""
    angle, ssm, k, v = states
    return (all(t.is_contiguous() for t in states) and angle.dtype == torch.float32 and ssm.dtype == torch.float32)


def mamba3_step_triton(x, dt, adt, trap, B, C, angles, B_bias, C_bias, D, mimo_x, states, pairwise=True):
    """One decode step through the kernel, the states (angle, ssm, k, v) advanced in place (step_state_fits must
    hold). Shapes as core.mamba3_scan.mamba3_step_ref; returns y (b, R, H, P) fp32."""
    f32 = torch.float32
    c = lambda t: t.to(f32).contiguous()  # noqa: E731
    return mamba3_step_op(x.contiguous(), c(dt), c(adt), c(trap), B.contiguous(), C.contiguous(), c(angles),
                          c(B_bias), c(C_bias), None if D is None else c(D), None if mimo_x is None else c(mimo_x),
                          *states, pairwise)
