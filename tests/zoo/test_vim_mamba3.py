"""Vision Mamba / AuM with the bidirectional Mamba-3 mixer (Mamba3(bidirectional=True), VisionMamba(mixer="mamba3"))."""

import pytest
import torch

from mambazoo.core.backend import backend
from mambazoo.core.init import reset_parameters
from mambazoo.core.mamba3 import Mamba3
from mambazoo.core.mamba3_scan import mamba3_scan_ref
from mambazoo.registry import create_model, describe_model, list_models

TINY = dict(d_model=16, d_state=8, headdim=8, chunk_size=4)  # 4 heads of 8, 2 rotary angles
REVERSED_ONLY = ("dt_bias_b", "B_bias_b", "C_bias_b", "D_b")
# the unidirectional mixer's keys, in order: mamba-ssm's Mamba3 names, nothing added
SISO_KEYS = ["dt_bias", "B_bias", "C_bias", "D", "in_proj.weight", "B_norm.weight", "C_norm.weight", "out_proj.weight"]
MIMO_KEYS = ["dt_bias", "B_bias", "C_bias", "mimo_x", "mimo_z", "mimo_o", "D", "in_proj.weight", "B_norm.weight",
             "C_norm.weight", "out_proj.weight"]


def _bidir(**kw) -> Mamba3:
    """A bidirectional mixer whose two directions (and every other parameter) hold distinct random values."""
    m = Mamba3(**{**TINY, **kw}, bidirectional=True)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.endswith(".weight"):
                p.add_(0.3 * torch.randn_like(p))
            elif "norm" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    return m


def _direction(m: Mamba3, sfx: str) -> Mamba3:
    """A unidirectional mixer with m's shared parameters and direction ``sfx``'s ('' or '_b') scan parameters."""
    one = Mamba3(**{**TINY, "is_mimo": m.is_mimo, "mimo_rank": m.mimo_rank, "rope_fraction": m.rope_fraction,
                    "is_outproj_norm": m.is_outproj_norm})
    sd = {k: v for k, v in m.state_dict().items() if not k.endswith("_b")}
    for k in ("dt_bias", "B_bias", "C_bias", "D") + (("mimo_x",) if m.is_mimo else ()):
        sd[k] = m.state_dict()[k + sfx]
    one.load_state_dict(sd, strict=True)
    return one


@pytest.mark.parametrize("kw", [{}, {"is_mimo": True, "mimo_rank": 2}, {"rope_fraction": 1.0}])
def test_output_is_the_average_of_forward_and_flipped_reversed_direction(kw):
    m = _bidir(**kw)
    x = torch.randn(2, 11, 16)
    # the gate and out_proj are linear in the scan output at each position, so averaging the scans equals
    # averaging two unidirectional mixers' outputs: forward on x, reversed on x flipped (then flipped back)
    fwd, rev = _direction(m, ""), _direction(m, "_b")
    want = (fwd(x) + rev(x.flip(1)).flip(1)) / 2
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)
    assert (fwd(x) - want).abs().max() > 1e-3  # the reversed direction contributes


def test_output_norm_averages_the_scans_before_the_norm():
    """With the (nonlinear) output norm the two scans are averaged first: built from the sequential oracle."""
    m = _bidir(is_outproj_norm=True)
    x = torch.randn(2, 9, 16)
    z, xs, B, C, dd_dt, dd_A, trap, ang = m._split(m.in_proj(x))

    def oracle(sfx, flip):
        f = (lambda t: t.flip(1)) if flip else (lambda t: t)
        dt, adt = m._decay(f(dd_dt), f(dd_A), m.get_parameter("dt_bias" + sfx))
        y = mamba3_scan_ref(f(xs), dt, adt, f(trap), f(B), f(C), f(ang), m.get_parameter("B_bias" + sfx),
                            m.get_parameter("C_bias" + sfx), m.get_parameter("D" + sfx), pairwise=m.pairwise)
        return f(y)

    want = m._output((oracle("", False) + oracle("_b", True)) / 2, z, x.dtype)
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)


