"""Image and audio DataModules on tiny generated files; the spoken-digits builder."""

import gzip
import math
import shutil
import struct
import types
import wave

import numpy as np
import pytest
import torch

from mambazoo.data.audio import WavFolderDataModule, read_wav
from mambazoo.data.images import (FASHION_MNIST_MEAN, FASHION_MNIST_STD, FashionMNISTDataModule, ImageFolderDataModule,
                              read_idx, resize_batch)

from helpers import load_script


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
    raw = next(iter(dm.train_dataloader()))
    assert raw[0].shape == (4, 1, 28, 28) and raw[0].dtype == torch.uint8 and raw[1].dtype == torch.int64
    x, y = dm.transform_batch(raw, train=True)
    assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32 and y is raw[1]
    x, y = dm.transform_batch(next(iter(dm.test_dataloader())), train=False)
    assert y.tolist() == [0, 1, 2, 3]
    assert -2 < x.mean() < 2  # normalized
    big = FashionMNISTDataModule(root=str(fashion_root), batch_size=2, num_workers=0, val_split=2, img_size=32)
    assert big.transform_batch(next(iter(big.val_dataloader())), train=False)[0].shape == (2, 1, 32, 32)
    assert big.transform_batch(next(iter(big.train_dataloader())), train=True)[0].shape == (2, 1, 32, 32)


def test_fashion_mnist_loader_yields_stacked_uint8_batches(fashion_root):
    """One batch is the split's own images and labels at the sampled indices, through Subset's
    ``__getitems__``, with or without worker processes."""
    dm = FashionMNISTDataModule(root=str(fashion_root), batch_size=4, num_workers=0, val_split=6)
    dm.setup()
    full = dm.val_set.dataset
    want_images = full.images[dm.val_set.indices[:4]]
    want_labels = full.labels[dm.val_set.indices[:4]]
    for workers in (0, 1):
        dm.num_workers = workers
        images, labels = next(iter(dm.val_dataloader()))
        assert torch.equal(images, want_images) and torch.equal(labels, want_labels)
    assert [len(y) for _, y in dm.test_dataloader()] == [4, 4]


def _fashion_batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8), torch.arange(n) % 10


