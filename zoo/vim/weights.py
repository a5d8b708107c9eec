"""Load a Vim / AuM state dict from a local file (safetensors or a torch checkpoint), adapting the
position embedding to the model's image size and naming every mismatched key on failure.

Files in the official hustvl/Vim layout (the released vim_*_midclstok_*.pth) are recognised by their
keys and converted (``mambazoo.vim.convert``); ``format='official'`` or ``format='zoo'`` forces either."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import nn
from timm.layers import resample_abs_pos_embed

# Wrappers under which training code commonly nests the model's own state dict.
_NESTED = ("state_dict_ema", "model_ema", "state_dict", "model")
_PREFIXES = ("module.", "model.", "_orig_mod.")


FORMATS = ("auto", "zoo", "official")


def _load_file(path: str | Path):
    """What a .safetensors file or a torch checkpoint holds, on the CPU, never executing pickled code
    (an ``argparse.Namespace``, which DeiT-style training scripts save under 'args', is allowed)."""
    from mambazoo.weights_io import load_file

    return load_file(path, allowed_globals=(argparse.Namespace,))


def to_zoo_layout(checkpoint, source: str = "the checkpoint", format: str = "auto",
                  use_ema: bool = False, strict: bool = True) -> dict[str, torch.Tensor]:
    """Our state dict from what a weights file held: the official hustvl/Vim layout is converted
    (its 'model' entry, or 'model_ema' with ``use_ema``; ``strict``: see ``convert_official_vim``),
    ours is unwrapped (``clean_state_dict``)."""
    from mambazoo.vim.convert import convert_official_vim, is_official_vim

    if format not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {format!r}")
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{source}: expected a state dict of tensors (or a checkpoint holding one)")
    if format == "official" or (format == "auto" and is_official_vim(checkpoint)):
        return convert_official_vim(checkpoint, use_ema=use_ema, strict=strict, source=source)
    return clean_state_dict(checkpoint, source)


def read_state_dict(path: str | Path, format: str = "auto", use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a torch checkpoint, with our keys. Our own files may be
    nested (Lightning's 'state_dict', ...; prefixes 'module.', 'model.', '_orig_mod.' are stripped);
    official hustvl/Vim checkpoints are converted (``format``: 'auto' detects them, 'official' /
    'zoo' force either; ``use_ema``: an official checkpoint's 'model_ema' instead of 'model').
    Never downloads."""
    return to_zoo_layout(_load_file(path), str(path), format, use_ema)


def clean_state_dict(sd: dict, source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """Unwrap a checkpoint ('state_dict', 'model', ... entries) and strip a prefix shared by all keys
    ('module.', 'model.', '_orig_mod.')."""
    for key in _NESTED:
        if isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{source}: expected a state dict of tensors (or a checkpoint holding one)")
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _owner_grid(model: nn.Module, key: str):
    """The patch grid of the module that owns the position embedding ``key``, or None."""
    owner = model.get_submodule(key.rsplit(".", 1)[0]) if "." in key else model
    pe = getattr(owner, "patch_embed", None)
    return getattr(pe, "grid_size", None)


def adapt_pos_embed(state_dict: dict, model: nn.Module, src_grid=None) -> dict:
    """Resample every '*pos_embed' of ``state_dict`` whose token count differs from the model's.

    The source grid is ``src_grid`` (gh, gw) if given, else assumed square."""
    own = model.state_dict()
    out = dict(state_dict)
    for key, v in state_dict.items():
        if not key.endswith("pos_embed") or key not in own or v.shape == own[key].shape:
            continue
        grid = _owner_grid(model, key)
        if grid is None or v.dim() != 3 or v.shape[-1] != own[key].shape[-1]:
            continue  # left for the mismatch report
        n = v.shape[1] - 1
        old = tuple(src_grid) if src_grid is not None else (math.isqrt(n),) * 2
        if old[0] * old[1] != n:
            raise ValueError(f"{key}: the file's {n} patch positions do not form the grid {old}; "
                             "pass src_grid=(gh, gw)")
        out[key] = resample_abs_pos_embed(v.float(), list(grid), list(old), num_prefix_tokens=1).to(v.dtype)
    return out


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """timm's ``pretrained_filter_fn``: unwrap the checkpoint (converting the official hustvl/Vim
    layout) and resample its position embedding."""
    return adapt_pos_embed(to_zoo_layout(state_dict), model)


def load_weights(model: nn.Module, path: str | Path, strict: bool = True, src_grid=None,
                 fresh: tuple[str, ...] = (), format: str = "auto",
                 use_ema: bool = False) -> dict[str, list[str]]:
    """Load ``path`` into ``model``; position embeddings are resampled to the model's image size.
    Official hustvl/Vim checkpoints are converted (``format``, ``use_ema``: see ``read_state_dict``).

    With ``strict`` any missing, unexpected or wrongly shaped key raises ValueError listing them
    all, before anything is loaded; keys named in ``fresh`` (e.g. a classifier head of another
    size) may be missing or mismatched and keep their initialization. Without ``strict`` the
    matching tensors are loaded and the lists are returned:
    ``{'missing': [...], 'unexpected': [...], 'mismatched': [...]}``."""
    sd = adapt_pos_embed(to_zoo_layout(_load_file(path), str(path), format, use_ema, strict), model, src_grid)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = sorted(
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(sd) & set(own) if sd[k].shape != own[k].shape
    )
    report = {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}
    problems = {"missing": [k for k in missing if k not in fresh], "unexpected": unexpected,
                "mismatched": [m for m in mismatched if m.split(":")[0] not in fresh]}
    if strict and any(problems.values()):
        lines = [f"{path}: the weights do not fit {type(model).__name__}"]
        for name, keys in problems.items():
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
                lines.append(f"  {name} ({len(keys)}): {shown}")
        lines.append("  (a different num_classes? load with strict=False and keep the new head)")
        raise ValueError("\n".join(lines))
    bad = {m.split(":")[0] for m in mismatched}
    model.load_state_dict({k: v for k, v in sd.items() if k in own and k not in bad}, strict=False)
    return report


def _route_timm_checkpoint_path() -> None:
    """``timm.create_model(name, checkpoint_path=P)`` reads P with timm's own reader (raw tracebacks on a bad file,
    no official-layout conversion, no position-embedding resampling). For the zoo's Vision Mamba models only, P
    goes through ``load_weights`` instead (the project's safe reader, ``mambazoo.weights_io``); every other
    model keeps timm's path. Installed once, when this module is imported (``import mambazoo.vim``)."""
    try:
        import timm.models._factory as factory
    except ImportError:  # a timm without that module: its own reader stays
        return
    original = getattr(factory, "load_checkpoint", None)
    if original is None or getattr(original, "_mambazoo", False):
        return

    def load_checkpoint(model, checkpoint_path, *args, **kwargs):
        from mambazoo.vim.model import VisionMamba

        if not isinstance(model, VisionMamba) or args or kwargs:
            return original(model, checkpoint_path, *args, **kwargs)
        return load_weights(model, checkpoint_path)

    load_checkpoint._mambazoo = True
    factory.load_checkpoint = load_checkpoint


_route_timm_checkpoint_path()
