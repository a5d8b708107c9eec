"""mambazoo.core.mamba / mambazoo.core.block: decoding equals the full forward, bidirectional mode, init, bad input."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import rel, set_backend
from mambazoo.core.backend import backend
from mambazoo.core.block import Block
from mambazoo.core.mamba import Mamba, dt_bias_init


@pytest.mark.parametrize("kwargs", [dict(), dict(inner_norm=True, dt_rank=5), dict(selective=False)])
def test_step_by_step_decoding_equals_full_forward(kwargs):
    m = Mamba(16, d_state=4, **kwargs).eval()
    x = torch.randn(2, 11, 16)
    with torch.no_grad():
        full = m(x)
        state = m.allocate_state(2)
        steps = torch.stack([m.step(x[:, t], state) for t in range(11)], dim=1)
    assert rel(steps, full) < 1e-5


def test_chunked_prefill_then_decode_continues_the_sequence():
    m = Mamba(16, d_state=4).eval()
    x = torch.randn(2, 13, 16)
    with torch.no_grad():
        full = m(x)
        state = m.allocate_state(2)
        first = m(x[:, :6], state)
        second = m(x[:, 6:10], state)  # shorter than nothing special; crosses the conv window
        rest = torch.stack([m.step(x[:, t], state) for t in range(10, 13)], dim=1)
    assert rel(torch.cat([first, second, rest], 1), full) < 1e-5


def test_state_does_not_grow_with_length():
    m = Mamba(16, d_state=4).eval()
    state = m.allocate_state(1)
    size = state.nbytes()
    with torch.no_grad():
        m(torch.randn(1, 50, 16), state)
        for _ in range(20):
            m.step(torch.randn(1, 16), state)
    assert state.nbytes() == size


def test_bidirectional_flip_swaps_the_two_directions():
    m = Mamba(16, d_state=4, bidirectional=True).eval()
    swapped = copy.deepcopy(m)
    swapped.fwd, swapped.bwd = swapped.bwd, swapped.fwd
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        y = m(x)
        assert rel(swapped(x.flip(1)).flip(1), y) < 1e-5
        # the backward branch matters: perturbing it changes the output
        m.bwd.D.add_(1.0)
        assert rel(m(x), y) > 1e-3


def test_bidirectional_output_depends_on_the_future():
    m = Mamba(16, d_state=4, bidirectional=True).eval()
    x = torch.randn(1, 8, 16)
    x2 = x.clone()
    x2[:, -1] += 1.0
    with torch.no_grad():
        assert not torch.allclose(m(x)[:, 0], m(x2)[:, 0])
    with pytest.raises(ValueError, match="not causal"):
        m.allocate_state(1)


def test_causal_mixer_ignores_the_future():
    m = Mamba(16, d_state=4).eval()
    x = torch.randn(1, 8, 16)
    x2 = x.clone()
    x2[:, 5] += 1.0
    with torch.no_grad():
        y, y2 = m(x), m(x2)
    assert torch.equal(y[:, :5], y2[:, :5]) and not torch.allclose(y[:, 5:], y2[:, 5:])


def test_dt_initialization_lies_in_range():
    b = dt_bias_init(4096, 1e-3, 1e-1)
    dt = F.softplus(b)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 1e-1 * 1.001
    # log-uniform: the median is near the geometric mean
    assert abs(math.log(dt.median().item()) - math.log(1e-2)) < 0.2
    m = Mamba(32, d_state=8)
    assert torch.allclose(-torch.exp(m.fwd.A_log[0]), -torch.arange(1, 9.0))


def test_block_keeps_an_fp32_residual_under_autocast():
    blk = Block(16, Mamba(16, d_state=4))
    x = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = blk(x)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert blk.mixer.fwd.A_log.grad is not None and blk.mixer.fwd.A_log.dtype == torch.float32


def test_block_step_matches_block_forward():
    blk = Block(16, Mamba(16, d_state=4), ffn=torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(),
                                                                   torch.nn.Linear(32, 16))).eval()
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        full = blk(x)
        state = blk.mixer.allocate_state(2)
        steps = torch.stack([blk.step(x[:, t], state) for t in range(7)], 1)
    assert rel(steps, full) < 1e-5


def test_bad_input_raises():
    m = Mamba(16, d_state=4)
    with pytest.raises(ValueError, match=r"x: expected \(batch, L, d_model=16\)"):
        m(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"x: expected \(batch, d_model=16\)"):
        m.step(torch.randn(2, 1, 16), m.allocate_state(2))
    with pytest.raises(ValueError, match="d_state"):
        Mamba(16, d_state=0)


@pytest.mark.parametrize("selective", [True, False])
def test_backward_direction_equals_the_causal_branch_on_the_flipped_sequence(selective):
    """The backward branch (reverse scan, anti-causal conv, no copies) is exactly the causal branch run
    on the flipped sequence and flipped back."""
    torch.manual_seed(0)
    m = Mamba(16, d_state=4, bidirectional=True, selective=selective)
    x = torch.randn(2, 13, 16)
    xs, z = m.in_proj(x).transpose(1, 2).chunk(2, dim=1)
    want = m._branch(m.bwd, xs.flip(-1), z.flip(-1), None).flip(-1)
    got = m._branch(m.bwd, xs, z, None, reverse=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    full = (m._branch(m.fwd, xs, z, None) + want) * 0.5
    torch.testing.assert_close(m(x), m.out_proj(full.transpose(1, 2)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_mixer_under_torch_compile_matches_eager(bidirectional):
    """The `compile` task option: AOT tracing (functionalization, traced strides) gives eager's values and
    gradients (a softplus backward whose layout differed from its meta once broke the traced views)."""
    torch.manual_seed(0)
    m = Mamba(32, d_state=4, bidirectional=bidirectional)
    x = torch.randn(2, 24, 32)
    grads = []
    for fn in (m, torch.compile(m, backend="aot_eager")):
        m.zero_grad()
        xi = x.clone().requires_grad_()
        y = fn(xi)
        y.square().sum().backward()
        grads.append((y.detach(), xi.grad, m.in_proj.weight.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bidirectional_mixer_on_the_kernels_matches_the_reference_path(monkeypatch):
    """The Triton path of the bidirectional mixer (interpreter: anti-causal conv kernel, reverse scan averaged
    with the forward direction in its store, no tile states without autograd) gives the values and gradients
    of the PyTorch path (chunked scan, F.conv1d, lerp)."""
    torch.manual_seed(0)
    m = Mamba(8, d_state=4, bidirectional=True)
    x = torch.randn(1, 19, 8)
    outs = {}
    for scan, conv in (("chunked", "torch"), ("triton", "triton")):
        set_backend(monkeypatch, scan=scan, conv=conv)
        m.zero_grad()
        xi = x.clone().requires_grad_()
        y = m(xi)
        (y * torch.linspace(-1, 1, 8)).sum().backward()
        with torch.no_grad():
            y_inf = m(x)
        outs[scan] = (y.detach(), y_inf, xi.grad, m.bwd.A_log.grad.clone(), m.fwd.conv1d.weight.grad.clone())
    for got, want in zip(outs["triton"], outs["chunked"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_inference_folds_dt_proj_into_x_proj(monkeypatch):
    """Without autograd, delta comes from one GEMM with W_dt W_x,dt folded into one weight: the same delta, B and
    C as the two projections, and the folded weight follows in-place weight updates (optimizer steps,
    load_state_dict)."""
    torch.manual_seed(0)
    d = Mamba(16, d_state=4).fwd
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        folded = d.ssm_inputs(x, fold=True)
        with backend(fold_dt=False):
            plain = d.ssm_inputs(x, fold=True)
        for a, b in zip(folded, plain):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        # one GEMM: delta is a view of its (b, L, d_inner + 2 N) output; two GEMMs: dt_proj's own (b, L, d_inner)
        assert folded[0].stride(1) == 32 + 2 * 4 and plain[0].stride(1) == 32
        d.dt_proj.weight.mul_(2)  # in place: the cached folded weight must not be reused
        torch.testing.assert_close(d.ssm_inputs(x, fold=True)[0], 2 * folded[0], rtol=1e-5, atol=1e-6)
        assert d.ssm_inputs(x)[0].stride(1) == 32  # the decode path (fold=False) keeps two GEMMs
    with torch.inference_mode():  # inference tensors have no version counter: computed, not cached
        m = Mamba(16, d_state=4)
        torch.testing.assert_close(m.fwd.ssm_inputs(x, fold=True)[0], m.fwd.ssm_inputs(x)[0], rtol=1e-5, atol=1e-6)
    with torch.enable_grad():  # training keeps the two projections (their gradients)
        d.ssm_inputs(x, fold=True)[0].sum().backward()
    assert d.dt_proj.weight.grad is not None and d.x_proj.weight.grad is not None



def test_scan_constants_cached_without_autograd():
    """A = -exp(A_log), D and the dt bias reach the scan as fp32: computed once without autograd (and again after an
    in-place update), in the graph with it."""
    torch.manual_seed(0)
    d = Mamba(16, d_state=4).fwd
    with torch.no_grad():
        first, again = d.scan_constants(), d.scan_constants()
        assert all(a is b for a, b in zip(first, again))
        torch.testing.assert_close(first[0], -torch.exp(d.A_log))
        d.A_log.add_(0.5)
        torch.testing.assert_close(d.scan_constants()[0], -torch.exp(d.A_log))
        pf, wf = d.low_rank_weights(torch.bfloat16)
        assert pf.dtype == wf.dtype == torch.bfloat16 and d.low_rank_weights(torch.bfloat16)[0] is pf
    A, D, bias = d.scan_constants()
    assert A.grad_fn is not None and A is not d.scan_constants()[0]
