"""The loaders shared by the DataModules that hold three in-memory splits."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Subset


def drop_unreadable(files: list, readable, what: str) -> list:
    """The entries of ``files`` ((path, label) pairs) whose path ``readable(path)`` accepts; the others are
    left out and named in one printed line (a corrupt or empty file then costs one sample, not the run)."""
    good, bad = [], []
    for entry in files:
        (good if readable(entry[0]) else bad).append(entry)
    if bad:
        shown = ", ".join(str(p) for p, _ in bad[:5]) + (f", ... ({len(bad)} in all)" if len(bad) > 5 else "")
        print(f"skipped {len(bad)} file(s) that are not readable {what}: {shown}", flush=True)
    if not good:
        raise ValueError(f"none of the {len(files)} files is a readable {what} (e.g. {files[0][0] if files else '-'})")
    return good


def check_classes(folder, classes: list[str]) -> None:
    """ValueError unless there are at least two class sub-folders (one class leaves nothing to tell apart)."""
    if len(classes) < 2:
        raise ValueError(f"{folder}: one class sub-folder ({classes[0]!r}); classification needs at least 2 "
                         f"classes, each a sub-folder {folder}/<class>/")


def split_indices(n: int, n_val: int, seed: int) -> tuple[list[int], list[int]]:
    """A fixed random split of range(n): (train indices, val indices)."""
    if not 0 <= n_val < n:
        raise ValueError(f"val_split: expected 0 <= n_val < {n} examples, got {n_val}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


class SplitDataModule(L.LightningDataModule):
    """Train / val / test loaders over ``self.train_set``, ``val_set`` and ``test_set``, which
    subclasses fill in ``setup()``; the loaders call ``setup()`` themselves when used directly."""

    def __init__(self, batch_size: int, num_workers: int):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers: expected an int >= 0, got {num_workers}")
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_set = self.val_set = self.test_set = None

    def _setup_folders(self) -> None:
        """Splits of a folder data set: ``self.split_dirs`` may hold train/val/test folders; without a
        val folder ``self.val_split`` (a fraction) of the training files is held out with
        ``self.seed``; without a test folder the test split is the val split. Needs ``self._folder(path,
        train)``, ``self.train_dir``."""
        if self.train_set is not None:
            return
        if not 0 <= self.val_split < 1:
            raise ValueError(f"val_split: expected a fraction in [0, 1), got {self.val_split!r}")
        if "val" in self.split_dirs:
            self.train_set = self._folder(self.train_dir, True)
            self.val_set = self._folder(self.split_dirs["val"], False)
        else:
            train, val = self._folder(self.train_dir, True), self._folder(self.train_dir, False)
            n = len(train)
            n_val = min(n - 1, max(1, int(round(self.val_split * n)))) if self.val_split > 0 else 0
            train_idx, val_idx = split_indices(n, n_val, self.seed)
            self.train_set, self.val_set = Subset(train, train_idx), Subset(val, val_idx)
        self.test_set = self._folder(self.split_dirs["test"], False) if "test" in self.split_dirs else self.val_set

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if self.train_set is None:
            self.setup()
        return DataLoader(getattr(self, f"{split}_set"), batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available())  # asynchronous copies to the GPU

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
