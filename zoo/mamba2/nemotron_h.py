"""Nemotron-H (NVIDIA's Mamba-2 / attention hybrid, transformers' NemotronHForCausalLM) -> CausalLM.

Why this family: its layers are exactly our pieces. A Mamba-2 layer is mambazoo.core.mamba2.Mamba2 (same
parameter names, gated RMSNorm grouped by n_groups); its attention layers have no positional embedding, like our
Jamba-style Attention; its MLP is up_proj -> relu^2 -> down_proj (``ReLU2MLP`` below). Bamba would also need
partial rotary embeddings (half of each head) in the attention, which core/attention.py does not have.

Nemotron-H stacks single-purpose layers, each ``x + layer(norm(x))`` with its own RMSNorm: M (Mamba-2),
* (attention), - (MLP), E (MoE). A mixer layer followed by an MLP layer is one of our Blocks (mixer, norm;
ffn, ffn_norm), so a pattern converts when every MLP layer follows a mixer layer; MoE layers are not supported.

    model = load_nemotron_h(folder)      # config.json + model.safetensors of NemotronHForCausalLM
"""

from __future__ import annotations

import os
import re

import torch
import torch.nn.functional as F
from torch import nn

from mambazoo.convert import load_into, read_state_dict
from mambazoo.core.norm import RMSNorm
from mambazoo.lm import CausalLM, LMConfig

__all__ = ["NemotronHLM", "ReLU2MLP", "convert_nemotron_h", "load_nemotron_h", "nemotron_h_config"]

_PATTERN = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}


class ReLU2MLP(nn.Module):
    """Nemotron-H's MLP: x (..., d_model) -> down_proj(relu(up_proj(x))^2)."""

    def __init__(self, d_model: int, d_hidden: int, bias: bool = False):
        super().__init__()
        self.up_proj = nn.Linear(d_model, d_hidden, bias=bias)
        self.down_proj = nn.Linear(d_hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.relu(self.up_proj(x)).square())

    def residual_out(self) -> nn.Linear:
        return self.down_proj


class NemotronHLM(CausalLM):
    """CausalLM whose dense FFNs are ``ReLU2MLP`` when config.mlp_kind == 'relu2' (everything else as CausalLM)."""

    def _block(self, i: int, mixer_kind: str, ffn_kind: str):
        c = self.config
        if ffn_kind == "mlp" and c.mlp_kind == "relu2":
            block = super()._block(i, mixer_kind, "none")
            block.ffn_norm = RMSNorm(c.d_model, eps=c.norm_eps)
            block.ffn = ReLU2MLP(c.d_model, c.d_ffn)
            return block
        return super()._block(i, mixer_kind, ffn_kind)


def _layer_types(cfg: dict) -> list[str]:
    types = cfg.get("layers_block_type") or cfg.get("layer_types")
    if types is None and "hybrid_override_pattern" in cfg:
        p = cfg["hybrid_override_pattern"]
        if set(p) - set(_PATTERN):
            raise ValueError(f"hybrid_override_pattern: expected letters M * - E, got {p!r}")
        types = [_PATTERN[ch] for ch in p]
    if not types:
        raise ValueError("config.json: expected layers_block_type (or hybrid_override_pattern) of a Nemotron-H model")
    return list(types)


def _pairs(types: list[str]) -> list[tuple[int, int | None]]:
    """[(mixer layer, following MLP layer or None)]; ValueError for MoE or an MLP layer after no mixer."""
    pairs, k = [], 0
    while k < len(types):
        t = types[k]
        if t == "moe":
            raise ValueError(f"layer {k}: MoE layers of Nemotron-H are not supported (got layer types {types})")
        if t not in ("linear_attention", "full_attention"):
            raise ValueError(f"layer {k}: expected an MLP layer to follow a Mamba-2 or attention layer, got {types}")
        if k + 1 < len(types) and types[k + 1] == "mlp":
            pairs.append((k, k + 1))
            k += 2
        else:
            pairs.append((k, None))
            k += 1
    return pairs


def _f(v) -> float:
    return float(v["__float__"]) if isinstance(v, dict) and "__float__" in v else float(v)


