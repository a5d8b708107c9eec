"""LightningDataModules. Text and synthetic data live here; images (mambazoo.data.images) and audio
(mambazoo.data.audio) are imported on first use."""

from mambazoo.data.synthetic import SyntheticDataModule, induction_heads, mqar, selective_copy
from mambazoo.data.text import ByteDataModule, TokenFileDataModule, load_byte_corpus, stdlib_files

_LAZY = {
    "FashionMNISTDataModule": "mambazoo.data.images",
    "ImageFolderDataModule": "mambazoo.data.images",
    "WavFolderDataModule": "mambazoo.data.audio",
}

__all__ = ["ByteDataModule", "SyntheticDataModule", "TokenFileDataModule", "induction_heads", "load_byte_corpus",
           "mqar", "selective_copy", "stdlib_files", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mambazoo.data' has no attribute {name!r}")
