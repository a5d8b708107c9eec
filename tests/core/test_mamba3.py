"""Mamba-3 core: chunked reference == sequential oracle (outputs, final states, every gradient), packed
sequences, the mixer's decode step == its full forward, rotary state properties, causality, input checks."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import set_backend
from mambazoo.core.mamba3 import Mamba3, heavy_tail, mamba3_decay
from mambazoo.core.mamba3_scan import (
    mamba3_scan,
    mamba3_scan_chunked,
    mamba3_scan_ref,
    mamba3_step_ref,
    rotate,
)

DT = torch.float64


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(b=2, L=13, H=4, P=3, R=1, G=2, N=8, S=2, states=True, dtype=DT, grad=False):
    """Random scan inputs (shapes of core/mamba3_scan.py), dt spread over [~1e-3, ~3]."""
    dt = F.softplus(torch.randn(b, L, H, dtype=dtype) * 2 - 2)
    t = dict(
        x=torch.randn(b, L, H, P, dtype=dtype), dt=dt, adt=-dt * (torch.rand(b, L, H, dtype=dtype) * 2 + 1e-3),
        trap=torch.rand(b, L, H, dtype=dtype), B=torch.randn(b, L, R, G, N, dtype=dtype),
        C=torch.randn(b, L, R, G, N, dtype=dtype), angles=torch.randn(b, L, H, S, dtype=dtype) * 2,
        B_bias=torch.randn(H, R, N, dtype=dtype), C_bias=torch.randn(H, R, N, dtype=dtype),
        D=torch.randn(H, dtype=dtype), mimo_x=torch.randn(H, R, P, dtype=dtype) if R > 1 else None)
    init = None
    if states:
        init = [torch.randn(b, H, S, dtype=dtype) * 3, torch.randn(b, H, P, N, dtype=dtype),
                torch.randn(b, R, H, N, dtype=dtype), torch.randn(b, H, P, dtype=dtype)]
    if grad:
        for v in list(t.values()) + (init or []):
            if v is not None:
                v.requires_grad_(True)
    return t, init


def loss_of(y, fin, gens):
    """A scalar touching y and every final state with random weights (so each gradient path is exercised)."""
    total = (y * gens[0]).sum()
    for f, w in zip(fin, gens[1:]):
        total = total + (f * w).sum()
    return total


@pytest.mark.parametrize("R", [1, 2, 4])
@pytest.mark.parametrize("L,chunk", [(1, 4), (7, 4), (13, 4), (13, 64)])
@pytest.mark.parametrize("pairwise", [True, False])
def test_chunked_equals_oracle_forward_states_and_gradients(R, L, chunk, pairwise):
    t, init = make_inputs(L=L, R=R, G=2 if R < 4 else 1, grad=True)
    y0, f0 = mamba3_scan_ref(**t, initial_states=init, return_final_states=True, pairwise=pairwise)
    y1, f1 = mamba3_scan_chunked(**t, initial_states=init, return_final_states=True, pairwise=pairwise,
                                 chunk_size=chunk)
    assert y0.shape == (2, L, R, 4, 3)
    assert rel(y1, y0) < 1e-12
    for a, b in zip(f1, f0):
        assert rel(a, b) < 1e-12
    gens = [torch.randn_like(y0)] + [torch.randn_like(f) for f in f0]
    leaves = [v for v in list(t.values()) + init if v is not None]
    g0 = torch.autograd.grad(loss_of(y0, f0, gens), leaves)
    g1 = torch.autograd.grad(loss_of(y1, f1, gens), leaves)
    names = [k for k, v in t.items() if v is not None] + ["angle0", "ssm0", "k0", "v0"]
    for name, a, b in zip(names, g1, g0):
        assert b.abs().sum() > 0, name  # every input reaches the output
        assert rel(a, b) < 1e-10, name


@pytest.mark.parametrize("R", [1, 2])
def test_packed_sequences_seq_idx_and_cu_seqlens(R):
    """seq_idx restarts every state (the initial one belongs to the first sequence); each packed sequence of
    cu_seqlens equals its own run from its own initial state."""
    L = 13
    t, init = make_inputs(L=L, R=R, grad=True)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 3, 3], [4, 4, 4, 4, 4, 4, 7, 7, 7, 7, 7, 7, 7]])
    y0, f0 = mamba3_scan_ref(**t, initial_states=init, seq_idx=seq_idx, return_final_states=True)
    y1, f1 = mamba3_scan_chunked(**t, initial_states=init, seq_idx=seq_idx, return_final_states=True, chunk_size=4)
    assert rel(y1, y0) < 1e-12
    for a, b in zip(f1, f0):
        assert rel(a, b) < 1e-12
    g = torch.randn_like(y0)
    leaves = [t["x"], t["angles"], t["dt"], t["trap"], init[1], init[2]]
    for a, b in zip(torch.autograd.grad((y1 * g).sum(), leaves), torch.autograd.grad((y0 * g).sum(), leaves)):
        assert rel(a, b) < 1e-10
    # row 1's second sequence from zero states equals a fresh run of it
    sl = {k: (v[1:, 6:] if k in ("x", "dt", "adt", "trap", "B", "C", "angles") else v) for k, v in t.items()}
    alone, fin_alone = mamba3_scan_ref(**sl, return_final_states=True)
    assert rel(y0[1:, 6:], alone) < 1e-12
    assert rel(f0[1][1:], fin_alone[1]) < 1e-12
    # the first sequence continues the initial state: differs from a zero start
    assert rel(y0[:1, :3], mamba3_scan_ref(**{k: (v[:1, :3] if k in sl and v is not None and v.dim() > 2 and
                                                    v.shape[1] == L else v) for k, v in t.items()})) > 1e-3

    # cu_seqlens: batch 1, one state per sequence
    t1, init1 = make_inputs(b=1, L=L, R=R)
    cu = torch.tensor([0, 3, 4, 10, 13])
    init_n = [torch.randn(4, *s.shape[1:], dtype=DT) for s in init1]
    yc, fc = mamba3_scan_chunked(**t1, initial_states=init_n, cu_seqlens=cu, return_final_states=True, chunk_size=4)
    yr, fr = mamba3_scan_ref(**t1, initial_states=init_n, cu_seqlens=cu, return_final_states=True)
    assert rel(yc, yr) < 1e-12 and all(rel(a, b) < 1e-12 for a, b in zip(fc, fr))
    assert fc[1].shape == (4, 4, 3, 8)
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        part = {k: (v[:, s:e] if k in ("x", "dt", "adt", "trap", "B", "C", "angles") else v) for k, v in t1.items()}
        yi, fi = mamba3_scan_ref(**part, initial_states=[z[i:i + 1] for z in init_n], return_final_states=True)
        assert rel(yc[:, s:e], yi) < 1e-12
        assert all(rel(a[i:i + 1], b) < 1e-12 for a, b in zip(fc, fi))


def test_oracle_against_written_out_recurrence():
    """The oracle against the recurrence written out with explicit loops (SISO, one group, pairwise rotation):
    h_t = a_t h_{t-1} + a_t dt_t (1 - l_t) x_{t-1} k_{t-1}^T + dt_t l_t x_t k_t^T, y_t = h_t q_t + D x_t."""
    t, init = make_inputs(b=1, L=6, H=1, P=2, G=1, N=4, S=1, states=False)
    y = mamba3_scan_ref(**t)[0, :, 0, 0]  # (L, P)
    h = torch.zeros(2, 4, dtype=DT)
    theta = 0.0
    k_prev = torch.zeros(4, dtype=DT)
    x_prev = torch.zeros(2, dtype=DT)
    for s in range(6):
        dt, lam = t["dt"][0, s, 0], t["trap"][0, s, 0]
        theta = theta + math.pi * torch.tanh(t["angles"][0, s, 0, 0]) * dt
        c, sn = torch.cos(theta), torch.sin(theta)
        rot = torch.tensor([[c, -sn, 0, 0], [sn, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=DT)
        k = rot @ (t["B"][0, s, 0, 0] + t["B_bias"][0, 0])
        q = rot @ (t["C"][0, s, 0, 0] + t["C_bias"][0, 0])
        a = torch.exp(t["adt"][0, s, 0])
        xs = t["x"][0, s, 0]
        h = a * h + a * dt * (1 - lam) * torch.outer(x_prev, k_prev) + dt * lam * torch.outer(xs, k)
        assert torch.allclose(y[s], h @ q + t["D"][0] * xs, rtol=1e-12, atol=1e-12)
        k_prev, x_prev = k, xs


def test_rotation_is_relative():
    """Outputs depend on angles only through theta_t - theta_s: a shifted initial angle changes nothing when the
    initial SSM / key state is zero, and changes the output when it is not."""
    t, init = make_inputs(L=9)
    zero = [init[0], torch.zeros_like(init[1]), torch.zeros_like(init[2]), init[3]]
    shifted = [init[0] + 1.234] + zero[1:]
    assert rel(mamba3_scan_ref(**t, initial_states=shifted), mamba3_scan_ref(**t, initial_states=zero)) < 1e-12
    shifted_full = [init[0] + 1.234] + init[1:]
    assert rel(mamba3_scan_ref(**t, initial_states=shifted_full), mamba3_scan_ref(**t, initial_states=init)) > 1e-3


def test_rotate_layouts():
    """pairwise pairs (2i, 2i+1), halves pairs (i, i + N/2); the two agree up to a permutation of dims;
    pairs beyond S pass through; norms are kept."""
    v = torch.randn(5, 8, dtype=DT)
    th = torch.randn(5, 2, dtype=DT)
    a = rotate(v, th, pairwise=True)
    perm = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])  # pairwise layout -> halves layout
    b = rotate(v[:, perm], th, pairwise=False)
    assert torch.allclose(a[:, perm], b)
    assert torch.allclose(a.norm(dim=-1), v.norm(dim=-1))
    assert torch.equal(a[:, 4:], v[:, 4:])  # S = 2 of 4 pairs rotate
    assert not torch.allclose(a[:, :4], v[:, :4])


def test_trap_limits():
    """trap = 1 is the Euler (Mamba-2) update: the previous step's key / value have no effect; trap = 0 uses
    only them."""
    t, init = make_inputs(L=7)
    t["trap"] = torch.ones_like(t["trap"])
    other = [init[0], init[1], torch.randn_like(init[2]), torch.randn_like(init[3])]
    assert rel(mamba3_scan_ref(**t, initial_states=other), mamba3_scan_ref(**t, initial_states=init)) < 1e-12
    t["trap"] = torch.zeros_like(t["trap"])
    assert rel(mamba3_scan_ref(**t, initial_states=other), mamba3_scan_ref(**t, initial_states=init)) > 1e-3


def test_step_chain_equals_scan():
    t, init = make_inputs(L=5, R=2)
    y, fin = mamba3_scan_chunked(**t, initial_states=init, return_final_states=True, chunk_size=2)
    states = init
    for s in range(5):
        per = {k: (v[:, s] if k in ("x", "dt", "adt", "trap", "B", "C", "angles") else v) for k, v in t.items()}
        ys, states = mamba3_step_ref(**per, states=states)
        assert rel(ys, y[:, s]) < 1e-12
    assert all(rel(a, b) < 1e-12 for a, b in zip(states, fin))
    assert 0 <= fin[0].min() and fin[0].max() < 2 * math.pi  # the angle state is reduced mod 2 pi


# -- the mixer ------------------------------------------------------------------------------------


def tiny(**kw):
    cfg = dict(d_model=16, d_state=8, headdim=4, chunk_size=4)
    cfg.update(kw)
    return Mamba3(**cfg)


MIXERS = [dict(), dict(is_mimo=True, mimo_rank=2), dict(is_mimo=True, mimo_rank=4, ngroups=2),
          dict(is_outproj_norm=True), dict(is_mimo=True, mimo_rank=2, is_outproj_norm=True),
          dict(rope_fraction=1.0), dict(a_activation="heavy_tail")]


@pytest.mark.parametrize("kw", MIXERS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "siso")
def test_mixer_step_equals_forward(kw):
    """Prefill of 6 tokens with a state, then 5 decode steps == the full forward of 11 tokens; the angle,
    key and value caches are what the full forward's final states are."""
    torch.manual_seed(1)
    m = tiny(**kw)
    with torch.no_grad():
        m.in_proj.weight.mul_(3)  # larger angles / gates than the default init
        m.D.normal_()
    x = torch.randn(2, 11, 16)
    with torch.no_grad():
        full = m(x)
        full_state = m.allocate_state(2)
        m(x, state=full_state)
        st = m.allocate_state(2)
        pre = m(x[:, :6], state=st)
        steps = [m.step(x[:, t], st) for t in range(6, 11)]
    assert rel(pre, full[:, :6]) < 1e-5
    assert rel(torch.stack(steps, 1), full[:, 6:]) < 1e-5
    for a, b in zip(st.tensors(), full_state.tensors()):
        assert rel(a, b) < 1e-5
    assert st.angle.abs().sum() > 0 and st.k.abs().sum() > 0 and st.v.abs().sum() > 0
    st2 = m.allocate_state(2)
    with torch.no_grad():
        one = torch.stack([m.step(x[:, t], st2) for t in range(11)], 1)
    assert rel(one, full) < 1e-5


