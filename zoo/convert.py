"""Weights users already have -> CausalLM, from local files only (no hub).

Formats (detected from the keys):
- mamba_ssm's MambaLMHeadModel: backbone.embedding, backbone.layers.i.{norm, mixer.*}, backbone.norm_f, lm_head;
- transformers' MambaForCausalLM: the same with backbone.embeddings;
- transformers' JambaForCausalLM: model.embed_tokens, model.layers.i.{input_layernorm, pre_ff_layernorm,
  mamba.*, self_attn.{q,k,v,o}_proj, feed_forward.*}, model.final_layernorm, lm_head; experts either packed
  (experts.gate_up_proj (E, 2I, H), experts.down_proj (E, H, I)) or one module per expert
  (experts.j.{gate,up,down}_proj).
A source is a .safetensors or .bin file, or a folder with model.safetensors / pytorch_model.bin (or
their sharded *.index.json) and optionally config.json.

Our own checkpoints: ``save_checkpoint`` writes safetensors (config in the metadata) atomically;
``load_checkpoint`` reads them back.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch

from mambazoo.lm import CausalLM, LMConfig
from mambazoo.weights_io import json_or_none, require_safetensors, umask_mode

_MIXER = {"conv1d.weight": "fwd.conv1d.weight", "conv1d.bias": "fwd.conv1d.bias", "x_proj.weight": "fwd.x_proj.weight",
          "dt_proj.weight": "fwd.dt_proj.weight", "dt_proj.bias": "fwd.dt_proj.bias", "A_log": "fwd.A_log",
          "D": "fwd.D", "in_proj.weight": "in_proj.weight", "in_proj.bias": "in_proj.bias",
          "out_proj.weight": "out_proj.weight", "out_proj.bias": "out_proj.bias",
          "dt_layernorm.weight": "fwd.dt_norm.weight", "b_layernorm.weight": "fwd.B_norm.weight",
          "c_layernorm.weight": "fwd.C_norm.weight"}


# -- reading files -------------------------------------------------------------------------------
def _read_one(path: Path) -> dict[str, torch.Tensor]:
    """{name: tensor} of one weights file, through the project's safe reader (``mambazoo.weights_io``)."""
    from mambazoo.weights_io import read_state_dict as read_weights

    return read_weights(path)


