"""The Mamba-2 mixer: shapes, published inits, decode == full forward, chunked prefill, packing, causality."""

import math

import pytest
import torch
import torch.nn.functional as F

from mambazoo.core.mamba2 import GatedRMSNorm, Mamba2, causal_conv1d_packed
from mambazoo.core.ssd import ssd_ref


def mixer(**kw):
    args = dict(d_model=16, d_state=8, headdim=4, ngroups=2, chunk_size=5)
    args.update(kw)
    return Mamba2(**args)


def test_shapes_and_published_inits():
    m = Mamba2(d_model=64, d_state=16, headdim=16, ngroups=2)
    assert (m.d_inner, m.nheads, m.conv_dim) == (128, 8, 128 + 2 * 2 * 16)
    assert m.in_proj.weight.shape == (128 + 192 + 8, 64)
    assert m.conv1d.weight.shape == (192, 1, 4)
    A = torch.exp(m.A_log)
    assert A.min() >= 1 and A.max() <= 16
    dt = F.softplus(m.dt_bias)
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    assert torch.equal(m.D, torch.ones(8)) and torch.equal(m.norm.weight, torch.ones(128))
    assert m.norm.group_size == 64
    with pytest.raises(ValueError, match="headdim: expected a divisor of d_inner"):
        Mamba2(d_model=10, headdim=3)
    with pytest.raises(ValueError, match="ngroups: expected a divisor of nheads = 8"):
        Mamba2(d_model=64, headdim=16, ngroups=3)


def test_forward_matches_hand_written_pipeline():
    m = mixer(D_has_hdim=True)
    with torch.no_grad():
        m.D.normal_()
    x = torch.randn(2, 9, 16)
    y = m(x)
    zxbcdt = x @ m.in_proj.weight.T
    z, xbc, dt = zxbcdt.split([32, 32 + 32, 8], -1)
    xbc = F.silu(F.conv1d(F.pad(xbc.transpose(1, 2), (3, 0)), m.conv1d.weight, m.conv1d.bias, groups=64))
    xs, B, C = xbc.transpose(1, 2).split([32, 16, 16], -1)
    out = ssd_ref(xs.reshape(2, 9, 8, 4), dt, -m.A_log.exp(), B.reshape(2, 9, 2, 8), C.reshape(2, 9, 2, 8),
                  D=m.D.view(8, 4), dt_bias=m.dt_bias, dt_softplus=True).reshape(2, 9, 32)
    g = (out * F.silu(z)).view(2, 9, 2, 16)  # gate first, then RMSNorm per group of d_inner / ngroups
    g = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + 1e-5)).view(2, 9, 32) * m.norm.weight
    torch.testing.assert_close(y, g @ m.out_proj.weight.T, rtol=1e-4, atol=1e-5)


def test_gated_norm_modes():
    y, z = torch.randn(3, 8), torch.randn(3, 8)
    n = GatedRMSNorm(8, group_size=4)
    h = (y * F.silu(z)).view(3, 2, 4)
    torch.testing.assert_close(n(y, z), (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).view(3, 8))
    nb = GatedRMSNorm(8, group_size=8, norm_before_gate=True)
    torch.testing.assert_close(nb(y, z), y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5) * F.silu(z))
    with pytest.raises(ValueError, match="group_size: expected a divisor of dim = 8"):
        GatedRMSNorm(8, group_size=3)


def test_step_by_step_equals_full_forward():
    m = mixer()
    x = torch.randn(2, 11, 16)
    with torch.no_grad():
        y = m(x)
        state = m.allocate_state(2)
        ys = torch.stack([m.step(x[:, t], state) for t in range(11)], 1)
    torch.testing.assert_close(ys, y, rtol=1e-4, atol=1e-5)
    assert state.conv.shape == (2, 64, 4) and state.ssm.shape == (2, 8, 4, 8)


def test_chunked_prefill_continues_from_cache():
    m = mixer()
    x = torch.randn(2, 13, 16)
    with torch.no_grad():
        y = m(x)
        state = m.allocate_state(2)
        parts = [m(x[:, :6], state), m(x[:, 6:7], state), m(x[:, 7:], state)]
        full = m.allocate_state(2)
        m(x, full)
        y_next = m.step(x[:, 0], state)
        y_next_full = m.step(x[:, 0], full)
    torch.testing.assert_close(torch.cat(parts, 1), y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y_next, y_next_full, rtol=1e-4, atol=1e-5)


