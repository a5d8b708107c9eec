"""The Triton selective-scan kernels against core's reference (CPU, TRITON_INTERPRET=1).

Shapes are tiny (the interpreter is slow); the CPU tile is 16 steps, so L = 37 and 129 cross tiles.
Errors are ||out - ref|| / ||ref|| per output and per gradient.
"""

import pytest
import torch

from helpers import assert_close, rel, set_backend
from mambazoo.core.scan_ref import low_rank_delta, low_rank_dtype, selective_scan_ref, selective_state_update_ref
from mambazoo.kernels import selective_scan_triton, selective_state_update
from mambazoo.kernels.scan import ops

TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_inputs(batch=2, dim=4, L=37, N=4, dtype=torch.float32, b_shape="variable", c_shape="variable",
                groups=2, D=True, z=True, bias=True, h0=True):
    """Fresh random inputs; dt = softplus(delta + bias) spreads over about [1e-3, 1]."""
    def bc(kind):
        if kind == "variable":
            return torch.randn(batch, N, L, dtype=dtype)
        if kind == "grouped":
            return torch.randn(batch, groups, N, L, dtype=dtype)
        return torch.randn(dim, N, dtype=dtype)  # invariant

    return dict(
        u=torch.randn(batch, dim, L, dtype=dtype),
        delta=(torch.rand(batch, dim, L) * 6 - 6).to(dtype),
        A=-torch.rand(dim, N) * 3 - 0.1,
        B=bc(b_shape),
        C=bc(c_shape),
        D=torch.randn(dim) if D else None,
        z=torch.randn(batch, dim, L, dtype=dtype) if z else None,
        delta_bias=torch.rand(dim) * 0.5 if bias else None,
        initial_state=torch.randn(batch, dim, N) if h0 else None,
    )


def leaves(inp):
    return {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in inp.items()}


def run_both(inp, softplus=True, last=True, fn_ref=None, seq_idx=None):
    """Forward and all gradients through the kernel and through the reference; returns both dicts."""
    results = []
    for impl in ("triton", "ref"):
        x = leaves(inp)
        args = [x[k] for k in NAMES[:8]]
        if impl == "triton":
            out = selective_scan_triton(*args, softplus, True, x["initial_state"], seq_idx)
        elif fn_ref is not None:
            out = fn_ref(x, softplus)
        else:
            out = selective_scan_ref(*args, softplus, True, x["initial_state"])
        y, h = out
        torch.manual_seed(1)
        gy, gh = torch.randn_like(y), torch.randn_like(h)
        loss = (y.float() * gy.float()).sum() + ((h * gh).sum() if last else 0)
        loss.backward()
        res = {"y": y.detach(), "last_state": h.detach()}
        res.update({f"d{k}": v.grad for k, v in x.items() if v is not None})
        results.append(res)
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_and_gradients(dtype):
    inp = make_inputs(dtype=dtype)
    got, ref = run_both(inp)
    assert_close(got, ref, TOL[dtype])


@pytest.mark.parametrize("L", [1, 7, 129])
def test_odd_lengths(L):
    got, ref = run_both(make_inputs(L=L, batch=1, dim=3))
    assert_close(got, ref, TOL[torch.float32])


@pytest.mark.parametrize("b_shape,c_shape", [("grouped", "grouped"), ("invariant", "invariant"),
                                             ("invariant", "variable"), ("variable", "grouped")])
def test_bc_layouts(b_shape, c_shape):
    got, ref = run_both(make_inputs(dim=8, L=20, b_shape=b_shape, c_shape=c_shape))
    assert_close(got, ref, TOL[torch.float32])


def test_no_optional_inputs_no_softplus():
    inp = make_inputs(D=False, z=False, bias=False, h0=False, L=19)
    inp["delta"] = torch.rand_like(inp["delta"]) * 0.5  # dt used as is: keep it positive
    got, ref = run_both(inp, softplus=False, last=False)
    assert_close(got, ref, TOL[torch.float32])


@pytest.fixture
def split_l(monkeypatch):
    """Force the long-sequence path: L split into stretches chained by the carry passes."""
    monkeypatch.setitem(ops.CONFIG["cpu"], "nsplit", 3)


def test_split_sequence(split_l):
    got, ref = run_both(make_inputs(L=100, batch=1, dim=3))
    assert_close(got, ref, TOL[torch.float32])


