"""Text data: raw UTF-8 bytes (MambaByte) and pre-tokenized token files.

Bytes: the default corpus is the running Python's standard-library sources
(``sysconfig.get_paths()['stdlib']``, every ``*.py``), or any file, folder or glob. Files are split
into train / validation by a hash of their path, so validation bytes come from unseen files.

Token files: a flat numpy memmap of uint16 or uint32 token ids (``.npy`` or raw). Build one from
bytes with ``python -m mambazoo.data.text export --out DIR`` (the stdlib corpus as byte ids).

Training batches are random windows (batch, seq_len + 1) drawn by ``mambazoo.data.streams`` (resumable);
validation batches are consecutive non-overlapping windows of the held-out data.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import sys
import sysconfig
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mambazoo.data.streams import train_stream_loader

SEPARATOR = b"\n\n"


def stdlib_files() -> list[Path]:
    """The standard library's ``*.py`` sources of the running Python (site-packages excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.parts) and p.is_file())


def resolve_files(path: str | os.PathLike | None) -> list[Path]:
    """None -> the stdlib sources; a file -> [it]; a folder -> its files (recursive, hidden ones
    skipped); anything else is a glob. Raises FileNotFoundError saying what to pass."""
    if path is None:
        files = stdlib_files()
        if not files:
            raise FileNotFoundError(f"no *.py files under {sysconfig.get_paths()['stdlib']}: this Python has "
                                    "no standard-library sources; pass --data.init_args.path FILE|FOLDER|GLOB")
        return files
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not any(s.startswith(".") for s in f.relative_to(p).parts))
    else:
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if os.path.isfile(f))
    if not files:
        raise FileNotFoundError(f"no text found at {str(path)!r}: pass an existing file, folder or glob as "
                                "--data.init_args.path, or leave it unset for the standard-library corpus")
    return files


def check_fraction(name: str, value: float) -> None:
    """ValueError unless 0 < value < 1 (a held-out fraction: none or all of the data leaves nothing to train or
    to validate on)."""
    if not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{name}: expected a number in (0, 1), got {value!r}")


def _is_val(path: Path, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha1(str(path).encode()).digest()[:4], "little")
    return (h % 10_000) < val_fraction * 10_000


