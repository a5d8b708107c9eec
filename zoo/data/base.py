"""The loaders shared by the DataModules that hold three in-memory splits."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader


class SplitDataModule(L.LightningDataModule):
    """Train / val / test loaders over ``self.train_set``, ``val_set`` and ``test_set``, which
    subclasses fill in ``setup()``; the loaders call ``setup()`` themselves when used directly."""

    def __init__(self, batch_size: int, num_workers: int):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size}")
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_set = self.val_set = self.test_set = None

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if self.train_set is None:
            self.setup()
        return DataLoader(getattr(self, f"{split}_set"), batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
