"""Optional dependencies (the package's extras): import one, or say which extra brings it."""

from __future__ import annotations

import importlib
from types import ModuleType

# module -> the extra of `pip install 'mambazoo[EXTRA]'` that installs it
EXTRAS = {"torchaudio": "audio", "matplotlib": "plots", "tensorboard": "tensorboard", "transformers": "hf"}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, purpose: str) -> ModuleType:
    """``importlib.import_module(module)``, or MissingExtraError naming ``pip install 'mambazoo[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if e.name != module.split(".")[0]:
            raise  # the module exists but fails inside: not a missing extra
        extra = EXTRAS.get(module.split(".")[0], "all")
        raise MissingExtraError(f"{purpose} needs {module}, which is not installed: "
                                f"pip install 'mambazoo[{extra}]'") from e
