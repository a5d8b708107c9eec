"""The one reader of weight and checkpoint files: .safetensors, and torch files (.bin / .pt / .pth / .ckpt,
zip or legacy pickle) through ``torch.load(weights_only=True)``, so pickled code is never executed.

The format is recognised from the file's first bytes, not its name (a torch file named .safetensors is read
as a torch file). Anything that is not a weights file raises ``WeightsFileError`` (a ValueError) in one line
that names the path, the formats expected and what was found: an empty file, a truncated one, JSON or other
text, random bytes, a pickle that holds Python objects other than tensors and plain containers."""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
from pathlib import Path
from typing import Any

import torch

from mambazoo.errors import WeightsFileError

EXPECTED = "a .safetensors file or a torch checkpoint (.bin / .pt / .pth / .ckpt)"
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def sniff(path: str | os.PathLike) -> str:
    """What a file holds, from its first bytes: 'safetensors', 'torch-zip', 'torch-pickle', or (not weights)
    'empty', 'truncated-safetensors', 'json', 'text', 'unknown'."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "empty"
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "torch-zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle protocol 2..5 (torch's legacy format)
        return "torch-pickle"
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: u64 little-endian header size, then the JSON header
        n = struct.unpack("<Q", head[:8])[0]
        return "safetensors" if 8 + n <= size else "truncated-safetensors"
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"["):
        return "json"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:  # (or a multi-byte character cut at the 512th byte: then 'unknown', harmless)
        return "unknown"
    return "text" if all(c.isprintable() or c in "\t\n\r" for c in text) else "unknown"


def _describe(path: Path, kind: str) -> str:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if kind == "empty":
        return "an empty file (0 bytes)"
    if kind == "truncated-safetensors":
        return f"a truncated safetensors file (its header alone needs {8 + struct.unpack('<Q', head)[0]} bytes, the file has {size})"
    if kind == "json":
        return f"JSON text ({size} bytes)"
    if kind == "text":
        return f"text ({size} bytes, starting {head!r})"
    return f"{size} bytes of unrecognised data (starting 0x{head.hex()})"


def load_file(path: str | os.PathLike, map_location: Any = "cpu", allowed_globals: tuple = ()) -> Any:
    """What a weights file holds: a dict of tensors (.safetensors) or the object a torch file holds (a state
    dict, a Lightning checkpoint, ...), on ``map_location``. ``allowed_globals``: classes a torch file may hold
    besides tensors and plain containers (``torch.serialization.add_safe_globals``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such weights file (expected {EXPECTED})")
    if path.is_dir():
        raise WeightsFileError(f"{path}: a folder, expected {EXPECTED}")
    kind = sniff(path)
    if kind == "safetensors":
        from safetensors.torch import load_file as st_load

        device = map_location if isinstance(map_location, str) else "cpu"
        try:
            return st_load(str(path), device=device)
        except Exception as e:  # SafetensorError: not an Exception subclass we can import portably
            raise WeightsFileError(f"{path}: expected a safetensors file, found a corrupt or truncated one "
                                   f"({type(e).__name__}: {e})") from None
    if kind in ("torch-zip", "torch-pickle"):
        return _torch_load(path, kind, map_location, allowed_globals)
    hint = " (a config file? pass the weights file or its folder)" if kind == "json" else ""
    raise WeightsFileError(f"{path}: expected {EXPECTED}, found {_describe(path, kind)}{hint}")


def _torch_load(path: Path, kind: str, map_location, allowed_globals) -> Any:
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        m = re.search(r"unsupported (global|operand|class)\W*(global )?([\w.]*)", msg, re.IGNORECASE)
        culprit = f"{m.group(1)} {m.group(3)}".strip() if m else None
        if culprit is not None:
            raise WeightsFileError(
                f"{path}: refused: the file holds pickled Python objects, not only tensors (unsupported {culprit}); "
                "loading them could run code, so it is not read. Save a state dict (tensors only) or "
                "a .safetensors file") from None
        raise WeightsFileError(f"{path}: expected {EXPECTED}, found a corrupt torch {_KIND[kind]} "
                               f"({_first_line(msg)})") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, AttributeError, struct.error) as e:
        if isinstance(e, OSError) and e.errno is not None:  # a real I/O error (permissions, disk): as is
            raise
        raise WeightsFileError(f"{path}: expected {EXPECTED}, found a truncated or corrupt torch {_KIND[kind]} "
                               f"({type(e).__name__}: {_first_line(str(e)) or 'unexpected end of file'})") from None


_KIND = {"torch-zip": "zip archive", "torch-pickle": "pickle"}


def _first_line(msg: str) -> str:
    """The first sentence of an error message (torch's run on for several lines)."""
    line = msg.strip().splitlines()[0] if msg.strip() else ""
    return line.split(". ")[0].rstrip(".")


def read_state_dict(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict from a weights file; a torch file that holds something else (a Lightning
    checkpoint, a list, ...) raises WeightsFileError naming what it holds."""
    obj = load_file(path, map_location)
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return obj
    raise WeightsFileError(f"{path}: expected a state dict (names -> tensors), found {describe_object(obj)}")


def describe_object(obj: Any) -> str:
    """A short description of what a torch file held, for error messages."""
    if isinstance(obj, dict):
        if not obj:
            return "an empty dict"
        keys = sorted(map(str, obj))[:6]
        others = [type(v).__name__ for v in obj.values() if not isinstance(v, torch.Tensor)]
        what = "a Lightning checkpoint" if "state_dict" in obj and "pytorch-lightning_version" in obj else "a dict"
        return f"{what} with keys {keys}" + (f" holding {sorted(set(others))[:4]}" if others else "")
    return f"a {type(obj).__name__}"


def json_or_none(path: Path) -> dict | None:
    """A config.json as a dict (None when absent); malformed JSON raises WeightsFileError naming the file."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsFileError(f"{path}: expected a JSON config, found malformed JSON ({e})") from None


def require_safetensors(path: str | os.PathLike, what: str = "a .safetensors file") -> None:
    """Raise WeightsFileError naming ``path``, ``what`` was expected and what it holds, unless it is a
    readable safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected {what})")
    kind = sniff(path)
    if kind == "safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                f.metadata()
        except Exception as e:  # SafetensorError
            raise WeightsFileError(f"{path}: expected {what}, found a corrupt or truncated safetensors file "
                                   f"({type(e).__name__}: {e})") from None
        return
    if kind in ("torch-zip", "torch-pickle"):
        load_file(path)  # a corrupt file or pickled code is named as such
        raise WeightsFileError(f"{path}: expected {what}, found a torch file ({_KIND[kind]}), which carries no "
                               "model config")
    raise WeightsFileError(f"{path}: expected {what}, found {_describe(path, kind)}")


def umask_mode() -> int:
    """The mode a file created with open() gets under the current umask (0o666 minus the umask): files the
    project writes through a temporary file (mkstemp makes them 0o600) are given this mode."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask
