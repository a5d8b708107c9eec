"""Compatibility shim for TRITON_INTERPRET=1 (CPU tests) with NumPy >= 2.3.

Triton 3.6's interpreter turns a scalar tensor into a Python int with ``int(array)``, which NumPy
2.3+ rejects for the 1-element arrays that hold scalars (so ``range(n)`` over a kernel argument
fails).  We wrap its tensor patching to convert through ``.item()`` instead.  No effect on GPU runs.
"""

from __future__ import annotations

import os


def apply() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_mambazoo", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._mambazoo = True
    interpreter._patch_lang_tensor = patched
