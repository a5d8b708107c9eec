"""mambazoo.core.scan: the references against an independent float64 computation, and against each other."""

import pytest
import torch
import torch.nn.functional as F

from helpers import rel, set_backend
from mambazoo.core.backend import Backend, backend
from mambazoo.core.scan import selective_scan, selective_scan_chunked, selective_scan_ref, selective_state_update_ref


def scan_by_solve(u, delta, A, B, C, D, z, delta_bias, h0):
    """Independent float64 selective scan: for each (b, d, n) the states solve the lower-bidiagonal
    system h_t - a_t h_{t-1} = dt_t B_t u_t, done with a triangular solve (no loop, no cumsum).
    B, C given per channel as (batch, dim, L, N)."""
    dt = F.softplus(delta + delta_bias[None, :, None])  # (b, d, L)
    a = torch.exp(dt[..., None] * A[None, :, None, :])  # (b, d, L, N)
    rhs = dt[..., None] * B * u[..., None]  # (b, d, L, N)
    rhs = torch.cat([rhs[:, :, :1] + a[:, :, :1] * h0[:, :, None], rhs[:, :, 1:]], dim=2)
    L = u.shape[-1]
    a_t = a.permute(0, 1, 3, 2)  # (b, d, N, L)
    M = torch.eye(L, dtype=u.dtype).expand(*a_t.shape[:-1], L, L).clone()
    idx = torch.arange(1, L)
    M[..., idx, idx - 1] = -a_t[..., 1:]
    h = torch.linalg.solve_triangular(M, rhs.permute(0, 1, 3, 2)[..., None], upper=False)[..., 0]
    h = h.permute(0, 1, 3, 2)  # (b, d, L, N)
    y = (h * C).sum(-1) + D[None, :, None] * u
    return y * F.silu(z), h[:, :, -1]


def make_inputs(batch=2, dim=4, L=9, N=3, dtype=torch.float32, bc="variable", groups=2):
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(dtype)

    u, z = r(batch, dim, L), r(batch, dim, L)
    delta = r(batch, dim, L, scale=0.5)
    A = -torch.rand(dim, N, generator=g) * 2 - 0.1
    if bc == "variable":
        B, C = r(batch, N, L), r(batch, N, L)
    elif bc == "grouped":
        B, C = r(batch, groups, N, L), r(batch, groups, N, L)
    else:
        B, C = r(dim, N), r(dim, N)
    D = torch.randn(dim, generator=g)
    bias = torch.rand(dim, generator=g) * 2 - 3  # softplus(bias) ~ 0.05 .. 0.3
    h0 = torch.randn(batch, dim, N, generator=g)
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=bias, initial_state=h0)


