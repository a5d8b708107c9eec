"""timm entry points: ``timm.create_model('vim_tiny_patch16_224', num_classes=..., in_chans=...,
img_size=...)`` after ``import mambazoo.vim``.

No weights are hosted: ``pretrained=True`` needs a local file (safetensors or a torch / Lightning
checkpoint), given as ``pretrained_cfg_overlay=dict(file='vim_tiny.safetensors', num_classes=10)``
where num_classes is the file's (timm drops the head when it differs from the model's). Position
embeddings are resampled to ``img_size``; 3-channel patch weights are adapted to ``in_chans``.
The official hustvl/Vim checkpoints are converted on the way in (``mambazoo.vim.convert``), here and with
``checkpoint_path=``."""

from __future__ import annotations

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


default_cfgs = generate_default_cfgs({name: _cfg() for name in TIMM_NAMES})


def _create(variant: str, pretrained: bool = False, **kwargs) -> VisionMamba:
    args = {**VIM_CONFIGS[TIMM_NAMES[variant]], **kwargs}
    return build_model_with_cfg(VisionMamba, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **args)


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
