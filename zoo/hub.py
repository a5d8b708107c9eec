"""Pretrained models from the Hugging Face Hub or a local folder, and back out to transformers' formats.

    model = mambazoo.from_pretrained("state-spaces/mamba-130m-hf")      # a Hub repo id
    model = mambazoo.from_pretrained("mamba-130m")                       # a zoo name with a known repo
    model = mambazoo.from_pretrained("path/to/folder", revision=None)    # a local folder or weights file
    mambazoo.save_pretrained(model, "out/")     # config.json + model.safetensors (transformers-readable)

Downloads go through ``huggingface_hub`` (its cache, ``revision``, ``cache_dir``, ``local_files_only``,
``HF_HUB_OFFLINE=1``). The layout of what was downloaded is recognised from config.json and the keys:

| layout                                   | recognised by                          | becomes          |
|------------------------------------------|----------------------------------------|------------------|
| transformers MambaForCausalLM            | config.json model_type "mamba"         | CausalLM         |
| transformers FalconMambaForCausalLM      | model_type "falcon_mamba"              | CausalLM, weight-free RMSNorm on dt, B, C (inner norms of weight 1) |
| transformers JambaForCausalLM            | model_type "jamba"                     | CausalLM (hybrid) |
| mamba_ssm MambaLMHeadModel               | config.json with d_model / n_layer, pytorch_model.bin | CausalLM |
| official hustvl/Vim checkpoint           | a *.pth whose keys are layers.i.mixer.* | VisionMamba      |
| mambazoo's own export                    | config.json with a "mambazoo" entry    | the model it describes |

Mamba-2 checkpoints (transformers model_type "mamba2", or mamba_ssm with ssm_cfg.layer "Mamba2") load
through mambazoo.mamba2.convert; mamba_ssm folders with ssm_cfg.layer "Mamba3" (Mamba-3 mixers under
mamba-ssm's own parameter names, core.mamba3) load through ``mamba3_lm_from_mamba_ssm``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import torch
from torch import nn

# Zoo config name -> Hub repo. Checked by hand on 2026-12-05 against public references (model cards,
# transformers' docs, scripts that download them): see docs/ or the report of that date.
KNOWN_REPOS: dict[str, str] = {
    "mamba-130m": "state-spaces/mamba-130m-hf",
    "mamba-370m": "state-spaces/mamba-370m-hf",
    "mamba-790m": "state-spaces/mamba-790m-hf",
    "mamba-1.4b": "state-spaces/mamba-1.4b-hf",
    "mamba-2.8b": "state-spaces/mamba-2.8b-hf",
    "jamba-v0.1": "ai21labs/Jamba-v0.1",
    "falcon-mamba-7b": "tiiuae/falcon-mamba-7b",
    "vim-tiny": "hustvl/Vim-tiny-midclstok",
    "vim-small": "hustvl/Vim-small-midclstok",
    "vim-base": "hustvl/Vim-base-midclstok",
}
# The same Mamba weights in mamba_ssm's own layout (config.json + pytorch_model.bin, no tokenizer).
MAMBA_SSM_REPOS: dict[str, str] = {f"mamba-{s}": f"state-spaces/mamba-{s}" for s in ("130m", "370m", "790m", "1.4b", "2.8b")}
# The official Vim repos hold one training checkpoint each.
VIM_FILES: dict[str, str] = {
    "hustvl/Vim-tiny-midclstok": "vim_t_midclstok_76p1acc.pth",
    "hustvl/Vim-small-midclstok": "vim_s_midclstok_80p5acc.pth",
    "hustvl/Vim-base-midclstok": "vim_b_midclstok_81p9acc.pth",
}
# mamba_ssm's language models were trained with the GPT-NeoX tokenizer, which their repos do not carry.
GPT_NEOX_TOKENIZER = "EleutherAI/gpt-neox-20b"

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                    "merges.txt", "tokenizer.model")
_WEIGHT_PATTERNS = (["*.safetensors", "*.safetensors.index.json"], ["*.bin", "*.bin.index.json"], ["*.pth", "*.pt"])


# -- where the files are -------------------------------------------------------------------------------
def _offline(local_files_only: bool | None) -> bool:
    if local_files_only:
        return True
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return bool(env or constants.HF_HUB_OFFLINE)


def repo_id_for(name_or_path: str) -> str | None:
    """The Hub repo id of a zoo name (``KNOWN_REPOS``), the argument itself if it looks like ``org/name``,
    else None."""
    if name_or_path in KNOWN_REPOS:
        return KNOWN_REPOS[name_or_path]
    if re.fullmatch(r"[\w.\-]+/[\w.\-]+", name_or_path):
        return name_or_path
    return None


def _hub_call(fn, repo_id: str, revision, **kwargs):
    """Run a huggingface_hub download, turning its errors into one ValueError naming the repo."""
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    rev = f" at revision {revision!r}" if revision else ""
    try:
        return fn(repo_id=repo_id, revision=revision, **kwargs)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise ValueError(f"{repo_id}{rev}: not in the local Hub cache and downloads are off (offline mode: "
                         "HF_HUB_OFFLINE=1 or local_files_only=True); download it once online, or pass a local "
                         "folder") from e
    except RevisionNotFoundError as e:
        raise ValueError(f"{repo_id}: no revision {revision!r} on the Hub") from e
    except RepositoryNotFoundError as e:
        raise ValueError(f"{repo_id}: no such repository on the Hub (or it is private: log in with `hf auth login`)") from e
    except EntryNotFoundError as e:
        raise ValueError(f"{repo_id}{rev}: the file {kwargs.get('filename')!r} is not in the repository") from e


def download(name_or_path: str | os.PathLike, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
             local_files_only: bool | None = None, token: str | bool | None = None, weights: bool = True) -> Path:
    """A local folder (or file) holding the model: ``name_or_path`` itself when it exists, else the snapshot
    of its Hub repo (a repo id, or a zoo name of ``KNOWN_REPOS``) in the Hub cache, downloaded if needed.

    Only what the loaders read is fetched: the JSON files and tokenizer files, then the first kind of weights
    the repo has (safetensors, else .bin, else .pth); ``weights=False``: the JSON and tokenizer files only."""
    p = Path(name_or_path)
    if p.exists():
        return p
    name = str(name_or_path)
    repo_id = repo_id_for(name)
    if repo_id is None:
        known = ", ".join(sorted(KNOWN_REPOS))
        raise ValueError(f"{name!r}: expected a local folder or file, a Hub repo id (org/name) or a zoo name with a "
                         f"known repo ({known}); no such path either")
    from huggingface_hub import hf_hub_download, snapshot_download

    kw = dict(cache_dir=cache_dir, local_files_only=_offline(local_files_only), token=token)
    if repo_id in VIM_FILES:
        return Path(_hub_call(hf_hub_download, repo_id, revision, filename=VIM_FILES[repo_id], **kw))
    folder = Path(_hub_call(snapshot_download, repo_id, revision, allow_patterns=["*.json", "*.txt", "*.model"], **kw))
    if not weights:
        return folder
    for patterns in _WEIGHT_PATTERNS:
        folder = Path(_hub_call(snapshot_download, repo_id, revision, allow_patterns=patterns, **kw))
        if any(folder.glob(patterns[0])):
            return folder
    raise ValueError(f"{repo_id}: no weights (*.safetensors, *.bin or *.pth) in the repository snapshot {folder}")


# -- which layout ------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: expected a JSON config, could not parse it ({e})") from e


def detect_layout(path: Path) -> str:
    """'mamba', 'falcon_mamba', 'jamba', 'mamba_ssm', 'mamba2', 'mamba3', 'vim_official', 'mambazoo' or 'mambazoo_checkpoint'
    for a folder or weights file (see the module docstring)."""
    folder = path if path.is_dir() else path.parent
    cfg = _read_json(folder / "config.json")
    if cfg is not None:
        if "mambazoo" in cfg:
            return "mambazoo"
        mt = cfg.get("model_type")
        if mt in ("mamba", "falcon_mamba", "jamba"):
            return mt
        if mt == "mamba2":
            return "mamba2"
        if "d_model" in cfg and "n_layer" in cfg:
            layer = (cfg.get("ssm_cfg") or {}).get("layer", "Mamba1")
            return {"Mamba2": "mamba2", "Mamba3": "mamba3"}.get(layer, "mamba_ssm")
        if mt is not None:
            raise ValueError(f"{path}: config.json has model_type {mt!r}; expected mamba, falcon_mamba, jamba, "
                             "a mamba_ssm config (d_model, n_layer) or a mambazoo export")
    files = [path] if path.is_file() else sorted(list(path.glob("*.pth")) + list(path.glob("*.pt")))
    for f in files:
        if f.suffix in (".pth", ".pt"):
            from mambazoo.vim.convert import is_official_vim
            from mambazoo.vim.weights import _load_file

            try:
                content = _load_file(f)
            except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
                first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                raise ValueError(f"{f}: expected a torch checkpoint of tensors (e.g. an official hustvl/Vim .pth); "
                                 f"could not read it with weights_only=True ({first})") from e
            if is_official_vim(content):
                return "vim_official"
    if path.is_file() and path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("format") == "mambazoo":
                return "mambazoo_checkpoint"
    raise ValueError(f"{path}: expected a transformers Mamba / FalconMamba / Jamba folder (config.json with "
                     "model_type), a mamba_ssm folder (config.json with d_model, n_layer + pytorch_model.bin), an "
                     "official hustvl/Vim .pth checkpoint or a mambazoo export; found none of these")


# -- building the model --------------------------------------------------------------------------------
def _lm_from_transformers(path: Path, layout: str, dtype=None, **overrides):
    from mambazoo.convert import (convert_jamba, convert_mamba, jamba_config, load_into,
                                  mamba_config_from_state_dict, read_state_dict)
    from mambazoo.lm import CausalLM

    sd, cfg = read_state_dict(path)
    cfg = cfg or {}
    if layout == "jamba":
        config, converted = jamba_config(cfg, **overrides), convert_jamba(sd)
    else:
        extra = {}
        if layout == "falcon_mamba":  # RMSNorm without weight on dt, B and C: ours with weight 1
            extra["inner_norm"] = True
            n = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"backbone\.layers\.(\d+)\.", k)))
            for i in range(n):
                pre = f"backbone.layers.{i}.mixer."
                r = sd[pre + "dt_proj.weight"].shape[1]
                ds = sd[pre + "A_log"].shape[1]
                dt = sd[pre + "A_log"].dtype
                sd[pre + "dt_layernorm.weight"] = torch.ones(r, dtype=dt)
                sd[pre + "b_layernorm.weight"] = torch.ones(ds, dtype=dt)
                sd[pre + "c_layernorm.weight"] = torch.ones(ds, dtype=dt)
        if layout == "mamba_ssm":
            extra["pad_vocab_multiple"] = cfg.get("pad_vocab_size_multiple", 8)
        config = mamba_config_from_state_dict(sd, cfg, **{**extra, **overrides})
        converted = convert_mamba(sd)
    model = CausalLM(config)
    if layout == "falcon_mamba":
        eps = cfg.get("mixer_rms_eps", 1e-6)
        for block in model.layers:
            for norm in ("dt_norm", "B_norm", "C_norm"):
                getattr(block.mixer.fwd, norm).eps = eps
    load_into(model, converted)
    return model.to(dtype or next(iter(sd.values())).dtype)


def mamba3_config_from_mamba_ssm(sd: dict, cfg: dict, **overrides):
    """The LMConfig of a mamba_ssm MambaLMHeadModel with ssm_cfg.layer "Mamba3": the mixer's shape from layer 0's
    keys (core.mamba3.mamba3_config_from_state_dict), with ssm_cfg's rope_fraction / ngroups / mimo_rank /
    chunk_size where it gives them. Raises ValueError for what the LM does not build (MLP or attention layers,
    LayerNorm, an A floor other than 1e-4)."""
    from mambazoo.core.mamba3 import mamba3_config_from_state_dict
    from mambazoo.lm import LMConfig

    ssm = dict(cfg.get("ssm_cfg") or {})
    if ssm.get("layer") != "Mamba3":
        raise ValueError(f"config.json: expected ssm_cfg.layer 'Mamba3', got {ssm.get('layer')!r}")
    if cfg.get("d_intermediate", 0) or cfg.get("attn_layer_idx"):
        raise ValueError(f"config.json: expected a pure Mamba-3 LM (d_intermediate 0, no attn_layer_idx), got "
                         f"d_intermediate={cfg.get('d_intermediate')}, attn_layer_idx={cfg.get('attn_layer_idx')}")
    if not cfg.get("rms_norm", True):
        raise ValueError("config.json: expected rms_norm true (the blocks' RMSNorm), got false")
    if float(ssm.get("A_floor", 1e-4)) != 1e-4:
        raise ValueError(f"ssm_cfg.A_floor: expected the published 1e-4, got {ssm['A_floor']}")
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"backbone\.layers\.(\d+)\.", k))}
    if not layers or "backbone.embedding.weight" not in sd:
        raise ValueError(f"state dict: expected backbone.embedding.weight and backbone.layers.i.mixer.*, got e.g. "
                         f"{sorted(sd)[:5]}")
    m = mamba3_config_from_state_dict(sd, "backbone.layers.0.mixer.")
    for key in ("rope_fraction", "ngroups"):
        if key in ssm:
            m[key] = ssm[key]
    is_mimo = bool(ssm.get("is_mimo", m["is_mimo"]))
    if is_mimo != m["is_mimo"]:
        raise ValueError(f"ssm_cfg.is_mimo: expected {m['is_mimo']} (the weights' mimo_x), got {is_mimo}")
    if not float(m["expand"]).is_integer():
        raise ValueError(f"expand: expected d_inner a multiple of d_model, got {m['expand']}")
    c = LMConfig(vocab_size=cfg.get("vocab_size", sd["backbone.embedding.weight"].shape[0]), d_model=m["d_model"],
                 n_layer=len(layers), mixer="mamba3", d_state=m["d_state"], expand=int(m["expand"]),
                 headdim=m["headdim"], ngroups=m["ngroups"], rope_fraction=float(m["rope_fraction"]),
                 is_mimo=is_mimo, mimo_rank=m["mimo_rank"], outproj_norm=m["is_outproj_norm"],
                 chunk_size=ssm.get("chunk_size", 64), norm_eps=cfg.get("norm_epsilon", 1e-5),
                 tie_embeddings=cfg.get("tie_embeddings", True),
                 pad_vocab_multiple=cfg.get("pad_vocab_size_multiple", 8))
    return c.replace(**overrides)


def mamba3_lm_from_mamba_ssm(source, dtype=None, **overrides):
    """A Mamba-3 CausalLM from a mamba_ssm MambaLMHeadModel folder (config.json with ssm_cfg.layer "Mamba3" +
    pytorch_model.bin or model.safetensors, mamba-ssm's names: backbone.embedding, backbone.layers.i.{norm,
    mixer.*}, backbone.norm_f, lm_head), loaded strictly, in the weights' dtype (or ``dtype``)."""
    from mambazoo.convert import load_into, read_state_dict
    from mambazoo.lm import CausalLM

    sd, cfg = read_state_dict(source)
    config = mamba3_config_from_mamba_ssm(sd, cfg or {}, **overrides)
    ours = {re.sub(r"^backbone\.", "", re.sub(r"^backbone\.embedding\.", "embedding.", k)): v for k, v in sd.items()}
    weights_dtype = next(iter(sd.values())).dtype
    model = load_into(CausalLM(config), ours).to(weights_dtype)
    return model.to(dtype) if dtype is not None else model


