"""The Triton depthwise causal conv1d (+ SiLU) against PyTorch's conv1d (CPU, TRITON_INTERPRET=1)."""

import pytest
import torch

from helpers import set_backend
from mambazoo.core.backend import Backend, backend, conv_impl
from mambazoo.core.conv_ref import causal_conv1d_ref
from mambazoo.kernels.conv1d import causal_conv1d


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("W,bias,silu,L,dw_tiles", [(4, True, True, 45, 8), (3, False, True, 45, 8),
                                                    (4, True, False, 45, 8), (2, True, True, 100, 1)])
def test_forward_and_gradients_match_torch(W, bias, silu, L, dw_tiles, reverse, monkeypatch):
    """dw_tiles=1: every 32-step tile of the backward is its own program (dw / db added across programs)."""
    import mambazoo.kernels.conv1d.ops

    monkeypatch.setattr(mambazoo.kernels.conv1d.ops, "DW_TILES", dw_tiles)
    monkeypatch.setattr(mambazoo.kernels.conv1d.ops, "FWD_BLOCK_D", 32)  # d = 70 crosses the forward's channel tiles
    torch.manual_seed(0)
    b, d = 2, 70  # crosses channel and step tiles
    proj = torch.randn(b, L, 2 * d)  # an in_proj output: x is a strided (b, d, L) view of it
    w = torch.randn(d, W)
    bb = torch.randn(d) if bias else None
    outs = []
    for fn in (causal_conv1d, causal_conv1d_ref):
        p = proj.clone().requires_grad_()
        wl = w.clone().requires_grad_()
        bl = bb.clone().requires_grad_() if bias else None
        x = p[..., :d].transpose(1, 2)
        y = fn(x, wl, bl, silu, reverse)
        (y * torch.linspace(-1, 1, L)).sum().backward()
        outs.append((y, p.grad, wl.grad, bl.grad if bias else None))
    got, ref = outs
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    assert got[0].transpose(1, 2).is_contiguous()  # written in the (b, L, d) layout x_proj reads
    for g, r in zip(got[1:], ref[1:]):
        if r is not None:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def test_bad_input_and_backend_switch(monkeypatch):
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d(torch.randn(1, 4, 5), torch.randn(3, 4))
    with pytest.raises(ValueError, match="widths 1 to 4"):
        causal_conv1d(torch.randn(1, 4, 5), torch.randn(4, 5))
    with pytest.raises(ValueError, match="bias"):
        causal_conv1d(torch.randn(1, 4, 5), torch.randn(4, 4), torch.randn(3))
    with pytest.raises(ValueError, match="MAMBAZOO_CONV"):
        Backend.from_env({"MAMBAZOO_CONV": "cuda"})
    with pytest.raises(ValueError, match="conv"), backend(conv="cuda"):
        pass
    with backend(conv="triton"):
        assert conv_impl(torch.device("cpu")) == "triton"  # tests run under TRITON_INTERPRET=1
    assert conv_impl(torch.device("cpu")) == "torch"


def test_the_mixer_runs_the_triton_conv_on_cuda_by_default():
    assert conv_impl(torch.device("cuda")) == "triton"
    assert conv_impl(torch.device("cpu")) == "torch"
    with backend(conv="torch"):
        assert conv_impl(torch.device("cuda")) == "torch"