def test_not_causal_and_the_reversed_parameters_matter():
    m = _bidir()
    x = torch.randn(1, 12, 16)
    late = x.clone()
    late[:, -1] += 1.0  # the last token only
    with torch.no_grad():
        base, moved = m(x), m(late)
        assert (moved[:, 0] - base[:, 0]).abs().max() > 1e-4  # the first output sees the last token
        uni = _direction(m, "")
        torch.testing.assert_close(uni(late)[:, :-1], uni(x)[:, :-1])  # the forward direction alone is causal
        for name in REVERSED_ONLY:
            p = m.get_parameter(name)
            old = p.clone()
            p.add_(0.5)
            assert (m(x) - base).abs().max() > 1e-4, name
            p.copy_(old)
        torch.testing.assert_close(m(x), base)


def test_gradients_reach_both_directions():
    m = _bidir(is_mimo=True, mimo_rank=2)
    m(torch.randn(2, 10, 16)).square().sum().backward()
    for name in ("in_proj.weight", "out_proj.weight", "dt_bias", "B_bias", "C_bias", "D", "mimo_x", "mimo_z",
                 "mimo_o", "B_norm.weight", *REVERSED_ONLY, "mimo_x_b"):
        g = m.get_parameter(name).grad
        assert g is not None and g.abs().sum() > 0, name


def test_packed_sequences_flip_seq_idx_and_cu_seqlens():
    m = _bidir()
    x = torch.randn(1, 13, 16)
    cuts = [0, 5, 13]
    with torch.no_grad():
        alone = torch.cat([m(x[:, a:b]) for a, b in zip(cuts[:-1], cuts[1:])], dim=1)
        seq_idx = torch.tensor([[0] * 5 + [1] * 8])
        torch.testing.assert_close(m(x, seq_idx=seq_idx), alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m(x, cu_seqlens=torch.tensor(cuts)), alone, rtol=1e-5, atol=1e-5)
        assert (m(x)[:, :5] - alone[:, :5]).abs().max() > 1e-4  # unpacked, the first sequence sees the second


def test_kernels_equal_the_chunked_reference_in_both_directions(monkeypatch):
    """MAMBAZOO_MAMBA3=triton (the interpreter here): the reversed scan and the flipped cu_seqlens go through the
    kernels too; forward and every parameter's gradient equal the chunked reference's."""
    m = _bidir(d_model=16, d_state=32, headdim=16, chunk_size=8)
    x = torch.randn(1, 11, 16)
    cu = torch.tensor([0, 4, 11])
    import mambazoo.kernels.mamba3 as k3

    calls, orig = [], k3.mamba3_scan_triton
    monkeypatch.setattr(k3, "mamba3_scan_triton", lambda *a, **kw: calls.append(kw.get("cu_seqlens")) or orig(*a, **kw))
    runs = {}
    for impl in ("chunked", "triton"):
        m.zero_grad()
        with backend(mamba3=impl):
            y, y_cu = m(x), m(x, cu_seqlens=cu)
            (y.square().sum() + y_cu.sum()).backward()
        runs[impl] = (y.detach(), y_cu.detach(), {n: p.grad.clone() for n, p in m.named_parameters()})
    assert len(calls) == 4  # both directions, with and without cu_seqlens; the reversed one's boundaries flipped
    assert [c.tolist() for c in calls if c is not None] == [[0, 4, 11], [0, 7, 11]]
    (y0, c0, g0), (y1, c1, g1) = runs["chunked"], runs["triton"]
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c1, c0, rtol=1e-4, atol=1e-5)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-4, msg=n)


