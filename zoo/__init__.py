"""mambazoo: Mamba-family models across modalities on one selective state-space core.

    mambazoo.create_model(name, **overrides) -> nn.Module     a registered model by config name
    mambazoo.list_models() -> list[str]                      every registered name
    mambazoo.describe_model(name) -> str
    mambazoo.register_model(name, description)               decorator for a builder
    mambazoo.from_pretrained(hub_id_or_path, revision=None)  pretrained weights (Hub or folder), see mambazoo.hub
    mambazoo.save_pretrained(model, dir)                     config.json + model.safetensors (transformers-readable)

The repository's folders install into this one namespace: ``zoo/`` is ``mambazoo`` itself (the registry,
one sub-package per variant, ``mambazoo.tasks``, ``mambazoo.data``, the CLI), ``core/`` is ``mambazoo.core``
(the model math in plain PyTorch) and ``kernels/`` is ``mambazoo.kernels`` (Triton kernels).

Names load on first use, so ``import mambazoo`` and the ``mambazoo`` command do not pay for torch, timm
or Lightning until they are needed. The timm architectures ``vim_{tiny,small,base}_patch16_224`` are
registered when timm is imported (or at once, if it already is), so ``import mambazoo`` then
``timm.create_model("vim_tiny_patch16_224")`` works.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

__version__ = "0.2.0"

# public name -> the module that defines it
_LAZY = {
    "create_model": "mambazoo.registry",
    "describe_model": "mambazoo.registry",
    "list_models": "mambazoo.registry",
    "register_model": "mambazoo.registry",
    "from_pretrained": "mambazoo.hub",
    "save_pretrained": "mambazoo.hub",
    "load_tokenizer": "mambazoo.hub",
}

__all__ = ["create_model", "describe_model", "list_models", "register_model", "from_pretrained", "save_pretrained",
           "load_tokenizer", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mambazoo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _RegisterWithTimm:
    """A meta-path finder that lets timm load as usual, then imports mambazoo.vim (which registers the
    Vim architectures with timm's registry). Removes itself after the first use."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(cls)
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            importlib.import_module("mambazoo.vim")

        spec.loader.exec_module = exec_module
        return spec


if "timm" in sys.modules:
    importlib.import_module("mambazoo.vim")
elif _RegisterWithTimm not in sys.meta_path:
    sys.meta_path.insert(0, _RegisterWithTimm)
