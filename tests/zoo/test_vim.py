"""Vision Mamba: named configs, both scan directions, timm round trip, weights, bad input."""

import copy

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

import mambazoo
import mambazoo.vim  # noqa: F401  (registers the timm names)
from mambazoo.core.backend import backend
from mambazoo.vim import VisionMamba, load_weights

TINY = dict(embed_dim=16, depth=2, d_state=4)  # small enough for CPU tests


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name, millions", [("vim-tiny", 7), ("vim-small", 26), ("vim-base", 98)])
def test_published_parameter_counts(name, millions):
    with torch.device("meta"):
        m = mambazoo.create_model(name)
    assert abs(n_params(m) / 1e6 - millions) < 0.05 * millions
    assert m.patch_embed.num_patches == 196 and m.pos_embed.shape == (1, 197, m.embed_dim)


@pytest.mark.parametrize("name", ["vim-tiny", "vim-small", "vim-base", "vim-tiny-fashion"])
def test_named_config_output_shapes(name):
    # full width, one block, on the meta device: shapes without memory or time
    with torch.device("meta"):
        m = mambazoo.create_model(name, depth=1)
        c, h = m.patch_embed.in_chans, m.patch_embed.img_size[0]
        feats = m.forward_features(torch.empty(2, c, h, h))
        logits = m.forward_head(feats)
    assert feats.shape == (2, 1 + m.patch_embed.num_patches, m.embed_dim)
    assert logits.shape == (2, m.num_classes)


def test_fashion_config_runs_on_cpu():
    m = mambazoo.create_model("vim-tiny-fashion", depth=1)
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def _swap_directions(model):
    swapped = copy.deepcopy(model)
    for blk in swapped.blocks:
        blk.mixer.fwd, blk.mixer.bwd = blk.mixer.bwd, blk.mixer.fwd
    return swapped


def test_flipping_the_sequence_swaps_the_directions():
    model = VisionMamba(img_size=16, patch_size=4, num_classes=3, **TINY).eval()
    tokens = torch.randn(2, 17, 16)
    with torch.no_grad():
        out = model.forward_tokens(tokens)
        flipped = model.forward_tokens(tokens.flip(1)).flip(1)
        swapped = _swap_directions(model).forward_tokens(tokens)
    # compare what the blocks add to the residual stream, not the stream itself
    d_out, d_flipped, d_swapped = out - tokens, flipped - tokens, swapped - tokens
    torch.testing.assert_close(d_flipped, d_swapped, rtol=1e-4, atol=1e-6)
    # the two directions really differ: ignoring either one would make these equal
    assert (d_flipped - d_out).abs().mean() > 0.1 * d_out.abs().mean()


@pytest.mark.parametrize("train", [False, True])
def test_backward_branch_is_used_in_training_and_inference(train):
    model = VisionMamba(img_size=16, patch_size=4, num_classes=3, **TINY).train(train)
    tokens = torch.randn(2, 17, 16)
    before = (model.forward_tokens(tokens) - tokens).detach()  # what the blocks add
    with torch.no_grad():
        for blk in model.blocks:
            blk.mixer.bwd.D.add_(1.0)
    after = (model.forward_tokens(tokens) - tokens).detach()
    assert (after - before).abs().mean() > 0.1 * before.abs().mean()
    # and the backward parameters get gradients through the whole model
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert all(blk.mixer.bwd.x_proj.weight.grad.abs().sum() > 0 for blk in model.blocks)


def test_middle_class_token_and_heads():
    m = VisionMamba(img_size=16, patch_size=4, num_classes=3, **TINY).eval()
    x = torch.randn(2, 3, 16, 16)
    feats = m.forward_features(x)
    assert feats.shape == (2, 17, 16)
    torch.testing.assert_close(m.forward_head(feats, pre_logits=True), feats[:, 8])
    m.reset_classifier(0)
    assert m(x).shape == (2, 16)
    m.reset_classifier(7, global_pool="avg")
    assert m(x).shape == (2, 7)


