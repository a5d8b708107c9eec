"""The fused decode-step kernels (kernels/decode/, the A_log state update) against their PyTorch
references (core/decode.py), and a whole model decoding with them against the plain path
(CPU, TRITON_INTERPRET=1; the backend's scan="triton" turns the fused path on for CPU tensors).

bf16 tolerances are loose on purpose: the interpreter casts fp32 -> bf16 by truncation (the GPU
rounds to nearest even), so a kernel's bf16 outputs are up to one ulp off the reference here.
"""

import copy

import pytest
import torch

from mambazoo.core.block import Block
from mambazoo.core.cache import MambaState
from mambazoo.core.decode import add_rms_norm_ref, conv_step_ref, fused_decode_enabled
from mambazoo.core.mamba import Mamba
from mambazoo.core.scan import selective_state_update_ref
from mambazoo.kernels import decode
from mambazoo.kernels.decode import add_rms_norm, conv_state_update
from mambazoo.kernels.decode.state_update import launch_state_update
from helpers import rel, set_backend
from mambazoo import create_model
from mambazoo.core.backend import backend

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture
def fused(monkeypatch):
    """Force the fused decode path on CPU tensors (the kernels run in the interpreter)."""
    set_backend(monkeypatch, scan="triton", fused_decode=True)


# -- add + RMSNorm ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["add", "first", "norm_only"])
@pytest.mark.parametrize("loop", [False, True])
def test_add_rms_norm(dtype, mode, loop, monkeypatch):
    if loop:  # rows wider than one tile: the two-pass variant
        monkeypatch.setattr(decode.ops, "_MAX_BLOCK_NORM", 16)
    batch, d = 3, 37
    x = torch.randn(batch, 2 * d, dtype=dtype)[:, :d] if mode != "norm_only" else None  # strided rows
    residual = torch.randn(batch, d) if mode != "first" else None
    weight = (1 + 0.1 * torch.randn(d)).to(dtype)
    r_ref = residual.clone() if residual is not None else None
    out, r = add_rms_norm(x, residual, weight, 1e-5)
    out_ref, r_ref = add_rms_norm_ref(x, r_ref, weight, 1e-5)
    assert out.dtype == out_ref.dtype == (dtype if x is not None else weight.dtype)
    assert r.dtype == torch.float32 and torch.equal(r, r_ref)
    if mode == "add":
        assert r is residual  # updated in place
    assert rel(out, out_ref) < TOL[dtype]
    # out_dtype: fp32 output from bf16 inputs is the norm of the fp32 residual, to fp32 precision
    out32, _ = add_rms_norm(None, r, weight, 1e-5, out_dtype=torch.float32)
    assert out32.dtype == torch.float32
    assert rel(out32, add_rms_norm_ref(None, r.clone(), weight, 1e-5, torch.float32)[0]) < 1e-6


def test_add_rms_norm_without_keeping_the_residual(monkeypatch):
    """keep_residual=False (a last norm): the same normed rows, the residual not written back; a row wider than one
    block still is (the looping kernel reads it back)."""
    torch.manual_seed(0)
    x, residual, weight = torch.randn(5, 48), torch.randn(5, 48), torch.rand(48) + 0.5
    want, r_want = add_rms_norm(x, residual.clone(), weight)
    kept = residual.clone()
    out, r = add_rms_norm(x, kept, weight, keep_residual=False)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert r is kept and torch.equal(kept, residual)
    monkeypatch.setattr(decode.ops, "_MAX_BLOCK_NORM", 16)
    looped = residual.clone()
    out, _ = add_rms_norm(x, looped, weight, keep_residual=False)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(looped, r_want)


@pytest.mark.parametrize("loop", [False, True])
def test_add_rms_norm_written_over_x(loop, monkeypatch):
    """out_into_x: the normed rows land in x's own memory (same values as a fresh output); not where dtypes differ."""
    if loop:
        monkeypatch.setattr(decode.ops, "_MAX_BLOCK_NORM", 16)
    x, residual, weight = torch.randn(3, 37), torch.randn(3, 37), 1 + 0.1 * torch.randn(37)
    want, r_want = add_rms_norm(x.clone(), residual.clone(), weight)
    out, r = add_rms_norm(x, residual, weight, out_into_x=True)
    assert out.data_ptr() == x.data_ptr() and torch.equal(out, want) and torch.equal(r, r_want)
    xb = torch.randn(3, 37, dtype=torch.bfloat16)
    out32, _ = add_rms_norm(xb, torch.randn(3, 37), weight, out_dtype=torch.float32, out_into_x=True)
    assert out32.dtype == torch.float32 and out32.data_ptr() != xb.data_ptr()