@pytest.mark.parametrize("programs,nsplit", [(1, 1), (3, 3), (64, 1)])
def test_persistent_backward(programs, nsplit, monkeypatch):
    """The backward launches at most `bwd_programs` programs, each walking several work items (blocks of channels
    of a batch row) with one scratch; gradients are the same however the work is shared out."""
    monkeypatch.setitem(ops.CONFIG["cpu"], "bwd_programs", programs)
    monkeypatch.setitem(ops.CONFIG["cpu"], "nsplit", nsplit)
    launches = []
    kernel = ops.scan_bwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                scratch = args[23]
                launches.append((grid, kwargs["PERSISTENT"], scratch.numel()))
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(ops, "scan_bwd_kernel", Spy())
    got, ref = run_both(make_inputs(batch=3, dim=8, L=40, b_shape="grouped", c_shape="variable"))
    assert_close(got, ref, TOL[torch.float32])
    work = 3 * 8 // ops.CONFIG["cpu"]["bwd_block_d"]  # 6 work items of 4 channels
    grid, persistent, scratch = launches[-1]
    assert grid == (min(programs, work), nsplit) and persistent == (programs < work)
    per_program = (16 // 8) * 4 * 4  # K = chunk / block_l states of (N, block_d)
    assert scratch == grid[0] * nsplit * per_program


def test_row_too_long_for_32_bit_offsets_is_refused():
    """A batch row the kernel cannot address with 32-bit offsets raises a clear error before any launch
    (meta tensors: the shapes and strides are real, no memory is allocated)."""
    big = torch.empty_strided((1, 2, 3), (0, 2 ** 31, 1), device="meta")
    B = torch.empty(1, 4, 3, device="meta")
    with pytest.raises(ValueError, match="2\\^31"):
        ops.scan_forward(big, big, torch.empty(2, 4, device="meta"), B, B, None, None, None, None, None, False)


def test_separate_tile_lengths(monkeypatch):
    """The forward and backward may walk L in tiles of different lengths (checkpoints every `chunk` steps)."""
    monkeypatch.setitem(ops.CONFIG["cpu"], "nsplit", 3)
    monkeypatch.setitem(ops.CONFIG["cpu"], "fwd_block_l", 4)
    monkeypatch.setitem(ops.CONFIG["cpu"], "bwd_block_l", 16)
    got, ref = run_both(make_inputs(L=100, batch=1, dim=3))
    assert_close(got, ref, TOL[torch.float32])


@pytest.mark.parametrize("reverse", [False, True])
def test_strided_inputs_as_a_mixer_produces_them(reverse):
    """u, delta, z, B, C read through their strides (views of the (b, L, d) projections, no copies);
    y then takes the gate's (b, L, d) layout. Values and gradients equal the contiguous case."""
    torch.manual_seed(3)
    batch, dim, L, N = 2, 6, 37, 4
    base = make_inputs(batch=batch, dim=dim, L=L, N=N)
    proj = dict(xz=torch.randn(batch, L, 2 * dim), dl=torch.rand(batch, L, dim) * 6 - 6,
                xproj=torch.randn(batch, L, 3 + 2 * N))  # in_proj, dt_proj and x_proj outputs (dt_rank 3)

    def views(p):
        return dict(u=p["xz"][..., :dim].transpose(1, 2), z=p["xz"][..., dim:].transpose(1, 2),
                    delta=p["dl"].transpose(1, 2), B=p["xproj"][..., 3:3 + N].transpose(1, 2),
                    C=p["xproj"][..., 3 + N:].transpose(1, 2))

    outs = []
    for strided in (True, False):
        p = {k: v.clone().requires_grad_() for k, v in proj.items()}
        x = leaves({k: base[k] for k in ("A", "D", "delta_bias", "initial_state")})
        v = views(p)
        if strided:
            assert not v["u"].is_contiguous() and not v["B"].is_contiguous() and not v["z"].is_contiguous()
        else:
            v = {k: t.contiguous() for k, t in v.items()}
        x.update(v)
        y, h = selective_scan_triton(*[x[k] for k in NAMES[:8]], True, True, x["initial_state"], reverse=reverse)
        ((y * torch.linspace(-1, 1, L)).sum() + h.sum()).backward()
        grads = {k: t.grad for k, t in p.items()}
        grads.update({k: x[k].grad for k in ("A", "D", "delta_bias", "initial_state")})
        outs.append((y, h, grads))
    assert outs[0][0].stride(1) == 1 and outs[1][0].stride(2) == 1  # y follows the gate's layout
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-6, atol=1e-6)
    for k in outs[1][2]:
        torch.testing.assert_close(outs[0][2][k], outs[1][2][k], rtol=1e-5, atol=1e-6)
    # and the contiguous case against the oracle
    ref_in = dict(base, **{k: t.detach() for k, t in views(proj).items()})
    got, ref = run_both({k: (t.contiguous() if t is not None else None) for k, t in ref_in.items()})
    assert_close(got, ref, TOL[torch.float32])


def _segments(seq_row):
    """[(start, end)] of the runs of equal values in one row of seq_idx."""
    cuts = [0] + [t for t in range(1, len(seq_row)) if seq_row[t] != seq_row[t - 1]] + [len(seq_row)]
    return list(zip(cuts[:-1], cuts[1:]))


def _ref_with_seq_idx(seq_idx):
    """The oracle run per packed segment: zero state at each segment start (initial_state for the first)."""
    def fn(x, softplus):
        ys, lasts = [], []
        for b in range(x["u"].shape[0]):
            yb, h = [], x["initial_state"][b:b + 1] if x["initial_state"] is not None else None
            for s, e in _segments(seq_idx[b].tolist()):
                def cut(t):
                    if t is None or t.dim() == 2:
                        return t
                    return t[b:b + 1, ..., s:e]
                y, h = selective_scan_ref(cut(x["u"]), cut(x["delta"]), x["A"], cut(x["B"]), cut(x["C"]), x["D"],
                                          cut(x["z"]), x["delta_bias"], softplus, True, h if s == 0 else None)
                yb.append(y)
            ys.append(torch.cat(yb, dim=-1))
            lasts.append(h)
        return torch.cat(ys), torch.cat(lasts)
    return fn


@pytest.mark.parametrize("split", [False, True])
def test_seq_idx_boundaries(split, monkeypatch):
    if split:
        monkeypatch.setitem(ops.CONFIG["cpu"], "nsplit", 3)
    L = 45
    seq_idx = torch.tensor([[0] * 10 + [1] * 16 + [2] * 19, [0] * 33 + [5] * 12], dtype=torch.int32)
    got, ref = run_both(make_inputs(L=L), fn_ref=_ref_with_seq_idx(seq_idx), seq_idx=seq_idx)
    assert_close(got, ref, TOL[torch.float32])


def test_seq_idx_does_not_leak():
    """Changing the first packed sequence leaves the second one's outputs untouched."""
    inp = make_inputs(batch=1, L=24, h0=False)
    seq_idx = torch.tensor([[0] * 9 + [1] * 15], dtype=torch.int32)
    args = [inp[k] for k in NAMES[:8]]
    y1 = selective_scan_triton(*args, True, False, None, seq_idx)
    args[0] = args[0].clone()
    args[0][..., :9] = torch.randn(1, 4, 9)
    y2 = selective_scan_triton(*args, True, False, None, seq_idx)
    assert torch.equal(y1[..., 9:], y2[..., 9:])
    assert not torch.equal(y1[..., :9], y2[..., :9])


