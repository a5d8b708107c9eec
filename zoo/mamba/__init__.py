"""Mamba language models (Gu & Dao, 2023): n_layer residual Mamba blocks, no FFN, tied head."""

from __future__ import annotations

from mambazoo.lm import LMConfig, build_lm
from mambazoo.registry import register_configs

# (n_layer, d_model) of the published checkpoints; vocab 50277 (GPT-NeoX) padded to 50280.
SHAPES = {
    "mamba-130m": (24, 768),
    "mamba-370m": (48, 1024),
    "mamba-790m": (48, 1536),
    "mamba-1.4b": (48, 2048),
    "mamba-2.8b": (64, 2560),
}

CONFIGS: dict[str, LMConfig] = {
    name: LMConfig(vocab_size=50277, n_layer=n, d_model=d) for name, (n, d) in SHAPES.items()
}
CONFIGS["mamba-tiny"] = LMConfig(vocab_size=512, n_layer=2, d_model=64)


DESCRIPTIONS = {name: f"Mamba LM, {c.n_layer} layers x d_model {c.d_model}" for name, c in CONFIGS.items()}

register_configs(CONFIGS, DESCRIPTIONS, build_lm)

__all__ = ["CONFIGS", "DESCRIPTIONS", "SHAPES"]
