"""Model registry: name -> config -> model. Variant packages register their named configs on import."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from functools import partial
from typing import Any, Callable, Mapping

from torch import nn

# Sub-packages that register models; each is imported on first use of the registry.
VARIANT_PACKAGES = ("mambazoo.mamba", "mambazoo.mambabyte", "mambazoo.moe_mamba", "mambazoo.jamba", "mambazoo.vim", "mambazoo.audio",
                    "mambazoo.mamba2")

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_DESCRIPTIONS: dict[str, str] = {}
_loaded = False


def register_model(name: str, description: str = ""):
    """Decorator: ``builder(**overrides) -> nn.Module`` becomes reachable as ``create_model(name)``."""

    def wrap(builder: Callable[..., nn.Module]):
        if name in _BUILDERS and _BUILDERS[name] is not builder:
            raise ValueError(f"model {name!r} is registered twice")
        _BUILDERS[name] = builder
        _DESCRIPTIONS[name] = description or (builder.__doc__ or "").strip().split("\n")[0]
        return builder

    return wrap


def register_configs(configs: Mapping[str, Any], descriptions: Mapping[str, str],
                     build: Callable[..., nn.Module]) -> None:
    """Registers a family's named configs: ``create_model(name, **overrides)`` runs ``build(configs[name],
    **overrides)`` and ``describe_model(name)`` is ``descriptions[name]`` (one line). Every config needs a
    description and every description a config (ValueError naming the first that has none)."""
    unmatched = sorted(set(configs) ^ set(descriptions))
    if unmatched:
        side = "description" if unmatched[0] in configs else "config"
        raise ValueError(f"register_configs: {unmatched[0]!r} has no {side}")
    for name, config in configs.items():
        register_model(name, descriptions[name])(partial(build, config))


# Mamba-3 LMs (Lahoti et al., 2026) at the Mamba-2 LM shapes (n_layer, d_model), as the paper compares them;
# the published mixer defaults (d_state 128, headdim 64, expand 2, rope_fraction 0.5, chunk 64); no weights exist.
MAMBA3_SHAPES = {
    "mamba3-130m": (24, 768),
    "mamba3-370m": (48, 1024),
    "mamba3-780m": (48, 1536),
    "mamba3-1.3b": (48, 2048),
    "mamba3-2.7b": (64, 2560),
}


def mamba3_configs() -> dict:
    """name -> LMConfig of the named Mamba-3 LMs: the MAMBA3_SHAPES (SISO, and ``-mimo`` with rank 4) and the
    CPU-trainable ``mamba3-tiny`` (2 layers x d_model 64, 8 heads of 16, d_state 16, chunks of 32 tokens)."""
    from mambazoo.lm import LMConfig

    base = LMConfig(vocab_size=50277, mixer="mamba3", d_state=128, expand=2, headdim=64, ngroups=1,
                    chunk_size=64, rope_fraction=0.5, pad_vocab_multiple=16, tie_embeddings=True)
    out = {}
    for name, (n, d) in MAMBA3_SHAPES.items():
        out[name] = base.replace(n_layer=n, d_model=d)
        out[name + "-mimo"] = base.replace(n_layer=n, d_model=d, is_mimo=True, mimo_rank=4)
    out["mamba3-tiny"] = base.replace(n_layer=2, d_model=64, vocab_size=512, d_state=16, headdim=16, chunk_size=32,
                                      pad_vocab_multiple=8)
    return out


def _register_mamba3() -> None:
    from mambazoo.lm import build_lm

    configs = mamba3_configs()
    descriptions = {name: f"Mamba-3 LM{' (MIMO rank ' + str(c.mimo_rank) + ')' if c.is_mimo else ''}, "
                          f"{c.n_layer} layers x d_model {c.d_model}" for name, c in configs.items()}
    register_configs(configs, descriptions, build_lm)


def _load_variants() -> None:
    global _loaded
    if _loaded:
        return
    for pkg in VARIANT_PACKAGES:
        if importlib.util.find_spec(pkg) is not None:
            importlib.import_module(pkg)
    _register_mamba3()
    _loaded = True


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    _load_variants()
    return sorted(_BUILDERS)


def describe_model(name: str) -> str:
    """One-line description of a registered model."""
    _check_name(name)
    return _DESCRIPTIONS[name]


def _check_name(name: str) -> None:
    if not isinstance(name, str):
        raise ValueError(f"model name: expected a registered name (a str, see mambazoo.list_models()), "
                         f"got {type(name).__name__} {name!r}")
    _load_variants()
    if name not in _BUILDERS:
        close = difflib.get_close_matches(name, list(_BUILDERS), n=5, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(_BUILDERS))}"
        raise ValueError(f"unknown model {name!r}{hint}")


def create_model(name: str, pretrained: bool = False, **overrides) -> nn.Module:
    """Build a registered model; keyword overrides replace fields of its config.

    ``pretrained=True`` loads the weights of the name's Hub repo (``mambazoo.hub.KNOWN_REPOS``) through
    ``mambazoo.from_pretrained``; the overrides then apply to the pretrained config (e.g. ``num_classes``).
    Works under ``with torch.device("meta")``: the largest configs can be inspected without memory."""
    _check_name(name)
    if pretrained:
        from mambazoo.hub import KNOWN_REPOS, from_pretrained

        if name not in KNOWN_REPOS:
            raise ValueError(f"create_model({name!r}, pretrained=True): no pretrained weights are known for this "
                             f"name; known: {', '.join(sorted(k for k in KNOWN_REPOS if k in _BUILDERS))}")
        return from_pretrained(name, **overrides)
    return _BUILDERS[name](**overrides)