def _ref_reversed(seq_idx=None):
    """The oracle on inputs flipped along L, its y flipped back: what reverse=True must compute."""
    def fn(x, softplus):
        flip = lambda t: t.flip(-1) if t is not None and t.dim() > 2 else t  # noqa: E731
        fx = {k: flip(v) if k in ("u", "delta", "B", "C", "z") else v for k, v in x.items()}
        if seq_idx is None:
            y, h = selective_scan_ref(*[fx[k] for k in NAMES[:8]], softplus, True, fx["initial_state"])
        else:
            y, h = _ref_with_seq_idx(seq_idx.flip(-1))(fx, softplus)
        return y.flip(-1), h
    return fn


@pytest.mark.parametrize("split,packed", [(False, False), (True, False), (True, True)])
def test_reverse_scan(split, packed, monkeypatch):
    """reverse=True (Vim's backward direction, no flip copies) equals the oracle on flipped inputs."""
    if split:
        monkeypatch.setitem(ops.CONFIG["cpu"], "nsplit", 3)
    L = 45
    seq_idx = torch.tensor([[0] * 10 + [1] * 16 + [2] * 19, [0] * 33 + [5] * 12], dtype=torch.int32) if packed else None
    inp = make_inputs(L=L, b_shape="grouped", c_shape="variable")
    results = []
    for fn in (lambda x, sp: selective_scan_triton(*[x[k] for k in NAMES[:8]], sp, True, x["initial_state"],
                                                   seq_idx, reverse=True), _ref_reversed(seq_idx)):
        results.append(run_both(inp, fn_ref=fn)[1])
    assert_close(results[0], results[1], TOL[torch.float32])


@pytest.mark.parametrize("dtype,groups", [(torch.float32, 1), (torch.bfloat16, 1), (torch.float32, 2)])
def test_state_update(dtype, groups):
    batch, dim, N = 3, 8, 4
    state = torch.randn(batch, dim, N)
    bc = (batch, N) if groups == 1 else (batch, groups, N)
    args = dict(x=torch.randn(batch, dim, dtype=dtype), dt=torch.randn(batch, dim, dtype=dtype),
                A=-torch.rand(dim, N) * 3, B=torch.randn(*bc, dtype=dtype), C=torch.randn(*bc, dtype=dtype),
                D=torch.randn(dim), z=torch.randn(batch, dim, dtype=dtype), dt_bias=torch.rand(dim))
    s_ref = state.clone()
    y_ref = selective_state_update_ref(s_ref, **args, dt_softplus=True)
    y = selective_state_update(state, **args, dt_softplus=True)
    assert y.dtype == dtype and y.shape == (batch, dim)
    assert rel(y, y_ref) < TOL[dtype]
    assert rel(state, s_ref) < 1e-5


def test_state_update_matches_scan():
    """Two decode steps equal the last two outputs of the scan over the same two steps."""
    inp = make_inputs(batch=2, dim=4, L=2, z=False, h0=False)
    y = selective_scan_triton(*[inp[k] for k in NAMES[:8]], True)
    state = torch.zeros(2, 4, 4)
    for t in range(2):
        yt = selective_state_update(state, inp["u"][..., t], inp["delta"][..., t], inp["A"], inp["B"][..., t],
                                    inp["C"][..., t], inp["D"], None, inp["delta_bias"], True)
        assert rel(yt, y[..., t]) < 1e-5


def test_bad_inputs_raise_value_error():
    inp = make_inputs()
    args = [inp[k] for k in NAMES[:8]]
    with pytest.raises(ValueError, match="delta"):
        selective_scan_triton(args[0], args[1][..., :-1], *args[2:])
    with pytest.raises(ValueError, match="B"):
        selective_scan_triton(*args[:3], args[3][:, :-1], *args[4:])
    with pytest.raises(ValueError, match="seq_idx"):
        selective_scan_triton(*args, seq_idx=torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="state"):  # fp16 / bf16 states are taken (mamba_ssm's); fp64 is not
        selective_state_update(torch.zeros(2, 4, 4, dtype=torch.float64), torch.zeros(2, 4), torch.zeros(2, 4),
                               torch.zeros(4, 4), torch.zeros(2, 4), torch.zeros(2, 4))


def test_torch_compile_full_graph():
    """The registered ops trace without graph breaks (backend aot_eager: no C++ compiler needed)."""
    inp = make_inputs(L=9, batch=1, dim=2, h0=False)

    def f(u, delta, A, B, C, D, z, bias):
        return selective_scan_triton(u, delta, A, B, C, D, z, bias, True).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    x = leaves(inp)
    args = [x[k] for k in NAMES[:8]]
    loss = compiled(*args)
    loss.backward()
    ref = selective_scan_ref(*[inp[k] for k in NAMES[:8]], True).sum()
    assert rel(loss.detach(), ref) < 1e-5
    assert args[0].grad is not None


