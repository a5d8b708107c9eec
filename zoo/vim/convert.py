"""The official Vision Mamba checkpoints (hustvl/Vim, ``models_mamba.VisionMamba``) -> our VisionMamba.

The released files (vim_{t,s,b}_midclstok_*.pth and the fine-tuned vim_{t,s}_midclstok_ft_*.pth) are
DeiT-style training checkpoints: ``{'model': state_dict, 'model_ema': ..., 'optimizer': ..., 'args':
argparse.Namespace, ...}``. Their model is the bidirectional "v2" Mamba with a middle class token, which is
ours; only names and the order of the position-embedding rows differ:

    official                                   ours
    patch_embed.proj.{weight,bias}             patch_embed.proj.{weight,bias}
    cls_token (1, 1, D)                        cls_token
    pos_embed (1, 1+M, D), sequence order:     pos_embed (1, 1+M, D), timm order:
      the class token's row at M // 2            the class token's row first
    layers.i.norm.weight                       blocks.i.norm.weight
    layers.i.mixer.in_proj.weight              blocks.i.mixer.in_proj.weight
    layers.i.mixer.{conv1d,x_proj,dt_proj}.*   blocks.i.mixer.fwd.{conv1d,x_proj,dt_proj}.*
    layers.i.mixer.{A_log,D}                   blocks.i.mixer.fwd.{A_log,D}
    layers.i.mixer.{conv1d_b,x_proj_b,dt_proj_b}.*   blocks.i.mixer.bwd.{conv1d,x_proj,dt_proj}.*
    layers.i.mixer.{A_b_log,D_b}               blocks.i.mixer.bwd.{A_log,D}
    layers.i.mixer.out_proj.weight             blocks.i.mixer.out_proj.weight
    norm_f.weight                              norm.weight
    head.{weight,bias}                         head.{weight,bias}

(M = number of patches. The official model inserts the class token at index M // 2 and then adds
``pos_embed`` to the whole sequence; we add the patch rows to the patches and row 0 to the class token,
then insert it at M // 2: the same sums.) Variants the released weights do not use (layer scale
``gamma``, two class tokens, RoPE, LayerNorm instead of RMSNorm, biased projections, "v1" bimamba)
are refused with ValueError rather than loaded half-right.
"""

from __future__ import annotations

import re

import torch

# official mixer parameter (under layers.i.mixer.) -> ours (under blocks.i.mixer.)
MIXER_KEYS = {
    "in_proj.weight": "in_proj.weight",
    "conv1d.weight": "fwd.conv1d.weight",
    "conv1d.bias": "fwd.conv1d.bias",
    "x_proj.weight": "fwd.x_proj.weight",
    "dt_proj.weight": "fwd.dt_proj.weight",
    "dt_proj.bias": "fwd.dt_proj.bias",
    "A_log": "fwd.A_log",
    "D": "fwd.D",
    "conv1d_b.weight": "bwd.conv1d.weight",
    "conv1d_b.bias": "bwd.conv1d.bias",
    "x_proj_b.weight": "bwd.x_proj.weight",
    "dt_proj_b.weight": "bwd.dt_proj.weight",
    "dt_proj_b.bias": "bwd.dt_proj.bias",
    "A_b_log": "bwd.A_log",
    "D_b": "bwd.D",
    "out_proj.weight": "out_proj.weight",
}
# official top-level parameter -> ours (pos_embed is also reordered)
TOP_KEYS = {
    "patch_embed.proj.weight": "patch_embed.proj.weight",
    "patch_embed.proj.bias": "patch_embed.proj.bias",
    "cls_token": "cls_token",
    "pos_embed": "pos_embed",
    "norm_f.weight": "norm.weight",
    "head.weight": "head.weight",
    "head.bias": "head.bias",
}
_OPTIONAL = ("head.weight", "head.bias")  # absent when the model was built with num_classes=0
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")