def test_mixer_shapes_and_defaults():
    m = Mamba3(64)
    assert (m.d_state, m.headdim, m.expand, m.rope_fraction, m.chunk_size) == (128, 64, 2, 0.5, 64)
    assert m.nheads == 2 and m.num_rope_angles == 32 and m.mimo_rank == 1
    assert m.in_proj.weight.shape == (2 * 128 + 2 * 128 + 3 * 2 + 32, 64)
    m1 = Mamba3(64, rope_fraction=1.0)
    assert m1.num_rope_angles == 64 and m1.in_proj.weight.shape[0] == m.in_proj.weight.shape[0] + 32
    mm = Mamba3(64, is_mimo=True, mimo_rank=4)
    assert mm.B_bias.shape == (2, 4, 128) and mm.mimo_x.shape == (2, 4, 64)
    st = mm.allocate_state(3)
    assert st.angle.shape == (3, 2, 32) and st.ssm.shape == (3, 2, 64, 128) and st.k.shape == (3, 4, 2, 128)
    assert st.v.shape == (3, 2, 64) and st.ssm.dtype == torch.float32


def test_rope_fraction_rotates_half_or_all_pairs():
    """d_state 8, SISO pairs (2i, 2i+1): rope_fraction 0.5 rotates dims 0-3 (S = 2 angles), 1.0 all 8 (S = 4).
    With B and C (and their biases) zero on dims 0-3, the angles change nothing at 0.5 and change the output
    at 1.0."""
    for frac, S, matters in ((0.5, 2, False), (1.0, 4, True)):
        torch.manual_seed(2)
        m = tiny(rope_fraction=frac)
        assert m.num_rope_angles == S
        d_inner, N = m.d_inner, m.d_state
        with torch.no_grad():
            m.in_proj.weight.mul_(3)
            for start in (2 * d_inner, 2 * d_inner + N):  # the B rows, then the C rows
                m.in_proj.weight[start:start + 4].zero_()
            m.B_bias[..., :4] = 0
            m.C_bias[..., :4] = 0
            x = torch.randn(1, 9, 16)
            y = m(x)
            m.in_proj.weight[-S:].normal_()  # other angles
            assert (rel(m(x), y) > 1e-4) == matters