def test_opcheck():
    inp = make_inputs(L=5, batch=1, dim=2, N=2)
    args = (*[inp[k] for k in NAMES], None, True)
    torch.library.opcheck(torch.ops.mambazoo.scan_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_state_update_compiles_full_graph():
    """The decode step traces as the registered op and updates the state in place under torch.compile."""
    batch, dim, N = 2, 4, 4
    args = dict(x=torch.randn(batch, dim), dt=torch.randn(batch, dim), A=-torch.rand(dim, N),
                B=torch.randn(batch, N), C=torch.randn(batch, N))
    s1, s2 = torch.randn(batch, dim, N), None
    s2 = s1.clone()
    step = torch.compile(lambda s: selective_state_update(s, **args, dt_softplus=True), backend="aot_eager",
                         fullgraph=True)
    y = step(s1)
    y_ref = selective_state_update_ref(s2, **args, dt_softplus=True)
    assert rel(y, y_ref) < 1e-5 and rel(s1, s2) < 1e-5


def test_backward_outputs_have_the_strides_the_fake_promises():
    """torch.compile checks every custom-op output's strides against the fake implementation: dB / dC must
    come back in torch.empty_like(B) layout also when B is a dense permuted tensor ((b, L, N) memory)."""
    inp = make_inputs(L=5, batch=2, dim=2, N=3)
    B = inp["B"].transpose(1, 2).contiguous().transpose(1, 2)  # (b, N, L) with N fastest in memory
    C = inp["C"][:, :, :, None].expand(-1, -1, -1, 2)[..., 0]  # a non-dense view
    args = [inp["u"], inp["delta"], inp["A"], B, C, inp["D"], inp["z"], inp["delta_bias"]]
    y, last, hs = torch.ops.mambazoo.scan_fwd(*args, None, None, True)
    real = torch.ops.mambazoo.scan_bwd(torch.randn_like(y), None, *args, None, hs, True, False)
    fake = ops._scan_bwd_fake(torch.randn_like(y), None, *args, None, hs, True, False)
    for r, f in zip(real, fake):
        assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype)
    assert real[3].stride() == B.stride() and real[4].is_contiguous()


def test_unused_outputs_reach_the_backward_as_none(monkeypatch):
    """No zero-filled gradient is made for the tile states or an unused last state (memory at the peak)."""
    seen = []
    real = ops.scan_backward  # the eager path (EagerScan) calls the launcher directly

    def spy(dout, dlast, *rest):
        seen.append(dlast)
        return real(dout, dlast, *rest)

    monkeypatch.setattr(ops, "scan_backward", spy)
    x = leaves(make_inputs(L=9, batch=1, dim=2, N=2))
    y = selective_scan_triton(*[x[k] for k in NAMES[:8]], True)
    y.sum().backward()
    assert seen == [None] and x["u"].grad is not None
    y, last = selective_scan_triton(*[x[k] for k in NAMES[:8]], True, True)
    (y.sum() + last.sum()).backward()
    assert seen[1] is not None and tuple(seen[1].shape) == tuple(last.shape)


@pytest.mark.parametrize("reverse,split", [(True, False), (True, True), (False, False)])
def test_average_with_is_the_mean_in_values_and_gradients(reverse, split, monkeypatch):
    """average_with: (y_other + scan) / 2 from the kernel's store equals the reference scan averaged by lerp,
    and the gradients of y_other and of every scan input are those of the plain average (a bidirectional
    mixer's two directions)."""
    if split:
        monkeypatch.setitem(ops.CONFIG["cpu"], "nsplit", 2)
    inp = make_inputs(L=37, h0=False)
    other = torch.randn(2, 4, 37)
    results = []
    for impl in ("triton", "ref"):
        x, o = leaves(inp), other.clone().requires_grad_()
        args = [x[k] for k in NAMES[:8]]
        if impl == "triton":
            y = selective_scan_triton(*args, True, reverse=reverse, average_with=o)
        else:
            flip = (lambda t: t.flip(-1) if t is not None and t.dim() == 3 else t) if reverse else (lambda t: t)
            y = flip(selective_scan_ref(*[flip(a) for a in args], True))
            y = (o + y) / 2
        torch.manual_seed(1)
        (y * torch.randn_like(y)).sum().backward()
        res = {"y": y.detach(), "dother": o.grad}
        res.update({f"d{k}": v.grad for k, v in x.items() if v is not None})
        results.append(res)
    assert_close(results[0], results[1], TOL[torch.float32])


def test_average_with_under_torch_compile():
    """The averaged scan traces as the registered op (no graph break) with the same values and gradient."""
    inp = make_inputs(L=9, batch=1, dim=2, h0=False)
    other = torch.randn(1, 2, 9)

    def f(u, delta, A, B, C, D, z, bias, o):
        return selective_scan_triton(u, delta, A, B, C, D, z, bias, True, reverse=True, average_with=o)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    o1, o2 = other.clone().requires_grad_(), other.clone().requires_grad_()
    y1 = compiled(*[inp[k] for k in NAMES[:8]], o1)
    y2 = f(*[inp[k] for k in NAMES[:8]], o2)
    (y1 * 3).sum().backward()
    (y2 * 3).sum().backward()
    assert rel(y1.detach(), y2.detach()) < 1e-6
    assert torch.allclose(o1.grad, torch.full_like(other, 1.5)) and torch.allclose(o2.grad, o1.grad)


def test_inference_stores_no_tile_states(monkeypatch):
    """Without autograd the forward skips the backward's tile states (same y); a scan_fwd run that way
    refuses a backward with a clear error instead of reading missing states."""
    seen = []
    real = ops.scan_forward

    def spy(*args):
        out = real(*args)
        seen.append(out[2].shape[2])
        return out

    monkeypatch.setattr(ops, "scan_forward", spy)
    inp = make_inputs(L=37, h0=False)
    args = [inp[k] for k in NAMES[:8]]
    with torch.no_grad():
        y_inf = selective_scan_triton(*args, True)
    x = leaves(inp)
    y_train = selective_scan_triton(*[x[k] for k in NAMES[:8]], True)
    assert seen[0] == 0 and seen[1] > 0
    assert torch.equal(y_inf, y_train.detach())
    u = inp["u"].clone().requires_grad_()
    y, _, _ = ops.EagerScan.apply(u, *args[1:], None, None, True, False, None, False)
    with pytest.raises(RuntimeError, match="store_states=False"):
        y.sum().backward()


