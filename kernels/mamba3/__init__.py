"""Triton kernels of the Mamba-3 scan; mambazoo.core.mamba3_scan holds their reference.

    mamba3_scan_triton(x, dt, adt, trap, B, C, angles, B_bias, C_bias, D=None, mimo_x=None, initial_states=None,
                       cu_seqlens=None, return_final_states=False, pairwise=True, chunk_size=None)

    mamba3_step_triton(x, dt, adt, trap, B, C, angles, B_bias, C_bias, D, mimo_x, states, pairwise=True)

The forward (SISO and MIMO) runs as ``torch.ops.mambazoo.mamba3_chunk_fwd``, its backward as
``mamba3_chunk_bwd`` (the rotation, biases and angle sums differentiated by autograd on the host) and the decode
step (the state advanced in place) as ``mamba3_step``: torch.library ops with fake implementations. Tested
through the Triton interpreter against core.mamba3_scan; not yet compiled or timed on a GPU.
"""

from mambazoo.kernels.mamba3.ops import (
    kernel_supports,
    mamba3_chunk_bwd,
    mamba3_chunk_fwd,
    mamba3_scan_triton,
    mamba3_scan_triton_train,
    mamba3_step_op,
    mamba3_step_triton,
    step_state_fits,
)

__all__ = ["kernel_supports", "mamba3_chunk_bwd", "mamba3_chunk_fwd", "mamba3_scan_triton", "mamba3_scan_triton_train",
           "mamba3_step_op", "mamba3_step_triton", "step_state_fits"]
