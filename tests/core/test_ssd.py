"""The SSD layer (Mamba-2): chunked reference == sequential oracle, states, packed sequences, the step."""

import math

import pytest
import torch

from mambazoo.core.ssd import (
    seq_idx_from_cu_seqlens,
    ssd,
    ssd_backend,
    ssd_chunked,
    ssd_ref,
    ssd_step_ref,
)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def make(b=2, L=7, h=4, p=3, g=2, n=5, d_hp=False, z=True, dt_scale=1.0, requires_grad=False):
    """Random SSD inputs; dt before softplus spread so softplus(dt + bias) covers ~[1e-3, 1] * dt_scale."""
    t = dict(
        x=torch.randn(b, L, h, p),
        dt=torch.randn(b, L, h) * 0.5 + math.log(dt_scale),
        A=-torch.rand(h) * 15 - 1,  # the published init range [-16, -1]
        B=torch.randn(b, L, g, n),
        C=torch.randn(b, L, g, n),
        D=torch.randn(h, p) if d_hp else torch.randn(h),
        z=torch.randn(b, L, h, p) if z else None,
        dt_bias=torch.log(torch.expm1(torch.exp(torch.rand(h) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)))),
        initial_states=torch.randn(b, h, p, n),
    )
    if requires_grad:
        for v in t.values():
            if v is not None:
                v.requires_grad_(True)
    return t


def grads(out, inputs):
    names = [k for k, v in inputs.items() if v is not None and v.requires_grad]
    gs = torch.autograd.grad(out, [inputs[k] for k in names], allow_unused=True)
    return dict(zip(names, gs))


@pytest.mark.parametrize("L,chunk", [(1, 4), (7, 3), (7, 16), (129, 16), (129, 50)])
def test_chunked_equals_oracle_forward_backward_states(L, chunk):
    inp = make(L=L, requires_grad=True, d_hp=(L == 7))
    kw = dict(dt_softplus=True, return_final_states=True)
    y_ref, s_ref = ssd_ref(**inp, **kw)
    y, s = ssd_chunked(**inp, chunk_size=chunk, **kw)
    assert rel(y, y_ref) < 1e-5 and rel(s, s_ref) < 1e-5
    wy, ws = torch.randn_like(y), torch.randn_like(s)
    g_ref = grads((y_ref * wy).sum() + (s_ref * ws).sum(), inp)
    g = grads((y * wy).sum() + (s * ws).sum(), inp)
    assert set(g) == {"x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"}
    for k in g:
        assert rel(g[k], g_ref[k]) < 1e-4, k


def test_oracle_matches_hand_recurrence_one_head():
    # one head, one channel, N = 1: S_t = exp(dt A) S_{t-1} + dt x B ; y = C S + D x
    x, dt, B, C = torch.randn(5), torch.rand(5), torch.randn(5), torch.randn(5)
    A, D = -0.7, 0.3
    S, ys = 0.0, []
    for t in range(5):
        S = math.exp(dt[t] * A) * S + dt[t] * x[t] * B[t]
        ys.append(C[t] * S + D * x[t])
    y = ssd_ref(x.view(1, 5, 1, 1), dt.view(1, 5, 1), torch.tensor([A]), B.view(1, 5, 1, 1), C.view(1, 5, 1, 1),
                D=torch.tensor([D]))
    torch.testing.assert_close(y.view(5), torch.stack(ys).float(), rtol=1e-5, atol=1e-6)


def test_groups_equal_repeated_heads():
    inp = make(h=4, g=2, z=False)
    y = ssd_ref(**inp, dt_softplus=True)
    rep = dict(inp, B=inp["B"].repeat_interleave(2, dim=2), C=inp["C"].repeat_interleave(2, dim=2))
    torch.testing.assert_close(ssd_ref(**rep, dt_softplus=True), y)
    inp["B"] = inp["B"][:, :, :1]
    with pytest.raises(ValueError, match="C: expected"):
        ssd_ref(**inp)


