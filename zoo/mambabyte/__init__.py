"""MambaByte (Wang et al., 2024): a Mamba LM over raw UTF-8 bytes (vocabulary 256)."""

from __future__ import annotations

from mambazoo.lm import LMConfig, build_lm
from mambazoo.mambabyte.tokenizer import ByteTokenizer, bits_per_byte
from mambazoo.registry import register_configs

CONFIGS: dict[str, LMConfig] = {
    "mambabyte-353m": LMConfig(vocab_size=256, n_layer=53, d_model=1024),
    "mambabyte-972m": LMConfig(vocab_size=256, n_layer=48, d_model=1792),
    "mambabyte-tiny": LMConfig(vocab_size=256, n_layer=2, d_model=64, d_state=8),
}


DESCRIPTIONS = {name: f"MambaByte, {c.n_layer} layers x d_model {c.d_model}, 256 byte symbols"
                for name, c in CONFIGS.items()}

register_configs(CONFIGS, DESCRIPTIONS, build_lm)

__all__ = ["CONFIGS", "DESCRIPTIONS", "ByteTokenizer", "bits_per_byte"]