@pytest.mark.parametrize("reverse,split", [(False, False), (True, False), (True, True)])
def test_interleaved_bc_pairs_read_as_words(reverse, split, monkeypatch):
    """B and C as alternating bf16 columns of one projection (the Vim mixer's folded x_proj) are read as one int32
    word per (step, state): y and the last state equal those from the fp32 copies of the same values (the general
    forward: the inference kernel's own test is test_inference_kernel_matches_reference)."""
    monkeypatch.setitem(ops.CONFIG["cpu"], "infer", None)
    if split:
        monkeypatch.setitem(ops.CONFIG["cpu"], "nsplit", 3)
    batch, dim, L, N = 2, 4, 37, 4
    inp = make_inputs(batch=batch, dim=dim, L=L, N=N, h0=False)
    proj = torch.randn(batch, L, dim + 2 * N).to(torch.bfloat16)  # [delta | B0 C0 B1 C1 ...]
    B, C = proj[..., dim::2].transpose(1, 2), proj[..., dim + 1::2].transpose(1, 2)
    assert ops.bc_pairs(B, C) and not ops.bc_pairs(C, B) and not ops.bc_pairs(B, B)
    assert not ops.bc_pairs(proj[..., dim - 1:-1:2].transpose(1, 2), proj[..., dim::2].transpose(1, 2))  # odd start
    assert not ops.bc_pairs(B.float(), C.float())
    args = dict(inp, B=B, C=C)
    other = torch.randn(batch, dim, L)
    outs = []
    for pairs in (True, False):
        monkeypatch.setitem(ops.CONFIG["cpu"], "bc_pairs", pairs)
        with torch.no_grad():
            outs.append(selective_scan_triton(*[args[k] for k in NAMES[:8]], True, True, reverse=reverse,
                                              average_with=other))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=0, atol=0)
    ref = selective_scan_ref(*[(args[k].float() if k in ("B", "C") else args[k]) for k in NAMES[:8]], True, True)
    if not reverse:
        assert rel(outs[0][1], ref[1]) < TOL[torch.float32]


@pytest.mark.parametrize("reverse", [False, True])
def test_inference_tiles_and_softplus_polynomial(reverse, monkeypatch):
    """Inference scans reading B/C pairs take cfg["inf_tiles"] per direction (tile length, stages, softplus as ex2 +
    polynomial): still the reference's values, for softplus inputs far on both sides of its bend."""
    monkeypatch.setitem(ops.CONFIG["cpu"], "inf_tiles", dict(fwd=(16, 1, True), rev=(8, 1, True)))
    monkeypatch.setitem(ops.CONFIG["cpu"], "infer", None)
    batch, dim, L, N = 2, 4, 45, 4
    inp = make_inputs(batch=batch, dim=dim, L=L, N=N, h0=False)
    inp["delta"] = torch.linspace(-30, 30, batch * dim * L).reshape(batch, dim, L)[..., torch.randperm(L)]
    proj = torch.randn(batch, L, dim + 2 * N).to(torch.bfloat16)
    B, C = proj[..., dim::2].transpose(1, 2), proj[..., dim + 1::2].transpose(1, 2)
    args = dict(inp, B=B, C=C)
    with torch.no_grad():
        y, last = selective_scan_triton(*[args[k] for k in NAMES[:8]], True, True, reverse=reverse)
    flip = (lambda t: t.flip(-1) if t is not None and t.dim() == 3 else t) if reverse else (lambda t: t)
    ref = selective_scan_ref(*[flip(args[k].float() if k in ("B", "C") else args[k]) for k in NAMES[:8]], True, True)
    assert rel(y, flip(ref[0])) < TOL[torch.float32] and rel(last, ref[1]) < TOL[torch.float32]


def _pair_inputs(batch, dim, L, N, seed=0, dtype=torch.bfloat16):
    """make_inputs with B / C as alternating ``dtype`` columns of one (batch, L, dim + 2N) projection (the Vim fold;
    fp32: the low-rank projection) and delta spread over both sides of softplus's bend."""
    torch.manual_seed(seed)
    inp = make_inputs(batch=batch, dim=dim, L=L, N=N, h0=False)
    inp["delta"] = torch.linspace(-12, 6, batch * dim * L).reshape(batch, dim, L)[..., torch.randperm(L)]
    proj = torch.randn(batch, L, dim + 2 * N).to(dtype)
    return dict(inp, B=proj[..., dim::2].transpose(1, 2), C=proj[..., dim + 1::2].transpose(1, 2))


def _spy_infer(monkeypatch):
    calls = []
    launch = ops._scan_forward_infer
    monkeypatch.setattr(ops, "_scan_forward_infer", lambda *a: calls.append(a) or launch(*a))
    return calls


@pytest.mark.parametrize("infer", [dict(block_d=8, block_l=4, stages=1, poly=False, tanh=False),
                                   dict(block_d=8, block_l=8, stages=2, poly=True, tanh=False),
                                   dict(block_d=16, block_l=16, stages=1, poly=True, tanh=False),
                                   dict(block_d=32, block_l=4, stages=1, poly=False, tanh=False)])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("pair_dtype", [torch.bfloat16, torch.float32])
