"""Official hustvl/Vim checkpoints -> our VisionMamba: exact logits, image-size change, clear errors.

The official layout is produced here from one of our random models by a mapping written out
independently of mambazoo.vim.convert, so that a wrong rename or row order in the converter fails."""

import argparse

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

import mambazoo.vim  # noqa: F401  (registers the timm names)
from mambazoo.vim import VisionMamba, load_weights
from mambazoo.vim.convert import convert_official_vim, is_official_vim

TINY = dict(embed_dim=16, depth=2, d_state=4)

# ours (under blocks.i.mixer.) -> official (under layers.i.mixer.), spelled out as in models_mamba.py
_OFFICIAL_MIXER = {
    "in_proj.weight": "in_proj.weight", "out_proj.weight": "out_proj.weight",
    "fwd.conv1d.weight": "conv1d.weight", "fwd.conv1d.bias": "conv1d.bias",
    "fwd.x_proj.weight": "x_proj.weight", "fwd.dt_proj.weight": "dt_proj.weight",
    "fwd.dt_proj.bias": "dt_proj.bias", "fwd.A_log": "A_log", "fwd.D": "D",
    "bwd.conv1d.weight": "conv1d_b.weight", "bwd.conv1d.bias": "conv1d_b.bias",
    "bwd.x_proj.weight": "x_proj_b.weight", "bwd.dt_proj.weight": "dt_proj_b.weight",
    "bwd.dt_proj.bias": "dt_proj_b.bias", "bwd.A_log": "A_b_log", "bwd.D": "D_b",
}


def to_official(model: VisionMamba) -> dict:
    """Our model's weights as hustvl/Vim's VisionMamba.state_dict() would hold them."""
    out = {}
    for key, v in model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "blocks" and parts[2] == "mixer":
            out[f"layers.{parts[1]}.mixer.{_OFFICIAL_MIXER['.'.join(parts[3:])]}"] = v.clone()
        elif parts[0] == "blocks":
            out[f"layers.{parts[1]}.{'.'.join(parts[2:])}"] = v.clone()
        elif key == "norm.weight":
            out["norm_f.weight"] = v.clone()
        elif key == "pos_embed":
            # the official sequence: patches 0..M//2-1, class token, patches M//2..M-1
            n_patches = v.shape[1] - 1
            cls_row, patch_rows = v[:, :1], v[:, 1:]
            half = n_patches // 2
            out[key] = torch.cat([patch_rows[:, :half], cls_row, patch_rows[:, half:]], dim=1).clone()
        else:  # patch_embed.proj.*, cls_token, head.*
            out[key] = v.clone()
    return out


def _randomize(m):
    """Every parameter random and of order one: at their init (std 0.02, D = 1, the same A in both
    directions) the logits hardly depend on the input and some swaps change nothing, so a wrong
    mapping would go unnoticed."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("A_log"):
                p.uniform_(-1.0, 1.5)
            elif name.endswith("dt_proj.bias"):
                p.uniform_(-4.0, -1.0)
            elif name.endswith((".D", "norm.weight")):
                p.normal_(1.0, 0.5)
            else:
                p.normal_(0.0, 0.5)
    return m.eval()


def _source(img_size=16, num_classes=3, seed=0):
    torch.manual_seed(seed)
    return _randomize(VisionMamba(img_size=img_size, patch_size=4, num_classes=num_classes, **TINY))


def _save_official(path, model, **extra):
    """A DeiT-style training checkpoint as hustvl/Vim's main.py writes it."""
    ckpt = {"model": to_official(model), "epoch": 299, "args": argparse.Namespace(model="vim_tiny", lr=5e-4)}
    ckpt.update(extra)
    torch.save(ckpt, path)
    return path


def _fresh(img_size=16, num_classes=3, seed=1):
    torch.manual_seed(seed)
    return VisionMamba(img_size=img_size, patch_size=4, num_classes=num_classes, **TINY).eval()


@pytest.mark.parametrize("img_size", [16, 12])  # 16 and 9 patches: the middle index of an even and an odd count
def test_official_checkpoint_gives_the_same_logits(tmp_path, img_size):
    src = _source(img_size)
    ema = {k: v + 1.0 for k, v in to_official(src).items()}  # must not be the one loaded
    path = _save_official(tmp_path / "vim_t_midclstok_76p1acc.pth", src, model_ema=ema,
                          optimizer={"state": {}, "param_groups": []})
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        want = src(x)
        assert (want[0] - want[1]).abs().max() > 0.1  # the logits depend on the image
        for load in (lambda m: load_weights(m, path), lambda m: m.load_pretrained(path)):
            dst = _fresh(img_size)
            load(dst)
            torch.testing.assert_close(dst(x), want)
        # the converter alone: our keys exactly, from the checkpoint or its 'model' entry
        ckpt = torch.load(path, weights_only=False)
        assert is_official_vim(ckpt) and not is_official_vim({"model": src.state_dict()})
        converted = convert_official_vim(ckpt)
        assert set(converted) == set(src.state_dict())
        for k, v in src.state_dict().items():
            torch.testing.assert_close(converted[k], v)
        assert set(convert_official_vim(ckpt["model"])) == set(converted)
        # use_ema takes the other entry
        torch.testing.assert_close(convert_official_vim(ckpt, use_ema=True)["norm.weight"], src.norm.weight + 1)


