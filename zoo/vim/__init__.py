"""Vision Mamba (Vim): bidirectional Mamba over image patches with a middle class token.

Registers the named configs (``mambazoo.create_model('vim-tiny')``, see ``mambazoo.vim.configs``) and the timm
architectures ``vim_{tiny,small,base}_patch16_224`` (``timm.create_model`` after ``import mambazoo.vim``)."""

from __future__ import annotations

from mambazoo.registry import register_configs
from mambazoo.vim import timm_models  # noqa: F401  (registers the timm names)
from mambazoo.vim.configs import DESCRIPTIONS, VIM_CONFIGS
from mambazoo.vim.model import PatchEmbed, VisionMamba
from mambazoo.vim.weights import load_weights, read_state_dict


def build_vim(name: str, **overrides) -> VisionMamba:
    """The named config ``name`` with keyword ``overrides`` of VisionMamba's arguments."""
    return VisionMamba(**{**VIM_CONFIGS[name], **overrides})


def _build(config: dict, **overrides) -> VisionMamba:
    return VisionMamba(**{**config, **overrides})


register_configs(VIM_CONFIGS, DESCRIPTIONS, _build)

__all__ = ["PatchEmbed", "VisionMamba", "build_vim", "load_weights", "read_state_dict"]
