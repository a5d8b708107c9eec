"""LightningDataModules. Text and synthetic data live here; images (zoo.data.images) and audio
(zoo.data.audio) are imported on first use."""

from zoo.data.synthetic import SyntheticDataModule, induction_heads, mqar, selective_copy
from zoo.data.text import ByteDataModule, TokenFileDataModule, load_byte_corpus, stdlib_files

_LAZY = {
    "FashionMNISTDataModule": "zoo.data.images",
    "ImageFolderDataModule": "zoo.data.images",
    "WavFolderDataModule": "zoo.data.audio",
}

__all__ = ["ByteDataModule", "SyntheticDataModule", "TokenFileDataModule", "induction_heads", "load_byte_corpus",
           "mqar", "selective_copy", "stdlib_files", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'zoo.data' has no attribute {name!r}")
