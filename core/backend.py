"""Which implementation runs each op: one frozen description of the choices, read from the environment once.

    current() -> Backend                   the choices in force
    with backend(scan="ref"): ...          the same with some overridden (validated), restored on exit
    describe_backend() -> str              the choices, where each came from, and what they resolve to here
    scan_impl(device), ssd_impl(device), mamba3_impl(device), conv_impl(device), fused_decode(device)
                                           the choice resolved for a device

Every model asks this module (through mambazoo.core.dispatch) instead of reading flags. A new op is one entry:
a field of ``Backend`` made with ``switch(...)`` (its default, environment variable, allowed values and what it
picks); its dispatch function reads ``current().<name>``.

The environment (``MAMBAZOO_*``) is read when this module is imported; later changes to os.environ are not seen
(``reload_from_env()`` reads it again, for scripts that set variables after importing mambazoo).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import torch

__all__ = ["Backend", "backend", "current", "describe_backend", "reload_from_env", "scan_impl", "ssd_impl",
           "mamba3_impl", "conv_impl", "fused_decode", "interpreting"]

_TRUE, _FALSE = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


def switch(default, env: str, help: str, choices: tuple = ()):
    """One field of Backend: its default, the environment variable that sets it, what it picks, and its allowed
    values (a bool field takes True / False; its variable 1 / 0)."""
    return field(default=default, metadata=dict(env=env, help=help, choices=choices or (True, False)))


@dataclass(frozen=True)
class Backend:
    """The implementation choices. 'auto' picks the Triton kernel on CUDA tensors and PyTorch elsewhere; the bool
    fields turn the fused inference paths on or off (off: the general path, for A/B timing: docs/kernel_notes.md)."""

    scan: str = switch("auto", "MAMBAZOO_SCAN", "selective scan: auto (triton on CUDA, chunked elsewhere), triton "
                       "(CPU tensors need TRITON_INTERPRET=1), chunked or ref (the sequential oracle)",
                       ("auto", "triton", "chunked", "ref"))
    ssd: str = switch("auto", "MAMBAZOO_SSD", "Mamba-2 SSD layer: auto (triton on CUDA, chunked elsewhere), triton "
                      "(CPU tensors need TRITON_INTERPRET=1), chunked or ref (the sequential oracle)",
                      ("auto", "triton", "chunked", "ref"))
    mamba3: str = switch("auto", "MAMBAZOO_MAMBA3", "Mamba-3 scan and decode step: auto (triton on CUDA, chunked "
                         "elsewhere), triton (CPU tensors run the Triton interpreter) or chunked",
                         ("auto", "triton", "chunked"))
    conv: str = switch("auto", "MAMBAZOO_CONV", "mixer causal conv1d: auto (triton on CUDA, torch elsewhere), "
                       "triton (on CPU tensors only under TRITON_INTERPRET=1) or torch",
                       ("auto", "triton", "torch"))
    fused_decode: bool = switch(True, "MAMBAZOO_FUSED_DECODE", "fused decode step and residual add + RMSNorm at "
                                "inference, where the scan resolves to triton")
    scan_bidir: bool = switch(True, "MAMBAZOO_SCAN_BIDIR", "both directions of a bidirectional inference scan in "
                              "one kernel (kernels/scan/infer.py)")
    conv_pair: bool = switch(True, "MAMBAZOO_CONV_PAIR", "both directions' conv1d of a bidirectional mixer in one "
                             "kernel at inference")
    fold_dt: bool = switch(True, "MAMBAZOO_FOLD_DT", "dt_proj folded into x_proj (one GEMM) at inference")
    low_rank_dt: bool = switch(True, "MAMBAZOO_LOW_RANK_DT", "bidirectional inference: dt_proj formed inside the "
                               "scan from low-rank dt (half precision)")
    bc_fp32: bool = switch(True, "MAMBAZOO_BC_FP32", "low-rank path: the B / C projection written in fp32")
    gate_out_proj: bool = switch(True, "MAMBAZOO_GATE_OUT_PROJ", "bidirectional inference: the SiLU(z) gate inside "
                                 "out_proj's kernel")
    fused_patch: bool = switch(True, "MAMBAZOO_FUSED_PATCH", "Vim inference: patch embedding + position embedding "
                               "in one kernel")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, choices = getattr(self, f.name), f.metadata["choices"]
            if value not in choices or type(value) is not type(f.default):
                raise ValueError(f"backend {f.name}: expected one of {', '.join(map(str, choices))}, got {value!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Backend":
        """The choices set by ``environ`` (os.environ by default); unset or empty variables keep the defaults.
        Raises ValueError naming the variable, the allowed values and what it holds."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in dataclasses.fields(cls):
            env = f.metadata["env"]
            raw = environ.get(env, "").strip().lower()
            if not raw:
                continue
            if isinstance(f.default, bool):
                if raw not in _TRUE + _FALSE:
                    raise ValueError(f"{env}: expected 1 or 0, got {raw!r}")
                values[f.name] = raw in _TRUE
            elif raw not in f.metadata["choices"]:
                raise ValueError(f"{env}: expected {', '.join(f.metadata['choices'])}, got {raw!r}")
            else:
                values[f.name] = raw
        return cls(**values)


