"""Image DataModules, read from local files only.

- ``FashionMNISTDataModule``: the IDX files of Debian's dataset-fashion-mnist
  (``sudo apt-get install dataset-fashion-mnist`` puts them in /usr/share/datasets/fashion-mnist).
- ``ImageFolderDataModule``: any tree root/<class>/*.jpg (or root/{train,val,test}/<class>/...).

Batches are (images (B, C, H, W) float normalized, labels (B,) int64).
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from zoo.data.base import SplitDataModule, split_indices
from torchvision.transforms import v2 as T

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_INSTALL_HINT = "install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or pass root="


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"Fashion-MNIST file {stem}[.gz] not found in {root}; {_INSTALL_HINT}"
                            "<a folder holding the four *-ubyte.gz files>")


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a uint8 array: images (n, rows, cols) or labels (n,)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path}: not an IDX file (only {len(data)} bytes); {_INSTALL_HINT}")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or ndim not in (1, 3):
        raise ValueError(f"{path}: not an unsigned-byte IDX file of 1 or 3 dims (magic {data[:4].hex()}); "
                         f"{_INSTALL_HINT}")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} = {int(np.prod(shape))} values, file holds {body.size}; "
                         f"the file is truncated: {_INSTALL_HINT}")
    return body.reshape(shape)


def read_fashion_mnist(root: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (n, 28, 28) uint8 and labels (n,) int64 of split 'train' (60k) or 'test' (10k)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST folder {root} does not exist; {_INSTALL_HINT}<folder>")
    images = read_idx(_find(root, FASHION_MNIST_FILES[split][0]))
    labels = read_idx(_find(root, FASHION_MNIST_FILES[split][1]))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{root} ({split}): images {images.shape} and labels {labels.shape} do not match")
    if labels.size and labels.max() >= 10:
        raise ValueError(f"{root} ({split}): labels go up to {labels.max()}, expected 0..9")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


class TensorImageDataset(Dataset):
    """uint8 images (n, H, W) or (n, C, H, W) and labels (n,) -> (transform(image), label)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None):
        self.images = images if images.dim() == 4 else images[:, None]
        self.labels, self.transform = labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i]
        x = self.transform(x) if self.transform is not None else x.float() / 255
        return x, self.labels[i]


class FashionMNISTDataModule(SplitDataModule):
    """Fashion-MNIST from local IDX files: 60k train (minus ``val_split`` held out, fixed seed) and
    the 10k test images. Batches: images (B, 1, img_size, img_size) normalized, labels (B,).

    Augmentation in training (``augment``): random crop with 2 px padding and horizontal flip."""

    num_classes = 10
    classes = FASHION_MNIST_CLASSES

    def __init__(self, root: str = FASHION_MNIST_ROOT, batch_size: int = 128, num_workers: int = 2,
                 val_split: int = 5000, augment: bool = True, img_size: int = 28, seed: int = 0):
        super().__init__(batch_size, num_workers)
        self.root, self.val_split, self.augment = Path(root), val_split, augment
        self.img_size, self.seed = img_size, seed

    def _transform(self, train: bool):
        steps = [T.ToDtype(torch.float32, scale=True)]
        if self.img_size != 28:
            steps.append(T.Resize((self.img_size, self.img_size), antialias=True))
        if train and self.augment:
            pad = max(2, self.img_size // 14)
            steps += [T.RandomCrop(self.img_size, padding=pad), T.RandomHorizontalFlip()]
        steps.append(T.Normalize([FASHION_MNIST_MEAN], [FASHION_MNIST_STD]))
        return T.Compose(steps)

    def prepare_data(self) -> None:
        for split in FASHION_MNIST_FILES.values():
            for stem in split:
                _find(self.root, stem)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = read_fashion_mnist(self.root, "train")
        train_idx, val_idx = split_indices(len(labels), self.val_split, self.seed)
        self.train_set = Subset(TensorImageDataset(images, labels, self._transform(True)), train_idx)
        self.val_set = Subset(TensorImageDataset(images, labels, self._transform(False)), val_idx)
        test_images, test_labels = read_fashion_mnist(self.root, "test")
        self.test_set = TensorImageDataset(test_images, test_labels, self._transform(False))


class ImageFolderDataModule(SplitDataModule):
    """Any folder of images labelled by sub-folder: root/<class>/<image>, or with split folders
    root/train/<class>/..., root/val/..., root/test/... (a missing val/ is cut from train by
    ``val_split``, a fraction; a missing test/ reuses val). Batches: (B, 3, img_size, img_size)
    normalized with ``mean``/``std`` (ImageNet's by default), labels (B,).

    Augmentation in training: RandomResizedCrop and horizontal flip; evaluation resizes to
    img_size / crop_pct and center-crops."""

    def __init__(self, root: str, img_size: int = 224, batch_size: int = 64, num_workers: int = 2,
                 val_split: float = 0.1, augment: bool = True, crop_pct: float = 0.875,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, seed: int = 0):
        super().__init__(batch_size, num_workers)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist: expected root/<class>/<image> "
                                    "or root/train/<class>/<image>")
        self.split_dirs = {s: self.root / s for s in ("train", "val", "test") if (self.root / s).is_dir()}
        self.train_dir = self.split_dirs.get("train", self.root)
        self.classes = sorted(d.name for d in self.train_dir.iterdir() if d.is_dir())
        if not self.classes:
            raise ValueError(f"{self.train_dir}: no class sub-folders (expected {self.train_dir}/<class>/<image>)")
        self.num_classes = len(self.classes)
        self.img_size, self.val_split, self.augment, self.crop_pct = img_size, val_split, augment, crop_pct
        self.mean, self.std, self.seed = tuple(mean), tuple(std), seed

    def _transform(self, train: bool):
        head = [T.ToImage()]
        if train and self.augment:
            geo = [T.RandomResizedCrop(self.img_size, antialias=True), T.RandomHorizontalFlip()]
        else:
            geo = [T.Resize(int(round(self.img_size / self.crop_pct)), antialias=True), T.CenterCrop(self.img_size)]
        tail = [T.ToDtype(torch.float32, scale=True), T.Normalize(self.mean, self.std)]
        return T.Compose(head + geo + tail)

    def _folder(self, path: Path, train: bool):
        from torchvision.datasets import ImageFolder

        ds = ImageFolder(str(path), transform=self._transform(train), loader=_rgb_loader)
        if ds.classes != self.classes:
            raise ValueError(f"{path}: classes {ds.classes} differ from the training classes {self.classes}")
        return ds

    def setup(self, stage: str | None = None) -> None:
        self._setup_folders()


def _rgb_loader(path: str):
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")