def test_inference_kernel_matches_reference(infer, reverse, pair_dtype, monkeypatch):
    """The inference forward for B / C pairs (kernels/scan_infer.py: states split across lanes, per-step work shared
    by a channel's lanes) for every lane split of N (block_d 8 / 16 / 32: 4 / 2 / 1 lane slices), in both
    directions, averaging with another output and storing into a strided buffer; L not a multiple of the tile;
    pairs of bf16 (int32 words) and of fp32 (int64 words). Values: the reference's."""
    calls = _spy_infer(monkeypatch)
    monkeypatch.setitem(ops.CONFIG["cpu"], "infer", infer)
    batch, dim, L, N = 2, 20, 21, 8
    args = _pair_inputs(batch, dim, L, N, dtype=pair_dtype)
    other = torch.randn(batch, dim, L)
    buf = torch.full((batch, L, 2 * dim), float("nan"))
    flip = (lambda t: t.flip(-1) if t is not None and t.dim() == 3 else t) if reverse else (lambda t: t)
    ref_y, ref_last = selective_scan_ref(*[flip(args[k].float() if k in ("B", "C") else args[k]) for k in NAMES[:8]],
                                         True, True)
    with torch.no_grad():
        y, last = selective_scan_triton(*[args[k] for k in NAMES[:8]], True, True, reverse=reverse)
        avg = selective_scan_triton(*[args[k] for k in NAMES[:8]], True, reverse=reverse, average_with=other,
                                    out=buf[..., :dim].transpose(1, 2))
    assert len(calls) == 2
    assert rel(y, flip(ref_y)) < TOL[torch.float32] and rel(last, ref_last) < TOL[torch.float32]
    assert avg.data_ptr() == buf.data_ptr() and buf[..., dim:].isnan().all()
    assert rel(avg, (other + flip(ref_y)) / 2) < TOL[torch.float32]


def test_inference_kernel_only_where_it_fits(monkeypatch):
    """The general forward still runs what the inference kernel does not take: a gradient to record, an initial
    state, packed sequences, B / C that are not pairs, N or a tile length that the lane slices do not divide."""
    calls = _spy_infer(monkeypatch)
    monkeypatch.setitem(ops.CONFIG["cpu"], "infer", dict(block_d=8, block_l=4, stages=1, poly=False, tanh=False))
    args = _pair_inputs(2, 8, 21, 8)
    plain = [args[k] for k in NAMES[:8]]
    with torch.no_grad():
        selective_scan_triton(*plain, True)
        assert len(calls) == 1
        selective_scan_triton(*plain, True, initial_state=torch.zeros(2, 8, 8))
        selective_scan_triton(*plain, True, seq_idx=torch.zeros(2, 21, dtype=torch.int32))
        selective_scan_triton(*plain[:3], args["B"].float(), args["C"].float(), *plain[5:], True)
    u = args["u"].clone().requires_grad_()
    selective_scan_triton(u, *plain[1:], True)
    args2 = _pair_inputs(2, 8, 21, 2)  # N = 2: four lane slices do not divide it
    with torch.no_grad():
        y = selective_scan_triton(*[args2[k] for k in NAMES[:8]], True)
        monkeypatch.setitem(ops.CONFIG["cpu"], "infer", dict(block_d=8, block_l=2, stages=1, poly=False, tanh=False))
        selective_scan_triton(*plain, True)  # 2 steps per tile for 4 lane slices
    assert len(calls) == 1
    ref = selective_scan_ref(*[args2[k].float() if k in ("B", "C") else args2[k] for k in NAMES[:8]], True)
    assert rel(y, ref) < TOL[torch.float32]


def _low_rank(batch, dim, L, R, dtype, seed=1):
    """dt (batch, R, L) as a strided view of a wider (batch, L, R + 3) projection, and dt_weight (dim, R)."""
    torch.manual_seed(seed)
    dt = (torch.randn(batch, L, R + 3) * 2).to(dtype)[..., 1:R + 1].transpose(1, 2)
    return dt, torch.randn(dim, R) * 0.4


