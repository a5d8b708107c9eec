"""The selective state-space core in plain PyTorch, device-agnostic."""

if __name__ != "mambazoo.core":
    # Python runs from a checkout of the repository, and its core/ folder was found as a top-level
    # package `core`. It is not one: it installs as mambazoo.core. Step aside for an installed
    # distribution of that name (transformers imports HuggingFace's `kernels`), else say so.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _path)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(f"no module named {__name__!r}: the folder {os.path.dirname(__file__)} is "
                                  f"mambazoo.core (pip install -e . then import mambazoo.core)", name=__name__)
    sys.modules[__name__] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[__name__])
else:
    from mambazoo.core._public import *  # noqa: F401,F403
    from mambazoo.core._public import __all__  # noqa: F401