def per_channel(X, batch, dim, L):
    if X.dim() == 2:
        return X[None, :, None, :].expand(batch, dim, L, X.shape[1])
    if X.dim() == 3:
        return X.transpose(1, 2)[:, None].expand(batch, dim, L, X.shape[1])
    return X.transpose(2, 3).repeat_interleave(dim // X.shape[1], dim=1)


def run_oracle64(inp):
    x = {k: v.detach().double().requires_grad_() for k, v in inp.items()}
    batch, dim, L = x["u"].shape
    y, h = scan_by_solve(x["u"], x["delta"], x["A"], per_channel(x["B"], batch, dim, L),
                         per_channel(x["C"], batch, dim, L), x["D"], x["z"], x["delta_bias"], x["initial_state"])
    return x, y, h


@pytest.mark.parametrize("bc", ["variable", "grouped", "invariant"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("impl", [selective_scan_ref, selective_scan_chunked])
def test_reference_forward_and_every_gradient_match_float64(impl, dtype, tol, bc):
    inp = make_inputs(dtype=dtype, bc=bc)
    x64, y64, h64 = run_oracle64(inp)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inp.items()}
    kw = dict(chunk_size=4) if impl is selective_scan_chunked else {}
    y, h = impl(**leaves, delta_softplus=True, return_last_state=True, **kw)
    assert y.dtype == dtype and h.dtype == torch.float32
    assert y.shape == inp["u"].shape and h.shape == inp["initial_state"].shape
    assert rel(y, y64) < tol and rel(h, h64) < 1e-5
    gy, gh = torch.randn_like(y64), torch.randn_like(h64)
    ((y64 * gy).sum() + (h64 * gh).sum()).backward()
    (y.float() * gy.float()).sum().add((h * gh.float()).sum()).backward()
    for k in leaves:
        assert leaves[k].grad is not None, k
        assert rel(leaves[k].grad, x64[k].grad) < max(tol, 2e-5), k


def test_float64_oracle_gradients_are_right():
    """gradcheck the independent oracle itself, so the gradient comparisons above mean something."""
    inp = make_inputs(batch=1, dim=2, L=5, N=2)
    x = tuple(v.detach().double().requires_grad_() for v in inp.values())

    def f(u, delta, A, B, C, D, z, bias, h0):
        Bp, Cp = per_channel(B, 1, 2, 5), per_channel(C, 1, 2, 5)
        return scan_by_solve(u, delta, A, Bp, Cp, D, z, bias, h0)

    assert torch.autograd.gradcheck(f, x)


def _oracle_and_chunked(inp, grad_state=True, **kw):
    """Forward and every gradient (y and, if grad_state, the final state) of the oracle and of the chunked scan."""
    chunk = kw.pop("chunk_size", None)
    ref = {k: v.detach().clone().requires_grad_() for k, v in inp.items()}
    got = {k: v.detach().clone().requires_grad_() for k, v in inp.items()}
    y1, h1 = selective_scan_ref(**ref, return_last_state=True, **kw)
    y2, h2 = selective_scan_chunked(**got, return_last_state=True, chunk_size=chunk, **kw)
    gy, gh = torch.randn_like(y1, dtype=torch.float32), torch.randn_like(h1)
    for y, h in ((y1, h1), (y2, h2)):
        loss = (y.float() * gy).sum() + ((h * gh).sum() if grad_state else 0)
        loss.backward()
    return (y1, h1, ref), (y2, h2, got)


def _assert_same(oracle, chunked, tol=1e-5):
    (y1, h1, ref), (y2, h2, got) = oracle, chunked
    assert y2.dtype == y1.dtype and y2.shape == y1.shape and h2.dtype == torch.float32 and h2.shape == h1.shape
    assert rel(y2, y1) < tol and rel(h2, h1) < 1e-5
    for k in ref:
        assert got[k].grad is not None and torch.isfinite(got[k].grad).all(), k
        assert rel(got[k].grad, ref[k].grad) < tol, k


# odd lengths, chunk sizes that do not divide L, one step per chunk, a chunk longer than L, the default size
@pytest.mark.parametrize("L,chunk", [(1, 4), (7, 4), (13, 5), (33, 8), (64, 16), (17, 1), (9, 64), (31, None)])
@pytest.mark.parametrize("bc", ["variable", "grouped", "invariant"])
def test_chunked_equals_sequential_oracle_with_every_gradient(L, chunk, bc):
    inp = make_inputs(L=L, bc=bc)
    _assert_same(*_oracle_and_chunked(inp, delta_softplus=True, chunk_size=chunk))


@pytest.mark.parametrize("bc", ["variable", "grouped", "invariant"])
def test_chunked_without_optional_arguments_or_state_gradient_equals_oracle(bc):
    """No D, z, delta_bias or initial_state, no softplus, and a loss on y alone (the final state's gradient is None)."""
    inp = make_inputs(L=11, bc=bc)
    for k in ("D", "z", "delta_bias", "initial_state"):
        del inp[k]
    inp["delta"] = F.softplus(inp["delta"])
    _assert_same(*_oracle_and_chunked(inp, grad_state=False, chunk_size=4))


def test_chunked_bfloat16_inputs_equal_the_oracle():
    inp = make_inputs(L=21, dtype=torch.bfloat16)
    _assert_same(*_oracle_and_chunked(inp, delta_softplus=True, chunk_size=8), tol=1e-2)


@pytest.mark.parametrize("chunk", [3, 5, 13])
def test_chunked_seq_idx_equals_the_oracle_with_every_gradient(chunk):
    """Boundaries inside a chunk and on a chunk's first step (5 and 11 with chunk 5), one-step sequences (11, 12)
    and a last state that belongs to the final packed sequence alone."""
    inp = make_inputs(batch=2, L=13, bc="grouped")
    seq_idx = torch.tensor([[0] * 5 + [1] * 6 + [2] + [3], [7] * 13], dtype=torch.int64)
    _assert_same(*_oracle_and_chunked(inp, delta_softplus=True, seq_idx=seq_idx, chunk_size=chunk))


def test_chunked_reverse_equals_the_oracle(monkeypatch):
    """selective_scan(reverse=True) on the CPU backend against the same call forced to the oracle."""
    inp, seq_idx = _packed_inputs()
    results = []
    for choice in ("ref", "chunked"):
        set_backend(monkeypatch, scan=choice)
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inp.items()}
        y, h = selective_scan(**leaves, delta_softplus=True, return_last_state=True, seq_idx=seq_idx, reverse=True)
        results.append((y, h, leaves))
    gy, gh = torch.randn_like(results[0][0]), torch.randn_like(results[0][1])
    for y, h, _ in results:
        ((y * gy).sum() + (h * gh).sum()).backward()
    _assert_same(*results)


def test_chunked_is_stable_at_dt_times_a_of_minus_50_per_step():
    """exp(-cumsum) formulations overflow here; this one forms exp(dt*A) = exp(-50) per step: finite and equal to
    the oracle, gradients included."""
    inp = make_inputs(L=40)
    inp["A"] = -torch.ones_like(inp["A"])
    inp["delta"] = torch.full_like(inp["delta"], 50.0)
    inp["delta_bias"] = torch.zeros_like(inp["delta_bias"])
    oracle, chunked = _oracle_and_chunked(inp, delta_softplus=False, chunk_size=16)
    assert torch.isfinite(chunked[0]).all() and torch.isfinite(chunked[1]).all()
    _assert_same(oracle, chunked)


def test_chunked_with_large_softplus_steps_matches_the_oracle():
    inp = make_inputs(L=40)
    inp["delta_bias"] = torch.full_like(inp["delta_bias"], 30.0)
    _assert_same(*_oracle_and_chunked(inp, delta_softplus=True, chunk_size=40))


def test_chunked_empty_sequence_and_bad_chunk_size():
    inp = make_inputs(L=0)
    y, h = selective_scan_chunked(**inp, delta_softplus=True, return_last_state=True)
    assert y.shape == (2, 4, 0) and torch.equal(h, inp["initial_state"])
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="chunk_size: expected a positive int"):
            selective_scan_chunked(**make_inputs(), chunk_size=bad)


