"""The Mamba-3 forward kernel (kernels/mamba3) against the sequential oracle, through the Triton interpreter."""

import pytest
import torch
import torch.nn.functional as F

from helpers import set_backend
from mambazoo.core.mamba3 import Mamba3
from mambazoo.core.mamba3_scan import mamba3_scan_ref
from mambazoo.kernels.mamba3 import kernel_supports, mamba3_chunk_fwd, mamba3_scan_triton


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def inputs(b=2, L=37, H=2, P=20, R=1, G=1, N=32, S=8, dtype=torch.float32):
    dt = F.softplus(torch.randn(b, L, H) * 2 - 2)  # spread over ~[1e-3, 3]
    t = dict(x=torch.randn(b, L, H, P, dtype=dtype), dt=dt, adt=-dt * (torch.rand(b, L, H) * 2 + 1e-3),
             trap=torch.rand(b, L, H), B=torch.randn(b, L, R, G, N, dtype=dtype),
             C=torch.randn(b, L, R, G, N, dtype=dtype), angles=torch.randn(b, L, H, S) * 2,
             B_bias=torch.randn(H, R, N), C_bias=torch.randn(H, R, N), D=torch.randn(H),
             mimo_x=torch.randn(H, R, P) if R > 1 else None)
    init = [torch.randn(b, H, S) * 3, torch.randn(b, H, P, N), torch.randn(b, R, H, N), torch.randn(b, H, P)]
    return t, init


@pytest.mark.parametrize("R,G,L,pairwise", [(1, 1, 37, True), (1, 2, 1, True), (2, 1, 7, False), (4, 2, 19, False)])
def test_kernel_equals_oracle(R, G, L, pairwise):
    t, init = inputs(R=R, G=G, L=L, H=4 if G == 2 else 2)
    y, fin = mamba3_scan_triton(**t, initial_states=init, return_final_states=True, pairwise=pairwise)
    y0, fin0 = mamba3_scan_ref(**t, initial_states=init, return_final_states=True, pairwise=pairwise)
    assert y.shape == y0.shape
    assert rel(y, y0) < 1e-5
    for a, b in zip(fin, fin0):
        assert rel(a, b) < 1e-5


def test_kernel_packed_sequences_bf16_and_no_state():
    t, _ = inputs(b=1, L=21, R=2, N=64, S=16)
    cu = torch.tensor([0, 5, 6, 21])
    init = [torch.randn(3, 2, 16), torch.randn(3, 2, 20, 64), torch.randn(3, 2, 2, 64), torch.randn(3, 2, 20)]
    y, fin = mamba3_scan_triton(**t, initial_states=init, cu_seqlens=cu, return_final_states=True, pairwise=False)
    y0, fin0 = mamba3_scan_ref(**t, initial_states=init, cu_seqlens=cu, return_final_states=True, pairwise=False)
    assert rel(y, y0) < 1e-5 and all(rel(a, b) < 1e-5 for a, b in zip(fin, fin0))
    tb, _ = inputs(L=9, dtype=torch.bfloat16)
    yb = mamba3_scan_triton(**tb)
    assert yb.dtype == torch.bfloat16
    assert rel(yb, mamba3_scan_ref(**tb)) < 2e-2


def test_mixer_through_the_kernel(monkeypatch):
    """The mixer through the kernels (MAMBAZOO_MAMBA3=triton runs them in the interpreter) equals the chunked
    reference, forward and every parameter's gradient."""
    torch.manual_seed(3)
    m = Mamba3(32, d_state=32, headdim=16, is_mimo=True, mimo_rank=2, chunk_size=16)
    x = torch.randn(2, 9, 32)
    set_backend(monkeypatch, mamba3="chunked")
    with torch.no_grad():
        ref = m(x)
    set_backend(monkeypatch, mamba3="triton")
    calls = []
    import mambazoo.kernels.mamba3 as k3

    orig = k3.mamba3_scan_triton
    monkeypatch.setattr(k3, "mamba3_scan_triton", lambda *a, **kw: calls.append(1) or orig(*a, **kw))
    with torch.no_grad():
        out = m(x)
    assert calls and rel(out, ref) < 1e-5
    g = torch.randn_like(ref)
    (m(x) * g).sum().backward()  # forward and backward kernels
    assert len(calls) == 2
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    set_backend(monkeypatch, mamba3="chunked")
    (m(x) * g).sum().backward()
    for n, p in m.named_parameters():
        assert rel(grads[n], p.grad) < 1e-4, n


def test_op_is_registered_with_a_fake():
    assert kernel_supports(64, 4, 64) and kernel_supports(32, 1, 256) and kernel_supports(128, 4, 64)
    assert not any(kernel_supports(n, 1, 64) for n in (16, 48, 256))
    # training: the backward kernel up to R * N = 256 (published SISO N 128, MIMO rank 2 at 128, rank 4 at 64)
    assert all(kernel_supports(n, r, 64, backward=True) for n, r in ((128, 1), (128, 2), (64, 4)))
    assert not kernel_supports(128, 4, 64, backward=True)
    assert hasattr(torch.ops.mambazoo, "mamba3_chunk_fwd")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        b, L, H, P, R, G, N, S = 2, 5, 2, 16, 2, 1, 32, 8
        x = torch.empty(b, L, H, P)
        BC = torch.empty(b, L, R, G, N)
        y, hT, states = mamba3_chunk_fwd(x, BC, BC, torch.empty(b, L, H, S), torch.empty(b, L, H),
                                         torch.empty(b, L, H), torch.empty(b, L, H), torch.empty(H, R, N),
                                         torch.empty(H, R, N), None, torch.empty(H, R, P), torch.empty(b, H, P, N),
                                         4, True, True)
    assert y.shape == (b, L, R, H, P) and hT.shape == (b, H, P, N) and states.shape == (b, H, 2, P, N)


