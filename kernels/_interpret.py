"""Compatibility shims for TRITON_INTERPRET=1 (CPU tests); no effect on GPU runs.

- NumPy >= 2.3: Triton 3.6's interpreter turns a scalar tensor into a Python int with ``int(array)``, which NumPy
  2.3+ rejects for the 1-element arrays that hold scalars (so ``range(n)`` over a kernel argument fails).  We wrap
  its tensor patching to convert through ``.item()`` instead.
- bf16 tl.dot: the interpreter holds bf16 as raw uint16 bits and multiplies those bits as integers; we widen
  bf16 operands to fp32 first (exact: the products then sum in fp32, as the GPU's MMA accumulates).
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
    _patch_bf16_dot(interpreter)


def _patch_bf16_dot(interpreter) -> None:
    import numpy as np
    import triton.language as tl

    builder = interpreter.InterpreterBuilder
    original = builder.create_dot

    def widen(h):
        if h.dtype.scalar == tl.bfloat16:
            bits = h.data.astype(np.uint32) << np.uint32(16)
            return interpreter.TensorHandle(bits.view(np.float32), tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