@pytest.mark.parametrize("kw,extra", [({}, ("dt_bias_b", "B_bias_b", "C_bias_b", "D_b")),
                                      ({"is_mimo": True, "mimo_rank": 2},
                                       ("dt_bias_b", "B_bias_b", "C_bias_b", "D_b", "mimo_x_b"))])
def test_keys_and_parameter_counts(kw, extra):
    uni, bi = Mamba3(**TINY, **kw), Mamba3(**TINY, **kw, bidirectional=True)
    assert list(uni.state_dict()) == (MIMO_KEYS if kw else SISO_KEYS)
    assert set(bi.state_dict()) == set(uni.state_dict()) | set(extra)
    assert [k for k in bi.state_dict() if k not in extra] == list(uni.state_dict())
    H, R, N, P = 4, bi.mimo_rank, 8, 8
    n = sum(p.numel() for p in uni.parameters())
    assert sum(p.numel() for p in bi.parameters()) == n + 2 * H + 2 * H * R * N + (H * R * P if kw else 0)


def test_named_configs_and_their_parameter_counts():
    assert {"vim-tiny-mamba3", "aum-tiny-mamba3"} <= set(list_models())
    assert "Mamba-3" in describe_model("vim-tiny-mamba3") and "Mamba-3" in describe_model("aum-tiny-mamba3")
    with torch.device("meta"):
        vim, aum = create_model("vim-tiny-mamba3"), create_model("aum-tiny-mamba3")
    for blocks in (vim.blocks, aum.backbone.blocks):
        assert len(blocks) == 24
        mx = blocks[0].mixer
        assert isinstance(mx, Mamba3) and mx.bidirectional and (mx.d_model, mx.d_state, mx.headdim) == (192, 64, 64)
    # per block: in_proj 192 x (2 di + 2 N + 3 H + S) + out_proj di x 192 + (dt_bias, D) and (B, C biases) per
    # direction + B/C norms + the block's norm; di 384, H 6, N 64, S 16
    d, di, H, N, S = 192, 384, 6, 64, 16
    block = d * (2 * di + 2 * N + 3 * H + S) + di * d + 2 * 2 * H + 2 * 2 * H * N + 2 * N + d
    embed = 3 * 16 * 16 * d + d + d + 197 * d  # patch conv, class token, position embedding
    assert sum(p.numel() for p in vim.parameters()) == embed + 24 * block + d + (d * 1000 + 1000)


def test_vim_forward_backward_shapes():
    m = create_model("vim-tiny-mamba3", depth=2, embed_dim=32, img_size=32, num_classes=10, headdim=16, d_state=16)
    assert all(isinstance(b.mixer, Mamba3) and b.mixer.bidirectional for b in m.blocks)
    x = torch.randn(2, 3, 32, 32)
    out = m(x)
    assert out.shape == (2, 10)
    assert m.forward_features(x).shape == (2, 1 + 4, 32)
    out.square().sum().backward()
    for name in ("in_proj.weight", "dt_bias", "dt_bias_b", "B_bias_b", "D_b"):
        p = m.blocks[0].mixer.get_parameter(name)
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert m.patch_embed.proj.weight.grad.abs().sum() > 0
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), m(x))