def read_state_dict(source: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state dict, config.json as a dict or None) from a weights file or a folder."""
    p = Path(source)
    if not p.exists():
        raise ValueError(f"{p}: no such file or folder (weights are read from local files only)")
    if p.is_file():
        return _read_one(p), json_or_none(p.parent / "config.json")
    cfg = json_or_none(p / "config.json")
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (p / name).exists():
            return _read_one(p / name), cfg
        index = p / f"{name}.index.json"
        if index.exists():
            weight_map = (json_or_none(index) or {}).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: expected a shard index with a 'weight_map', found none")
            files = sorted(set(weight_map.values()))
            sd = {}
            for f in files:
                sd.update(_read_one(p / f))
            return sd, cfg
    raise ValueError(f"{p}: expected model.safetensors, pytorch_model.bin or a sharded *.index.json in the folder")


def detect_format(sd: dict, source: str = "state dict") -> str:
    """'mamba_ssm', 'hf_mamba', 'hf_jamba' or 'mambazoo' from the key names (``source`` names the file in errors)."""
    if "backbone.embedding.weight" in sd:
        return "mamba_ssm"
    if "backbone.embeddings.weight" in sd:
        return "hf_mamba"
    if "model.embed_tokens.weight" in sd and any(".mamba." in k for k in sd):
        return "hf_jamba"
    if "embedding.weight" in sd:
        return "mambazoo"
    raise ValueError(f"{source}: expected keys of mamba_ssm (backbone.embedding.*), transformers Mamba "
                     f"(backbone.embeddings.*) or Jamba (model.embed_tokens.*); got e.g. {sorted(sd)[:5]}")


# -- Mamba LM (mamba_ssm and transformers) -------------------------------------------------------
def mamba_config_from_state_dict(sd: dict, config: dict | None = None, **overrides) -> LMConfig:
    """Infer the LMConfig of a pure-Mamba state dict (either naming); ``config`` (config.json) may give
    the true vocabulary size and the norm epsilon."""
    emb = sd.get("backbone.embedding.weight", sd.get("backbone.embeddings.weight"))
    pre = "backbone.layers.0.mixer."
    needed = [pre + k for k in ("in_proj.weight", "A_log", "conv1d.weight", "dt_proj.weight")]
    if emb is None or any(k not in sd for k in needed):
        missing = [k for k in ["backbone.embedding(s).weight"] * (emb is None) + needed if k not in sd]
        raise ValueError(f"state dict: a partial Mamba state dict, missing {missing} (expected a complete "
                         "mamba_ssm / transformers MambaForCausalLM state dict)")
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"backbone\.layers\.(\d+)\.", k))}
    d_model = emb.shape[1]
    d_inner = sd[pre + "in_proj.weight"].shape[0] // 2
    config = config or {}
    vocab = config.get("vocab_size", emb.shape[0])
    c = LMConfig(vocab_size=vocab, d_model=d_model, n_layer=len(layers), d_state=sd[pre + "A_log"].shape[1],
                 d_conv=sd[pre + "conv1d.weight"].shape[-1], expand=d_inner // d_model,
                 dt_rank=sd[pre + "dt_proj.weight"].shape[1], conv_bias=pre + "conv1d.bias" in sd,
                 proj_bias=pre + "in_proj.bias" in sd,
                 norm_eps=config.get("layer_norm_epsilon", config.get("norm_epsilon", 1e-5)),
                 tie_embeddings=config.get("tie_word_embeddings", config.get("tie_embeddings", True)))
    return c.replace(**overrides)


def convert_mamba(sd: dict) -> dict[str, torch.Tensor]:
    """mamba_ssm or transformers Mamba keys -> ours."""
    out = {}
    for k, v in sd.items():
        if k in ("backbone.embedding.weight", "backbone.embeddings.weight"):
            out["embedding.weight"] = v
        elif k == "backbone.norm_f.weight":
            out["norm_f.weight"] = v
        elif k == "lm_head.weight":
            out[k] = v
        elif m := re.match(r"backbone\.layers\.(\d+)\.(norm\.weight|mixer\.(.+))$", k):
            i, rest, mixer_key = m.groups()
            if mixer_key is None:
                out[f"layers.{i}.norm.weight"] = v
            elif mixer_key in _MIXER:
                out[f"layers.{i}.mixer.{_MIXER[mixer_key]}"] = v
            else:
                raise ValueError(f"state dict: unexpected Mamba key {k!r}")
        else:
            raise ValueError(f"state dict: unexpected key {k!r}")
    return out


# -- Jamba (transformers) ------------------------------------------------------------------------
def jamba_config(cfg: dict, **overrides) -> LMConfig:
    """transformers' JambaConfig (config.json as a dict) -> LMConfig."""
    dt_rank = cfg.get("mamba_dt_rank", "auto")
    c = LMConfig(vocab_size=cfg["vocab_size"], d_model=cfg["hidden_size"], n_layer=cfg["num_hidden_layers"],
                 attn_period=cfg.get("attn_layer_period", 8), attn_offset=cfg.get("attn_layer_offset", 4),
                 moe_period=cfg.get("expert_layer_period", 2), moe_offset=cfg.get("expert_layer_offset", 1),
                 d_state=cfg.get("mamba_d_state", 16), d_conv=cfg.get("mamba_d_conv", 4),
                 expand=cfg.get("mamba_expand", 2), dt_rank=dt_rank, conv_bias=cfg.get("mamba_conv_bias", True),
                 proj_bias=cfg.get("mamba_proj_bias", False), inner_norm=True,
                 n_heads=cfg["num_attention_heads"], n_kv_heads=cfg.get("num_key_value_heads"),
                 d_ffn=cfg["intermediate_size"], mlp_kind="swiglu", expert_kind="swiglu",
                 n_experts=cfg.get("num_experts", cfg.get("num_local_experts", 16)),
                 top_k=cfg.get("num_experts_per_tok", 2), capacity_factor=None, renormalize=False,
                 aux_loss_weight=cfg.get("router_aux_loss_coef", 0.001), norm_eps=cfg.get("rms_norm_eps", 1e-6),
                 tie_embeddings=cfg.get("tie_word_embeddings", False), pad_vocab_multiple=1)
    if c.n_experts <= 1:  # no MoE layers at all
        c = c.replace(moe_period=None, ffn="d")
    return c.replace(**overrides)