def test_add_rms_norm_matches_block_norm():
    """The kernel reproduces mambazoo.core.norm.RMSNorm on the fp32 residual stream (eps included)."""
    blk = Block(24, torch.nn.Identity(), norm_eps=1e-3)
    with torch.no_grad():
        blk.norm.weight.copy_(torch.randn(24))
    x, h = torch.randn(2, 24) * 1e-2, torch.randn(2, 24, dtype=torch.bfloat16) * 1e-2
    out, r = add_rms_norm(h, x.clone(), blk.norm.weight, blk.norm.eps, out_dtype=torch.float32)
    ref = blk.norm(x + h.float())
    assert torch.equal(r, x + h.float())
    assert rel(out, ref) < 1e-6


def test_add_rms_norm_bad_inputs():
    with pytest.raises(ValueError, match="neither"):
        add_rms_norm(None, None, torch.ones(4))
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(torch.randn(2, 4), torch.randn(2, 4, dtype=torch.bfloat16), torch.ones(4))
    with pytest.raises(ValueError, match="weight"):
        add_rms_norm(torch.randn(2, 4), None, torch.ones(5))


# -- conv state update -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("W", [4, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_state_update(dtype, W, bias):
    batch, d = 2, 37
    state = torch.randn(batch, d, W, dtype=dtype)
    x = torch.randn(batch, 2 * d, dtype=dtype)[:, d:]  # a slice of in_proj's output: strided rows
    weight = torch.randn(d, 1, W, dtype=dtype) * 0.5
    b = torch.randn(d, dtype=dtype) if bias else None
    s_ref = state.clone()
    y = conv_state_update(state, x, weight, b)
    y_ref = conv_step_ref(s_ref, x, weight, b)
    assert torch.equal(state, s_ref)
    assert y.dtype == dtype and y.shape == (batch, d)
    assert rel(y, y_ref) < TOL[dtype]


def test_conv_state_update_mixed_dtypes():
    """fp32 parameters under bf16 autocast: fp32 state, bf16 x, fp32 weight; y in x's dtype."""
    batch, d, W = 2, 21, 4
    state, x = torch.randn(batch, d, W), torch.randn(batch, d, dtype=torch.bfloat16)
    weight, b = torch.randn(d, W), torch.randn(d)
    s_ref = state.clone()
    y = conv_state_update(state, x, weight, b, silu=False)
    y_ref = conv_step_ref(s_ref, x, weight, b, silu=False)
    assert torch.equal(state, s_ref) and y.dtype == torch.bfloat16
    assert rel(y, y_ref) < TOL[torch.bfloat16]


def test_conv_state_update_bad_inputs():
    with pytest.raises(ValueError, match="x"):
        conv_state_update(torch.zeros(2, 4, 4), torch.zeros(2, 5), torch.zeros(4, 1, 4))
    with pytest.raises(ValueError, match="weight"):
        conv_state_update(torch.zeros(2, 4, 4), torch.zeros(2, 4), torch.zeros(4, 1, 3))


# -- state update from A_log -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_update_a_log(dtype):
    """A_log (A = -exp(A_log) in the kernel), D and dt bias in the weights' dtype, x/z/B/C as strided
    slices of projections: the same as the reference with A, D, dt bias made fp32 beforehand."""
    batch, dim, N, r = 2, 37, 16, 3
    state = torch.randn(batch, dim, N)
    xz = torch.randn(batch, 2 * dim, dtype=dtype)
    x, z = xz[:, :dim], xz[:, dim:]
    dbc = torch.randn(batch, r + 2 * N, dtype=dtype)
    B, C = dbc[:, r:r + N], dbc[:, r + N:]
    dt = torch.randn(batch, dim, dtype=dtype)
    A_log = torch.log(torch.rand(dim, N) * 4 + 0.5).to(dtype)
    D, dt_bias = torch.randn(dim).to(dtype), torch.rand(dim).to(dtype)
    s_ref = state.clone()
    y = launch_state_update(state, x, dt, A_log, B, C, D, z, dt_bias, True, A_is_log=True)
    y_ref = selective_state_update_ref(s_ref, x, dt, -torch.exp(A_log.float()), B, C, D.float(), z,
                                       dt_bias.float(), True)
    assert y.dtype == dtype and y.shape == (batch, dim)
    assert rel(state, s_ref) < 1e-5
    assert rel(y, y_ref) < TOL[dtype]