def test_mixer_causal_and_trains():
    m = tiny(is_mimo=True, mimo_rank=2)
    x = torch.randn(2, 10, 16, requires_grad=True)
    y = m(x)
    x2 = x.detach().clone()
    x2[:, 6] += 1.0
    y2 = m(x2)
    assert torch.equal(y[:, :6], y2[:, :6]) and not torch.allclose(y[:, 6:], y2[:, 6:])
    y.square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_mixer_seq_idx_and_cu_seqlens():
    m = tiny()
    x = torch.randn(1, 9, 16)
    seq_idx = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        y = m(x, seq_idx=seq_idx)
        assert rel(y[:, 4:], m(x[:, 4:])) < 1e-5 and rel(y[:, :4], m(x[:, :4])) < 1e-5
        st = m.allocate_state(2)
        yc = m(x, state=st, cu_seqlens=torch.tensor([0, 4, 9]))
        assert rel(yc, y) < 1e-5
        st1 = m.allocate_state(1)
        m(x[:, 4:], state=st1)
        assert rel(st.ssm[1:], st1.ssm) < 1e-5


def test_a_activations():
    a = torch.tensor([-3.0, -1.0, 0.0, 2.0])
    assert torch.allclose(heavy_tail(a), torch.tensor([0.25, 0.5, 1.0, 3.0]))
    dt = torch.full((4,), 0.5)
    assert torch.allclose(mamba3_decay(a, dt, 1e-4, "heavy_tail"), -heavy_tail(a) * 0.5)
    assert torch.allclose(mamba3_decay(a, dt, 1e-4, "softplus"), -F.softplus(a) * 0.5)
    floor = mamba3_decay(torch.tensor([-1e6]), torch.ones(1), 0.01, "heavy_tail")
    assert torch.allclose(floor, torch.tensor([-0.01]))  # floored at A_floor