def test_the_inverse_mapping_is_sensitive():
    # swapping the two directions, or leaving the class token's row in place, changes the logits
    src = _source()
    x = torch.randn(2, 3, 16, 16)
    sd = to_official(src)
    swapped = dict(sd)
    for a, b in (("conv1d.weight", "conv1d_b.weight"), ("x_proj.weight", "x_proj_b.weight"), ("A_log", "A_b_log")):
        for i in range(2):
            swapped[f"layers.{i}.mixer.{a}"], swapped[f"layers.{i}.mixer.{b}"] = (
                sd[f"layers.{i}.mixer.{b}"], sd[f"layers.{i}.mixer.{a}"])
    unordered = dict(sd, pos_embed=src.pos_embed.detach().clone())
    with torch.no_grad():
        for bad in (swapped, unordered):
            dst = _fresh()
            dst.load_state_dict(convert_official_vim(bad))
            assert (dst(x) - src(x)).abs().max() > 0.5


def test_timm_paths_and_plain_load_state_dict(tmp_path):
    src = _randomize(timm.create_model("vim_tiny_patch16_224", num_classes=5, in_chans=1, img_size=32, **TINY))
    path = _save_official(tmp_path / "vim.pth", src)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        want = src(x)
        overlay = dict(file=str(path), num_classes=5, input_size=(1, 32, 32))
        m = timm.create_model("vim_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=overlay,
                              num_classes=5, in_chans=1, img_size=32, **TINY).eval()
        torch.testing.assert_close(m(x), want)
        m = timm.create_model("vim_tiny_patch16_224", checkpoint_path=str(path), num_classes=5, in_chans=1,
                              img_size=32, **TINY).eval()
        torch.testing.assert_close(m(x), want)
        m = timm.create_model("vim_tiny_patch16_224", num_classes=5, in_chans=1, img_size=32, **TINY).eval()
        m.load_state_dict(to_official(src))
        torch.testing.assert_close(m(x), want)
        # also nested, as AudioMamba holds its VisionMamba under 'backbone.'
        outer = torch.nn.ModuleDict({"backbone": timm.create_model(
            "vim_tiny_patch16_224", num_classes=5, in_chans=1, img_size=32, **TINY).eval()})
        outer.load_state_dict({f"backbone.{k}": v for k, v in to_official(src).items()})
        torch.testing.assert_close(outer["backbone"](x), want)
        # a new head through timm: everything else loads
        m = timm.create_model("vim_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=overlay,
                              num_classes=7, in_chans=1, img_size=32, **TINY).eval()
        torch.testing.assert_close(m.blocks[1].mixer.bwd.A_log, src.blocks[1].mixer.bwd.A_log)
        assert m(x).shape == (2, 7)


def test_official_weights_at_another_image_size(tmp_path):
    src = _source(img_size=16)  # 4x4 patches
    path = _save_official(tmp_path / "vim.pth", src)
    big = _fresh(img_size=24)  # 6x6 patches
    load_weights(big, path)
    # resampled in our layout, so the class token's row stays the class token's
    torch.testing.assert_close(big.pos_embed, resample_abs_pos_embed(src.pos_embed, [6, 6], [4, 4]))
    torch.testing.assert_close(big.cls_token, src.cls_token)
    assert big(torch.randn(1, 3, 24, 24)).shape == (1, 3)
    # through timm too
    overlay = dict(file=str(path), num_classes=3, input_size=(3, 16, 16))
    m = timm.create_model("vim_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=overlay,
                          num_classes=3, img_size=24, patch_size=4, **TINY)
    torch.testing.assert_close(m.pos_embed, big.pos_embed)


def _corrupt_missing(sd):
    del sd["layers.1.mixer.x_proj_b.weight"]


def _corrupt_shape(sd):
    sd["layers.0.mixer.A_b_log"] = sd["layers.0.mixer.A_b_log"][:, :2].clone()


def _corrupt_layer_scale(sd):
    sd["layers.0.mixer.gamma"] = torch.ones(16)


@pytest.mark.parametrize("corrupt, message", [
    (_corrupt_missing, r"missing \(1\): layers\.1\.mixer\.x_proj_b\.weight"),
    (_corrupt_shape, r"wrong shape \(1\): layers\.0\.mixer\.A_b_log: \(32, 2\), expected \(32, 4\)"),
    (_corrupt_layer_scale, r"(?s)unexpected \(1\): layers\.0\.mixer\.gamma.*layer scale"),
])
def test_corrupted_checkpoint_raises_and_loads_nothing(tmp_path, corrupt, message):
    sd = to_official(_source())
    corrupt(sd)
    path = tmp_path / "bad.pth"
    torch.save({"model": sd}, path)
    dst = _fresh()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        load_weights(dst, path)
    with pytest.raises(ValueError, match=message):
        dst.load_pretrained(path)
    overlay = dict(file=str(path), num_classes=3, input_size=(3, 16, 16))
    with pytest.raises(ValueError, match=message):
        timm.create_model("vim_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=overlay,
                          num_classes=3, img_size=16, patch_size=4, **TINY)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def test_official_weights_that_do_not_fit_the_model(tmp_path):
    path = _save_official(tmp_path / "vim.pth", _source())
    wider = VisionMamba(img_size=16, patch_size=4, num_classes=3, embed_dim=24, depth=2, d_state=4)
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(ValueError, match=r"blocks\.0\.mixer\.bwd\.conv1d\.bias: file \(32,\) vs model \(48,\)"):
        load_weights(wider, path)
    assert all(torch.equal(before[k], v) for k, v in wider.state_dict().items())
    with pytest.raises(ValueError, match="format"):
        load_weights(wider, path, format="hustvl")
    with pytest.raises(ValueError, match=r"expected the official Vim state dict or a checkpoint with a 'model'"):
        convert_official_vim({"epoch": 3, "state": {}})