def _vim_from_official(path: Path, dtype=None, **overrides):
    """VisionMamba shaped like the official checkpoint (sizes read from its tensors), weights loaded."""
    from mambazoo.vim.convert import convert_official_vim
    from mambazoo.vim.model import VisionMamba
    from mambazoo.vim.weights import _load_file, load_weights

    files = [path] if path.is_file() else sorted(path.glob("*.pth")) + sorted(path.glob("*.pt"))
    f = files[0]
    sd = convert_official_vim(_load_file(f), source=str(f))
    pw = sd["patch_embed.proj.weight"]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    mix = "blocks.0.mixer."
    grid = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
    patch = pw.shape[-1]
    kwargs = dict(img_size=grid * patch, patch_size=patch, in_chans=pw.shape[1], embed_dim=pw.shape[0],
                  depth=depth, d_state=sd[mix + "fwd.A_log"].shape[1], d_conv=sd[mix + "fwd.conv1d.weight"].shape[-1],
                  expand=sd[mix + "in_proj.weight"].shape[0] // 2 // pw.shape[0],
                  num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0)
    kwargs.update(overrides)
    fresh = ("head.weight", "head.bias") if kwargs["num_classes"] != (sd["head.weight"].shape[0] if "head.weight" in sd else 0) else ()
    model = VisionMamba(**kwargs)
    load_weights(model, f, fresh=fresh)
    return model.to(dtype) if dtype is not None else model


