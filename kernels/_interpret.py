"""Compatibility shims for TRITON_INTERPRET=1 (CPU tests); no effect on GPU runs.

- NumPy >= 2.3: Triton 3.6's interpreter turns a scalar tensor into a Python int with ``int(array)``, which NumPy
  2.3+ rejects for the 1-element arrays that hold scalars (so ``range(n)`` over a kernel argument fails).  We wrap
  its tensor patching to convert through ``.item()`` instead.
- bf16 tl.dot: the interpreter holds bf16 as raw uint16 bits and multiplies those bits as integers; we widen
  bf16 operands to fp32 first (exact: the products then sum in fp32, as the GPU's MMA accumulates).
- fp32 -> bf16 casts: the interpreter truncates the mantissa (and its 'rtne' mode rounds half up without carrying
  into the exponent); the GPU rounds to nearest even. We convert through torch, which rounds as the GPU does.
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

    def index(self):
        return int(self.handle.data.reshape(-1)[0])

    def patched(tensor, *scope):
        original(tensor, *scope)
        if scope:  # Triton >= 3.6 patches through a scope object that it can undo
            scope[0].set_attr(tensor, "__index__", index)
        else:  # Triton 3.5 and older set the attribute directly
            tensor.__index__ = index

    patched._mambazoo = True
    interpreter._patch_lang_tensor = patched
    _patch_bf16_dot(interpreter)
    _patch_bf16_cast(interpreter)


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


def _patch_bf16_cast(interpreter) -> None:
    import numpy as np
    import torch
    import triton.language as tl

    builder = interpreter.InterpreterBuilder
    cast_impl, fp_to_fp = builder.cast_impl, builder.create_fp_to_fp

    def to_bf16(src):
        bits = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16).view(torch.int16).numpy()
        return interpreter.TensorHandle(bits.view(np.uint16), tl.bfloat16)

    def narrows(src, dst_type) -> bool:
        return src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16

    builder.cast_impl = lambda self, src, dst_type: to_bf16(src) if narrows(src, dst_type) else cast_impl(
        self, src, dst_type)
    # create_fp_trunc and the other casts call self.cast_impl: patched with it
    builder.create_fp_to_fp = lambda self, src, dst_type, rounding_mode: to_bf16(src) if narrows(
        src, dst_type) else fp_to_fp(self, src, dst_type, rounding_mode)
