"""Compiled Triton kernels may read a module-level number only if it is a tl.constexpr (the interpreter, which
CI runs, accepts plain ones; the compiler on a GPU refuses them). Checked for every kernel of mambazoo.kernels."""

import importlib
import inspect
import pkgutil

import triton.language as tl

import mambazoo.kernels


def _kernel_modules():
    for info in pkgutil.walk_packages(mambazoo.kernels.__path__, "mambazoo.kernels."):
        yield importlib.import_module(info.name)


def test_kernels_read_only_constexpr_numbers():
    checked, bad = 0, []
    for mod in _kernel_modules():
        for name, obj in vars(mod).items():
            # a @triton.jit kernel (JITFunction, or InterpretedFunction under TRITON_INTERPRET=1) holds .fn
            fn = getattr(obj, "fn", None)
            if not inspect.isfunction(fn) or fn.__module__ != mod.__name__ or type(obj).__module__.split(".")[0] != "triton":
                continue
            checked += 1
            for g in fn.__code__.co_names:
                value = fn.__globals__.get(g)
                if isinstance(value, (int, float)) and not isinstance(value, (bool, tl.constexpr)):
                    bad.append(f"{mod.__name__}.{name} reads {g} = {value!r}")
    assert checked > 10, checked  # the walk found the kernels
    assert not bad, bad
