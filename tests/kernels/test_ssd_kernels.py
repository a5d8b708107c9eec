"""The SSD Triton kernels (mambazoo.kernels.ssd) against core's sequential oracle, through the interpreter
(TRITON_INTERPRET=1, set by tests/conftest.py): tiny shapes, the interpreter is slow."""

import math

import pytest
import torch

from mambazoo.core.backend import backend
from mambazoo.core.ssd import ssd_ref, ssd_step_ref
from mambazoo.kernels.ssd import kernel_chunk_size, ssd_step_triton, ssd_triton


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def inputs(b=2, L=21, h=4, p=3, g=2, n=5, dtype=torch.float32, d_hp=False):
    t = dict(x=torch.randn(b, L, h, p), dt=torch.randn(b, L, h) * 0.5, A=-torch.rand(h) * 15 - 1,
             B=torch.randn(b, L, g, n), C=torch.randn(b, L, g, n), D=torch.randn(h, p) if d_hp else torch.randn(h),
             z=torch.randn(b, L, h, p),
             dt_bias=torch.log(torch.expm1(torch.exp(torch.rand(h) * math.log(100.0) + math.log(1e-3)))),
             initial_states=torch.randn(b, h, p, n))
    for k in ("x", "dt", "B", "C", "z"):
        t[k] = t[k].to(dtype)
    return t


@pytest.mark.parametrize("case", ["plain", "packed", "limits"])
def test_forward_equals_oracle_fp32(case):
    inp = inputs(d_hp=case == "packed")
    kw = dict(dt_softplus=True, return_final_states=True)
    if case == "packed":
        seq = torch.zeros(2, 21, dtype=torch.int32)
        seq[:, 5:] = 1
        seq[:, 6:] = 2  # a one-token sequence, and boundaries inside and across chunks of 16
        seq[:, 17:] = 3
        kw["seq_idx"] = seq
    if case == "limits":
        kw["dt_limit"] = (0.01, 0.05)
        inp["z"] = None
    y, s = ssd_triton(**inp, chunk_size=16, **kw)
    y_ref, s_ref = ssd_ref(**inp, **kw)
    assert rel(y, y_ref) < 1e-5 and rel(s, s_ref) < 1e-5