@pytest.mark.parametrize("chunk", [4, 5])
def test_seq_idx_does_not_leak_and_matches_separate_runs(chunk):
    inp = make(b=2, L=13, requires_grad=True)
    cuts = [0, 3, 4, 13]  # sequences of 3, 1 and 9 tokens
    seq_idx = torch.zeros(2, 13, dtype=torch.int32)
    for i, (a, e) in enumerate(zip(cuts, cuts[1:])):
        seq_idx[:, a:e] = i
    y_ref, s_ref = ssd_ref(**inp, dt_softplus=True, seq_idx=seq_idx, return_final_states=True)
    y, s = ssd_chunked(**inp, chunk_size=chunk, dt_softplus=True, seq_idx=seq_idx, return_final_states=True)
    assert rel(y, y_ref) < 1e-5 and rel(s, s_ref) < 1e-5
    g_ref = grads((y_ref ** 2).sum() + s_ref.sum(), inp)
    g = grads((y ** 2).sum() + s.sum(), inp)
    for k in g:
        assert rel(g[k], g_ref[k]) < 1e-4, k
    # each packed sequence equals its own run; only the first sees the initial state
    with torch.no_grad():
        for i, (a, e) in enumerate(zip(cuts, cuts[1:])):
            part = {k: (v[:, a:e] if v is not None and v.dim() >= 3 and k not in ("initial_states",) else v)
                    for k, v in inp.items()}
            part["initial_states"] = inp["initial_states"] if i == 0 else None
            y_i, s_i = ssd_ref(**part, dt_softplus=True, return_final_states=True)
            torch.testing.assert_close(y[:, a:e], y_i, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(s, s_i, rtol=1e-4, atol=1e-5)


def test_cu_seqlens_equals_seq_idx():
    inp = make(b=1, L=11)
    cu = torch.tensor([0, 4, 4, 11])
    seq_idx = seq_idx_from_cu_seqlens(cu, 11)
    assert seq_idx.tolist() == [[0] * 4 + [2] * 7]
    torch.testing.assert_close(ssd_chunked(**inp, chunk_size=3, cu_seqlens=cu, dt_softplus=True),
                               ssd_ref(**inp, seq_idx=seq_idx, dt_softplus=True))
    with pytest.raises(ValueError, match="cu_seqlens: expected non-decreasing offsets from 0 to L = 11"):
        ssd_ref(**inp, cu_seqlens=torch.tensor([0, 5, 10]))


def test_dt_limit_clamps():
    inp = make(L=6, dt_scale=10.0)
    y_lim = ssd_ref(**inp, dt_softplus=True, dt_limit=(0.01, 0.05))
    y_chk = ssd_chunked(**inp, chunk_size=4, dt_softplus=True, dt_limit=(0.01, 0.05))
    assert rel(y_chk, y_lim) < 1e-5
    dt = (inp["dt"] + inp["dt_bias"]).exp().log1p().clamp(0.01, 0.05)
    no_bias = dict(inp, dt=dt, dt_bias=None)
    torch.testing.assert_close(ssd_ref(**no_bias), y_lim)  # no softplus: dt given as is
    assert rel(ssd_ref(**inp, dt_softplus=True), y_lim) > 1e-2  # the limit changed something


def test_step_by_step_equals_full():
    inp = make(L=9, d_hp=True)
    y_full, s_full = ssd_ref(**inp, dt_softplus=True, return_final_states=True)
    state = inp["initial_states"].clone()
    ys = []
    for t in range(9):
        ys.append(ssd_step_ref(state, inp["x"][:, t], inp["dt"][:, t], inp["A"], inp["B"][:, t], inp["C"][:, t],
                               D=inp["D"], z=inp["z"][:, t], dt_bias=inp["dt_bias"], dt_softplus=True))
    torch.testing.assert_close(torch.stack(ys, 1), y_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, s_full, rtol=1e-5, atol=1e-5)


def test_initial_state_continues_a_split_sequence():
    inp = make(L=10)
    y, s = ssd_chunked(**inp, chunk_size=4, dt_softplus=True, return_final_states=True)
    first = {k: (v[:, :6] if k in ("x", "dt", "B", "C", "z") else v) for k, v in inp.items()}
    second = {k: (v[:, 6:] if k in ("x", "dt", "B", "C", "z") else v) for k, v in inp.items()}
    y1, s1 = ssd_chunked(**first, chunk_size=4, dt_softplus=True, return_final_states=True)
    second["initial_states"] = s1
    y2, s2 = ssd_chunked(**second, chunk_size=3, dt_softplus=True, return_final_states=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2, s, rtol=1e-5, atol=1e-5)


def test_causal():
    inp = make(L=12, z=True)
    inp["initial_states"] = None
    y = ssd_chunked(**inp, chunk_size=5, dt_softplus=True)
    for k in ("x", "dt", "B", "C", "z"):
        mod = dict(inp)
        mod[k] = inp[k].clone()
        mod[k][:, 8:] += 1.0
        y2 = ssd_chunked(**mod, chunk_size=5, dt_softplus=True)
        torch.testing.assert_close(y2[:, :8], y[:, :8])
        assert not torch.allclose(y2[:, 8:], y[:, 8:])


def test_half_precision_inputs_close_to_fp32():
    inp = make(L=20)
    y32 = ssd_chunked(**inp, chunk_size=8, dt_softplus=True)
    half = {k: (v.bfloat16() if v is not None and k in ("x", "dt", "B", "C", "z") else v) for k, v in inp.items()}
    y16 = ssd_chunked(**half, chunk_size=8, dt_softplus=True)
    assert y16.dtype == torch.bfloat16 and rel(y16, y32) < 2e-2


def test_bad_input_raises_naming_the_shape():
    inp = make()
    with pytest.raises(ValueError, match=r"x: expected \(batch, L, heads, headdim\)"):
        ssd_ref(**dict(inp, x=inp["x"][0]))
    with pytest.raises(ValueError, match=r"dt: expected \(batch, L, heads\) = \(2, 7, 4\)"):
        ssd_ref(**dict(inp, dt=inp["dt"][..., :3]))
    with pytest.raises(ValueError, match=r"A: expected \(heads,\) = \(4,\)"):
        ssd_ref(**dict(inp, A=torch.ones(3)))
    with pytest.raises(ValueError, match="group count that divides heads = 4"):
        ssd_ref(**dict(inp, B=torch.randn(2, 7, 3, 5), C=torch.randn(2, 7, 3, 5)))
    with pytest.raises(ValueError, match=r"D: expected \(heads,\) = \(4,\) or \(heads, headdim\) = \(4, 3\)"):
        ssd_ref(**dict(inp, D=torch.ones(5)))
    with pytest.raises(ValueError, match=r"initial_states: expected \(batch, heads, headdim, N\) = \(2, 4, 3, 5\)"):
        ssd_chunked(**dict(inp, initial_states=torch.zeros(2, 4, 3)))
    with pytest.raises(ValueError, match=r"seq_idx: expected an integer tensor \(batch, L\) = \(2, 7\)"):
        ssd_chunked(**inp, seq_idx=torch.zeros(2, 7))
    with pytest.raises(ValueError, match="chunk_size: expected a positive int"):
        ssd_chunked(**inp, chunk_size=0)
    with pytest.raises(ValueError, match=r"state: expected \(batch, heads, headdim, N\)"):
        ssd_step_ref(torch.zeros(2, 4, 3), inp["x"][:, 0], inp["dt"][:, 0], inp["A"], inp["B"][:, 0], inp["C"][:, 0])


def test_dispatch_is_chunked_on_cpu():
    from mambazoo.core.backend import Backend, backend

    with backend(ssd="auto"):
        assert ssd_backend(torch.device("cpu")) == "chunked"
        assert ssd_backend(torch.device("cuda")) == "triton"
    with backend(ssd="ref"):
        assert ssd_backend(torch.device("cuda")) == "ref"
        inp = make(L=5)
        torch.testing.assert_close(ssd(**inp, chunk_size=4, dt_softplus=True), ssd_ref(**inp, dt_softplus=True))
    assert Backend.from_env({"MAMBAZOO_SSD": "chunked"}).ssd == "chunked"
    with pytest.raises(ValueError, match="MAMBAZOO_SSD: expected auto, triton, chunked, ref, got 'bogus'"):
        Backend.from_env({"MAMBAZOO_SSD": "bogus"})
