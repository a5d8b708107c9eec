"""kernels/patch_embed.py (through the interpreter): image -> tokens with the position embedding, one kernel."""

import pytest
import torch

import mambazoo.kernels  # noqa: F401  (the interpreter's shims)
from mambazoo.core.proj_ref import patch_tokens_ref
from mambazoo.kernels.patch_embed import patch_tokens, patch_tokens_fit


@pytest.mark.parametrize("dim,bias,size", [(48, True, (64, 80)), (32, False, (48, 40)), (24, True, (34, 50))])
def test_patch_tokens_match_the_unfused_path(dim, bias, size):
    """dim with a second part (48 = 32 + 16), a power of two, a masked second part (24 = 16 + 8); image sizes not a
    multiple of the patch (the remainder is cut, as the strided conv does), patch rows wider than one strip."""
    torch.manual_seed(0)
    C, patch = 3, (16, 16)
    x = torch.randn(2, C, *size)
    weight = torch.randn(dim, C, *patch) * 0.05
    b = torch.randn(dim) if bias else None
    gh, gw = size[0] // 16, size[1] // 16
    pos = torch.randn(gh * gw, dim)
    mid = gh * gw // 2
    dt = torch.bfloat16
    w_t = weight.reshape(dim, -1).t().contiguous().to(dt)
    out = patch_tokens(x, w_t, b.to(dt) if bias else None, pos, patch, mid)
    want = patch_tokens_ref(x, weight, b, pos, patch, mid, dt)
    keep = torch.ones(gh * gw + 1, dtype=torch.bool)
    keep[mid] = False
    assert out.shape == want.shape and out.dtype == torch.float32
    torch.testing.assert_close(out[:, keep], want[:, keep], rtol=1e-2, atol=2e-2)


def test_patch_tokens_reject_what_they_do_not_take():
    dt = torch.bfloat16
    x = torch.randn(1, 3, 32, 32)
    w_t = torch.randn(3 * 256, 32).to(dt)
    pos = torch.randn(4, 32)
    assert patch_tokens_fit((16, 16), (16, 16), 192) and not patch_tokens_fit((8, 8), (8, 8), 192)
    assert not patch_tokens_fit((16, 16), (8, 8), 192)
    with pytest.raises(ValueError, match="weight_t"):
        patch_tokens(x, w_t.float(), None, pos, (16, 16), 2)
    with pytest.raises(ValueError, match="pos"):
        patch_tokens(x, w_t, None, pos[:3], (16, 16), 2)
    with pytest.raises(ValueError, match="patch_tokens_fit"):
        patch_tokens(torch.randn(1, 3, 16, 16), torch.randn(3 * 64, 32).to(dt), None, torch.randn(4, 32), (8, 8), 2)