def test_vim_mimo_and_aum():
    m = create_model("vim-tiny", mixer="mamba3", depth=1, embed_dim=32, img_size=16, patch_size=8, num_classes=3,
                     headdim=16, d_state=16, is_mimo=True, mimo_rank=2, rope_fraction=1.0)
    mx = m.blocks[0].mixer
    assert (mx.mimo_rank, mx.rope_fraction) == (2, 1.0) and mx.mimo_x_b.shape == (4, 2, 16)
    assert m(torch.randn(2, 3, 16, 16)).shape == (2, 3)
    a = create_model("aum-tiny-mamba3", depth=1, embed_dim=32, headdim=16, d_state=16, num_classes=5, n_mels=32,
                     frames=32)
    assert isinstance(a.backbone.blocks[0].mixer, Mamba3) and a.backbone.blocks[0].mixer.bidirectional
    wave = torch.randn(2, 16000 * 32 // 100)
    out = a(wave)
    assert out.shape == (2, 5)
    out.sum().backward()
    assert a.backbone.blocks[0].mixer.dt_bias_b.grad.abs().sum() > 0


def test_meta_build_then_reset_parameters():
    kw = dict(depth=2, embed_dim=32, img_size=32, num_classes=10, headdim=16, d_state=16, is_mimo=True, mimo_rank=2)
    direct = dict(create_model("vim-tiny-mamba3", **kw).named_parameters())
    with torch.device("meta"):
        model = create_model("vim-tiny-mamba3", **kw)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))  # what reset_parameters leaves alone stays visible
    got = dict(reset_parameters(model).named_parameters())
    assert got.keys() == direct.keys()
    for k, want in direct.items():
        p = got[k]
        assert torch.isfinite(p).all(), k
        assert getattr(p, "_no_weight_decay", False) == getattr(want, "_no_weight_decay", False), k
        if k.endswith(("B_bias", "C_bias", "B_bias_b", "C_bias_b", "D", "D_b", "mimo_x", "mimo_x_b", "mimo_z",
                       "mimo_o")):
            assert torch.equal(p, want), k
    mx = model.blocks[0].mixer
    for name in ("dt_bias", "dt_bias_b"):
        dt = torch.nn.functional.softplus(mx.get_parameter(name))
        assert ((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 1e-1 * (1 + 1e-5))).all(), name
    assert not torch.equal(mx.dt_bias, mx.dt_bias_b)  # independent draws
    assert mx.dt_bias_b._no_weight_decay and mx.D_b._no_weight_decay
    assert "blocks.0.mixer.dt_bias_b" in model.no_weight_decay()


def test_no_state_no_step():
    m = _bidir()
    with pytest.raises(ValueError, match="bidirectional mixer is not causal"):
        m.allocate_state(2)
    with pytest.raises(ValueError, match="bidirectional mixer is not causal"):
        m.step(torch.randn(2, 16), Mamba3(**TINY).allocate_state(2))
    with pytest.raises(ValueError, match="bidirectional mixer is not causal"):
        m(torch.randn(2, 5, 16), state=Mamba3(**TINY).allocate_state(2))


def test_bad_mixer_name():
    for name in ("vim-tiny", "aum-tiny"):
        with pytest.raises(ValueError, match="mixer: expected 'mamba', 'mamba2' or 'mamba3', got 'mamba4'"):
            create_model(name, mixer="mamba4", depth=1)


@pytest.mark.parametrize("name,kw", [
    ("vim-tiny", dict(mixer="mamba2", headdim=16)),
    ("vim-tiny-mamba3", dict(headdim=16, is_mimo=True, mimo_rank=2, rope_fraction=1.0)),
    ("aum-tiny-mamba3", dict(headdim=16, n_mels=32, frames=32)),
])
def test_save_and_load_keep_the_mixer(tmp_path, name, kw):
    """save_pretrained writes the mixer's kind and shape; from_pretrained rebuilds the same model (equal outputs)."""
    from mambazoo.hub import from_pretrained, save_pretrained

    torch.manual_seed(0)
    kw = dict(depth=1, embed_dim=32, d_state=16, num_classes=3, **kw)
    if name.startswith("vim"):
        kw.update(img_size=16, patch_size=8)
    m = create_model(name, **kw).eval()
    x = torch.randn(2, 16000 * 32 // 100) if name.startswith("aum") else torch.randn(2, 3, 16, 16)
    save_pretrained(m, tmp_path)
    back = from_pretrained(tmp_path).eval()
    vim = back.backbone if name.startswith("aum") else back
    assert vim.mixer_kind == kw.get("mixer", "mamba3")
    with torch.no_grad():
        torch.testing.assert_close(back(x), m(x), rtol=0, atol=0)