def test_optional_arguments_default_to_their_identity():
    inp = make_inputs()
    base = dict(u=inp["u"], delta=inp["delta"], A=inp["A"], B=inp["B"], C=inp["C"])
    y = selective_scan_ref(**base)
    y_explicit = selective_scan_ref(**base, D=torch.zeros(4), delta_bias=torch.zeros(4),
                                    initial_state=torch.zeros(2, 4, 3))
    assert torch.allclose(y, y_explicit)
    assert torch.allclose(selective_scan(**base), y, atol=1e-6)


def test_dispatch_can_be_forced_to_the_oracle(monkeypatch):
    inp = make_inputs()
    with backend(scan="ref"):
        assert torch.equal(selective_scan(**inp, delta_softplus=True), selective_scan_ref(**inp, delta_softplus=True))
    with pytest.raises(ValueError, match="MAMBAZOO_SCAN"):
        Backend.from_env({"MAMBAZOO_SCAN": "bogus"})
    with pytest.raises(ValueError, match="scan"), backend(scan="bogus"):
        selective_scan(**inp)


def test_state_update_ref_is_one_step_of_the_scan():
    inp = make_inputs(L=6, bc="grouped")
    y_full, h_full = selective_scan_ref(**inp, delta_softplus=True, return_last_state=True)
    state = inp["initial_state"].clone()
    for t in range(6):
        y_t = selective_state_update_ref(
            state, inp["u"][..., t], inp["delta"][..., t], inp["A"], inp["B"][..., t], inp["C"][..., t],
            D=inp["D"], z=inp["z"][..., t], dt_bias=inp["delta_bias"], dt_softplus=True)
        assert torch.allclose(y_t, y_full[..., t], atol=1e-5)
    assert torch.allclose(state, h_full, atol=1e-5)


@pytest.mark.parametrize("change,match", [
    (dict(u=torch.randn(2, 4)), r"u: expected \(batch, dim, L\)"),
    (dict(delta=torch.randn(2, 4, 8)), r"delta: expected \(batch, dim, L\) = \(2, 4, 9\)"),
    (dict(z=torch.randn(2, 4, 8)), r"z: expected \(batch, dim, L\) = \(2, 4, 9\)"),
    (dict(A=torch.randint(-3, 0, (4, 3))), r"A: expected a floating-point"),
    (dict(A=torch.randn(5, 3)), r"A: expected \(dim, N\) = \(4, N\)"),
    (dict(B=torch.randn(2, 3, 8)), r"B: expected \(batch, N, L\) = \(2, 3, 9\)"),
    (dict(C=torch.randn(2, 3, 3, 9)), r"C: expected \(batch, groups, N, L\)"),
    (dict(B=torch.randn(4, 5)), r"B: time-invariant B must be \(dim, N\) = \(4, 3\)"),
    (dict(D=torch.randn(3)), r"D: expected \(dim,\) = \(4,\)"),
    (dict(initial_state=torch.randn(2, 4, 5)), r"initial_state: expected \(batch, dim, N\) = \(2, 4, 3\)"),
])
def test_bad_input_raises_value_error_naming_the_expected_shape(change, match):
    inp = make_inputs()
    inp.update(change)
    for impl in (selective_scan_ref, selective_scan_chunked, selective_scan):
        with pytest.raises(ValueError, match=match):
            impl(**inp)