@pytest.mark.parametrize("R,G,N,P,pairwise", [(1, 1, 8, 4, True), (2, 2, 16, 5, False), (4, 1, 32, 16, True)])
def test_step_kernel_equals_reference(R, G, N, P, pairwise):
    """Three decode steps through the kernel (state advanced in place, bf16 K / V caches) against
    mamba3_step_ref."""
    from mambazoo.core.mamba3_scan import mamba3_step_ref
    from mambazoo.kernels.mamba3 import mamba3_step_triton

    H, S = 4, N // 4
    t, init = inputs(b=3, L=3, H=H, P=P, R=R, G=G, N=N, S=S)
    kernel_states = [init[0].clone(), init[1].clone(), init[2].to(torch.bfloat16), init[3].to(torch.bfloat16)]
    ref_states = [s.float().clone() for s in kernel_states]  # the kernel writes kernel_states in place
    for s in range(3):
        per = {k: (v[:, s] if k in ("x", "dt", "adt", "trap", "B", "C", "angles") else v) for k, v in t.items()}
        y = mamba3_step_triton(**per, states=kernel_states, pairwise=pairwise)
        y0, ref_states = mamba3_step_ref(**per, states=ref_states, pairwise=pairwise)
        ref_states = [ref_states[0], ref_states[1], ref_states[2].to(torch.bfloat16).float(),
                      ref_states[3].to(torch.bfloat16).float()]
        assert rel(y, y0) < 1e-5
        for a, b in zip(kernel_states, ref_states):
            assert rel(a, b) < 1e-5


def test_mixer_decode_through_the_step_kernel(monkeypatch):
    torch.manual_seed(4)
    m = Mamba3(16, d_state=8, headdim=4, is_mimo=True, mimo_rank=2, chunk_size=4)
    x = torch.randn(2, 6, 16)
    set_backend(monkeypatch, mamba3="chunked")
    with torch.no_grad():
        full = m(x)
        st_ref = m.allocate_state(2)
        m(x, state=st_ref)
    set_backend(monkeypatch, mamba3="triton")
    st = m.allocate_state(2)
    with torch.no_grad():
        ys = torch.stack([m.step(x[:, i], st) for i in range(6)], 1)
    assert rel(ys, full) < 1e-5
    for a, b in zip(st.tensors(), st_ref.tensors()):
        assert rel(a, b) < 1e-5


@pytest.mark.parametrize("R,G,L,pairwise", [(1, 1, 37, True), (2, 2, 19, False)])
def test_backward_kernel_equals_reference(R, G, L, pairwise):
    """Every gradient (inputs and initial states, through y and all final states) from the forward / backward
    kernels against autograd through the chunked reference."""
    from mambazoo.core.mamba3_scan import mamba3_scan_chunked
    from mambazoo.kernels.mamba3 import mamba3_scan_triton_train

    t, init = inputs(R=R, G=G, L=L, H=4 if G == 2 else 2)
    leaves = [v for v in list(t.values()) + init if v is not None]
    for v in leaves:
        v.requires_grad_(True)
    y, fin = mamba3_scan_triton_train(**t, initial_states=init, return_final_states=True, pairwise=pairwise)
    y0, fin0 = mamba3_scan_chunked(**t, initial_states=init, return_final_states=True, pairwise=pairwise)
    assert rel(y, y0) < 1e-5 and all(rel(a, b) < 1e-5 for a, b in zip(fin, fin0))
    ws = [torch.randn_like(y0)] + [torch.randn_like(f) for f in fin0]

    def loss(y, fin):
        return (y * ws[0]).sum() + sum((f * w).sum() for f, w in zip(fin, ws[1:]))

    g = torch.autograd.grad(loss(y, fin), leaves)
    g0 = torch.autograd.grad(loss(y0, fin0), leaves)
    names = [k for k, v in t.items() if v is not None] + ["angle0", "ssm0", "k0", "v0"]
    for name, a, b in zip(names, g, g0):
        assert b.abs().sum() > 0, name
        assert rel(a, b) < 1e-5, name


def test_backward_op_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mambazoo.kernels.mamba3 import mamba3_chunk_bwd

    with FakeTensorMode():
        b, L, R, H, P, N = 2, 5, 2, 3, 16, 32
        v = torch.empty(b, L, R, H, P)
        qk = torch.empty(b, L, R, H, N)
        s = torch.empty(b, L, H)
        out = mamba3_chunk_bwd(v, torch.empty(b, H, P, N), qk, qk, v, s, s, s, torch.empty(H),
                               torch.empty(b, H, 1, P, N), 16)
    assert [tuple(o.shape) for o in out] == [(b, L, R, H, N), (b, L, R, H, N), (b, L, R, H, P), (b, L, H),
                                             (b, L, H), (b, L, H), (b, H), (b, H, P, N)]


def test_compile_traces_the_kernels_without_graph_breaks():
    """torch.compile(fullgraph=True) through the custom ops' fake implementations, inference and training
    (the forward / backward ops inside the autograd Function); results equal the reference."""
    t, _ = inputs(b=1, L=20, R=2)
    f = torch.compile(lambda **kw: mamba3_scan_triton(**kw), backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert rel(f(**t), mamba3_scan_ref(**t)) < 1e-5
    leaves = {k: v.requires_grad_(True) for k, v in t.items() if v is not None}
    g = torch.randn(1, 20, 2, 2, 20)
    grads = torch.autograd.grad((f(**t) * g).sum(), list(leaves.values()))
    grads0 = torch.autograd.grad((mamba3_scan_ref(**t) * g).sum(), list(leaves.values()))
    for name, a, b in zip(leaves, grads, grads0):
        assert rel(a, b) < 1e-5, name