def _from_mambazoo_export(path: Path, cfg: dict, dtype=None, **overrides):
    from safetensors.torch import load_file

    from mambazoo.convert import load_into
    from mambazoo.lm import CausalLM, LMConfig

    zoo = cfg["mambazoo"]
    folder = path if path.is_dir() else path.parent
    family = zoo.get("family")
    if family == "lm":
        model = CausalLM(LMConfig.from_dict(zoo["config"]).replace(**overrides))
        if zoo.get("inner_norm_eps") is not None:
            for block in model.layers:
                if hasattr(block.mixer, "fwd") and block.mixer.fwd.inner_norm:
                    for norm in ("dt_norm", "B_norm", "C_norm"):
                        getattr(block.mixer.fwd, norm).eps = zoo["inner_norm_eps"]
        if zoo.get("weights") == "transformers":
            layout = cfg["model_type"]
            sd, _ = _read_weights(folder)
            from mambazoo.convert import convert_jamba, convert_mamba

            if layout == "falcon_mamba":
                for i, block in enumerate(model.layers):
                    pre = f"backbone.layers.{i}.mixer."
                    for ours, theirs in (("dt_norm", "dt_layernorm"), ("B_norm", "b_layernorm"), ("C_norm", "c_layernorm")):
                        sd[pre + theirs + ".weight"] = torch.ones_like(getattr(block.mixer.fwd, ours).weight)
            sd = convert_jamba(sd) if layout == "jamba" else convert_mamba(sd)
        else:
            sd = load_file(str(folder / "model.safetensors"))
        load_into(model, sd)
        return model.to(dtype or next(iter(sd.values())).dtype)
    if family in ("vim", "aum"):
        if family == "vim":
            from mambazoo.vim.model import VisionMamba as cls
        else:
            from mambazoo.audio.model import AudioMamba as cls
        from mambazoo.vim.weights import load_weights

        model = cls(**{**zoo["config"], **overrides})
        head = ("head.weight", "head.bias") if family == "vim" else ("backbone.head.weight", "backbone.head.bias")
        load_weights(model, folder / "model.safetensors", fresh=head)  # a head of another size stays fresh
        return model.to(dtype) if dtype is not None else model
    raise ValueError(f"{path}: config.json's mambazoo entry names family {family!r}; expected lm, vim or aum")