_current = Backend.from_env()


def current() -> Backend:
    """The choices in force (the environment's at import, or a ``backend(...)`` override)."""
    return _current


def reload_from_env() -> Backend:
    """Reads the MAMBAZOO_* environment again and makes it the choices in force; returns them."""
    global _current
    _current = Backend.from_env()
    return _current


@contextlib.contextmanager
def backend(**changes) -> Iterator[Backend]:
    """``with backend(scan="ref", fused_decode=False): ...``: the current choices with ``changes`` applied (each
    validated: ValueError naming the field) for the duration of the block; restored on exit, also on an error."""
    global _current
    names = {f.name for f in dataclasses.fields(Backend)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise ValueError(f"backend: unknown choice {unknown[0]!r}; expected one of {', '.join(sorted(names))}")
    previous = _current
    _current = dataclasses.replace(previous, **changes)
    try:
        yield _current
    finally:
        _current = previous


def interpreting() -> bool:
    """Whether Triton runs its CPU interpreter (TRITON_INTERPRET=1, read at each call: set by the test set-up)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def scan_impl(device: torch.device) -> str:
    """The selective scan on ``device``: 'triton', 'chunked' or 'ref'."""
    choice = _current.scan
    if choice != "auto":
        return choice
    return "triton" if device.type == "cuda" else "chunked"


def ssd_impl(device: torch.device) -> str:
    """The Mamba-2 SSD layer on ``device``: 'triton' (mambazoo.kernels.ssd), 'chunked' or 'ref'."""
    choice = _current.ssd
    if choice != "auto":
        return choice
    return "triton" if device.type == "cuda" else "chunked"


def mamba3_impl(device: torch.device) -> str:
    """The Mamba-3 scan and decode step on ``device``: 'triton' (mambazoo.kernels.mamba3) or 'chunked'."""
    choice = _current.mamba3
    if choice != "auto":
        return choice
    return "triton" if device.type == "cuda" else "chunked"


def conv_impl(device: torch.device) -> str:
    """The mixer's conv1d on ``device``: 'triton' (mambazoo.kernels.conv1d) on CUDA unless conv='torch', and on CPU
    tensors only when conv='triton' asks and the Triton interpreter is on; 'torch' otherwise."""
    choice = _current.conv
    if choice == "torch":
        return "torch"
    return "triton" if device.type == "cuda" or (choice == "triton" and interpreting()) else "torch"


def fused_decode(device: torch.device) -> bool:
    """Whether the decode step and the residual add + RMSNorm on ``device`` run the fused kernels: fused_decode on,
    the scan resolving to 'triton', the kernels able to run there (CUDA, or CPU under TRITON_INTERPRET=1), autograd
    off (the kernels have no backward) and torch.compile not tracing. Read at each call, so a CUDA graph keeps the
    path it was captured with."""
    if not _current.fused_decode or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    if scan_impl(device) != "triton":
        return False
    return device.type == "cuda" or interpreting()


def describe_backend(b: Backend | None = None) -> str:
    """A table of the choices: name, value, where it came from (default, the environment variable, or code) and
    what it picks; then what 'auto' resolves to on the CPU and, where present, CUDA."""
    b = b or _current
    env_view = Backend.from_env()
    lines = ["mambazoo backend (mambazoo.core.backend)", ""]
    width = max(len(f.name) for f in dataclasses.fields(b))
    for f in dataclasses.fields(b):
        value = getattr(b, f.name)
        env = f.metadata["env"]
        if value != getattr(env_view, f.name):
            source = "set in code"
        elif os.environ.get(env, "").strip():
            source = f"{env}={os.environ[env].strip()}"
        else:
            source = f"default ({env} unset)"
        shown = ("on" if value else "off") if isinstance(value, bool) else value
        lines.append(f"  {f.name:<{width}}  {shown:<8} {source}")
        lines.append(f"  {'':<{width}}  {f.metadata['help']}")
    lines.append("")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    previous = _set(b)
    try:
        for d in devices:
            lines.append(f"  on {d.type}: scan {scan_impl(d)}, ssd {ssd_impl(d)}, mamba3 {mamba3_impl(d)}, "
                         f"conv {conv_impl(d)}, fused decode {'on' if _decode_possible(d) else 'off'}")
    finally:
        _set(previous)
    lines.append(f"  TRITON_INTERPRET {'on' if interpreting() else 'off'}")
    return "\n".join(lines)


def _decode_possible(device: torch.device) -> bool:
    """fused_decode(device) for an inference call (autograd off, not compiling)."""
    return _current.fused_decode and scan_impl(device) == "triton" and (device.type == "cuda" or interpreting())


def _set(b: Backend) -> Backend:
    global _current
    previous, _current = _current, b
    return previous