def load_byte_corpus(path=None, val_fraction: float = 0.02, max_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train bytes, validation bytes) as uint8 arrays. Several files: split by a hash of each
    path relative to their common folder (the same split wherever the corpus is installed; at
    least one file each side); one file: the last ``val_fraction`` of it is validation."""
    check_fraction("val_fraction", val_fraction)
    files = resolve_files(path)
    if len(files) == 1:
        data = np.frombuffer(files[0].read_bytes(), dtype=np.uint8)
        if max_bytes:
            data = data[:max_bytes]
        cut = int(len(data) * (1 - val_fraction))
        return data[:cut], data[cut:]
    root = Path(os.path.commonpath([str(f) for f in files]))
    val = [f for f in files if _is_val(f.relative_to(root), val_fraction)] or files[-1:]
    held_out = set(val)
    train = [f for f in files if f not in held_out] or files[:1]
    def join(fs, limit):
        chunks, total = [], 0
        for f in fs:
            b = f.read_bytes()
            chunks.append(b)
            total += len(b) + len(SEPARATOR)
            if limit and total >= limit:
                break
        return np.frombuffer(SEPARATOR.join(chunks), dtype=np.uint8)[:limit] if chunks else np.zeros(0, np.uint8)
    return join(train, max_bytes), join(val, None)


def window_batch(data: np.ndarray, seq_len: int, batch_size: int, rng: np.random.Generator) -> torch.Tensor:
    """``batch_size`` random windows of ``seq_len + 1`` tokens of ``data`` -> (batch, seq_len + 1) long."""
    offsets = rng.integers(0, len(data) - seq_len - 1, size=batch_size)
    return torch.from_numpy(np.stack([np.asarray(data[o:o + seq_len + 1], dtype=np.int64) for o in offsets]))


class Windows(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` tokens (consecutive windows share one) tiling
    ``data``; with ``max_windows``, that many of them spread evenly over the data."""

    def __init__(self, data: np.ndarray, seq_len: int, max_windows: int | None = None):
        total = (len(data) - 1) // seq_len
        if total < 1:
            raise ValueError(f"validation data has {len(data)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        self.data, self.seq_len = data, seq_len
        n = min(total, max_windows) if max_windows else total
        self.starts = [(i * total // n) * seq_len for i in range(n)]

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> torch.Tensor:
        s = self.starts[i]
        return torch.from_numpy(np.asarray(self.data[s:s + self.seq_len + 1], dtype=np.int64))

    def covered(self) -> np.ndarray:
        """The tokens the windows score, concatenated (each window's first token is context only)."""
        return np.concatenate([np.asarray(self.data[s + 1:s + self.seq_len + 1]) for s in self.starts])


class _WindowDataModule(pl.LightningDataModule):
    """Shared by the byte and token-file datamodules: self.train_data / self.val_data arrays."""

    val_names = ["val"]
    test_names = ["test"]

    def __init__(self, seq_len: int, batch_size: int, val_batch_size: int | None, val_max_windows: int | None,
                 seed: int, num_workers: int):
        super().__init__()
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size: expected positive ints, got {seq_len}, {batch_size}")
        for name, v in (("val_batch_size", val_batch_size), ("val_max_windows", val_max_windows)):
            if v is not None and v < 1:
                raise ValueError(f"{name}: expected a positive int or null, got {v}")
        if num_workers < 0:
            raise ValueError(f"num_workers: expected an int >= 0, got {num_workers}")
        self.seq_len, self.batch_size, self.seed, self.num_workers = seq_len, batch_size, seed, num_workers
        self.val_batch_size = val_batch_size or batch_size
        self.val_max_windows = val_max_windows
        self.train_data = self.val_data = None

    def _check_sizes(self) -> None:
        if len(self.train_data) < self.seq_len + 2:
            raise ValueError(f"training data has {len(self.train_data)} tokens, fewer than seq_len + 2 = {self.seq_len + 2}")

    def _make_batch(self, rng, j):
        return window_batch(self.train_data, self.seq_len, self.batch_size, rng)

    def train_dataloader(self) -> DataLoader:
        return train_stream_loader(self._make_batch, self.seed, self.trainer, self.num_workers)

    def val_windows(self) -> Windows:
        return Windows(self.val_data, self.seq_len, self.val_max_windows)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_windows(), batch_size=self.val_batch_size, shuffle=False, num_workers=0)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(Windows(self.val_data, self.seq_len), batch_size=self.val_batch_size, shuffle=False)


class ByteDataModule(_WindowDataModule):
    """UTF-8 bytes as tokens 0..255. ``path``: file, folder or glob (None: the stdlib sources);
    ``val_fraction`` of the files held out; ``max_bytes`` caps the training bytes;
    ``val_max_windows`` caps the validation windows (the test set is every held-out window)."""

    tokenizer = "bytes"

    def __init__(self, path: str | None = None, seq_len: int = 256, batch_size: int = 32,
                 val_batch_size: int | None = None, val_fraction: float = 0.02, val_max_windows: int | None = 64,
                 max_bytes: int | None = None, seed: int = 0, num_workers: int = 0):
        super().__init__(seq_len, batch_size, val_batch_size, val_max_windows, seed, num_workers)
        check_fraction("val_fraction", val_fraction)
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes: expected a positive int or null, got {max_bytes}")
        self.path, self.val_fraction, self.max_bytes = path, val_fraction, max_bytes

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is None:
            self.train_data, self.val_data = load_byte_corpus(self.path, self.val_fraction, self.max_bytes)
            self._check_sizes()


EXPORT_HINT = "python -m mambazoo.data.text export --out DIR  (writes DIR/train.u16.npy and DIR/val.u16.npy)"


def open_tokens(path: str | os.PathLike, dtype: str = "uint16") -> np.ndarray:
    """A read-only memmap of token ids: ``.npy`` (dtype from its header) or raw ``dtype``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"token file {str(p)!r} not found. Build one with your tokenizer as a flat "
                                f"uint16/uint32 numpy array, or for byte tokens: {EXPORT_HINT}")
    if p.suffix == ".npy":
        arr = np.load(p, mmap_mode="r")
        if arr.dtype not in (np.uint16, np.uint32) or arr.ndim != 1:
            raise ValueError(f"{p}: expected a 1-d uint16 or uint32 array, got {arr.ndim}-d {arr.dtype}")
        return arr
    if dtype not in ("uint16", "uint32"):
        raise ValueError(f"dtype: expected 'uint16' or 'uint32', got {dtype!r}")
    return np.memmap(p, dtype=dtype, mode="r")


class TokenFileDataModule(_WindowDataModule):
    """Pre-tokenized token ids from numpy memmaps (uint16 / uint32). ``val_path`` None: the last
    ``val_fraction`` of the training file is held out."""

    tokenizer = None

    def __init__(self, train_path: str, val_path: str | None = None, dtype: str = "uint16", seq_len: int = 256,
                 batch_size: int = 32, val_batch_size: int | None = None, val_fraction: float = 0.01,
                 val_max_windows: int | None = 64, seed: int = 0, num_workers: int = 0):
        super().__init__(seq_len, batch_size, val_batch_size, val_max_windows, seed, num_workers)
        check_fraction("val_fraction", val_fraction)
        self.train_path, self.val_path, self.dtype, self.val_fraction = train_path, val_path, dtype, val_fraction

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is not None:
            return
        train = open_tokens(self.train_path, self.dtype)
        if self.val_path:
            self.train_data, self.val_data = train, open_tokens(self.val_path, self.dtype)
        else:
            cut = int(len(train) * (1 - self.val_fraction))
            self.train_data, self.val_data = train[:cut], train[cut:]
        self._check_sizes()


def _export(args) -> None:
    train, val = load_byte_corpus(args.path, args.val_fraction)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "train.u16.npy", train.astype(np.uint16))
    np.save(out / "val.u16.npy", val.astype(np.uint16))
    print(f"wrote {out}/train.u16.npy ({len(train)} tokens) and {out}/val.u16.npy ({len(val)} tokens)")


def _dump_val(args) -> None:
    dm = ByteDataModule(path=args.path, seq_len=args.seq_len, val_fraction=args.val_fraction,
                        val_max_windows=args.val_max_windows)
    dm.setup()
    data = Windows(dm.val_data, dm.seq_len, args.val_max_windows).covered()  # the bytes the test set scores
    Path(args.out).write_bytes(data.tobytes())
    print(f"wrote {len(data)} validation bytes to {args.out}")


def main(argv=None) -> None:
    """``export``: a byte corpus as uint16 token files; ``dump-val``: the validation bytes a
    ByteDataModule scores (to compare with a compressor, e.g. ``xz -9``)."""
    ap = argparse.ArgumentParser(prog="python -m mambazoo.data.text", description=main.__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("export", "dump-val"):
        p = sub.add_parser(name)
        p.add_argument("--path", default=None, help="file, folder or glob (default: the stdlib sources)")
        p.add_argument("--out", required=True)
        p.add_argument("--val-fraction", type=float, default=0.02)
        if name == "dump-val":
            p.add_argument("--seq-len", type=int, default=256)
            p.add_argument("--val-max-windows", type=int, default=None,
                           help="as the datamodule's val_max_windows (default: all, i.e. the test set)")
    args = ap.parse_args(argv)
    (_export if args.cmd == "export" else _dump_val)(args)


if __name__ == "__main__":
    main(sys.argv[1:])
