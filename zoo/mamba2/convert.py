"""Mamba-2 weights users already have -> CausalLM (mixer: mamba2), from local files only.

Formats (detected from the keys; both store the mixer as in_proj, conv1d, dt_bias, A_log, D, norm.weight,
out_proj, the names of mambazoo.core.mamba2.Mamba2):
- transformers' Mamba2ForCausalLM: backbone.embeddings, backbone.layers.i.{norm, mixer.*}, backbone.norm_f,
  lm_head; config.json with hidden_size, state_size, n_groups, head_dim, ...;
- mamba_ssm's MambaLMHeadModel with Mamba2 layers: the same with backbone.embedding; config.json with d_model,
  n_layer, vocab_size, pad_vocab_size_multiple, ssm_cfg {layer: Mamba2, d_state, ngroups, headdim, ...}.
Read with mambazoo.convert.read_state_dict (a .safetensors / .bin file or a folder).
"""

from __future__ import annotations

import os
import re

import torch

from mambazoo.convert import load_into, read_state_dict
from mambazoo.lm import CausalLM, LMConfig

__all__ = ["convert_mamba2", "detect_mamba2_format", "load_mamba2", "mamba2_config_from_state_dict"]


def detect_mamba2_format(sd: dict) -> str:
    """'hf_mamba2' or 'mamba_ssm_mamba2' from the key names; ValueError for anything else."""
    is_mamba2 = "backbone.layers.0.mixer.dt_bias" in sd
    if is_mamba2 and "backbone.embeddings.weight" in sd:
        return "hf_mamba2"
    if is_mamba2 and "backbone.embedding.weight" in sd:
        return "mamba_ssm_mamba2"
    raise ValueError("state dict: expected a Mamba-2 LM (backbone.embedding[s].weight and "
                     f"backbone.layers.0.mixer.dt_bias); got e.g. {sorted(sd)[:5]}")


def _as_float(v) -> float:
    """A number of config.json; transformers writes inf as {"__float__": "Infinity"}."""
    return float(v["__float__"]) if isinstance(v, dict) and "__float__" in v else float(v)


def mamba2_config_from_state_dict(sd: dict, config: dict | None = None, **overrides) -> LMConfig:
    """The LMConfig of a Mamba-2 LM state dict (either naming). Shapes give d_model, n_layer, d_inner, heads,
    d_conv and biases; ``config`` (config.json of either library) gives the vocabulary size, the group count
    (which shapes alone cannot separate from d_state; default 1, as both libraries), chunk size, norm epsilon
    and tying."""
    config = config or {}
    ssm = config.get("ssm_cfg") or {}
    if ssm.get("layer", "Mamba2") != "Mamba2":
        raise ValueError(f"config.json: expected ssm_cfg.layer 'Mamba2', got {ssm.get('layer')!r}")
    emb = sd.get("backbone.embeddings.weight", sd.get("backbone.embedding.weight"))
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"backbone\.layers\.(\d+)\.", k))}
    pre = "backbone.layers.0.mixer."
    d_model, nheads = emb.shape[1], sd[pre + "A_log"].shape[0]
    d_inner = sd[pre + "norm.weight"].shape[0]
    conv_dim = sd[pre + "conv1d.weight"].shape[0]
    ngroups = config.get("n_groups", ssm.get("ngroups", 1))
    d_state = (conv_dim - d_inner) // (2 * ngroups)
    limit = tuple(_as_float(v) for v in config.get("time_step_limit", ssm.get("dt_limit", (0.0, float("inf")))))
    if limit != (0.0, float("inf")):
        raise ValueError(f"config.json: expected the published dt limit (0, inf), got {limit}")
    if sd[pre + "D"].shape[0] != nheads:
        raise ValueError(f"D: expected one value per head ({nheads},), got {tuple(sd[pre + 'D'].shape)}")
    c = LMConfig(vocab_size=config.get("vocab_size", emb.shape[0]), d_model=d_model, n_layer=len(layers),
                 mixer="mamba2", d_state=d_state, d_conv=sd[pre + "conv1d.weight"].shape[-1],
                 expand=d_inner // d_model, headdim=d_inner // nheads, ngroups=ngroups,
                 chunk_size=config.get("chunk_size", ssm.get("chunk_size", 256)),
                 conv_bias=pre + "conv1d.bias" in sd, proj_bias=pre + "in_proj.bias" in sd,
                 norm_eps=config.get("layer_norm_epsilon", config.get("norm_epsilon", 1e-5)),
                 tie_embeddings=config.get("tie_word_embeddings", config.get("tie_embeddings", True)),
                 pad_vocab_multiple=config.get("pad_vocab_size_multiple", 1) if "ssm_cfg" in config else 1)
    if c.expand * d_model != d_inner:
        raise ValueError(f"norm.weight: expected d_inner a multiple of d_model = {d_model}, got {d_inner}")
    return c.replace(**overrides)


def convert_mamba2(sd: dict) -> dict[str, torch.Tensor]:
    """Either naming -> mambazoo's (embedding, layers.i.{norm, mixer.*}, norm_f, lm_head)."""
    out = {}
    for k, v in sd.items():
        k2 = re.sub(r"^backbone\.embeddings?\.", "embedding.", k)
        k2 = re.sub(r"^backbone\.", "", k2)
        out[k2] = v
    return out


def load_mamba2(source: str | os.PathLike, **overrides) -> CausalLM:
    """A Mamba-2 CausalLM from local transformers / mamba_ssm weights (file or folder), in the weights' dtype.
    Logits have the width of config.json's vocab_size (mamba_ssm pads its embedding rows beyond it)."""
    sd, cfg = read_state_dict(source)
    detect_mamba2_format(sd)
    config = mamba2_config_from_state_dict(sd, cfg, **overrides)
    dtype = next(iter(sd.values())).dtype
    return load_into(CausalLM(config), convert_mamba2(sd)).to(dtype)
