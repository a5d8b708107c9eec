"""MoE-Mamba (Pióro et al., 2024): Mamba layers interleaved with Switch mixture-of-experts FFNs.

The paper's shape: d_model 512, 8 blocks of [Mamba, Switch MoE], 32 experts of hidden 1536, top-1,
capacity factor 1.0, load-balancing weight 0.01, GPT-2 vocabulary (50257).
"""

from __future__ import annotations

from mambazoo.lm import LMConfig, build_lm
from mambazoo.registry import register_configs

CONFIGS: dict[str, LMConfig] = {
    "moe-mamba": LMConfig(vocab_size=50257, n_layer=8, d_model=512, ffn="e", n_experts=32, d_ffn=1536,
                          top_k=1, capacity_factor=1.0, aux_loss_weight=0.01, expert_kind="gelu"),
    "moe-mamba-tiny": LMConfig(vocab_size=512, n_layer=2, d_model=64, ffn="e", n_experts=4, d_ffn=128,
                               top_k=1, capacity_factor=1.0, aux_loss_weight=0.01, expert_kind="gelu"),
}


DESCRIPTIONS = {name: f"MoE-Mamba, {c.n_layer} x [Mamba, MoE {c.n_experts} experts top-{c.top_k}], d_model "
                      f"{c.d_model}" for name, c in CONFIGS.items()}

register_configs(CONFIGS, DESCRIPTIONS, build_lm)

__all__ = ["CONFIGS", "DESCRIPTIONS"]