def _read_weights(folder: Path):
    from mambazoo.convert import read_state_dict

    return read_state_dict(folder)


def load_tokenizer(name_or_path: str | os.PathLike, revision: str | None = None,
                   cache_dir: str | os.PathLike | None = None, local_files_only: bool | None = None):
    """The tokenizer that goes with a model: transformers' AutoTokenizer on the folder / repo when it holds
    tokenizer files (the ``tokenizers`` package's Tokenizer from tokenizer.json when transformers is not
    installed), GPT-NeoX's for mamba_ssm repos, the byte tokenizer for 256-symbol models; else None."""
    folder = download(name_or_path, revision, cache_dir, local_files_only, weights=False)
    folder = folder if folder.is_dir() else folder.parent
    if any((folder / f).is_file() for f in _TOKENIZER_FILES):
        import importlib.util

        from mambazoo.optional import require

        if importlib.util.find_spec("transformers") is None and (folder / "tokenizer.json").is_file() \
                and importlib.util.find_spec("tokenizers") is not None:
            return FastTokenizer.from_file(folder / "tokenizer.json", _read_json(folder / "config.json"))
        transformers = require("transformers", f"the tokenizer in {folder}")
        return transformers.AutoTokenizer.from_pretrained(str(folder))
    cfg = _read_json(folder / "config.json") or {}
    vocab = cfg.get("vocab_size") or (cfg.get("mambazoo", {}).get("config") or {}).get("vocab_size")
    if vocab == 256:
        from mambazoo.mambabyte.tokenizer import ByteTokenizer

        return ByteTokenizer()
    if detect_layout(folder) == "mamba_ssm":
        return load_tokenizer(GPT_NEOX_TOKENIZER, cache_dir=cache_dir, local_files_only=local_files_only)
    return None


