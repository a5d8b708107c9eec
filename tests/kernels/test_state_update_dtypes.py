"""selective_state_update with fp16 / bf16 states, as mamba_ssm's op takes them: the step runs in fp32 and the state
is stored back in place in its own dtype (CPU, TRITON_INTERPRET=1, against core's reference at each dtype)."""

import pytest
import torch

from helpers import rel
from mambazoo.core.scan_ref import selective_state_update_ref
from mambazoo.kernels import selective_state_update
from mambazoo.kernels.decode.state_update import launch_state_update

# tolerances of y and of the new state per (state dtype, input dtype): fp32 math, one rounding to the state's dtype
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _inputs(state_dtype, itype, batch=2, dim=24, N=16, groups=1):
    torch.manual_seed(0)
    state = torch.randn(batch, dim, N).to(state_dtype)
    x, dt, z = (torch.randn(batch, dim).to(itype) for _ in range(3))
    A = -torch.rand(dim, N) - 0.5
    B, C = (torch.randn(batch, groups, N).to(itype) if groups > 1 else torch.randn(batch, N).to(itype)
            for _ in range(2))
    D, dt_bias = torch.randn(dim), torch.randn(dim) - 2.0
    return state, x, dt, A, B, C, D, z, dt_bias


@pytest.mark.parametrize("itype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("groups", [1, 2])
def test_state_dtypes_match_the_reference(state_dtype, itype, groups):
    state, x, dt, A, B, C, D, z, dt_bias = _inputs(state_dtype, itype, groups=groups)
    s_ref, s_ker = state.clone(), state.clone()
    y_ref = selective_state_update_ref(s_ref, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True)
    y = selective_state_update(s_ker, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True)
    assert s_ker.dtype == state_dtype and y.dtype == itype == y_ref.dtype
    tol = max(TOL[state_dtype], TOL[itype])
    assert rel(s_ker, s_ref) < tol and rel(y, y_ref) < tol
    assert not torch.equal(s_ker, state)  # updated in place
    # against the fp32 step: the state differs from it by the rounding to its dtype only
    s32 = state.float().clone()
    selective_state_update_ref(s32, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True)
    assert rel(s_ker.float(), s32) < TOL[state_dtype]


@pytest.mark.parametrize("state_dtype", [torch.float16, torch.bfloat16])
def test_a_log_launch_takes_half_states(state_dtype):
    """The model's fused decode step (A_log, D, dt_bias as stored) with a half-precision state."""
    state, x, dt, A, B, C, D, z, dt_bias = _inputs(state_dtype, torch.float32)
    a_log = torch.log(-A)
    s_ref, s_ker = state.clone(), state.clone()
    y_ref = selective_state_update_ref(s_ref, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True)
    y = launch_state_update(s_ker, x, dt, a_log, B, C, D, z, dt_bias, True, A_is_log=True)
    assert rel(s_ker, s_ref) < TOL[state_dtype] and rel(y, y_ref) < TOL[state_dtype]


def test_other_state_dtypes_are_refused():
    state, x, dt, A, B, C, D, z, dt_bias = _inputs(torch.float32, torch.float32)
    for bad in (state.double(), state.transpose(1, 2).contiguous().transpose(1, 2)):
        with pytest.raises(ValueError, match="state: expected a contiguous float32, float16 or bfloat16"):
            selective_state_update(bad, x, dt, A, B, C, D, z, dt_bias)