def test_fashion_mnist_eval_transform_is_exact_and_deterministic():
    images, labels = _fashion_batch(8)
    dm = FashionMNISTDataModule(num_workers=0)
    x, y = dm.transform_batch((images, labels), train=False)
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y is labels
    assert torch.equal(x, (images.float() / 255 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD)
    assert torch.equal(x, dm.transform_batch((images, labels), train=False)[0])


@pytest.mark.parametrize("img_size", [40, 20])
def test_fashion_mnist_resize_matches_torchvision(img_size):
    from torchvision.transforms import v2 as T

    images, labels = _fashion_batch(4)
    dm = FashionMNISTDataModule(num_workers=0, img_size=img_size)
    x, _ = dm.transform_batch((images, labels), train=False)
    reference = T.Compose([T.ToDtype(torch.float32, scale=True), T.Resize((img_size, img_size), antialias=True),
                           T.Normalize([FASHION_MNIST_MEAN], [FASHION_MNIST_STD])])
    assert x.shape == (4, 1, img_size, img_size)
    torch.testing.assert_close(x, torch.stack([reference(im) for im in images]), atol=1e-5, rtol=0)


def _shifted(image, dy, dx):
    """image (H, W) moved so that out[y, x] = image[y + dy, x + dx], zeros where that falls outside."""
    h, w = image.shape
    out = torch.zeros_like(image)
    out[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = \
        image[max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)]
    return out


def _candidates(image01, pad):
    """image01 (H, W) in [0, 1] -> (2 (2 pad + 1)^2, H, W): every shift by (dy, dx) in [-pad, pad]^2
    with zeros shifted in, plain and mirrored, normalized as the module does."""
    shifts = [_shifted(image01, dy, dx) for dy in range(-pad, pad + 1) for dx in range(-pad, pad + 1)]
    plain = torch.stack(shifts)
    return (torch.cat([plain, plain.flip(-1)]) - FASHION_MNIST_MEAN) / FASHION_MNIST_STD


def _match(outputs, candidates):
    """outputs (B, H, W), candidates (K, H, W) -> (B,) index of the candidate equal to each output, -1 if none."""
    equal = (outputs[:, None] == candidates[None]).flatten(2).all(-1)  # (B, K)
    return torch.where(equal.any(1), equal.int().argmax(1), -1)


@pytest.mark.parametrize("img_size", [28, 42])
def test_fashion_mnist_train_augment_is_a_padded_crop_and_flip_per_sample(img_size):
    """Each output is its own input (resized) shifted by some (dy, dx) in [-pad, pad]^2 with zeros
    shifted in, optionally mirrored: a padded random crop then a horizontal flip."""
    torch.manual_seed(0)
    images, labels = _fashion_batch(16, seed=1)
    dm = FashionMNISTDataModule(num_workers=0, img_size=img_size)
    pad = max(2, img_size // 14)
    x, y = dm.transform_batch((images, labels), train=True)
    assert x.shape == (16, 1, img_size, img_size) and y is labels
    base = resize_batch(images.float() / 255, img_size) if img_size != 28 else images.float() / 255
    for i in range(16):
        assert _match(x[i], _candidates(base[i, 0], pad)).item() >= 0, f"sample {i} is no padded crop + flip"


def test_fashion_mnist_train_augment_draws_each_sample_on_its_own():
    """One image copied across a batch comes out in every one of the 2 (2 pad + 1)^2 crops and
    flips, and reproducibly under a fixed seed."""
    images, labels = _fashion_batch(1)
    copies = (images.expand(1000, -1, -1, -1), labels.expand(1000))
    dm = FashionMNISTDataModule(num_workers=0)
    torch.manual_seed(0)
    x, _ = dm.transform_batch(copies, train=True)
    assert len(torch.unique(x[:64], dim=0)) > 1
    which = _match(x[:, 0], _candidates(images[0, 0].float() / 255, pad=2))
    assert (which >= 0).all() and len(torch.unique(which)) == 2 * 5 * 5
    torch.manual_seed(0)
    assert torch.equal(x, dm.transform_batch(copies, train=True)[0])


def test_fashion_mnist_without_augment_train_is_eval():
    batch = _fashion_batch(8)
    for img_size in (28, 32):
        dm = FashionMNISTDataModule(num_workers=0, augment=False, img_size=img_size)
        x, _ = dm.transform_batch(batch, train=True)
        assert x.shape == (8, 1, img_size, img_size)
        assert torch.equal(x, dm.transform_batch(batch, train=False)[0])


def test_fashion_mnist_batch_hook_follows_the_trainers_training_flag():
    batch = _fashion_batch(64)
    dm = FashionMNISTDataModule(num_workers=0)
    plain = dm.transform_batch(batch, train=False)[0]
    assert torch.equal(dm.on_after_batch_transfer(batch, 0)[0], plain)  # no trainer: evaluation
    dm.trainer = types.SimpleNamespace(training=False)
    assert torch.equal(dm.on_after_batch_transfer(batch, 0)[0], plain)
    dm.trainer = types.SimpleNamespace(training=True)
    x = dm.on_after_batch_transfer(batch, 0)[0]
    assert x.shape == plain.shape and not torch.equal(x, plain)


def test_fashion_mnist_hook_under_a_lightning_trainer(fashion_root, monkeypatch):
    """A real fit + test: the model gets normalized float batches; training ones augmented."""
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(28 * 28, 10)
            self.seen = []

        def _step(self, batch, stage):
            x, y = batch
            self.seen.append((stage, x.dtype, tuple(x.shape)))
            return torch.nn.functional.cross_entropy(self.head(x.flatten(1)), y)

        def training_step(self, batch, batch_idx):
            return self._step(batch, "train")

        def validation_step(self, batch, batch_idx):
            self._step(batch, "val")

        def test_step(self, batch, batch_idx):
            self._step(batch, "test")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = FashionMNISTDataModule(root=str(fashion_root), batch_size=4, num_workers=0, val_split=6)
    flags = []
    transform = dm.transform_batch
    monkeypatch.setattr(dm, "transform_batch", lambda batch, train: flags.append(train) or transform(batch, train))
    model = Probe()
    trainer = L.Trainer(accelerator="cpu", fast_dev_run=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    assert [stage for stage, _, _ in model.seen] == ["train", "val", "test"]
    assert all(dtype == torch.float32 and shape == (4, 1, 28, 28) for _, dtype, shape in model.seen)
    assert flags == [True, False, False]


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
    (tmp_path / "empty" / "b").mkdir(parents=True)  # two classes (one is refused on its own, see tests/zoo)
    with pytest.raises(ValueError, match="no .wav files"):
        WavFolderDataModule(str(tmp_path / "empty"), num_workers=0).setup()
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "x.wav").write_bytes(b"not a wav")
    with pytest.raises(ValueError, match="not a PCM WAV"):
        read_wav(tmp_path / "bad" / "a" / "x.wav")


def _digits_script():
    return load_script("make_spoken_digits")


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
