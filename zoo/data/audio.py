"""Audio DataModule: any folder of WAV files labelled by sub-folder, read from local files only.

Layout: root/<label>/*.wav, or with split folders root/train/<label>/*.wav, root/val/..., root/test/...
(scripts/make_spoken_digits.py writes the latter). Batches are (waveforms (B, samples) float32 in
[-1, 1] at ``sample_rate``, labels (B,) int64), every clip padded or cut to ``clip_seconds``.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mambazoo.audio.frontend import torchaudio_module
from mambazoo.data.base import SplitDataModule, check_classes, drop_unreadable

_DIGITS_HINT = ("for the spoken-digits set run `sudo apt-get install espeak-ng` and "
                "`python scripts/make_spoken_digits.py --root data/spoken_digits`")


def read_wav(path: str | Path) -> tuple[torch.Tensor, int]:
    """A PCM WAV file (8, 16, 24 or 32 bit) as (mono float32 samples in [-1, 1], sample rate).
    Channels are averaged."""
    try:
        with wave.open(str(path), "rb") as w:
            rate, channels, width, n = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
            raw = w.readframes(n)
    except (wave.Error, EOFError) as e:
        raise ValueError(f"{path}: not a PCM WAV file ({e or 'empty file'}); convert it, e.g. "
                         "`ffmpeg -i in -c:a pcm_s16le out.wav`") from None
    if n == 0 or not raw:
        raise ValueError(f"{path}: a WAV file with no audio frames")
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / (1 << 23)
    elif width == 4:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / 2 ** 31
    else:
        raise ValueError(f"{path}: {8 * width}-bit samples are not supported")
    x = x.reshape(-1, channels).mean(axis=1)
    return torch.from_numpy(x.copy()), rate


def _has_frames(path: Path) -> bool:
    """Whether the file is a PCM WAV holding at least one frame (its header only)."""
    try:
        with wave.open(str(path), "rb") as w:
            return w.getnframes() > 0 and w.getsampwidth() in (1, 2, 3, 4)
    except (wave.Error, EOFError, OSError):
        return False


def fit_length(x: torch.Tensor, length: int, offset: int | None = None) -> torch.Tensor:
    """(samples,) -> (length,): a clip longer than ``length`` is cut at ``offset`` (default: centred),
    a shorter one is zero-padded on both sides, placed at ``offset`` (default: centred)."""
    n = x.shape[0]
    if n >= length:
        start = (n - length) // 2 if offset is None else min(max(offset, 0), n - length)
        return x[start:start + length]
    left = (length - n) // 2 if offset is None else min(max(offset, 0), length - n)
    return torch.nn.functional.pad(x, (left, length - n - left))


class WavFolder(Dataset):
    """WAV files under root/<label>/ -> (waveform (clip_samples,) at sample_rate, label index).

    In training (``augment``) the clip is placed / cut at a random offset and scaled by a random
    gain in [0.7, 1.3]; otherwise it is centred."""

    def __init__(self, root: Path, classes: list[str], sample_rate: int, clip_samples: int, augment: bool,
                 checked: dict | None = None):
        self.files: list[tuple[Path, int]] = []
        for label, name in enumerate(classes):
            folder = root / name
            if folder.is_dir():
                self.files += [(p, label) for p in sorted(folder.glob("*.wav")) + sorted(folder.glob("*.WAV"))]
        if not self.files:
            raise ValueError(f"{root}: no .wav files under {root}/<label>/; {_DIGITS_HINT}")
        checked = {} if checked is None else checked  # root -> readable files, shared by a folder's views
        if str(root) not in checked:
            checked[str(root)] = drop_unreadable(self.files, _has_frames, "PCM WAV files with audio")
        self.files = list(checked[str(root)])
        self.sample_rate, self.clip_samples, self.augment = sample_rate, clip_samples, augment
        self._resamplers: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.files)

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.files]

    def _resample(self, x: torch.Tensor, rate: int) -> torch.Tensor:
        if rate == self.sample_rate:
            return x
        if rate not in self._resamplers:
            self._resamplers[rate] = torchaudio_module().transforms.Resample(rate, self.sample_rate)
        return self._resamplers[rate](x)

    def __getitem__(self, i: int):
        path, label = self.files[i]
        x, rate = read_wav(path)
        x = self._resample(x, rate)
        if self.augment:
            slack = abs(x.shape[0] - self.clip_samples)
            x = fit_length(x, self.clip_samples, int(torch.randint(0, slack + 1, ()).item()))
            x = x * float(torch.empty(()).uniform_(0.7, 1.3))
        else:
            x = fit_length(x, self.clip_samples)
        return x.clamp(-1, 1), label


class WavFolderDataModule(SplitDataModule):
    """Any folder of WAVs labelled by sub-folder (see the module docstring for the layouts).

    Without a val/ folder, ``val_split`` (a fraction) of the training files is held out with a
    fixed seed; without a test/ folder the test loader reuses val. ``num_classes`` and ``classes``
    (sorted sub-folder names of the training folder) are known right after construction."""

    def __init__(self, root: str, batch_size: int = 32, sample_rate: int = 16000, clip_seconds: float = 1.0,
                 num_workers: int = 2, val_split: float = 0.1, augment: bool = True, seed: int = 0):
        super().__init__(batch_size, num_workers)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"audio folder {self.root} does not exist; {_DIGITS_HINT}")
        if sample_rate < 1 or clip_seconds <= 0:
            raise ValueError(f"sample_rate, clip_seconds: expected positive values, got {sample_rate}, {clip_seconds}")
        self.split_dirs = {s: self.root / s for s in ("train", "val", "test") if (self.root / s).is_dir()}
        self.train_dir = self.split_dirs.get("train", self.root)
        self.classes = sorted(d.name for d in self.train_dir.iterdir() if d.is_dir())
        if not self.classes:
            raise ValueError(f"{self.train_dir}: no label sub-folders (expected {self.train_dir}/<label>/*.wav); "
                             f"{_DIGITS_HINT}")
        check_classes(self.train_dir, self.classes)
        self.num_classes = len(self.classes)
        self.sample_rate, self.clip_seconds = sample_rate, clip_seconds
        self.clip_samples = int(round(clip_seconds * sample_rate))
        self.val_split, self.augment, self.seed = val_split, augment, seed
        self._checked: dict = {}

    def _folder(self, path: Path, train: bool) -> WavFolder:
        return WavFolder(path, self.classes, self.sample_rate, self.clip_samples, augment=train and self.augment,
                         checked=self._checked)

    def setup(self, stage: str | None = None) -> None:
        self._setup_folders()
