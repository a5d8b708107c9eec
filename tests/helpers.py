"""Shared test helpers (importable as ``helpers``: tests/conftest.py's folder is on sys.path).

    rel(got, want)                 relative error ||got - want|| / ||want|| in float64
    assert_close(got, want, tol)   tensors, or dicts of tensors by name: same shape and dtype, finite, rel < tol
    set_backend(monkeypatch, **choices)   mambazoo.core.backend's choices for the rest of the test
    load_script(name)              scripts/NAME.py imported as a module (the benchmark and data scripts)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib

import torch


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64 (want = 0 counts as a norm of 1e-30)."""
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def assert_close(got, want, tol: float) -> None:
    """got and want tensors, or dicts of tensors (each key of want checked in got): equal shapes and dtypes, got
    finite, relative error (rel) below tol; the message names the key and the error."""
    if isinstance(want, torch.Tensor):
        got, want = {"tensor": got}, {"tensor": want}
    for k in want:
        assert got[k] is not None, k
        assert got[k].shape == want[k].shape, (k, got[k].shape, want[k].shape)
        assert got[k].dtype == want[k].dtype, (k, got[k].dtype, want[k].dtype)
        assert torch.isfinite(got[k]).all(), k
        err = rel(got[k], want[k])
        assert err < tol, f"{k}: relative error {err:.2e} >= {tol:.0e}"


def set_backend(monkeypatch, **choices) -> None:
    """The backend's current choices with ``choices`` applied until the test ends (monkeypatch restores them), as
    ``with mambazoo.core.backend.backend(**choices)`` would for a block; validated the same way."""
    from mambazoo.core import backend

    monkeypatch.setattr(backend, "_current", dataclasses.replace(backend.current(), **choices))


SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    """scripts/<name>.py imported as a module named name (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