# why a key we do not map is there: the official options our VisionMamba does not have
_UNSUPPORTED = (
    (re.compile(r"layers\.\d+\.mixer\.gamma$"), "layer scale (init_layer_scale)"),
    (re.compile(r"cls_token_(head|tail)$"), "two class tokens (use_double_cls_token)"),
    (re.compile(r"rope\."), "rotary position embedding (if_rope)"),
    (re.compile(r"(norm_f|layers\.\d+\.norm)\.bias$"), "LayerNorm instead of RMSNorm (rms_norm=False)"),
    (re.compile(r"layers\.\d+\.mixer\.(in_proj|out_proj)\.bias$"), "biased in/out projections (bias=True)"),
)


def _strip_module_prefix(sd: dict) -> dict:
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _looks_official(keys) -> bool:
    return any(k == "norm_f.weight" or (k.startswith("layers.") and ".mixer." in k) for k in keys)


def official_state_dict(checkpoint: dict, use_ema: bool = False, source: str = "the checkpoint") -> dict:
    """The official model's own state dict out of a checkpoint: its 'model' entry (or 'model_ema'
    with ``use_ema``), or the checkpoint itself when it is already a flat state dict."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{source}: expected a checkpoint dict, got {type(checkpoint).__name__}")
    key = "model_ema" if use_ema else "model"
    if isinstance(checkpoint.get(key), dict):
        sd = checkpoint[key]
    elif use_ema:
        raise ValueError(f"{source}: no 'model_ema' entry (entries: {sorted(map(str, checkpoint))})")
    elif all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        sd = checkpoint
    else:
        raise ValueError(f"{source}: expected the official Vim state dict or a checkpoint with a 'model' "
                         f"entry, got entries {sorted(map(str, checkpoint))}")
    bad = sorted(k for k, v in sd.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ValueError(f"{source}: expected tensors, got other values at {bad[:10]}")
    return _strip_module_prefix(dict(sd))


def is_official_vim(checkpoint) -> bool:
    """Whether ``checkpoint`` (a state dict, or a checkpoint holding one under 'model' or
    'model_ema') is in the hustvl/Vim layout."""
    if not isinstance(checkpoint, dict):
        return False
    for sd in (checkpoint.get("model"), checkpoint.get("model_ema"), checkpoint):
        if isinstance(sd, dict) and _looks_official(_strip_module_prefix(sd)):
            return True
    return False


def pos_embed_to_ours(pe: torch.Tensor) -> torch.Tensor:
    """(1, 1+M, D) in the official sequence order (class token's row at M // 2) -> ours (its row first)."""
    mid = (pe.shape[1] - 1) // 2
    return torch.cat([pe[:, mid:mid + 1], pe[:, :mid], pe[:, mid + 1:]], dim=1)


def _expected_shapes(sd: dict, depth: int) -> dict[str, tuple]:
    """Shapes every official key must have, from a few anchors (None: any size)."""
    d = sd["norm_f.weight"].shape[0] if "norm_f.weight" in sd and sd["norm_f.weight"].dim() == 1 else None
    m0 = {k[len("layers.0.mixer."):]: v for k, v in sd.items() if k.startswith("layers.0.mixer.")}
    e = m0["D"].shape[0] if "D" in m0 and m0["D"].dim() == 1 else None
    n = m0["A_log"].shape[1] if "A_log" in m0 and m0["A_log"].dim() == 2 else None
    r = m0["dt_proj.weight"].shape[1] if "dt_proj.weight" in m0 and m0["dt_proj.weight"].dim() == 2 else None
    w = m0["conv1d.weight"].shape[-1] if "conv1d.weight" in m0 and m0["conv1d.weight"].dim() == 3 else None
    xp = r + 2 * n if r is not None and n is not None else None
    two_e = 2 * e if e is not None else None
    shapes = {
        "patch_embed.proj.weight": (d, None, None, None), "patch_embed.proj.bias": (d,),
        "cls_token": (1, 1, d), "pos_embed": (1, None, d), "norm_f.weight": (d,),
        "head.weight": (None, d), "head.bias": (None,),
    }
    mixer = {
        "in_proj.weight": (two_e, d), "out_proj.weight": (d, e),
        "conv1d.weight": (e, 1, w), "conv1d.bias": (e,), "x_proj.weight": (xp, e),
        "dt_proj.weight": (e, r), "dt_proj.bias": (e,), "A_log": (e, n), "D": (e,),
    }
    for i in range(depth):
        shapes[f"layers.{i}.norm.weight"] = (d,)
        for name, shape in mixer.items():
            shapes[f"layers.{i}.mixer.{name}"] = shape
            if name not in ("in_proj.weight", "out_proj.weight"):  # shared by both directions
                back = {"A_log": "A_b_log", "D": "D_b"}.get(name, name.replace(".", "_b.", 1))
                shapes[f"layers.{i}.mixer.{back}"] = shape
    return shapes


def _fits(shape: torch.Size, pattern: tuple) -> bool:
    return len(shape) == len(pattern) and all(p is None or s == p for s, p in zip(shape, pattern))


def convert_official_vim(checkpoint: dict, *, use_ema: bool = False, strict: bool = True,
                         source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """hustvl/Vim state dict (or a checkpoint holding it under 'model') -> our VisionMamba's keys.

    Args:
        checkpoint: the official ``VisionMamba.state_dict()``, or a training checkpoint with it under
            'model' (a 'module.' prefix is stripped).
        use_ema: take the checkpoint's 'model_ema' entry instead of 'model'.
        strict: raise ValueError naming every missing, unexpected or wrongly shaped official key
            (and which unsupported option an unexpected key belongs to). Without it, known keys
            are renamed and anything else is passed through unchanged.
        source: how to name the checkpoint in errors (e.g. its path).

    Returns our state dict; the position embedding is moved to our row order (class token first) but
    not resampled: ``mambazoo.vim.weights.load_weights`` / the timm filter resample it to the model's grid.
    """
    sd = official_state_dict(checkpoint, use_ema, source)
    out: dict[str, torch.Tensor] = {}
    unexpected, layers = [], set()
    for key, value in sd.items():
        m = _LAYER.fullmatch(key)
        if m and m[2] == "norm.weight":
            new = f"blocks.{m[1]}.norm.weight"
        elif m and m[2].startswith("mixer.") and m[2][len("mixer."):] in MIXER_KEYS:
            new = f"blocks.{m[1]}.mixer.{MIXER_KEYS[m[2][len('mixer.'):]]}"
        elif key in TOP_KEYS:
            new = TOP_KEYS[key]
        else:
            unexpected.append(key)
            out[key] = value
            continue
        if m:
            layers.add(int(m[1]))
        out[new] = value
    depth = max(layers) + 1 if layers else 0
    shapes = _expected_shapes(sd, depth)
    required = [k for k in shapes if k not in _OPTIONAL]
    if ("head.weight" in sd) != ("head.bias" in sd):
        required += list(_OPTIONAL)
    missing = [k for k in required if k not in sd]
    mismatched = [f"{k}: {tuple(sd[k].shape)}, expected {tuple('?' if p is None else p for p in shapes[k])}"
                  for k in shapes if k in sd and not _fits(sd[k].shape, shapes[k])]
    if "pos_embed" in sd and sd["pos_embed"].dim() == 3 and sd["pos_embed"].shape[1] < 2:
        mismatched.append(f"pos_embed: {tuple(sd['pos_embed'].shape)}, expected (1, 1 + num_patches, D)")
    if strict and (missing or unexpected or mismatched):
        raise ValueError(_report(source, missing, unexpected, mismatched))
    pe = out.get("pos_embed")
    if pe is not None and pe.dim() == 3 and pe.shape[1] >= 2:
        out["pos_embed"] = pos_embed_to_ours(pe)
    return out


def _report(source, missing, unexpected, mismatched) -> str:
    lines = [f"{source}: not a Vision Mamba state dict in the official (hustvl/Vim, bimamba v2, middle "
             "class token) layout that mambazoo.vim can convert"]
    for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
        if keys:
            shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
            lines.append(f"  {name} ({len(keys)}): {shown}")
    reasons = sorted({why for k in unexpected for pattern, why in _UNSUPPORTED if pattern.match(k)})
    if reasons:
        lines.append(f"  the checkpoint uses options mambazoo.vim's VisionMamba does not have: {'; '.join(reasons)}")
    return "\n".join(lines)
