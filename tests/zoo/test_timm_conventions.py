"""timm conventions for Vim and AuM: pretrained=True through the hf_hub_id / hf_hub_filename of the pretrained
cfg (offline, from a Hub cache built here), list_models(pretrained=True), features_only + out_indices +
feature_info, forward_intermediates / prune_intermediate_layers, set_grad_checkpointing, group_matcher with
timm's layer-wise LR decay."""

import argparse
import shutil

import pytest
import timm
import torch

import mambazoo.vim  # noqa: F401  (registers the timm names)
from mambazoo.vim.model import VisionMamba

TINY = dict(img_size=32, patch_size=8, embed_dim=16, depth=3, d_state=4)


def _random(m):
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m.eval()


def test_list_models_pretrained():
    names = timm.list_models("vim*", pretrained=True)
    assert {"vim_tiny_patch16_224.in1k", "vim_small_patch16_224.in1k", "vim_base_patch16_224.in1k"} <= set(names)
    cfg = timm.get_pretrained_cfg("vim_tiny_patch16_224.in1k")
    assert (cfg.hf_hub_id, cfg.hf_hub_filename) == ("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth")


_MIX = {"fwd.conv1d": "conv1d", "bwd.conv1d": "conv1d_b", "fwd.x_proj": "x_proj", "bwd.x_proj": "x_proj_b",
        "fwd.dt_proj": "dt_proj", "bwd.dt_proj": "dt_proj_b", "fwd.A_log": "A_log", "bwd.A_log": "A_b_log",
        "fwd.D": "D", "bwd.D": "D_b", "in_proj": "in_proj", "out_proj": "out_proj"}


def _official(model) -> dict:
    """A hustvl/Vim training checkpoint of ``model``: {'model': ..., 'args': Namespace, 'epoch': ...}."""
    sd = {}
    for k, v in model.state_dict().items():
        p = k.split(".")
        if p[0] == "blocks" and p[2] == "mixer":
            rest = ".".join(p[3:])
            stem = next(s for s in sorted(_MIX, key=len, reverse=True) if rest.startswith(s))
            sd[f"layers.{p[1]}.mixer.{_MIX[stem]}{rest[len(stem):]}"] = v.clone()
        elif p[0] == "blocks":
            sd[f"layers.{p[1]}.{'.'.join(p[2:])}"] = v.clone()
        elif k == "norm.weight":
            sd["norm_f.weight"] = v.clone()
        elif k == "pos_embed":
            h = (v.shape[1] - 1) // 2
            sd[k] = torch.cat([v[:, 1:1 + h], v[:, :1], v[:, 1 + h:]], 1).clone()
        else:
            sd[k] = v.clone()
    return {"model": sd, "args": argparse.Namespace(model="vim_tiny"), "epoch": 299}


def test_timm_pretrained_downloads_the_official_file_through_the_hub_cache(tmp_path):
    src = _random(VisionMamba(**TINY, num_classes=1000))
    snap = tmp_path / "hub" / "models--hustvl--Vim-tiny-midclstok" / "snapshots" / ("c" * 40)
    snap.mkdir(parents=True)
    torch.save(_official(src), snap / "vim_t_midclstok_76p1acc.pth")
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("c" * 40)
    m = timm.create_model("vim_tiny_patch16_224", pretrained=True, cache_dir=tmp_path / "hub", **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), src(x), rtol=1e-5, atol=1e-5)
    new_head = timm.create_model("vim_tiny_patch16_224", pretrained=True, cache_dir=tmp_path / "hub",
                                 num_classes=4, **TINY)
    assert new_head.head.weight.shape == (4, 16)
    torch.testing.assert_close(new_head.blocks[2].mixer.out_proj.weight, src.blocks[2].mixer.out_proj.weight)
    shutil.rmtree(tmp_path / "hub")
    with pytest.raises(Exception, match="Vim-tiny-midclstok|offline|cache"):  # offline, nothing cached
        timm.create_model("vim_tiny_patch16_224", pretrained=True, cache_dir=tmp_path / "hub", **TINY)


def test_features_only_out_indices_and_feature_info():
    m = timm.create_model("vim_tiny_patch16_224", features_only=True, out_indices=(0, 2), **TINY).eval()
    assert m.feature_info.channels() == [16, 16] and m.feature_info.reduction() == [8, 8]
    feats = m(torch.randn(2, 3, 32, 32))
    assert [tuple(f.shape) for f in feats] == [(2, 16, 4, 4), (2, 16, 4, 4)]


def test_forward_intermediates_and_prune():
    m = _random(VisionMamba(**TINY, num_classes=5))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, inter = m.forward_intermediates(x, norm=True)
        tokens = m.forward_features(x)
        torch.testing.assert_close(final, tokens)
        mid = tokens.shape[1] // 2  # the last block's normed patch tokens, class token out, as a map
        patches = torch.cat([tokens[:, :mid], tokens[:, mid + 1:]], 1)
        torch.testing.assert_close(inter[-1], patches.reshape(2, 4, 4, 16).permute(0, 3, 1, 2))
        nlc = m.forward_intermediates(x, indices=[1], output_fmt="NLC", intermediates_only=True)
        assert len(inter) == 3 and nlc[0].shape == (2, 16, 16)
        kept = m.prune_intermediate_layers(indices=[1])
        assert kept == [1] and len(m.blocks) == 2
        torch.testing.assert_close(m.forward_intermediates(x, indices=[1], output_fmt="NLC",
                                                           intermediates_only=True)[0], nlc[0])


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    m = _random(VisionMamba(**TINY, num_classes=5)).train()
    x = torch.randn(2, 3, 32, 32)
    m(x).square().sum().backward()
    plain = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.set_grad_checkpointing(True)
    calls = []
    hook = torch.utils.checkpoint.checkpoint
    try:
        torch.utils.checkpoint.checkpoint = lambda *a, **k: calls.append(1) or hook(*a, **k)
        m(x).square().sum().backward()
    finally:
        torch.utils.checkpoint.checkpoint = hook
    assert len(calls) == 3
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], rtol=1e-5, atol=1e-6)


def test_group_matcher_drives_timm_layer_decay():
    from timm.optim import create_optimizer_v2

    m = VisionMamba(**TINY, num_classes=5)
    opt = create_optimizer_v2(m, "adamw", lr=1e-3, layer_decay=0.5)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert len(scales) == 5  # stem, 3 blocks, norm + head
    by_name = {}
    for g in opt.param_groups:
        for p in g["params"]:
            by_name[id(p)] = g["lr_scale"]
    assert by_name[id(m.patch_embed.proj.weight)] < by_name[id(m.blocks[0].mixer.in_proj.weight)] \
        < by_name[id(m.blocks[2].mixer.in_proj.weight)] < by_name[id(m.head.weight)]


def test_audio_mamba_conventions():
    pytest.importorskip("torchaudio")
    from mambazoo.audio.model import AudioMamba

    m = AudioMamba(num_classes=3, n_mels=16, frames=32, n_fft=64, win_length=64, hop_length=16, freq_mask=0,
                   time_mask=0, patch_size=8, embed_dim=16, depth=2, d_state=4).eval()
    wave = torch.randn(2, 16 * 31)
    with torch.no_grad():
        maps = m.forward_intermediates(wave, intermediates_only=True)
    assert [tuple(f.shape) for f in maps] == [(2, 16, 2, 4)] * 2
    assert m.feature_info[0]["module"] == "backbone.blocks.0"
    m.set_grad_checkpointing()
    assert m.backbone.grad_checkpointing
    assert "stem" in m.group_matcher()
