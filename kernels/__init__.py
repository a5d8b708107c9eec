"""Fused Triton kernels for the selective scan; mambazoo.core.scan holds their reference.

    selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, initial_state=None, seq_idx=None)
    selective_scan_bidirectional_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                                        out=None, dt_weight=None)
    selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False)

The one-direction scan and the decode step call ops registered with torch.library (``torch.ops.mambazoo.scan_fwd`` /
``scan_bwd`` / ``state_update``), so torch.compile traces them without graph breaks; the bidirectional scan, while
compiling or recording a gradient, runs as two of those scans.
"""

if __name__ != "mambazoo.kernels":
    # Python runs from a checkout of the repository, and its kernels/ folder was found as a top-level
    # package `kernels`. It is not one: it installs as mambazoo.kernels. Step aside for an installed
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
                                  f"mambazoo.kernels (pip install -e . then import mambazoo.kernels)", name=__name__)
    sys.modules[__name__] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[__name__])
else:
    from mambazoo.kernels._public import *  # noqa: F401,F403
    from mambazoo.kernels._public import __all__  # noqa: F401
