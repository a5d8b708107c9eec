"""kernels/gated_proj.py (through the interpreter): the mixer's gate and out_proj with z formed on chip."""

import pytest
import torch
import torch.nn.functional as F

import mambazoo.kernels  # noqa: F401  (the interpreter's shims)
from helpers import rel
from mambazoo.core.proj_ref import gated_out_proj_ref
from mambazoo.kernels.gated_proj import gated_out_proj, gated_out_proj_fits


@pytest.mark.parametrize("d_model,d_inner", [(48, 40), (32, 64), (24, 48)])  # P2 = 16; none; masked (16 + 8)
@pytest.mark.parametrize("bias,ahead", [(False, False), (True, False), (True, True)])
def test_gated_out_proj_matches_the_unfused_math(d_model, d_inner, bias, ahead):
    """Rows not a multiple of the row block, d_inner not a multiple of the channel chunk, strided rows of y (a
    column slice) and h, z a chunk ahead or not: the reference within bf16's rounding of the gated value and of the
    output."""
    torch.manual_seed(0)
    M = 37
    dt = torch.bfloat16
    y = torch.randn(M, d_inner + 5).to(dt)[:, 2:2 + d_inner]
    h = torch.randn(M, d_model + 3).to(dt)[:, :d_model]
    wz = (torch.randn(d_inner, d_model) * d_model ** -0.5).to(dt)
    wo = (torch.randn(d_model, d_inner) * d_inner ** -0.5).to(dt)
    bz, bo = (torch.randn(d_inner).to(dt), torch.randn(d_model).to(dt)) if bias else (None, None)
    out = gated_out_proj(y, h, wz, wo, bz, bo, ahead=ahead)
    assert out.shape == (M, d_model) and out.dtype == dt
    assert rel(out, gated_out_proj_ref(y, h, wz, wo, bz, bo)) < 1e-2
    # the gated value rounded to bf16 before out_proj, as the kernel does: closer still
    z = F.linear(h.float(), wz.float(), bz.float() if bias else None)
    p = (y.float() * F.silu(z)).to(dt).float()
    want = F.linear(p, wo.float(), bo.float() if bias else None)
    assert rel(out, want) < 5e-3


def test_gated_out_proj_rejects_bad_input():
    dt = torch.bfloat16
    y, h = torch.randn(8, 32).to(dt), torch.randn(8, 16).to(dt)
    wz, wo = torch.randn(32, 16).to(dt), torch.randn(16, 32).to(dt)
    with pytest.raises(ValueError, match="h: expected"):
        gated_out_proj(y, h[:4], wz, wo)
    with pytest.raises(ValueError, match="wz: expected"):
        gated_out_proj(y, h, wz.t(), wo)
    with pytest.raises(ValueError, match="wo: expected"):
        gated_out_proj(y, h, wz, wo[:, :8])
    with pytest.raises(ValueError, match="dtypes"):
        gated_out_proj(y.float(), h, wz, wo)
    with pytest.raises(ValueError, match="bo: expected"):
        gated_out_proj(y, h, wz, wo, bo=torch.zeros(3, dtype=dt))
    with pytest.raises(ValueError, match="y: expected"):
        gated_out_proj(torch.randn(32, 8).to(dt).t(), h, wz, wo)  # (8, 32) with a strided last axis
    big = torch.randn(4, 512).to(dt)
    assert not gated_out_proj_fits(512, 64) and gated_out_proj_fits(192, 384)
    with pytest.raises(ValueError, match="gated_out_proj_fits"):
        gated_out_proj(torch.randn(4, 64).to(dt), big, torch.randn(64, 512).to(dt), torch.randn(512, 64).to(dt))
