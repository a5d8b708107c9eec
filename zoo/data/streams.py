"""Resumable training streams: batch j of a run is a pure function of (seed, j, rank), so a run
resumed from a checkpoint at step s sees exactly the batches an uninterrupted run would."""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info


class StepStream(IterableDataset):
    """Endless stream of ready-made batches: ``make_batch(rng, j)`` builds batch j from an RNG
    seeded by (seed, rank, j). Worker w of W yields j = start + w, start + w + W, ...; the
    DataLoader (batch_size=None) interleaves workers in order, so the sequence of j is unchanged."""

    def __init__(self, make_batch: Callable, seed: int, start: int = 0, rank: int = 0):
        self.make_batch, self.seed, self.start, self.rank = make_batch, seed, start, rank

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        w, W = (info.id, info.num_workers) if info is not None else (0, 1)
        j = self.start + w
        while True:
            yield self.make_batch(np.random.default_rng([self.seed, self.rank, j]), j)
            j += W


def train_stream_loader(make_batch: Callable, seed: int, trainer, num_workers: int = 0) -> DataLoader:
    """A DataLoader over ``StepStream`` starting at the micro-batch the trainer has reached
    (global_step x accumulate_grad_batches), distinct per rank. Needs --trainer.max_steps."""
    start, rank = 0, 0
    if trainer is not None:
        if trainer.max_steps is None or trainer.max_steps < 0:
            raise ValueError("this datamodule streams batches without end: set --trainer.max_steps "
                             "(and an int --trainer.val_check_interval)")
        start = trainer.global_step * trainer.accumulate_grad_batches
        rank = trainer.global_rank
    return DataLoader(StepStream(make_batch, seed, start, rank), batch_size=None, num_workers=num_workers,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())
