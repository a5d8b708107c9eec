"""Image DataModules, read from local files only.

- ``FashionMNISTDataModule``: the IDX files of Debian's dataset-fashion-mnist
  (``sudo apt-get install dataset-fashion-mnist`` puts them in /usr/share/datasets/fashion-mnist).
  Its loaders yield raw uint8 batches (images (B, 1, 28, 28), labels (B,)), each gathered by one
  indexing op; its ``on_after_batch_transfer`` hook turns them, on the device, into normalized
  float32 images (resize, and in training random crop + flip, all vectorized on the batch). Code
  that iterates its loaders without a Lightning Trainer calls ``dm.transform_batch(batch, train)``.
- ``ImageFolderDataModule``: any tree root/<class>/*.jpg (or root/{train,val,test}/<class>/...);
  its loaders yield (images (B, C, H, W) float normalized, labels (B,) int64) directly.

What the model sees is (images (B, C, H, W) float normalized, labels (B,) int64).
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from mambazoo.data.base import SplitDataModule, check_classes, drop_unreadable, split_indices
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


class UInt8ImageDataset(Dataset):
    """uint8 images (n, H, W) or (n, C, H, W) and labels (n,), served as they are stored.

    ``dataset[i]`` is (image (C, H, W) uint8, label); ``dataset.__getitems__(indices)``, which the
    DataLoader calls with a whole batch of indices, is (images (B, C, H, W) uint8, labels (B,)),
    gathered by one indexing op. Load it with ``collate_fn=stacked_batch``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images = images if images.dim() == 4 else images[:, None]
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.images.index_select(0, index), self.labels.index_select(0, index)


def stacked_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The DataLoader's collate_fn for ``UInt8ImageDataset``: the fetcher hands it what
    ``__getitems__`` returned, a batch already stacked, which passes through unchanged."""
    return batch


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """float images (B, C, H, W) -> (B, C, size, size), bilinear with antialias (as torchvision's
    ``Resize(antialias=True)`` on float tensors)."""
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def random_crop_flip(images: torch.Tensor, pad: int) -> torch.Tensor:
    """images (B, C, H, W) -> (B, C, H, W): each sample is cropped at its own random offset from
    itself zero-padded by ``pad`` on every side (torchvision's ``RandomCrop(H, padding=pad)``), then
    mirrored left-right with probability 0.5 (``RandomHorizontalFlip``). One gather on the batch's
    device, random numbers from that device's default generator, no host synchronization."""
    b, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (pad, pad, pad, pad))  # (B, C, H + 2 pad, W + 2 pad), zeros around
    top = torch.randint(0, 2 * pad + 1, (b, 1), device=device)
    left = torch.randint(0, 2 * pad + 1, (b, 1), device=device)
    flip = torch.rand(b, 1, device=device) < 0.5
    rows = top + torch.arange(h, device=device)  # (B, H) rows of padded
    ramp = torch.arange(w, device=device)
    cols = left + torch.where(flip, ramp.flip(0), ramp)  # (B, W) columns of padded, reversed if flipped
    index = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).view(b, 1, h * w)  # (B, 1, H*W)
    return padded.flatten(2).gather(2, index.expand(b, c, h * w)).view(b, c, h, w)


