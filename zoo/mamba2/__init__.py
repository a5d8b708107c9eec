"""Mamba-2 language models (Gu & Dao, 2024): n_layer residual Mamba-2 blocks, no FFN, tied head.

Published shapes: d_state 128, headdim 64, expand 2, ngroups 1, vocab 50277 (GPT-NeoX) padded to a multiple
of 16 (50288). Weights of transformers' Mamba2ForCausalLM and mamba_ssm's MambaLMHeadModel (Mamba2 layers)
load through ``mambazoo.mamba2.convert.load_mamba2``.
"""

from __future__ import annotations

from mambazoo.lm import CausalLM, LMConfig, build_lm
from mambazoo.registry import register_model

# (n_layer, d_model) of the published checkpoints (state-spaces/mamba2-*)
SHAPES = {
    "mamba2-130m": (24, 768),
    "mamba2-370m": (48, 1024),
    "mamba2-780m": (48, 1536),
    "mamba2-1.3b": (48, 2048),
    "mamba2-2.7b": (64, 2560),
}


def mamba2_config(n_layer: int, d_model: int, **overrides) -> LMConfig:
    """An LMConfig of ``n_layer`` Mamba-2 blocks with the published mixer shape (overrides replace fields)."""
    base = LMConfig(vocab_size=50277, n_layer=n_layer, d_model=d_model, mixer="mamba2", d_state=128, d_conv=4,
                    expand=2, headdim=64, ngroups=1, chunk_size=256, pad_vocab_multiple=16, tie_embeddings=True)
    return base.replace(**overrides)


CONFIGS: dict[str, LMConfig] = {name: mamba2_config(n, d) for name, (n, d) in SHAPES.items()}
# CPU-trainable: 2 layers x d_model 64, 8 heads of 16, d_state 16, chunks of 32 tokens
CONFIGS["mamba2-tiny"] = mamba2_config(2, 64, vocab_size=512, d_state=16, headdim=16, chunk_size=32,
                                       pad_vocab_multiple=8)


def _register(name: str) -> None:
    c = CONFIGS[name]

    @register_model(name, f"Mamba-2 LM, {c.n_layer} layers x d_model {c.d_model}")
    def builder(**overrides) -> CausalLM:
        return build_lm(CONFIGS[name], **overrides)


for _name in CONFIGS:
    _register(_name)

__all__ = ["CONFIGS", "SHAPES", "mamba2_config"]