# -- the switch ------------------------------------------------------------------------------------
def test_fused_decode_enabled(monkeypatch):
    cpu = torch.device("cpu")
    set_backend(monkeypatch, scan="auto")
    with torch.no_grad():
        assert not fused_decode_enabled(cpu)  # CPU keeps the reference path
        set_backend(monkeypatch, scan="triton")
        assert fused_decode_enabled(cpu)
        with backend(fused_decode=False):
            assert not fused_decode_enabled(cpu)
    with torch.enable_grad():
        assert not fused_decode_enabled(cpu)  # the kernels have no backward


# -- whole decode steps ----------------------------------------------------------------------------
def _decode(model, ids, fused_on, monkeypatch):
    cache = model.allocate_cache(ids.shape[0], 8)
    with torch.inference_mode(), backend(scan="triton" if fused_on else "auto"):
        out = torch.stack([model.step(ids[:, t], cache) for t in range(ids.shape[1])], 1)
    return out, cache


def _count_calls(monkeypatch):
    calls = {"norm": 0, "conv": 0}
    norm, conv = decode.add_rms_norm, decode.conv_state_update

    def counting_norm(*a, **k):
        calls["norm"] += 1
        return norm(*a, **k)

    def counting_conv(*a, **k):
        calls["conv"] += 1
        return conv(*a, **k)

    monkeypatch.setattr(decode, "add_rms_norm", counting_norm)
    monkeypatch.setattr(decode, "conv_state_update", counting_conv)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_decode_fused_matches_reference(dtype, monkeypatch):
    """mamba-tiny decoding token by token: fused kernels (residual add deferred into the next norm)
    give the logits and the states of the plain PyTorch path."""
    model = create_model("mamba-tiny").to(dtype).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 4))
    ref, cache_ref = _decode(model, ids, False, monkeypatch)
    calls = _count_calls(monkeypatch)
    out, cache = _decode(model, ids, True, monkeypatch)
    n_layer, steps = model.config.n_layer, ids.shape[1]
    assert calls == {"norm": (n_layer + 1) * steps, "conv": n_layer * steps}  # the fused path ran
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert rel(out, ref) < TOL[dtype]
    for s, s_ref in zip(cache.layers, cache_ref.layers):
        assert rel(s.ssm, s_ref.ssm) < TOL[dtype]
        assert rel(s.conv, s_ref.conv) < TOL[dtype]


@pytest.mark.parametrize("overrides", [
    dict(conv_bias=False, d_conv=3),  # conv without bias, another width
    dict(selective=False),  # LTI SSM: fused conv, PyTorch SSM step
])
def test_model_decode_fused_variants(overrides, monkeypatch):
    model = create_model("mamba-tiny", **overrides).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 3))
    ref, _ = _decode(model, ids, False, monkeypatch)
    out, _ = _decode(model, ids, True, monkeypatch)
    assert rel(out, ref) < TOL[torch.float32]


def test_hybrid_decode_fused_matches_reference(monkeypatch):
    """A Jamba-style hybrid: Mamba with inner norms + MoE, attention + MLP, on the fused path."""
    model = create_model("jamba-tiny", n_layer=2, layout="MA", ffn="ed").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 3))
    ref, _ = _decode(model, ids, False, monkeypatch)
    calls = _count_calls(monkeypatch)
    out, _ = _decode(model, ids, True, monkeypatch)
    assert calls == {"norm": (2 * 2 + 1) * 3, "conv": 3}  # norm + ffn norm per block, final norm; 1 Mamba
    assert rel(out, ref) < TOL[torch.float32]
    assert model.layers[0].aux_loss is not None


def test_block_step_fused_keeps_its_contract(fused):
    """Block.step on the fused path still returns the block's output x + mixer(norm(x)) in fp32 and
    leaves its input alone; equal to the reference path."""
    blk = Block(32, Mamba(32, d_state=8, layer_idx=0)).eval()
    x = torch.randn(2, 32)
    x0 = x.clone()
    s1, s2 = blk.mixer.allocate_state(2), blk.mixer.allocate_state(2)
    with torch.inference_mode():
        y = blk.step(x, s1)
        assert fused_decode_enabled(x.device)
        ref_blk = copy.deepcopy(blk)
    with torch.no_grad(), backend(scan="auto"):
        y_ref = ref_blk.step(x, s2)
    assert torch.equal(x, x0)
    assert y.dtype == torch.float32
    assert rel(y, y_ref) < TOL[torch.float32]
    assert isinstance(s1, MambaState) and rel(s1.ssm, s2.ssm) < 1e-5