class FashionMNISTDataModule(SplitDataModule):
    """Fashion-MNIST from local IDX files: 60k train (minus ``val_split`` held out, fixed seed) and
    the 10k test images.

    The loaders yield uint8 batches (images (B, 1, 28, 28), labels (B,)), gathered by one indexing
    op per batch with no per-sample work, so the main process alone (num_workers=0) keeps up with a
    GPU. Under a Lightning Trainer, ``on_after_batch_transfer`` runs ``transform_batch`` on the
    device: images (B, 1, img_size, img_size) float32 normalized with ``FASHION_MNIST_MEAN``/``STD``;
    code that iterates the loaders itself calls ``transform_batch(batch, train)``.

    Augmentation in training (``augment``): random crop with max(2, img_size // 14) px zero padding
    and horizontal flip, drawn per sample."""

    num_classes = 10
    classes = FASHION_MNIST_CLASSES

    def __init__(self, root: str = FASHION_MNIST_ROOT, batch_size: int = 128, num_workers: int = 2,
                 val_split: int = 5000, augment: bool = True, img_size: int = 28, seed: int = 0):
        super().__init__(batch_size, num_workers)
        self.root, self.val_split, self.augment = Path(root), val_split, augment
        self.img_size, self.seed = img_size, seed

    def transform_batch(self, batch: tuple[torch.Tensor, torch.Tensor],
                        train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images (B, 1, 28, 28), labels (B,)) on any device -> (float32 images
        (B, 1, img_size, img_size) normalized, labels): scale to [0, 1], resize if img_size != 28,
        random crop + flip if ``train and self.augment``, normalize. Vectorized on the batch's
        device, without host synchronization."""
        images, labels = batch
        x = images.float() / 255
        if x.shape[-2:] != (self.img_size, self.img_size):
            x = resize_batch(x, self.img_size)
        if train and self.augment:
            x = random_crop_flip(x, pad=max(2, self.img_size // 14))
        return (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD, labels

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Lightning calls this on the batch once it is on the device: the training loop gets the
        augmented transform; validation, sanity checks, test and predict the deterministic one."""
        training = self.trainer is not None and self.trainer.training
        return self.transform_batch(batch, train=training)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if self.train_set is None:
            self.setup()
        # pinned batches: Lightning's non_blocking copy to the GPU is then truly asynchronous (from pageable memory
        # the host waits for the copy); measured on 2 x H200 DDP it made no difference either way
        return DataLoader(getattr(self, f"{split}_set"), batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          collate_fn=stacked_batch, pin_memory=torch.cuda.is_available())

    def prepare_data(self) -> None:
        for split in FASHION_MNIST_FILES.values():
            for stem in split:
                _find(self.root, stem)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = read_fashion_mnist(self.root, "train")
        train_idx, val_idx = split_indices(len(labels), self.val_split, self.seed)
        full = UInt8ImageDataset(images, labels)
        self.train_set, self.val_set = Subset(full, train_idx), Subset(full, val_idx)
        self.test_set = UInt8ImageDataset(*read_fashion_mnist(self.root, "test"))


class ImageFolderDataModule(SplitDataModule):
    """Any folder of images labelled by sub-folder: root/<class>/<image>, or with split folders
    root/train/<class>/..., root/val/..., root/test/... (a missing val/ is cut from train by
    ``val_split``, a fraction; a missing test/ reuses val). Batches: (B, 3, img_size, img_size)
    normalized with ``mean``/``std`` (ImageNet's by default), labels (B,).

    Augmentation in training: RandomResizedCrop and horizontal flip; evaluation resizes to
    img_size / crop_pct and center-crops."""

    def __init__(self, root: str, img_size: int = 224, batch_size: int = 64, num_workers: int = 2,
                 val_split: float = 0.1, augment: bool = True, crop_pct: float = 0.875,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, seed: int = 0, check_files: bool = True):
        super().__init__(batch_size, num_workers)
        self.check_files, self._checked = check_files, {}
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist: expected root/<class>/<image> "
                                    "or root/train/<class>/<image>")
        self.split_dirs = {s: self.root / s for s in ("train", "val", "test") if (self.root / s).is_dir()}
        self.train_dir = self.split_dirs.get("train", self.root)
        self.classes = sorted(d.name for d in self.train_dir.iterdir() if d.is_dir())
        if not self.classes:
            raise ValueError(f"{self.train_dir}: no class sub-folders (expected {self.train_dir}/<class>/<image>)")
        check_classes(self.train_dir, self.classes)
        if not (isinstance(img_size, int) and img_size > 0) or not 0 < crop_pct <= 1:
            raise ValueError(f"img_size, crop_pct: expected a positive int and a number in (0, 1], got {img_size}, "
                             f"{crop_pct}")
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
        if self.check_files:
            key = str(path)
            if key not in self._checked:  # the train and eval views of one folder are checked once
                self._checked[key] = drop_unreadable(ds.samples, _is_image, "images")
            ds.samples = ds.imgs = list(self._checked[key])
            ds.targets = [label for _, label in ds.samples]
        return ds

    def setup(self, stage: str | None = None) -> None:
        self._setup_folders()


def _rgb_loader(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def _is_image(path: str) -> bool:
    """Whether PIL recognises the file as an image (its header; cheap, the pixels are not decoded)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.size  # noqa: B018
        return True
    except Exception:  # noqa: BLE001  (any failure: not an image we can read)
        return False
