"""timm entry points: ``timm.create_model('vim_tiny_patch16_224', num_classes=..., in_chans=...,
img_size=...)`` after ``import mambazoo.vim``.

``pretrained=True`` downloads the official ImageNet-1k weights of hustvl/Vim from the Hugging Face Hub
(``vim_tiny_patch16_224.in1k`` = hustvl/Vim-tiny-midclstok, vim_t_midclstok_76p1acc.pth; small and base
likewise: ``timm.list_models('vim*', pretrained=True)``), through timm's own hf_hub_id / hf_hub_filename
path (huggingface_hub's cache, ``HF_HUB_OFFLINE``, ``cache_dir=``), converted on the way in by
``checkpoint_filter_fn``. A local file instead: ``pretrained_cfg_overlay=dict(file='vim_tiny.safetensors',
num_classes=10)`` where num_classes is the file's (timm drops the head when it differs from the model's).
Position embeddings are resampled to ``img_size``; 3-channel patch weights are adapted to ``in_chans``.
``features_only=True`` (with ``out_indices``) returns block outputs as (batch, dim, gh, gw) maps."""

from __future__ import annotations

import argparse

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from mambazoo.vim.configs import TIMM_NAMES, VIM_CONFIGS
from mambazoo.vim.model import VisionMamba
from mambazoo.vim.weights import checkpoint_filter_fn


def _cfg(**kwargs) -> dict:
    return dict(
        url="", num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=0.875,
        interpolation="bicubic", fixed_input_size=False, mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD, first_conv="patch_embed.proj", classifier="head",
        license="apache-2.0", **kwargs,
    )


# The official checkpoints (hustvl/Vim on the Hub): repo and file per architecture.
HUB_WEIGHTS = {
    "vim_tiny_patch16_224": ("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth"),
    "vim_small_patch16_224": ("hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth"),
    "vim_base_patch16_224": ("hustvl/Vim-base-midclstok", "vim_b_midclstok_81p9acc.pth"),
}

default_cfgs = generate_default_cfgs({
    f"{name}.in1k": _cfg(hf_hub_id=HUB_WEIGHTS[name][0], hf_hub_filename=HUB_WEIGHTS[name][1])
    for name in TIMM_NAMES
})


def _create(variant: str, pretrained: bool = False, **kwargs) -> VisionMamba:
    args = {**VIM_CONFIGS[TIMM_NAMES[variant]], **kwargs}
    out_indices = args.pop("out_indices", 3)
    # the official files are DeiT training checkpoints: an argparse.Namespace ('args') beside the tensors, which
    # timm's torch.load(weights_only=True) refuses unless allowed; nothing else is
    with torch.serialization.safe_globals([argparse.Namespace]):
        return build_model_with_cfg(VisionMamba, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                    feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **args)


@register_model
def vim_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-Ti: depth 24, width 192, patch 16 (~7M parameters at 224 px, 1000 classes)."""
    return _create("vim_tiny_patch16_224", pretrained, **kwargs)


@register_model
def vim_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-S: depth 24, width 384, patch 16 (~26M parameters)."""
    return _create("vim_small_patch16_224", pretrained, **kwargs)


@register_model
def vim_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-B: depth 24, width 768, patch 16 (~98M parameters)."""
    return _create("vim_base_patch16_224", pretrained, **kwargs)