def test_forward_without_options_and_one_token():
    inp = inputs(L=1, g=1)
    for k in ("D", "z", "dt_bias", "initial_states"):
        inp[k] = None
    inp["dt"] = inp["dt"].abs()
    y, s = ssd_triton(**inp, return_final_states=True)
    y_ref, s_ref = ssd_ref(**inp, return_final_states=True)
    assert rel(y, y_ref) < 1e-5 and rel(s, s_ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_half_inputs(dtype):
    inp = inputs(L=18, dtype=dtype)
    y, s = ssd_triton(**inp, chunk_size=16, dt_softplus=True, return_final_states=True)
    y_ref, s_ref = ssd_ref(**{k: (v.float() if v is not None else v) for k, v in inp.items()}, dt_softplus=True,
                           return_final_states=True)
    assert y.dtype == dtype and s.dtype == torch.float32
    assert rel(y, y_ref) < 2e-2 and rel(s, s_ref) < 2e-2


def assert_gradients_equal_the_oracle(inp, kw):
    """Every input's gradient through ssd_triton (chunk 16) equals ssd_ref's, for random weights on y and the final
    state (kw: ssd keyword arguments with return_final_states=True)."""
    y, s = ssd_triton(**inp, chunk_size=16, **kw)
    y_ref, s_ref = ssd_ref(**inp, **kw)
    wy, ws = torch.randn_like(y), torch.randn_like(s)
    names = [k for k, v in inp.items() if v is not None]
    g = torch.autograd.grad((y * wy).sum() + (s * ws).sum(), [inp[k] for k in names])
    g_ref = torch.autograd.grad((y_ref * wy).sum() + (s_ref * ws).sum(), [inp[k] for k in names])
    for k, a, b in zip(names, g, g_ref):
        assert rel(a, b) < 1e-4, k


@pytest.mark.parametrize("case", ["one-chunk", "chunks", "packed", "limits"])
def test_backward_kernels_equal_the_oracle(case):
    L = 9 if case == "one-chunk" else 37
    inp = inputs(L=L, d_hp=case == "limits")
    kw = dict(dt_softplus=True, return_final_states=True)
    if case == "packed":
        seq = torch.zeros(2, L, dtype=torch.int32)
        seq[:, 3:] = 1
        seq[:, 16:] = 2  # a boundary on a chunk edge
        seq[:, 20:] = 3
        kw["seq_idx"] = seq
    if case == "limits":
        kw["dt_limit"] = (0.003, 0.05)
        inp["z"] = None
        inp["initial_states"] = None
    for v in inp.values():
        if v is not None:
            v.requires_grad_(True)
    assert_gradients_equal_the_oracle(inp, kw)
    if case == "chunks":  # only y used: the final state's gradient is absent, not an error
        gx = torch.autograd.grad(ssd_triton(**inp, chunk_size=16, dt_softplus=True).sum(), inp["x"])[0]
        gx_ref = torch.autograd.grad(ssd_ref(**inp, dt_softplus=True).sum(), inp["x"])[0]
        assert rel(gx, gx_ref) < 1e-4


def test_backward_half_inputs():
    inp = inputs(L=20, dtype=torch.bfloat16)
    for v in inp.values():
        v.requires_grad_(True)
    y = ssd_triton(**inp, chunk_size=16, dt_softplus=True)
    ref = {k: v.detach().float().requires_grad_(True) for k, v in inp.items()}
    y_ref = ssd_ref(**ref, dt_softplus=True)
    w = torch.randn(y.shape)
    g = torch.autograd.grad((y.float() * w).sum(), list(inp.values()))
    g_ref = torch.autograd.grad((y_ref * w).sum(), list(ref.values()))
    for k, a, b in zip(inp, g, g_ref):
        assert a.dtype == inp[k].dtype and rel(a, b) < 3e-2, k


@pytest.mark.parametrize("d_hp", [False, True])
def test_step_kernel_equals_step_ref(d_hp):
    inp = inputs(L=3, d_hp=d_hp, p=20)  # headdim 20: two blocks of 16 columns
    s1, s2 = inp["initial_states"].clone(), inp["initial_states"].clone()
    for t in range(3):
        args = (inp["x"][:, t], inp["dt"][:, t], inp["A"], inp["B"][:, t], inp["C"][:, t])
        kw = dict(D=inp["D"], z=inp["z"][:, t], dt_bias=inp["dt_bias"], dt_softplus=True)
        y1 = ssd_step_triton(s1, *args, **kw)
        y2 = ssd_step_ref(s2, *args, **kw)
        assert rel(y1, y2) < 1e-5 and rel(s1, s2) < 1e-5
    with pytest.raises(ValueError, match=r"state: expected \(batch, heads, headdim, N\)"):
        ssd_step_triton(s1[0], *args)


def test_fake_implementations_give_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        inp = inputs(L=7)
        y, s = torch.ops.mambazoo.ssd_fwd(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["D"], None,
                                          inp["dt_bias"], None, None, 16, True, 0.0, math.inf)
        st = torch.zeros(2, 4, 3, 5)
        y1 = torch.ops.mambazoo.ssd_step(st, inp["x"][:, 0], inp["dt"][:, 0], inp["A"], inp["B"][:, 0],
                                         inp["C"][:, 0], None, None, None, True, 0.0, math.inf)
    assert y.shape == (2, 7, 4, 3) and s.shape == (2, 4, 3, 5) and s.dtype == torch.float32
    assert y1.shape == (2, 4, 3)


def test_mixer_on_the_kernels_equals_chunked():
    from mambazoo.core.mamba2 import Mamba2

    m = Mamba2(d_model=8, d_state=4, headdim=4, ngroups=2, chunk_size=16).eval()
    x = torch.randn(1, 5, 8)
    with torch.no_grad(), backend(ssd="chunked"):
        y_ref = m(x)
        state_ref = m.allocate_state(1)
        m(x[:, :4], state_ref)
        step_ref = m.step(x[:, 4], state_ref)
    with torch.no_grad(), backend(ssd="triton"):
        y = m(x)
        state = m.allocate_state(1)
        m(x[:, :4], state)
        step = m.step(x[:, 4], state)
    assert rel(y, y_ref) < 1e-5 and rel(step, step_ref) < 1e-5 and rel(state.ssm, state_ref.ssm) < 1e-5
    # the fused decode path (the conv-state kernel too), as on CUDA
    with torch.no_grad(), backend(ssd="triton", scan="triton"):
        state = m.allocate_state(1)
        m(x[:, :4], state)
        fused = m.step(x[:, 4], state)
    assert rel(fused, step_ref) < 1e-5 and rel(state.conv, state_ref.conv) < 1e-6


def test_kernel_chunk_size():
    assert [kernel_chunk_size(c) for c in (1, 16, 17, 64, 256)] == [16, 16, 32, 64, 64]


def test_compile_fullgraph_traces_the_mixer():
    """torch.compile(fullgraph=True) traces a Mamba-2 mixer on the kernels (the ops' fakes give the shapes;
    aot_eager runs the traced forward and backward graphs without code generation)."""
    from mambazoo.core.mamba2 import Mamba2

    m = Mamba2(d_model=8, d_state=4, headdim=4, ngroups=2, chunk_size=16)
    x = torch.randn(1, 6, 8, requires_grad=True)
    with backend(ssd="triton"):
        y = m(x)
        (gx,) = torch.autograd.grad(y.square().sum(), x)
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        yc = compiled(x)
        (gxc,) = torch.autograd.grad(yc.square().sum(), x)
    assert rel(yc, y) < 1e-6 and rel(gxc, gx) < 1e-6


def test_wide_heads_split_the_state_passes():
    """headdim 80 > 64: the state passes run two row blocks per head (and the backward sums the decay's gradient
    over them)."""
    inp = inputs(b=1, L=20, h=2, p=80, g=1, n=4)
    for v in inp.values():
        v.requires_grad_(True)
    y, s = ssd_triton(**inp, chunk_size=16, dt_softplus=True, return_final_states=True)
    y_ref, s_ref = ssd_ref(**inp, dt_softplus=True, return_final_states=True)
    assert rel(y, y_ref) < 1e-5 and rel(s, s_ref) < 1e-5
    wy, ws = torch.randn_like(y), torch.randn_like(s)
    g = torch.autograd.grad((y * wy).sum() + (s * ws).sum(), list(inp.values()))
    g_ref = torch.autograd.grad((y_ref * wy).sum() + (s_ref * ws).sum(), list(inp.values()))
    for k, a, b in zip(inp, g, g_ref):
        assert rel(a, b) < 1e-4, k


def test_cu_seqlens_on_the_kernels():
    inp = inputs(b=1, L=19)
    cu = torch.tensor([0, 7, 8, 19])
    y, s = ssd_triton(**inp, chunk_size=16, dt_softplus=True, cu_seqlens=cu, return_final_states=True)
    y_ref, s_ref = ssd_ref(**inp, dt_softplus=True, cu_seqlens=cu, return_final_states=True)
    assert rel(y, y_ref) < 1e-5 and rel(s, s_ref) < 1e-5


@pytest.mark.parametrize("packed", [False, True])
def test_wide_states_split_the_chunk_backward(packed):
    """d_state 80 > 64: the chunk backward takes B, C and the states in two blocks of 64 state columns (the
    second one masked past 80), in both of its passes; every gradient equals the oracle's."""
    inp = inputs(b=1, L=37, h=2, p=8, g=1, n=80)
    kw = dict(dt_softplus=True, return_final_states=True)
    if packed:
        seq = torch.zeros(1, 37, dtype=torch.int32)
        seq[:, 11:] = 1
        kw["seq_idx"] = seq
    for v in inp.values():
        if v is not None:
            v.requires_grad_(True)
    assert_gradients_equal_the_oracle(inp, kw)