class FastTokenizer:
    """A ``tokenizers.Tokenizer`` with the calls generation uses (encode -> ids, decode, eos_token_id), for
    when transformers is not installed."""

    def __init__(self, tok, eos_token_id=None):
        self.tok, self.eos_token_id = tok, eos_token_id

    @classmethod
    def from_file(cls, path: Path, config: dict | None = None) -> "FastTokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)), (config or {}).get("eos_token_id"))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def from_pretrained(name_or_path: str | os.PathLike, revision: str | None = None, *,
                    cache_dir: str | os.PathLike | None = None, local_files_only: bool | None = None,
                    token: str | bool | None = None, dtype: torch.dtype | None = None,
                    tokenizer: bool = True, **overrides) -> nn.Module:
    """The zoo's model with the weights of a Hub repo, a zoo name of ``KNOWN_REPOS`` or a local folder / file.

    Args:
        name_or_path: ``org/name`` on the Hub, a zoo name (``mamba-130m``, ``vim-tiny``, ...), or a path.
        revision: a branch, tag or commit of the Hub repo (default: main).
        cache_dir, local_files_only, token: passed to huggingface_hub; ``HF_HUB_OFFLINE=1`` also means
            local_files_only.
        dtype: cast the model to this dtype (default: the weights' own).
        tokenizer: language models get ``model.tokenizer`` (see ``load_tokenizer``; None if there is none).
        overrides: fields of the model's config (e.g. ``num_classes=10`` for Vim: a new head).

    Returns a CausalLM (language models, logits (batch, L, vocab)) or a VisionMamba (images (batch, 3, H, W)
    -> logits (batch, num_classes)) in eval mode."""
    path = download(name_or_path, revision, cache_dir, local_files_only, token)
    layout = detect_layout(path)
    if layout in ("mamba", "falcon_mamba", "jamba", "mamba_ssm"):
        model = _lm_from_transformers(path, layout, dtype, **overrides)
    elif layout == "mamba2":  # transformers Mamba2 or mamba_ssm with ssm_cfg.layer Mamba2
        from mambazoo.mamba2.convert import load_mamba2

        model = load_mamba2(path, **overrides)
        model = model.to(dtype) if dtype is not None else model
    elif layout == "mamba3":  # mamba_ssm with ssm_cfg.layer Mamba3
        model = mamba3_lm_from_mamba_ssm(path, dtype, **overrides)
    elif layout == "vim_official":
        model = _vim_from_official(path, dtype, **overrides)
    elif layout == "mambazoo":
        folder = path if path.is_dir() else path.parent
        model = _from_mambazoo_export(path, _read_json(folder / "config.json"), dtype, **overrides)
    else:
        from mambazoo.convert import load_checkpoint

        model = load_checkpoint(path)
        model = model.to(dtype) if dtype is not None else model
    if tokenizer and hasattr(model, "generate"):
        model.tokenizer = load_tokenizer(path, local_files_only=local_files_only, cache_dir=cache_dir)
    return model.eval()