def convert_jamba(sd: dict) -> dict[str, torch.Tensor]:
    """transformers Jamba keys -> ours (per-expert weights are stacked)."""
    out, per_expert = {}, {}
    for k, v in sd.items():
        if k == "model.embed_tokens.weight":
            out["embedding.weight"] = v
        elif k == "model.final_layernorm.weight":
            out["norm_f.weight"] = v
        elif k == "lm_head.weight":
            out[k] = v
        elif m := re.match(r"model\.layers\.(\d+)\.(.+)$", k):
            i, rest = m.groups()
            L = f"layers.{i}."
            if rest == "input_layernorm.weight":
                out[L + "norm.weight"] = v
            elif rest == "pre_ff_layernorm.weight":
                out[L + "ffn_norm.weight"] = v
            elif rest.startswith("mamba.") and rest[6:] in _MIXER:
                out[L + "mixer." + _MIXER[rest[6:]]] = v
            elif rest.startswith("self_attn."):
                out[L + "mixer." + rest[len("self_attn."):]] = v
            elif rest in ("feed_forward.router.weight", "feed_forward.gate.weight"):
                out[L + "ffn.router.weight"] = v
            elif rest == "feed_forward.experts.gate_up_proj":
                out[L + "ffn.experts.w_in"] = v
            elif rest == "feed_forward.experts.down_proj":
                out[L + "ffn.experts.w_out"] = v
            elif e := re.match(r"feed_forward\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", rest):
                per_expert.setdefault(i, {})[(int(e.group(1)), e.group(2))] = v
            elif re.match(r"feed_forward\.(gate_proj|up_proj|down_proj)\.weight$", rest):
                out[L + "ffn." + rest[len("feed_forward."):]] = v
            else:
                raise ValueError(f"state dict: unexpected Jamba key {k!r}")
        else:
            raise ValueError(f"state dict: unexpected key {k!r}")
    for i, ws in per_expert.items():
        n = 1 + max(j for j, _ in ws)
        out[f"layers.{i}.ffn.experts.w_in"] = torch.stack(
            [torch.cat([ws[(j, "gate_proj")], ws[(j, "up_proj")]], 0) for j in range(n)])
        out[f"layers.{i}.ffn.experts.w_out"] = torch.stack([ws[(j, "down_proj")] for j in range(n)])
    return out


# -- entry points --------------------------------------------------------------------------------
def _pad_vocab(sd: dict, model: CausalLM) -> dict:
    """Zero-pad embedding / head rows up to the model's padded vocabulary."""
    for k in ("embedding.weight", "lm_head.weight"):
        if k in sd and sd[k].shape[0] < model.config.padded_vocab:
            w = sd[k]
            sd[k] = torch.cat([w, w.new_zeros(model.config.padded_vocab - w.shape[0], w.shape[1])])
    return sd


def load_into(model: CausalLM, sd: dict) -> CausalLM:
    """Load a converted state dict strictly (the tied head may be absent)."""
    sd = _pad_vocab(dict(sd), model)
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
        sd["lm_head.weight"] = sd["embedding.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"state dict does not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    return model


def load_pretrained(source: str | os.PathLike, **overrides) -> CausalLM:
    """A CausalLM from local mamba_ssm / transformers Mamba / transformers Jamba / mambazoo weights."""
    sd, cfg = read_state_dict(source)
    if any(k.endswith("layers.0.mixer.dt_bias") for k in sd):  # Mamba-2 (Mamba-1 keeps its bias in dt_proj)
        from mambazoo.mamba2.convert import load_mamba2

        return load_mamba2(source, **overrides)
    fmt = detect_format(sd, str(source))
    if fmt == "mambazoo":
        return load_checkpoint(source)
    if fmt == "hf_jamba":
        if cfg is None:
            raise ValueError(f"{source}: a Jamba checkpoint needs its config.json beside the weights")
        config = jamba_config(cfg, **overrides)
        converted = convert_jamba(sd)
    else:
        config = mamba_config_from_state_dict(sd, cfg, **overrides)
        converted = convert_mamba(sd)
    dtype = next(iter(sd.values())).dtype
    model = CausalLM(config)
    return load_into(model, converted).to(dtype)


def save_checkpoint(model: CausalLM, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write the model as safetensors (config JSON in the metadata); atomic: temp file then rename."""
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight")
    meta = {"format": "mambazoo", "config": json.dumps(model.config.to_dict())}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(sd, tmp, metadata=meta)
        os.chmod(tmp, umask_mode())  # the user's normal permissions, not mkstemp's 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str | os.PathLike, device=None) -> CausalLM:
    """Read a checkpoint written by ``save_checkpoint``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.exists():
        raise ValueError(f"{path}: no such checkpoint")
    require_safetensors(path, "a mambazoo checkpoint (.safetensors written by save_checkpoint)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "mambazoo" or "config" not in meta:
        raise ValueError(f"{path}: not a mambazoo checkpoint (no config in its metadata); "
                         "use load_pretrained for mamba_ssm / transformers weights")
    config = LMConfig.from_dict(json.loads(meta["config"]))
    sd = load_file(str(path), device=str(device or "cpu"))
    model = CausalLM(config)
    return load_into(model, sd).to(next(iter(sd.values())).dtype)