def test_bad_state_update_input_raises():
    state = torch.zeros(2, 4, 3)
    with pytest.raises(ValueError, match=r"x: expected \(batch, dim\) = \(2, 4\)"):
        selective_state_update_ref(state, torch.randn(2, 5), torch.randn(2, 4), -torch.rand(4, 3),
                                   torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="state: expected float32"):  # fp16 / bf16 states are taken (mamba_ssm's)
        selective_state_update_ref(state.double(), torch.randn(2, 4), torch.randn(2, 4), -torch.rand(4, 3),
                                   torch.randn(2, 3), torch.randn(2, 3))


def _packed_inputs():
    inp = make_inputs(batch=2, L=13, bc="grouped")
    seq_idx = torch.tensor([[0] * 5 + [1] * 6 + [2] * 2, [0] * 13], dtype=torch.int32)
    return inp, seq_idx


def test_seq_idx_restarts_the_state_at_each_packed_sequence():
    """Row 0 packs three sequences: each must equal the scan of that sequence alone (from a zero
    state, except the first, which starts from initial_state); row 1 is one plain sequence."""
    inp, seq_idx = _packed_inputs()
    y, h = selective_scan_ref(**inp, delta_softplus=True, return_last_state=True, seq_idx=seq_idx)
    for b, bounds in ((0, [(0, 5), (5, 11), (11, 13)]), (1, [(0, 13)])):
        for k, (s0, s1) in enumerate(bounds):
            part = {key: (v[b:b + 1, ..., s0:s1] if key in ("u", "delta", "z", "B", "C") else v)
                    for key, v in inp.items()}
            part["initial_state"] = inp["initial_state"][b:b + 1] if k == 0 else None
            y_part, h_part = selective_scan_ref(**part, delta_softplus=True, return_last_state=True)
            assert torch.allclose(y[b:b + 1, :, s0:s1], y_part, atol=1e-5), (b, k)
        assert torch.allclose(h[b:b + 1], h_part, atol=1e-5)
    # without seq_idx the state leaks across the boundaries
    assert not torch.allclose(selective_scan_ref(**inp, delta_softplus=True)[0, :, 5:], y[0, :, 5:], atol=1e-3)


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_seq_idx_in_chunked_and_dispatched_kernel_matches_the_oracle(impl, monkeypatch):
    inp, seq_idx = _packed_inputs()
    ref = {k: v.detach().clone().requires_grad_() for k, v in inp.items()}
    y_ref, h_ref = selective_scan_ref(**ref, delta_softplus=True, return_last_state=True, seq_idx=seq_idx)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inp.items()}
    set_backend(monkeypatch, scan=impl)
    y, h = selective_scan(**leaves, delta_softplus=True, return_last_state=True, seq_idx=seq_idx)
    assert rel(y, y_ref) < 1e-5 and rel(h, h_ref) < 1e-5
    gy, gh = torch.randn_like(y_ref), torch.randn_like(h_ref)
    ((y_ref * gy).sum() + (h_ref * gh).sum()).backward()
    ((y * gy).sum() + (h * gh).sum()).backward()
    for k in leaves:
        assert torch.isfinite(leaves[k].grad).all(), k
        assert rel(leaves[k].grad, ref[k].grad) < 1e-4, k


def test_bad_seq_idx_raises():
    inp, seq_idx = _packed_inputs()
    with pytest.raises(ValueError, match=r"seq_idx: expected an integer tensor \(batch, L\) = \(2, 13\)"):
        selective_scan_ref(**inp, seq_idx=seq_idx[:, :12])
    with pytest.raises(ValueError, match="seq_idx: expected an integer tensor"):
        selective_scan_chunked(**inp, seq_idx=seq_idx.float())


def test_reference_path_out_and_average_in_place():
    """mambazoo.core.scan on the CPU honours out= and average_in_place= without autograd (the Vim mixer's buffers), the same
    values as without them, and refuses an out of the wrong shape or dtype."""
    torch.manual_seed(0)
    b, d, L, N = 2, 3, 11, 4
    u, delta, z = torch.randn(b, d, L), torch.randn(b, d, L), torch.randn(b, d, L)
    A, B, C = -torch.rand(d, N) - 0.1, torch.randn(b, N, L), torch.randn(b, N, L)
    args = (u, delta, A, B, C, torch.randn(d), z, torch.rand(d))
    with torch.no_grad():
        want = selective_scan(*args, True)
        buf = torch.empty(b, L, 2 * d)[..., :d].transpose(1, 2)
        got = selective_scan(*args, True, out=buf)
        assert got.data_ptr() == buf.data_ptr() and torch.equal(got, want)
        back = selective_scan(*args, True, reverse=True)
        avg = selective_scan(*args, True, reverse=True, average_with=got, average_in_place=True)
        assert avg.data_ptr() == buf.data_ptr()
        torch.testing.assert_close(avg, torch.lerp(want, back, 0.5))
        with pytest.raises(ValueError, match="out: expected"):
            selective_scan(*args, True, out=torch.empty(b, d, L, dtype=torch.float64))
