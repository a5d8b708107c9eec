"""Jamba (Lieber et al., 2024): attention layers among Mamba layers (1:7, attention at i % 8 == 4),
MoE every other layer (i % 2 == 1, 16 experts, top-2), grouped-query attention without positional
embedding, RMSNorm on dt, B and C inside the Mamba layers, SwiGLU MLPs and experts, untied head.

The layout is config, so a ratio sweep is an override: ``create_model("jamba-tiny", attn_period=4)``
or ``create_model("jamba-tiny", layout="MAMA")``; ``window=`` makes attention sliding-window.
"""

from __future__ import annotations

from mambazoo.lm import LMConfig, build_lm
from mambazoo.registry import register_configs

_JAMBA = dict(attn_period=8, attn_offset=4, moe_period=2, moe_offset=1, inner_norm=True, top_k=2,
              n_experts=16, aux_loss_weight=0.001, capacity_factor=None, renormalize=False,
              mlp_kind="swiglu", expert_kind="swiglu", conv_bias=True, proj_bias=False, norm_eps=1e-6,
              tie_embeddings=False)

CONFIGS: dict[str, LMConfig] = {
    "jamba-v0.1": LMConfig(vocab_size=65536, n_layer=32, d_model=4096, d_ffn=14336, n_heads=32, n_kv_heads=8,
                           dt_rank=256, **_JAMBA),
    "jamba-tiny": LMConfig(vocab_size=512, n_layer=8, d_model=64, d_ffn=128, n_heads=4, n_kv_heads=2,
                           **{**_JAMBA, "n_experts": 4}),
}


DESCRIPTIONS = {name: f"Jamba hybrid, {c.n_layer} layers (attention 1:{c.attn_period - 1}), d_model {c.d_model}, "
                      f"MoE {c.n_experts} experts top-{c.top_k}" for name, c in CONFIGS.items()}

register_configs(CONFIGS, DESCRIPTIONS, build_lm)

__all__ = ["CONFIGS", "DESCRIPTIONS"]