@pytest.mark.parametrize("bidirectional", [False, True])
def test_mixer_with_the_triton_conv_matches_the_torch_conv(bidirectional, monkeypatch):
    """The backend's conv="triton" changes the kernels, not the function: outputs and gradients agree."""
    from mambazoo.core.mamba import Mamba

    torch.manual_seed(0)
    m = Mamba(16, d_state=4, bidirectional=bidirectional)
    x = torch.randn(2, 11, 16)
    outs = []
    for conv in ("torch", "triton"):
        set_backend(monkeypatch, conv=conv)
        m.zero_grad()
        y = m(x)
        y.square().sum().backward()
        outs.append((y.detach(), m.fwd.conv1d.weight.grad.clone(), m.in_proj.weight.grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reverse", [False, True])
def test_compiled_conv_is_one_opaque_op_with_eager_values_and_gradients(reverse):
    """Under torch.compile the conv is the registered custom op (no graph break, fullgraph): the same values and
    gradients as the eager autograd.Function; opcheck validates the schema and fake (meta) implementations."""
    torch.manual_seed(0)
    proj = torch.randn(2, 21, 2 * 8)
    w, bias = torch.randn(8, 4), torch.randn(8)

    def f(p, wl, bl):
        return causal_conv1d(p[..., :8].transpose(1, 2), wl, bl, True, reverse)

    outs = []
    for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        p, wl, bl = (t.clone().requires_grad_() for t in (proj, w, bias))
        y = fn(p, wl, bl)
        (y * torch.linspace(-1, 1, 21)).sum().backward()
        outs.append((y.detach(), p.grad, wl.grad, bl.grad))
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    x = proj[..., :8].transpose(1, 2)
    torch.library.opcheck(torch.ops.mambazoo.conv1d_fwd.default, (x, w, bias, True, reverse),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.mambazoo.conv1d_bwd.default, (x, w, None, torch.randn(2, 8, 21), True, reverse),
                          test_utils=("test_schema", "test_faketensor"))


def test_bidirectional_mixer_compiles_to_one_graph(monkeypatch):
    """The whole Vim mixer on the kernel path (conv and scan custom ops) traces without a graph break."""
    import torch._dynamo

    from mambazoo.core.mamba import Mamba

    set_backend(monkeypatch, conv="triton")
    set_backend(monkeypatch, scan="triton")
    m = Mamba(8, d_state=4, bidirectional=True)
    ex = torch._dynamo.explain(m)(torch.randn(1, 9, 8, requires_grad=True))
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), ex.break_reasons


@pytest.mark.parametrize("W,bias", [(4, True), (3, False)])
def test_pair_is_both_directions_from_one_read(W, bias, monkeypatch):
    """causal_conv1d_pair gives exactly the causal conv of one direction and the anti-causal conv of the other;
    it has no backward (clear error) and checks that the two directions' weights match."""
    import mambazoo.kernels.conv1d.ops
    from mambazoo.kernels.conv1d import causal_conv1d_pair

    monkeypatch.setattr(mambazoo.kernels.conv1d.ops, "FWD_BLOCK_D", 32)
    torch.manual_seed(0)
    b, d, L = 2, 40, 37
    x = torch.randn(b, L, 2 * d)[..., :d].transpose(1, 2)
    wf, wb = torch.randn(d, W), torch.randn(d, 1, W)
    bf, bb = (torch.randn(d), torch.randn(d)) if bias else (None, None)
    with torch.no_grad():
        yf, yb = causal_conv1d_pair(x, wf, bf, wb, bb)
        torch.testing.assert_close(yf, causal_conv1d(x, wf, bf, True, False), rtol=0, atol=0)
        torch.testing.assert_close(yb, causal_conv1d(x, wb, bb, True, True), rtol=0, atol=0)
        torch.testing.assert_close(yb, causal_conv1d_ref(x, wb[:, 0], bb, True, True), rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="must match"):
            causal_conv1d_pair(x, wf, bf, wb[..., :W - 1], bb)
    with pytest.raises(RuntimeError, match="no backward"):
        causal_conv1d_pair(x, wf.requires_grad_(), bf, wb, bb)


def test_bidirectional_mixer_inference_uses_the_pair_with_the_same_output(monkeypatch):
    """Without autograd the Vim mixer runs one conv kernel for both directions: the same output as one per direction."""
    import mambazoo.kernels.conv1d
    from mambazoo.core.mamba import Mamba

    set_backend(monkeypatch, conv="triton")
    calls = []
    real = mambazoo.kernels.conv1d.causal_conv1d_pair
    monkeypatch.setattr(mambazoo.kernels.conv1d, "causal_conv1d_pair", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    m = Mamba(16, d_state=4, bidirectional=True).eval()
    x = torch.randn(2, 21, 16)
    set_backend(monkeypatch, low_rank_dt=False)  # the folded x_proj (low-rank dt: next test)
    with torch.no_grad():
        paired = m(x)
        set_backend(monkeypatch, conv_pair=False)
        single = m(x)
    assert calls == [1]
    torch.testing.assert_close(paired, single, rtol=0, atol=0)


@pytest.mark.parametrize("scan", ["chunked", "triton"])
def test_bidirectional_mixer_scans_low_rank_dt(scan, monkeypatch):
    """Without autograd the Vim mixer (bf16, as it runs on a GPU) projects each conv output to [B/C pairs | low-rank
    dt] (fp32, or bf16 with bc_fp32=False) and leaves dt_proj to the scan (under the Triton scan both directions
    run in the two-direction kernel, which forms delta per tile, or with scan_bidir=False one inference kernel
    per direction; the product is formed first under the chunked one), and the gate to out_proj's kernel (z from
    the mixer's input rows; gate_out_proj=False gates in the scans): each the output of the folded-GEMM path
    within bf16's rounding."""
    from mambazoo.core.mamba import Mamba
    from mambazoo.kernels.scan import ops

    set_backend(monkeypatch, conv="triton")
    set_backend(monkeypatch, scan=scan)
    infer, bidir = [], []
    launch, launch2 = ops._scan_forward_infer, ops.scan_bidirectional_infer
    monkeypatch.setattr(ops, "_scan_forward_infer", lambda *a: infer.append((len(a) > 12, a[3].dtype)) or launch(*a))
    monkeypatch.setattr(ops, "scan_bidirectional_infer",
                        lambda *a: bidir.append((a[3][0].dtype, a[6] is not None)) or launch2(*a))
    torch.manual_seed(0)
    m = Mamba(32, d_state=8, bidirectional=True).eval().to(torch.bfloat16)  # d_inner 64, dt rank 2 -> 16
    x = torch.randn(2, 21, 32).to(torch.bfloat16)
    from mambazoo.kernels import gated_proj

    gated = []
    real_gate = gated_proj.gated_out_proj
    monkeypatch.setattr(gated_proj, "gated_out_proj", lambda *a: gated.append(a[1].shape) or real_gate(*a))
    with torch.no_grad():
        low = m(x)  # the projection in fp32: B / C read as fp32 pairs; the gate in out_proj's kernel
        set_backend(monkeypatch, scan_bidir=False)
        low_apart = m(x)  # ... one scan kernel per direction
        set_backend(monkeypatch, scan_bidir=True)
        set_backend(monkeypatch, gate_out_proj=False)
        in_scan = m(x)  # the gate in the scans
        set_backend(monkeypatch, bc_fp32=False)
        low16 = m(x)  # ... and the projection in bf16: bf16 pairs
        set_backend(monkeypatch, low_rank_dt=False)
        folded = m(x)
    assert gated == [(2 * 21, 32)] * 2  # z formed from the mixer's input rows, once per call
    f32 = (True, torch.float32)
    if scan == "triton":
        assert bidir == [(torch.float32, False), (torch.float32, True), (torch.bfloat16, True)]
        assert infer == [f32, f32, (False, torch.bfloat16), (False, torch.bfloat16)]
    else:
        assert bidir == infer == []
    for got in (low, low_apart, in_scan, low16):
        assert ((got.float() - folded.float()).norm() / folded.float().norm()).item() < 2e-2
    assert ((low.float() - low_apart.float()).norm() / low_apart.float().norm()).item() < 1e-2
    pf, wf = m.fwd.low_rank_weights()
    assert pf.shape == (2 * 8 + 16, 64) and wf.shape == (64, 16) and not pf[2 * 8 + 2:].any() and not wf[:, 2:].any()


def test_gated_mixer_with_projection_biases(monkeypatch):
    """The gate in out_proj's kernel with in_proj and out_proj biases (bias=True): in_proj's x-half bias on xs, its
    z-half bias on z inside the kernel, out_proj's on the output; the gate-in-the-scans path's output within bf16's
    rounding, and the cached weights follow an in-place update of a bias."""
    from mambazoo.core.mamba import Mamba
    from mambazoo.kernels import gated_proj

    set_backend(monkeypatch, conv="triton")
    calls = []
    real = gated_proj.gated_out_proj
    monkeypatch.setattr(gated_proj, "gated_out_proj", lambda *a: calls.append(a[4] is not None) or real(*a))
    torch.manual_seed(0)
    m = Mamba(32, d_state=8, bidirectional=True, bias=True).eval().to(torch.bfloat16)
    with torch.no_grad():
        m.in_proj.bias.normal_()
        m.out_proj.bias.normal_()
    x = torch.randn(2, 19, 32).to(torch.bfloat16)

    def both():
        set_backend(monkeypatch, gate_out_proj=True)
        gated = m(x).float()
        set_backend(monkeypatch, gate_out_proj=False)
        return gated, m(x).float()

    with torch.no_grad():
        gated, plain = both()
        assert ((gated - plain).norm() / plain.norm()).item() < 2e-2
        m.out_proj.bias.add_(1.0)
        gated2, plain2 = both()
    assert ((gated2 - plain2).norm() / plain2.norm()).item() < 2e-2
    assert ((gated2 - gated) - 1.0).abs().max().item() < 0.05  # the new bias reached the cached weights
    assert calls == [True, True]  # the gated kernel ran, with in_proj's z-half bias