# -- fine-tuning ---------------------------------------------------------------------------------------
def load_pretrained_into(model: nn.Module, name_or_path: str | os.PathLike, revision: str | None = None,
                         **hub_kwargs) -> dict[str, list[str]]:
    """Copy pretrained weights into an already built ``model`` (the task's), for fine-tuning.

    The pretrained model is loaded with ``from_pretrained``; every tensor whose name and shape match is
    copied. A classifier head (``head.*``) or an LM head / embedding of another size keeps its fresh
    initialization (a new head when the class count differs); any other missing or mismatched key raises
    ValueError naming them. Returns ``{'fresh': [...keys left as initialized]}``."""
    src = from_pretrained(name_or_path, revision, tokenizer=False, **hub_kwargs)
    theirs = src.state_dict()
    own = model.state_dict()
    # A Lightning task holds the network under .model; match names with or without that prefix.
    prefix = ""
    if not (set(theirs) & set(own)):
        for p in ("model.", "backbone.", "model.backbone."):
            if set(f"{p}{k}" for k in theirs) & set(own):
                prefix = p
                break
    heads = ("head.weight", "head.bias", "lm_head.weight", "embedding.weight")
    load, fresh, bad = {}, [], []
    for k, v in own.items():
        src_key = k[len(prefix):] if k.startswith(prefix) else None
        if src_key is not None and src_key in theirs and theirs[src_key].shape == v.shape:
            load[k] = theirs[src_key].to(v.dtype)
        elif src_key is not None and (src_key.endswith(heads) or src_key in heads):
            fresh.append(k)
        else:
            got = tuple(theirs[src_key].shape) if src_key in theirs else "absent"
            bad.append(f"{k}: model {tuple(v.shape)}, pretrained {got}")
    if bad:
        raise ValueError(f"{name_or_path}: the pretrained weights do not fit the model ({len(bad)} keys): "
                         + "; ".join(bad[:10]))
    model.load_state_dict(load, strict=False)
    return {"fresh": fresh}


