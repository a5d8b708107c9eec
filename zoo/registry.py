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


def _load_variants() -> None:
    global _loaded
    if _loaded:
        return
    for pkg in VARIANT_PACKAGES:
        if importlib.util.find_spec(pkg) is not None:
            importlib.import_module(pkg)
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