def test_packed_sequences_equal_separate_runs():
    m = mixer()
    x = torch.randn(1, 12, 16)
    seq_idx = torch.tensor([[0] * 5 + [1] * 2 + [2] * 5])
    y = m(x, seq_idx=seq_idx)
    for a, e in ((0, 5), (5, 7), (7, 12)):
        torch.testing.assert_close(y[:, a:e], m(x[:, a:e]), rtol=1e-4, atol=1e-5)
    y.sum().backward()
    assert m.A_log.grad is not None and torch.isfinite(m.in_proj.weight.grad).all()


def test_packed_conv_matches_plain_conv_for_one_sequence():
    x, w, b = torch.randn(2, 6, 9), torch.randn(6, 1, 4), torch.randn(6)
    ref = F.conv1d(F.pad(x, (3, 0)), w, b, groups=6)
    torch.testing.assert_close(causal_conv1d_packed(x, w, b, torch.zeros(2, 9, dtype=torch.long)), ref)


def test_causal_and_gradients():
    m = mixer()
    x = torch.randn(2, 10, 16, requires_grad=True)
    y = m(x)
    y[:, 6].sum().backward()
    assert x.grad[:, 7:].abs().max() == 0 and x.grad[:, :7].abs().max() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_bad_input():
    m = mixer()
    with pytest.raises(ValueError, match=r"x: expected \(batch, L, d_model=16\), got \(2, 5\)"):
        m(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"x: expected \(batch, d_model=16\)"):
        m.step(torch.randn(2, 1, 16), m.allocate_state(2))
    with pytest.raises(ValueError, match="seq_idx: expected None when continuing from a state"):
        m(torch.randn(1, 3, 16), m.allocate_state(1), seq_idx=torch.zeros(1, 3, dtype=torch.long))


def test_bf16_autocast_close_to_fp32():
    m = mixer()
    x = torch.randn(2, 8, 16)
    y32 = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = m(x)
    assert math.isfinite(y16.float().sum().item())
    assert ((y16.float() - y32).norm() / y32.norm()).item() < 3e-2


def test_bidirectional_mirror_symmetry_and_non_causality():
    m = mixer(bidirectional=True)
    with torch.no_grad():
        for p in (m.D, m.D_b, m.conv1d.bias, m.conv1d_b.bias):
            p.normal_()
    x = torch.randn(2, 9, 16, requires_grad=True)
    y = m(x)
    # swapping the two directions' parameters and reversing the input reverses the output
    mirror = mixer(bidirectional=True)
    mirror.load_state_dict(m.state_dict())
    with torch.no_grad():
        for a, b in (("conv1d", "conv1d_b"),):
            getattr(mirror, a).load_state_dict(getattr(m, b).state_dict())
            getattr(mirror, b).load_state_dict(getattr(m, a).state_dict())
        for a, b in (("dt_bias", "dt_bias_b"), ("A_log", "A_b_log"), ("D", "D_b")):
            getattr(mirror, a).copy_(getattr(m, b))
            getattr(mirror, b).copy_(getattr(m, a))
        torch.testing.assert_close(mirror(x.flip(1)).flip(1), y, rtol=1e-4, atol=1e-5)
    # the first token sees the last one; the unidirectional mixer's does not
    (g,) = torch.autograd.grad(y[:, 0].sum(), x)
    assert g[:, -1].abs().max() > 0
    with pytest.raises(ValueError, match="bidirectional mixer is not causal"):
        m.allocate_state(1)
    with pytest.raises(ValueError, match="bidirectional mixer is not causal"):
        m.step(torch.randn(1, 16), None)


def test_bidirectional_matches_hand_written_average():
    m = mixer(bidirectional=True)
    x = torch.randn(1, 7, 16)

    def direction(xbc, dt, conv, bias, a_log, D):
        xc = F.silu(F.conv1d(F.pad(xbc.transpose(1, 2), (3, 0)), conv.weight, conv.bias, groups=64)).transpose(1, 2)
        xs, B, C = xc.split([32, 16, 16], -1)
        return ssd_ref(xs.reshape(1, 7, 8, 4), dt, -a_log.exp(), B.reshape(1, 7, 2, 8), C.reshape(1, 7, 2, 8),
                       D=D, dt_bias=bias, dt_softplus=True).reshape(1, 7, 32)

    with torch.no_grad():
        z, xbc, dt = m.in_proj(x).split([32, 64, 8], -1)
        f = direction(xbc, dt, m.conv1d, m.dt_bias, m.A_log, m.D)
        b = direction(xbc.flip(1), dt.flip(1), m.conv1d_b, m.dt_bias_b, m.A_b_log, m.D_b).flip(1)
        want = m.out_proj(m.norm((f + b) / 2, z))
        torch.testing.assert_close(m(x), want, rtol=1e-4, atol=1e-5)