# -- export --------------------------------------------------------------------------------------------
def _mixer_config(model) -> dict:
    """The VisionMamba arguments that say which mixer its blocks hold and how it is shaped."""
    m, kind = model.blocks[0].mixer, getattr(model, "mixer_kind", "mamba")
    cfg = dict(mixer=kind, d_state=m.d_state, expand=m.d_inner // m.d_model)
    if kind != "mamba3":  # Mamba-3 has no convolution
        cfg["d_conv"] = m.d_conv
    if kind != "mamba":
        cfg["headdim"] = m.headdim
    if kind == "mamba3":
        cfg.update(rope_fraction=m.rope_fraction, is_mimo=m.is_mimo, mimo_rank=m.mimo_rank)
    return cfg


def _vim_config(model) -> dict:
    pe = model.patch_embed
    return dict(img_size=list(pe.img_size), patch_size=list(pe.patch_size), stride=list(pe.stride),
                in_chans=pe.in_chans, num_classes=model.num_classes, embed_dim=model.embed_dim,
                depth=len(model.blocks), **_mixer_config(model), global_pool=model.global_pool,
                norm_eps=model.norm.eps, dynamic_img_size=model.dynamic_img_size)


def _aum_config(model) -> dict:
    """AudioMamba's constructor arguments, read back from its front end and backbone."""
    fe, bb = model.frontend, model.backbone
    vim = _vim_config(bb)
    return dict(num_classes=model.num_classes, sample_rate=fe.sample_rate, n_mels=fe.n_mels, frames=fe.frames,
                n_fft=fe.mel.n_fft, win_length=fe.mel.win_length, hop_length=fe.hop_length,
                freq_mask=fe.freq_masking.mask_param if fe.freq_masking is not None else 0,
                time_mask=fe.time_masking.mask_param if fe.time_masking is not None else 0,
                patch_size=vim["patch_size"], stride=vim["stride"], embed_dim=vim["embed_dim"], depth=vim["depth"],
                global_pool=vim["global_pool"],
                **{k: v for k, v in _mixer_config(bb).items() if k not in ("d_conv", "expand")})


def _hf_layout(model) -> str | None:
    """'mamba', 'falcon_mamba', 'jamba' when transformers has a class for this CausalLM, else None."""
    c = model.config
    mixers, ffns = c.layer_layout(), c.ffn_layout()
    if set(mixers) == {"M"} and set(ffns) == {"none"} and c.selective:
        if not c.inner_norm:
            return "mamba"
        ones = all(torch.all(getattr(b.mixer.fwd, n).weight == 1) for b in model.layers
                   for n in ("dt_norm", "B_norm", "C_norm"))
        return "falcon_mamba" if ones else None
    jamba_like = (c.layout is None and c.ffn is None and c.attn_period and c.inner_norm and not c.rope
                  and c.window is None and c.selective and c.mlp_kind == "swiglu" and c.expert_kind == "swiglu"
                  and c.capacity_factor is None and not c.renormalize and c.d_expert in (None, c.d_ffn)
                  and c.d_ffn > 0 and "none" not in ffns)
    return "jamba" if jamba_like else None


def _to_hf_mamba(sd: dict) -> dict:
    from mambazoo.convert import _MIXER

    back = {v: k for k, v in _MIXER.items()}
    out = {}
    for k, v in sd.items():
        if k == "embedding.weight":
            out["backbone.embeddings.weight"] = v
        elif k == "norm_f.weight":
            out["backbone.norm_f.weight"] = v
        elif k == "lm_head.weight":
            out[k] = v
        elif m := re.match(r"layers\.(\d+)\.(norm\.weight|mixer\.(.+))$", k):
            i, _, mk = m.groups()
            if mk is None:
                out[f"backbone.layers.{i}.norm.weight"] = v
            elif mk in ("fwd.dt_norm.weight", "fwd.B_norm.weight", "fwd.C_norm.weight"):
                continue  # falcon_mamba: weight-free norms
            else:
                out[f"backbone.layers.{i}.mixer.{back[mk]}"] = v
        else:
            raise ValueError(f"save_pretrained: no transformers name for {k!r}")
    return out


def _to_hf_jamba(sd: dict) -> dict:
    from mambazoo.convert import _MIXER

    back = {v: k for k, v in _MIXER.items()}
    out = {}
    for k, v in sd.items():
        if k == "embedding.weight":
            out["model.embed_tokens.weight"] = v
        elif k == "norm_f.weight":
            out["model.final_layernorm.weight"] = v
        elif k == "lm_head.weight":
            out[k] = v
        elif m := re.match(r"layers\.(\d+)\.(.+)$", k):
            i, rest = m.groups()
            L = f"model.layers.{i}."
            if rest == "norm.weight":
                out[L + "input_layernorm.weight"] = v
            elif rest == "ffn_norm.weight":
                out[L + "pre_ff_layernorm.weight"] = v
            elif rest.startswith("mixer.") and rest[6:] in back:
                out[L + "mamba." + back[rest[6:]]] = v
            elif rest.startswith("mixer.") and rest[6:].split(".")[0] in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out[L + "self_attn." + rest[6:]] = v
            elif rest == "ffn.router.weight":
                out[L + "feed_forward.router.weight"] = v
            elif rest == "ffn.experts.w_in":  # (E, 2I, H): gate rows then up rows, one module per expert
                half = v.shape[1] // 2
                for j in range(v.shape[0]):
                    out[L + f"feed_forward.experts.{j}.gate_proj.weight"] = v[j, :half]
                    out[L + f"feed_forward.experts.{j}.up_proj.weight"] = v[j, half:]
            elif rest == "ffn.experts.w_out":
                for j in range(v.shape[0]):
                    out[L + f"feed_forward.experts.{j}.down_proj.weight"] = v[j]
            elif re.match(r"ffn\.(gate_proj|up_proj|down_proj)\.weight$", rest):
                out[L + "feed_forward." + rest[4:]] = v
            else:
                raise ValueError(f"save_pretrained: no transformers Jamba name for {k!r}")
        else:
            raise ValueError(f"save_pretrained: no transformers Jamba name for {k!r}")
    return out


def _hf_config(model, layout: str) -> dict:
    c = model.config
    m0 = next(b.mixer for b in model.layers if hasattr(b.mixer, "fwd"))
    common = dict(vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layer,
                  tie_word_embeddings=c.tie_embeddings, torch_dtype=str(model.embedding.weight.dtype).split(".")[-1])
    if layout in ("mamba", "falcon_mamba"):
        cfg = dict(model_type=layout, architectures=["MambaForCausalLM" if layout == "mamba" else "FalconMambaForCausalLM"],
                   state_size=c.d_state, expand=c.expand, conv_kernel=c.d_conv, use_bias=c.proj_bias,
                   use_conv_bias=c.conv_bias, time_step_rank=m0.dt_rank, intermediate_size=m0.d_inner,
                   layer_norm_epsilon=c.norm_eps, hidden_act="silu", residual_in_fp32=True, **common)
        if layout == "falcon_mamba":
            cfg["mixer_rms_eps"] = m0.fwd.dt_norm.eps
        return cfg
    moe = c.moe_period is not None
    return dict(model_type="jamba", architectures=["JambaForCausalLM"], intermediate_size=c.d_ffn,
                num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads or c.n_heads,
                attn_layer_period=c.attn_period, attn_layer_offset=c.attn_offset,
                expert_layer_period=c.moe_period if moe else 1, expert_layer_offset=c.moe_offset if moe else 0,
                num_experts=c.n_experts if moe else 1, num_experts_per_tok=c.top_k if moe else 1,
                router_aux_loss_coef=c.aux_loss_weight, mamba_d_state=c.d_state, mamba_d_conv=c.d_conv,
                mamba_expand=c.expand, mamba_dt_rank=m0.dt_rank, mamba_conv_bias=c.conv_bias,
                mamba_proj_bias=c.proj_bias, rms_norm_eps=c.norm_eps, hidden_act="silu", use_mamba_kernels=False,
                **common)


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, tokenizer=None) -> Path:
    """Write config.json + model.safetensors to ``save_directory`` (created).

    A CausalLM that transformers can represent (pure Mamba, FalconMamba, Jamba-shaped hybrids) is written in
    transformers' layout, so ``MambaForCausalLM`` / ``FalconMambaForCausalLM`` / ``JambaForCausalLM``
    ``.from_pretrained(dir)`` load it with the same logits; config.json also carries the zoo's own config
    (under "mambazoo") so that ``mambazoo.from_pretrained(dir)`` rebuilds it exactly. Other models (MoE-Mamba,
    Vim, AuM) are written with the zoo's names and their constructor arguments. A tokenizer with ``save_pretrained`` is saved beside it."""
    from safetensors.torch import save_file

    from mambazoo.lm import CausalLM

    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if isinstance(model, CausalLM):
        c = model.config
        if c.tie_embeddings:
            sd.pop("lm_head.weight", None)
        layout = _hf_layout(model)
        zoo = {"family": "lm", "config": c.to_dict()}
        if layout is None:
            cfg = {"model_type": "mambazoo", "mambazoo": zoo}
        else:
            for k in ("embedding.weight", "lm_head.weight"):  # transformers' vocabulary has no padding rows
                if k in sd:
                    sd[k] = sd[k][: c.vocab_size].contiguous()
            zoo["weights"] = "transformers"
            if layout == "falcon_mamba":
                zoo["inner_norm_eps"] = model.layers[0].mixer.fwd.dt_norm.eps
            cfg = {**_hf_config(model, layout), "mambazoo": zoo}
            sd = _to_hf_jamba(sd) if layout == "jamba" else _to_hf_mamba(sd)
    else:
        from mambazoo.audio.model import AudioMamba
        from mambazoo.vim.model import VisionMamba

        if isinstance(model, VisionMamba):
            zoo = {"family": "vim", "config": _vim_config(model)}
        elif isinstance(model, AudioMamba):
            zoo = {"family": "aum", "config": _aum_config(model)}
        else:
            raise ValueError(f"save_pretrained: expected a mambazoo CausalLM or VisionMamba, got {type(model).__name__}")
        cfg = {"model_type": "mambazoo", "mambazoo": zoo}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is not None and hasattr(tok, "save_pretrained"):
        tok.save_pretrained(str(out))
    return out