def test_overlapping_patches_and_rectangular_images():
    m = VisionMamba(img_size=(16, 24), patch_size=8, stride=4, num_classes=2, **TINY)
    assert m.patch_embed.grid_size == (3, 5)
    assert m(torch.randn(1, 3, 16, 24)).shape == (1, 2)


@pytest.mark.parametrize("hw,patch", [((32, 32), 16), ((40, 36), 8)])
def test_patchify_gemm_equals_the_strided_convolution(hw, patch):
    """Non-overlapping patches go through one GEMM (_patchify): same tokens and gradients as the conv,
    including images whose size is not a multiple of the patch (the remainder is dropped, as by the conv)."""
    from mambazoo.vim.model import PatchEmbed

    torch.manual_seed(0)
    pe = PatchEmbed(hw, patch, None, 3, 24)
    x = torch.randn(2, 3, *hw, requires_grad=True)
    out = pe(x)
    ref = pe.proj(x).flatten(2).transpose(1, 2)
    assert out.shape == ref.shape == (2, pe.num_patches, 24)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, pe.proj.weight), g)
    rx, rw = torch.autograd.grad(ref, (x, pe.proj.weight), g)
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-4)


def test_patchify_under_autocast_gathers_in_the_compute_dtype():
    """Under autocast the patches are gathered and cast in one copy: the conv's tokens (bf16 GEMM on the CPU)."""
    from mambazoo.vim.model import PatchEmbed

    torch.manual_seed(0)
    pe = PatchEmbed((32, 48), 16, None, 3, 24)
    x = torch.randn(2, 3, 32, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pe(x)
        ref = pe.proj(x).flatten(2).transpose(1, 2)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape == (2, 6, 24)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_position_embedding_in_place_without_autograd():
    """Without autograd the class token and the two position-embedded halves are written into one buffer: the same
    tokens as the concatenation autograd uses, the class token (plus its position embedding) in the middle."""
    torch.manual_seed(0)
    m = VisionMamba(img_size=32, patch_size=8, num_classes=3, **TINY)
    with torch.no_grad():
        m.pos_embed.normal_()
        m.cls_token.normal_()
    tokens = torch.randn(2, 16, m.embed_dim).to(torch.bfloat16)
    with torch.no_grad():
        fast = m._pos_embed(tokens, (4, 4))
    slow = m._pos_embed(tokens, (4, 4))
    assert slow.requires_grad and fast.dtype == slow.dtype == torch.float32
    torch.testing.assert_close(fast, slow.detach(), rtol=0, atol=0)
    torch.testing.assert_close(fast[:, 8], (m.cls_token + m.pos_embed[:, 0]).detach()[0].expand(2, -1))


def test_fused_residual_inference_matches_the_block_forward(monkeypatch):
    """Inference on the fused path (each residual add + RMSNorm one kernel, the add deferred to the next block)
    gives the same features as the plain blocks; training mode and autograd keep the plain path."""
    from mambazoo.kernels import decode
    from mambazoo.vim import model as vim_model

    torch.manual_seed(0)
    model = VisionMamba(img_size=16, patch_size=4, embed_dim=16, depth=3, num_classes=5).eval()
    x = torch.randn(2, 3, 16, 16)
    calls = []
    real = decode.add_rms_norm
    monkeypatch.setattr(decode, "add_rms_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        ref = model.forward_features(x)  # CPU default: the plain path
        assert calls == []
        # the fused path on CPU tensors: add_rms_norm runs in the interpreter, the scan stays core's reference
        monkeypatch.setattr(vim_model, "fused_decode_enabled", lambda device: True)
        out = model.forward_features(x)
        assert len(calls) == 4  # one fused add + norm per block, and the last add with the final norm
        tokens = torch.randn(2, 17, 16)
        kept = tokens.clone()
        plain = model.norm(model.forward_tokens(tokens))  # not consumed: the caller's tokens stay as they were
        assert torch.equal(tokens, kept)
        consumed = model.norm(model.forward_tokens(tokens, consume=True))  # the residual stream in x's memory
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(consumed, plain, rtol=1e-5, atol=1e-5)
    assert not torch.equal(tokens, kept)
    calls.clear()
    model.train()
    with torch.no_grad():
        model.forward_features(x)
    assert calls == []


def test_patch_and_position_embedding_in_one_kernel(monkeypatch):
    """At inference under bf16 autocast the fused path makes the tokens with one kernel (kernels/patch_embed.py:
    patches read from the image, projected, position embedding added, class token's row in the middle): the tokens
    and features of the unfused path (the backend's fused_patch=False) within bf16's rounding, at the model's size and at
    another (position embedding resampled); a bad image still raises the unfused path's ValueError."""
    from mambazoo.kernels import patch_embed
    from mambazoo.vim import model as vim_model

    monkeypatch.setattr(vim_model, "fused_decode_enabled", lambda device: True)
    calls = []
    real = patch_embed.patch_tokens
    monkeypatch.setattr(patch_embed, "patch_tokens", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    torch.manual_seed(0)
    model = VisionMamba(img_size=32, patch_size=16, embed_dim=24, depth=2, num_classes=5, dynamic_img_size=True).eval()
    for size in ((32, 32), (48, 64)):
        x = torch.randn(2, 3, *size)
        grid = (size[0] // 16, size[1] // 16)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            fused_tokens = model._patch_tokens(x, grid)
            fused = model.forward_features(x)
            with backend(fused_patch=False):
                assert model._patch_tokens(x, grid) is None
                plain_tokens = model._pos_embed(model.patch_embed(x), grid)
                plain = model.forward_features(x)
        assert fused_tokens.dtype == plain_tokens.dtype == torch.float32 and fused_tokens.shape == plain_tokens.shape
        torch.testing.assert_close(fused_tokens, plain_tokens, rtol=1e-2, atol=2e-2)
        assert ((fused - plain).norm() / plain.norm()).item() < 1e-2
    assert calls == [(2, 3, 32, 32)] * 2 + [(2, 3, 48, 64)] * 2
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="channels"):
        model.forward_features(torch.randn(1, 4, 32, 32))


def test_drop_path_only_in_training():
    m = VisionMamba(img_size=16, patch_size=4, num_classes=3, drop_path_rate=0.9, **TINY)
    x = torch.randn(4, 3, 16, 16)
    m.eval()
    torch.testing.assert_close(m(x), m(x))
    m.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, m(x))


def _from_file(path, **kwargs):
    """timm.create_model from a local file; the overlay describes the file (its classes and channels)."""
    overlay = dict(file=str(path), num_classes=5, input_size=(1, 32, 32))
    return timm.create_model("vim_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=overlay,
                             in_chans=1, **TINY, **kwargs).eval()


def test_timm_create_model_and_image_size_change(tmp_path):
    m = timm.create_model("vim_tiny_patch16_224", num_classes=5, in_chans=1, img_size=32, **TINY).eval()
    assert m.pretrained_cfg["architecture"] == "vim_tiny_patch16_224"
    x = torch.randn(2, 1, 32, 32)
    assert m(x).shape == (2, 5)
    from safetensors.torch import save_file

    path = tmp_path / "vim.safetensors"
    save_file(m.state_dict(), str(path))
    torch.testing.assert_close(_from_file(path, num_classes=5, img_size=32)(x), m(x))
    # a larger image: the position embedding is interpolated on load
    big = _from_file(path, num_classes=5, img_size=48)
    assert big.pos_embed.shape == (1, 1 + 9, 16)
    torch.testing.assert_close(big.pos_embed, resample_abs_pos_embed(m.pos_embed, [3, 3], [2, 2]))
    torch.testing.assert_close(big.blocks[1].mixer.bwd.A_log, m.blocks[1].mixer.bwd.A_log)
    assert big(torch.randn(2, 1, 48, 48)).shape == (2, 5)
    # another number of classes: everything but the head is loaded
    other = _from_file(path, num_classes=9, img_size=32)
    torch.testing.assert_close(other.pos_embed, m.pos_embed)
    assert other(x).shape == (2, 9)
    # set_img_size agrees with the interpolation on load
    m.set_img_size(48)
    torch.testing.assert_close(m.pos_embed, big.pos_embed)


def test_load_weights_from_torch_checkpoint_and_mismatch_errors(tmp_path):
    m = VisionMamba(img_size=16, patch_size=4, num_classes=3, **TINY).eval()
    ckpt = tmp_path / "last.ckpt"  # Lightning layout: nested, prefixed by the LightningModule's attribute
    torch.save({"state_dict": {f"model.{k}": v for k, v in m.state_dict().items()}, "epoch": 3}, ckpt)
    other = VisionMamba(img_size=16, patch_size=4, num_classes=3, **TINY).eval()
    load_weights(other, ckpt)
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(other(x), m(x))
    wrong = VisionMamba(img_size=16, patch_size=4, num_classes=4, embed_dim=16, depth=3, d_state=4)
    with pytest.raises(ValueError, match=r"(?s)missing \(\d+\): blocks\.2\..*mismatched \(2\): head\.bias"):
        load_weights(wrong, ckpt)
    report = load_weights(wrong, ckpt, strict=False)
    assert "head.weight: file (3, 16) vs model (4, 16)" in report["mismatched"]
    with pytest.raises(FileNotFoundError):
        load_weights(wrong, tmp_path / "nope.safetensors")


def test_bad_images_raise_clear_errors():
    m = VisionMamba(img_size=16, patch_size=4, in_chans=3, num_classes=3, **TINY)
    with pytest.raises(ValueError, match="expected 3 channels, got 1"):
        m(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"expected \(16, 16\) pixels"):
        m(torch.randn(2, 3, 20, 20))
    with pytest.raises(ValueError, match="expected \\(batch, channels, H, W\\)"):
        m(torch.randn(3, 16, 16))
    dyn = VisionMamba(img_size=16, patch_size=4, num_classes=3, dynamic_img_size=True, **TINY)
    assert dyn(torch.randn(1, 3, 24, 20)).shape == (1, 3)
    with pytest.raises(ValueError, match="smaller than one patch"):
        dyn(torch.randn(1, 3, 2, 16))
    with pytest.raises(ValueError, match="smaller than one patch"):
        VisionMamba(img_size=8, patch_size=16, **TINY)
    with pytest.raises(ValueError, match="global_pool"):
        VisionMamba(img_size=16, patch_size=4, global_pool="max", **TINY)


def test_load_pretrained_keeps_a_new_head_and_loads_nothing_on_a_misfit(tmp_path):
    src = VisionMamba(img_size=16, patch_size=4, num_classes=3, **TINY)
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    new_head = VisionMamba(img_size=16, patch_size=4, num_classes=5, **TINY)
    head_before = new_head.head.weight.detach().clone()
    new_head.load_pretrained(path)
    torch.testing.assert_close(new_head.pos_embed, src.pos_embed)
    assert torch.equal(new_head.head.weight, head_before)
    deeper = VisionMamba(img_size=16, patch_size=4, num_classes=3, embed_dim=16, depth=3, d_state=4)
    before = {k: v.clone() for k, v in deeper.state_dict().items()}
    with pytest.raises(ValueError, match=r"missing \(\d+\): blocks\.2\."):
        deeper.load_pretrained(path)
    assert all(torch.equal(before[k], v) for k, v in deeper.state_dict().items())  # nothing half-loaded