def test_backend_choice(monkeypatch):
    from mambazoo.core.mamba3_scan import mamba3_backend

    set_backend(monkeypatch, mamba3="auto")
    assert mamba3_backend(torch.device("cpu")) == "chunked"
    assert mamba3_backend(torch.device("cuda")) == "triton"
    set_backend(monkeypatch, mamba3="chunked")
    assert mamba3_backend(torch.device("cuda")) == "chunked"
    set_backend(monkeypatch, mamba3="triton")
    assert mamba3_backend(torch.device("cpu")) == "triton"
    set_backend(monkeypatch, mamba3="auto")
    from mambazoo.core.backend import Backend

    assert Backend.from_env({"MAMBAZOO_MAMBA3": "triton"}).mamba3 == "triton"
    with pytest.raises(ValueError, match="MAMBAZOO_MAMBA3: expected auto, triton, chunked, got 'cuda'"):
        Backend.from_env({"MAMBAZOO_MAMBA3": "cuda"})
    t, init = make_inputs(L=5)
    assert rel(mamba3_scan(**t, initial_states=init), mamba3_scan_ref(**t, initial_states=init)) < 1e-12


def test_bad_inputs_name_the_shape():
    t, init = make_inputs(L=5, R=2)
    cases = [
        (dict(x=t["x"][..., :2]), r"mimo_x: expected shape \(4, 2, 2\)"),
        (dict(dt=t["dt"][:, :3]), r"dt: expected shape \(2, 5, 4\)"),
        (dict(C=t["C"][..., :4]), r"C: expected shape \(2, 5, 2, 2, 8\)"),
        (dict(angles=torch.zeros(2, 5, 4, 5, dtype=DT)), r"angles: expected .* S <= 4"),
        (dict(B_bias=torch.zeros(4, 8, dtype=DT)), r"B_bias: expected shape \(4, 2, 8\)"),
        (dict(mimo_x=None), r"mimo_x: expected \(nheads, rank, headdim\) = \(4, 2, 3\)"),
        (dict(x=torch.zeros(2, 5, 12, dtype=DT)), r"x: expected \(batch, L, nheads, headdim\)"),
    ]
    for change, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            mamba3_scan_chunked(**{**t, **change})
    with pytest.raises(ValueError, match=r"initial_states\[ssm\]: expected shape \(2, 4, 3, 8\)"):
        mamba3_scan_ref(**t, initial_states=[init[0], init[1][..., :4], init[2], init[3]])
    with pytest.raises(ValueError, match=r"seq_idx: expected an integer tensor \(batch, L\) = \(2, 5\)"):
        mamba3_scan_chunked(**t, seq_idx=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"cu_seqlens: expected 0 = c_0 < c_1"):
        mamba3_scan_chunked(**{k: (v[:1] if k in ("x", "dt", "adt", "trap", "B", "C", "angles") else v)
                               for k, v in t.items()}, cu_seqlens=torch.tensor([0, 3, 7]))
    m = tiny()
    with pytest.raises(ValueError, match=r"x: expected \(batch, L, d_model=16\), got \(2, 5, 8\)"):
        m(torch.zeros(2, 5, 8))
    with pytest.raises(ValueError, match=r"x: expected \(batch, d_model=16\), got \(2, 1, 16\)"):
        m.step(torch.zeros(2, 1, 16), m.allocate_state(2))
    with pytest.raises(ValueError, match=r"state.ssm: expected \(3, 8, 4, 8\)"):
        m.step(torch.zeros(3, 16), m.allocate_state(2))
    with pytest.raises(ValueError, match="rope_fraction: expected 0.5 or 1.0"):
        tiny(rope_fraction=0.25)
    with pytest.raises(ValueError, match="headdim: expected a divisor of d_inner"):
        tiny(headdim=5)


def test_mixer_bf16_follows_fp32():
    """A bf16 mixer (weights and activations) against the same weights in fp32: forward and decode steps within
    bf16 rounding; the state keeps angle / ssm in fp32 and K / V in bf16."""
    torch.manual_seed(5)
    m = tiny(is_mimo=True, mimo_rank=2)
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        ref = m(x)
        mb = tiny(is_mimo=True, mimo_rank=2).to(torch.bfloat16)
        mb.load_state_dict(m.state_dict())
        yb = mb(x.to(torch.bfloat16))
        st = mb.allocate_state(2)
        steps = torch.stack([mb.step(x[:, t].to(torch.bfloat16), st) for t in range(9)], 1)
    assert yb.dtype == torch.bfloat16 and st.ssm.dtype == torch.float32 and st.k.dtype == torch.bfloat16
    assert rel(yb.double(), ref.double()) < 3e-2
    assert rel(steps.double(), ref.double()) < 3e-2
