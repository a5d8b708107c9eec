"""Vision Mamba with the bidirectional Mamba-2 mixer (VisionMamba(mixer="mamba2"))."""

import pytest
import torch

from mambazoo.core.mamba2 import Mamba2
from mambazoo.registry import create_model


def test_vim_with_mamba2_mixer_trains_and_uses_both_directions():
    m = create_model("vim-tiny", mixer="mamba2", depth=2, embed_dim=32, img_size=32, num_classes=10, headdim=16)
    assert all(isinstance(b.mixer, Mamba2) and b.mixer.bidirectional for b in m.blocks)
    x = torch.randn(2, 3, 32, 32)
    out = m(x)
    assert out.shape == (2, 10)
    out.square().sum().backward()
    for name in ("A_log", "A_b_log", "conv1d_b.weight", "dt_bias_b", "in_proj.weight"):
        p = m.blocks[0].mixer.get_parameter(name)
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), m(x))  # deterministic in eval
    with pytest.raises(ValueError, match="mixer: expected 'mamba', 'mamba2' or 'mamba3'"):
        create_model("vim-tiny", mixer="mamba4", depth=1)


def test_aum_with_mamba2_mixer():
    m = create_model("aum-tiny", mixer="mamba2", depth=1, embed_dim=32, headdim=16, num_classes=5, n_mels=32,
                     frames=32)
    assert isinstance(m.backbone.blocks[0].mixer, Mamba2)
    with torch.no_grad():
        assert m.eval()(torch.randn(2, 16000 * 32 // 100)).shape == (2, 5)