@pytest.mark.parametrize("dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                            (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("reverse", [False, True])
def test_inference_kernel_forms_low_rank_delta(dtype, w_dtype, reverse, monkeypatch):
    """dt_weight: delta given low-rank, dt (batch, R, L), and formed per tile inside the inference kernel (one dot
    of the tile's dt rows with the weight, in the narrower dtype of the two): the reference's values on delta =
    dt_weight @ dt, averaging into a strided buffer too. fp32 dt with a bf16 weight comes with fp32 B / C pairs (the
    Vim mixer's fp32 projection)."""
    calls = _spy_infer(monkeypatch)
    monkeypatch.setitem(ops.CONFIG["cpu"], "infer", dict(block_d=8, block_l=8, stages=2, poly=True, tanh=False))
    batch, dim, L, N, R = 2, 20, 21, 8, 16
    args = _pair_inputs(batch, dim, L, N, dtype=torch.float32 if w_dtype == torch.bfloat16 else torch.bfloat16)
    dt, W = _low_rank(batch, dim, L, R, dtype)
    W = W.to(w_dtype)
    ct = torch.bfloat16 if torch.bfloat16 in (dtype, w_dtype) else torch.float32
    delta = W.to(ct).float() @ dt.to(ct).float()
    torch.testing.assert_close(low_rank_delta(dt, W).float(), delta.to(dtype).float(), rtol=0, atol=0)
    flip = (lambda t: t.flip(-1) if t is not None and t.dim() == 3 else t) if reverse else (lambda t: t)
    ref = dict(args, delta=delta)
    ref_y, ref_last = selective_scan_ref(*[flip(ref[k].float() if k in ("B", "C") else ref[k]) for k in NAMES[:8]],
                                         True, True)
    low = [dict(args, delta=dt)[k] for k in NAMES[:8]]
    other = torch.randn(batch, dim, L)
    buf = torch.full((batch, L, 2 * dim), float("nan"))
    with torch.no_grad():
        y, last = selective_scan_triton(*low, True, True, reverse=reverse, dt_weight=W)
        avg = selective_scan_triton(*low, True, reverse=reverse, average_with=other, out=buf[..., :dim].transpose(1, 2),
                                    dt_weight=W)
    assert len(calls) == 2 and all(c[-1] is W or c[-1].shape == W.shape for c in calls)
    assert rel(y, flip(ref_y)) < TOL[torch.float32] and rel(last, ref_last) < TOL[torch.float32]
    assert avg.data_ptr() == buf.data_ptr() and rel(avg, (other + flip(ref_y)) / 2) < TOL[torch.float32]


def test_low_rank_delta_elsewhere_is_formed_first(monkeypatch):
    """What the inference kernel does not take with dt_weight (a rank not a power of two >= 16, B / C not pairs, a
    gradient to record) runs on dt_weight @ dt formed first: the same values, and gradients reach dt and the weight
    through the product. Mismatched shapes raise a clear ValueError (kernels and core)."""
    from mambazoo.core.scan import selective_scan

    calls = _spy_infer(monkeypatch)
    monkeypatch.setitem(ops.CONFIG["cpu"], "infer", dict(block_d=8, block_l=8, stages=1, poly=True, tanh=False))
    batch, dim, L, N = 2, 16, 19, 8
    args = _pair_inputs(batch, dim, L, N)
    for R, pairs in ((12, True), (16, False)):
        dt, W = _low_rank(batch, dim, L, R, torch.float32)
        a = dict(args, delta=dt) if pairs else dict(args, delta=dt, B=args["B"].float(), C=args["C"].float())
        with torch.no_grad():
            y = selective_scan_triton(*[a[k] for k in NAMES[:8]], True, dt_weight=W)
            want = selective_scan_triton(*[dict(a, delta=W @ dt)[k] for k in NAMES[:8]], True)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    assert all(len(c) == 12 for c in calls)  # the kernel ran only on formed deltas (R = 12, pairs)
    dt, W = _low_rank(batch, dim, L, 16, torch.float32)
    grads = []
    for low in (True, False):
        d_, w_ = dt.detach().clone().requires_grad_(), W.clone().requires_grad_()
        delta = d_ if low else w_ @ d_
        y = selective_scan_triton(*[dict(args, delta=delta)[k] for k in NAMES[:8]], True,
                                  dt_weight=w_ if low else None)
        (y * torch.linspace(-1, 1, L)).sum().backward()
        grads.append((y.detach(), d_.grad, w_.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    plain = [args[k] for k in NAMES[:8]]
    with pytest.raises(ValueError, match="dt_weight"):
        selective_scan_triton(*plain[:1], dt, *plain[2:], True, dt_weight=W[:, :8])
    with pytest.raises(ValueError, match="dt_weight"):
        selective_scan(*plain[:1], dt, *plain[2:], True, dt_weight=W[:, :8])
    with pytest.raises(ValueError, match="low-rank dt"):
        selective_scan(*plain[:1], dt[:, :8], *plain[2:], True, dt_weight=W)


def test_out_buffer_takes_y_without_autograd():
    """out=: y is stored in a caller's strided buffer (the dead half of a mixer's (b, L, 2d) projection) and that
    buffer returned; the reverse direction then averages into it in place; with autograd, a new tensor."""
    inp = make_inputs(L=37, h0=False)
    args = [inp[k] for k in NAMES[:8]]
    buf = torch.full((2, 37, 8), float("nan"))
    out = buf[..., :4].transpose(1, 2)  # (b, d, L) with unit stride along d, L stride 8
    with torch.no_grad():
        want = selective_scan_triton(*args, True)
        got = selective_scan_triton(*args, True, out=out)
        assert got.data_ptr() == out.data_ptr() and torch.equal(got, want) and buf[..., 4:].isnan().all()
        back = selective_scan_triton(*args, True, reverse=True)
        avg = selective_scan_triton(*args, True, reverse=True, average_with=got, average_in_place=True)
        assert avg.data_ptr() == out.data_ptr()
        torch.testing.assert_close(avg, (want + back) / 2, rtol=1e-6, atol=1e-6)
    x = leaves(inp)
    y = selective_scan_triton(*[x[k] for k in NAMES[:8]], True, out=torch.empty(2, 4, 37))
    assert y.requires_grad and y.grad_fn is not None
    for bad in (torch.empty(2, 4, 36), torch.empty(2, 4, 37, dtype=torch.float64), torch.empty(2, 37, 4, 2)[..., 0].mT):
        with pytest.raises(ValueError, match="out: expected"):
            selective_scan_triton(*args, True, out=bad)


def _bidir_inputs(batch, dim, L, N, pair_dtype, rank, seed=0):
    """Per-direction inputs as the Vim mixer hands them over: u as (batch, L, dim) buffers viewed (batch, dim, L), B / C
    interleaved pairs of a (batch, L, 2 N + R) projection whose last R columns are low-rank dt (rank > 0; else delta
    (batch, dim, L)), and each direction's own A, D, delta bias and dt weight."""
    torch.manual_seed(seed)
    d = {k: [] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias", "dt_weight")}
    for _ in range(2):
        proj = torch.randn(batch, L, 2 * N + rank).to(pair_dtype)
        d["u"].append(torch.randn(batch, L, dim).transpose(1, 2))
        d["B"].append(proj[..., 0:2 * N:2].transpose(1, 2))
        d["C"].append(proj[..., 1:2 * N:2].transpose(1, 2))
        if rank:
            d["delta"].append((proj[..., 2 * N:] * 2).transpose(1, 2))
            d["dt_weight"].append(torch.randn(dim, rank) * 0.4)
        else:
            d["delta"].append(torch.rand(batch, dim, L) * 6 - 6)
            d["dt_weight"].append(None)
        d["A"].append(-torch.rand(dim, N) * 3 - 0.1)
        d["D"].append(torch.randn(dim))
        d["delta_bias"].append(torch.rand(dim) * 0.5)
    return {k: tuple(v) for k, v in d.items()}


def _bidir_reference(a, z):
    """(y_fwd + y_bwd) / 2 from mambazoo.core's oracle, the backward direction on flipped inputs."""
    ys = []
    for k, flip in ((0, lambda t: t), (1, lambda t: t.flip(-1) if t is not None and t.dim() == 3 else t)):
        delta, w = a["delta"][k], a["dt_weight"][k]
        if w is not None:  # as the kernel forms it: operands in the narrower dtype, the sum in fp32, not rounded
            ct = low_rank_dtype(delta, w)
            delta = w.to(ct).float() @ delta.to(ct).float()
        y = selective_scan_ref(flip(a["u"][k]), flip(delta.float()), a["A"][k], flip(a["B"][k].float()),
                               flip(a["C"][k].float()), a["D"][k], flip(z), a["delta_bias"][k], True)
        ys.append(flip(y))
    return (ys[0] + ys[1]) / 2


def _spy_bidir(monkeypatch):
    calls = []
    launch = ops.scan_bidirectional_infer
    monkeypatch.setattr(ops, "scan_bidirectional_infer", lambda *a: calls.append(launch(*a)) or calls[-1])
    return calls


@pytest.mark.parametrize("infer,pair_dtype,rank,gate,lengths", [
    (dict(block_d=8, block_l=8, stages=1, poly=True, tanh=False), torch.float32, 16, False, (1, 2, 21, 40)),
    (dict(block_d=16, block_l=16, stages=2, poly=False, tanh=False), torch.bfloat16, 16, True, (1, 37)),
    (dict(block_d=32, block_l=4, stages=1, poly=True, tanh=False), torch.bfloat16, 0, False, (2, 21))])
def test_bidirectional_inference_kernel_matches_reference(infer, pair_dtype, rank, gate, lengths, monkeypatch):
    """Both directions of a bidirectional scan in two launches (kernels/scan_infer.py, scan_bidir_infer_kernel: phase
    1 runs the forward over [0, L // 2) and the backward over the rest, phase 2 each direction over the other half
    from its phase-1 state, averaging with the other's phase-1 output): the oracle's (y_fwd + y_bwd) / 2 for every
    lane split of N, fp32 and bf16 pairs, low-rank or full delta, gated or not, L = 1, 2 and odd lengths crossing
    tiles, stored into a strided buffer."""
    from mambazoo.kernels import selective_scan_bidirectional_triton

    calls = _spy_bidir(monkeypatch)
    monkeypatch.setitem(ops.CONFIG["cpu"], "infer", infer)
    batch, dim, N = 2, 20, 8
    for L in lengths:
        a = _bidir_inputs(batch, dim, L, N, pair_dtype, rank, seed=L)
        z = torch.randn(batch, dim, L) if gate else None
        buf = torch.full((batch, L, 2 * dim), float("nan"))
        with torch.no_grad():
            y = selective_scan_bidirectional_triton(*(a[k] for k in ("u", "delta", "A", "B", "C", "D")), z,
                                                    a["delta_bias"], True, buf[..., dim:].transpose(1, 2),
                                                    a["dt_weight"])
        assert y.data_ptr() == buf.data_ptr() + dim * 4 and buf[..., :dim].isnan().all()
        assert rel(y, _bidir_reference(a, z)) < TOL[torch.float32], L
    assert len(calls) == len(lengths) and all(c is not None for c in calls)


def test_bidirectional_scan_falls_back_to_two_scans(monkeypatch):
    """Where the two-direction kernel does not take the call (both_in_one=False, directions laid out differently,
    B / C not pairs, a gradient to record) the forward scan and the backward one averaging into it run instead: the
    same values, and gradients reach every input. Through mambazoo.core.scan.selective_scan_bidirectional on the chunked
    backend too; arguments that are not (forward, backward) pairs raise a clear ValueError."""
    from mambazoo.core.scan import selective_scan_bidirectional
    from mambazoo.kernels import selective_scan_bidirectional_triton as bidir

    calls = _spy_bidir(monkeypatch)
    monkeypatch.setitem(ops.CONFIG["cpu"], "infer", dict(block_d=8, block_l=8, stages=1, poly=True, tanh=False))
    batch, dim, L, N = 1, 8, 11, 8
    a = _bidir_inputs(batch, dim, L, N, torch.float32, 16)
    keys = ("u", "delta", "A", "B", "C", "D")
    want = _bidir_reference(a, None)
    with torch.no_grad():
        got = bidir(*(a[k] for k in keys), None, a["delta_bias"], True, None, a["dt_weight"])
        off = bidir(*(a[k] for k in keys), None, a["delta_bias"], True, None, a["dt_weight"], both_in_one=False)
        other = dict(a, u=(a["u"][0], a["u"][1].transpose(1, 2).contiguous().transpose(1, 2).contiguous()))
        mixed = bidir(*(other[k] for k in keys), None, a["delta_bias"], True, None, a["dt_weight"])
        unpaired = dict(a, B=tuple(b.contiguous() for b in a["B"]), C=tuple(c.contiguous() for c in a["C"]))
        plain = bidir(*(unpaired[k] for k in keys), None, a["delta_bias"], True, None, a["dt_weight"])
    assert len(calls) == 3 and calls[0] is not None and calls[1] is None and calls[2] is None
    for y in (got, off, mixed, plain):
        assert rel(y, want) < TOL[torch.float32]
    u = tuple(t.clone().requires_grad_() for t in a["u"])
    y = bidir(u, *(a[k] for k in keys[1:]), None, a["delta_bias"], True, None, a["dt_weight"])
    y.sum().backward()
    assert len(calls) == 3 and all(t.grad is not None and t.grad.abs().sum() > 0 for t in u)
    set_backend(monkeypatch, scan="chunked")
    chunked = selective_scan_bidirectional(*(a[k] for k in keys), delta_bias=a["delta_bias"], delta_softplus=True,
                                           dt_weight=a["dt_weight"])
    assert rel(chunked, want) < TOL[torch.float32]
    with pytest.raises(ValueError, match="A: expected a"):
        selective_scan_bidirectional(a["u"], a["delta"], a["A"][0], a["B"], a["C"])
    with pytest.raises(ValueError, match="u: expected a pair of tensors"):
        bidir((None, None), a["delta"], a["A"], a["B"], a["C"])