def nemotron_h_config(cfg: dict, **overrides) -> LMConfig:
    """LMConfig (mixer mamba2, layout of M / A, ffn of d / n, mlp_kind relu2) of a Nemotron-H config.json."""
    types = _layer_types(cfg)
    pairs = _pairs(types)
    d = cfg["hidden_size"]
    n_heads, head_dim = cfg.get("num_attention_heads", 32), cfg.get("head_dim", 128)
    if "full_attention" in types and n_heads * head_dim != d:
        raise ValueError(f"head_dim: expected hidden_size / num_attention_heads = {d // n_heads}, got {head_dim}")
    d_inner = cfg.get("mamba_num_heads", 128) * cfg.get("mamba_head_dim", 64)
    if d_inner % d:
        raise ValueError(f"mamba_num_heads * mamba_head_dim: expected a multiple of hidden_size = {d}, got {d_inner}")
    if tuple(_f(v) for v in cfg.get("time_step_limit", (0.0, float("inf")))) != (0.0, float("inf")):
        raise ValueError(f"time_step_limit: expected (0, inf), got {cfg.get('time_step_limit')}")
    if cfg.get("mlp_hidden_act", "relu2") != "relu2" or cfg.get("mamba_hidden_act", "silu") != "silu":
        raise ValueError("mlp_hidden_act / mamba_hidden_act: expected relu2 / silu")
    if cfg.get("attention_bias") or cfg.get("mlp_bias") or cfg.get("sliding_window"):
        raise ValueError("attention_bias / mlp_bias / sliding_window: expected none of them")
    c = LMConfig(
        vocab_size=cfg["vocab_size"], d_model=d, n_layer=len(pairs), mixer="mamba2",
        layout="".join("M" if types[m] == "linear_attention" else "A" for m, _ in pairs),
        ffn="".join("d" if f is not None else "n" for _, f in pairs),
        d_state=cfg.get("ssm_state_size", 128), d_conv=cfg.get("conv_kernel", 4), expand=d_inner // d,
        headdim=cfg.get("mamba_head_dim", 64), ngroups=cfg.get("n_groups", 8), chunk_size=cfg.get("chunk_size", 128),
        conv_bias=cfg.get("use_conv_bias", True), proj_bias=cfg.get("use_bias", cfg.get("mamba_proj_bias", False)),
        n_heads=n_heads, n_kv_heads=cfg.get("num_key_value_heads", n_heads), d_ffn=cfg.get("intermediate_size", 0),
        mlp_kind="relu2", norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=cfg.get("tie_word_embeddings", False), pad_vocab_multiple=1)
    return c.replace(**overrides)


def convert_nemotron_h(sd: dict, cfg: dict) -> dict[str, torch.Tensor]:
    """Nemotron-H keys ({model,backbone}.embeddings, .layers.k.{norm, mixer.*}, .norm_f, lm_head) -> ours."""
    where = {}
    for i, (m, f) in enumerate(_pairs(_layer_types(cfg))):
        where[m] = (i, "norm", "mixer")
        if f is not None:
            where[f] = (i, "ffn_norm", "ffn")
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^(model|backbone)\.", "", k)
        if k == "embeddings.weight":
            out["embedding.weight"] = v
        elif k in ("norm_f.weight", "lm_head.weight"):
            out[k] = v
        elif m := re.match(r"layers\.(\d+)\.(norm\.weight|mixer\.(.+))$", k):
            i, norm, mod = where[int(m[1])]
            out[f"layers.{i}.{norm}.weight" if m[3] is None else f"layers.{i}.{mod}.{m[3]}"] = v
        else:
            raise ValueError(f"state dict: unexpected Nemotron-H key {k!r}")
    return out


def load_nemotron_h(source: str | os.PathLike, **overrides) -> NemotronHLM:
    """A NemotronHLM from local NemotronHForCausalLM weights (a folder with config.json), in their dtype."""
    sd, cfg = read_state_dict(source)
    if cfg is None:
        raise ValueError(f"{source}: a Nemotron-H checkpoint needs its config.json beside the weights")
    config = nemotron_h_config(cfg, **overrides)
    dtype = next(iter(sd.values())).dtype
    return load_into(NemotronHLM(config), convert_nemotron_h(sd, cfg)).to(dtype)
