"""Image and audio DataModules on tiny generated files; the spoken-digits builder."""

import gzip
import importlib.util
import math
import shutil
import struct
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from zoo.data.audio import WavFolderDataModule, read_wav
from zoo.data.images import FashionMNISTDataModule, ImageFolderDataModule, read_idx

ROOT = Path(__file__).resolve().parents[1]


def write_idx(path, array):
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.fixture
def fashion_root(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 8)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return tmp_path


def test_fashion_mnist_datamodule(fashion_root):
    dm = FashionMNISTDataModule(root=str(fashion_root), batch_size=4, num_workers=0, val_split=6)
    assert dm.num_classes == 10
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (24, 6, 8)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    x, y = next(iter(dm.test_dataloader()))
    assert y.tolist() == [0, 1, 2, 3]
    assert -2 < x.mean() < 2  # normalized
    big = FashionMNISTDataModule(root=str(fashion_root), batch_size=2, num_workers=0, val_split=2, img_size=32)
    assert next(iter(big.val_dataloader()))[0].shape == (2, 1, 32, 32)


def test_fashion_mnist_missing_or_broken_files(tmp_path, fashion_root):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNISTDataModule(root=str(tmp_path / "nowhere"), num_workers=0).setup()
    (fashion_root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNISTDataModule(root=str(fashion_root), num_workers=0).prepare_data()
    with gzip.open(fashion_root / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">HBB3I", 0, 8, 3, 30, 28, 28) + b"\0" * 100)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(fashion_root / "train-images-idx3-ubyte.gz")


def test_image_folder_datamodule(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 1)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    dm = ImageFolderDataModule(str(tmp_path), img_size=16, batch_size=2, num_workers=0)
    assert dm.num_classes == 2 and dm.classes == ["cat", "dog"]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    assert len(dm.val_set) == 2 and len(dm.test_set) == 2
    # without split folders, val is cut from the tree
    flat = ImageFolderDataModule(str(tmp_path / "train"), img_size=16, batch_size=2, num_workers=0, val_split=0.34)
    flat.setup()
    assert (len(flat.train_set), len(flat.val_set)) == (4, 2)
    with pytest.raises(FileNotFoundError):
        ImageFolderDataModule(str(tmp_path / "nope"))


def write_wav(path, freq, rate=22050, seconds=0.5, width=2):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(rate * seconds)) / rate
    x = (0.4 * np.sin(2 * math.pi * freq * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(width), w.setframerate(rate)
        w.writeframes(x.tobytes())


def test_wav_folder_datamodule_with_splits(tmp_path):
    for split, n in (("train", 3), ("val", 1), ("test", 1)):
        for label, freq in (("0", 300), ("1", 900), ("2", 1500)):
            for i in range(n):
                write_wav(tmp_path / split / label / f"{i}.wav", freq + 10 * i)
    dm = WavFolderDataModule(str(tmp_path), batch_size=4, sample_rate=16000, clip_seconds=1.0, num_workers=0)
    assert dm.num_classes == 3
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (9, 3, 3)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 16000) and x.dtype == torch.float32 and y.dtype == torch.int64
    x, y = next(iter(dm.test_dataloader()))
    assert y.tolist() == [0, 1, 2]
    wave_, rate = read_wav(tmp_path / "test" / "0" / "0.wav")
    assert rate == 22050 and wave_.shape == (11025,) and 0.35 < wave_.abs().max() < 0.45
    # centred: 0.5 s of tone in the middle of 1 s at 16 kHz
    assert x[0, :3000].abs().max() == 0 and x[0, 6000:10000].abs().max() > 0.3


def test_wav_folder_without_splits_and_errors(tmp_path):
    for label in ("yes", "no"):
        for i in range(5):
            write_wav(tmp_path / "flat" / label / f"{i}.wav", 400 + 50 * i, rate=16000)
    dm = WavFolderDataModule(str(tmp_path / "flat"), batch_size=2, clip_seconds=0.25, num_workers=0, val_split=0.2)
    dm.setup()
    assert dm.classes == ["no", "yes"] and (len(dm.train_set), len(dm.val_set)) == (8, 2)
    assert next(iter(dm.val_dataloader()))[0].shape == (2, 4000)
    with pytest.raises(FileNotFoundError, match="make_spoken_digits"):
        WavFolderDataModule(str(tmp_path / "missing"))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no .wav files"):
        WavFolderDataModule(str(tmp_path / "empty"), num_workers=0).setup()
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "x.wav").write_bytes(b"not a wav")
    with pytest.raises(ValueError, match="not a PCM WAV"):
        read_wav(tmp_path / "bad" / "a" / "x.wav")


def _digits_script():
    spec = importlib.util.spec_from_file_location("make_spoken_digits", ROOT / "scripts" / "make_spoken_digits.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_spoken_digits_split_is_by_voice_and_stable():
    mod = _digits_script()
    variants = [f"v{i}" for i in range(20)]
    split = mod.split_voices(variants, 0.1, 0.1)
    assert sorted(split.values()).count("test") == 2 and sorted(split.values()).count("val") == 2
    # stable: a variant keeps its split whatever the order
    assert mod.split_voices(list(reversed(variants)), 0.1, 0.1) == split


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_spoken_digits_builder(tmp_path, capsys):
    mod = _digits_script()
    counts = mod.main(["--root", str(tmp_path), "--max-variants", "3", "--accents", "en-us", "--speeds", "175",
                       "--pitches", "50"])
    assert {s: sum(c.values()) for s, c in counts.items()} == {"train": 10, "val": 10, "test": 10}
    assert "test :" in capsys.readouterr().out
    voices = {s: {p.name.split("_")[0] for p in (tmp_path / s).rglob("*.wav")} for s in ("train", "val", "test")}
    assert not (voices["train"] & voices["test"]) and not (voices["train"] & voices["val"])
    dm = WavFolderDataModule(str(tmp_path), batch_size=10, num_workers=0)
    x, y = next(iter(dm.test_dataloader()))
    assert dm.num_classes == 10 and x.shape == (10, 16000) and (x.abs().amax(1) > 0.01).all()
