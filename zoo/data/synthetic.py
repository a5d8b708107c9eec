"""Synthetic sequence tasks that probe sequence models, generated on the fly and seeded.

- selective copying (Mamba paper, sec. 4.1): ``n_tokens`` data tokens scattered among noise in a
  sequence of ``seq_len``; after it come ``n_tokens`` markers, at which the data tokens must be
  produced in order. Tokens: 0 noise, 1 marker, 2..vocab-1 data.
- induction heads (Mamba paper, sec. 4.1): random tokens with one special token followed by a
  token b somewhere; the sequence ends with the special token, and the model must predict b.
  The special token is vocab - 1.
- MQAR (multi-query associative recall, Zoology): ``n_pairs`` key-value pairs, then a region of
  noise in which keys reappear; at each, the model must predict the key's value. Keys come from
  [1, vocab/2), values from [vocab/2, vocab), 0 is noise.
- parity (state tracking, the Mamba-3 paper's probe): a start token 2, then uniform bits 0 / 1; the
  target at each bit is the parity (xor) of the bits so far, the start is unscored. A real, non-negative
  decay cannot flip a sign per 1-bit; a rotation by pi (a complex state) can.

Each generator returns (inputs (b, T) long, targets (b, T) long) aligned: targets[t] is what the
model must output after reading inputs[:t+1]; -100 marks unscored positions.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from mambazoo.data.streams import train_stream_loader

IGNORE = -100


def _torch_gen(rng: np.random.Generator) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(0, 2**62)))


def _distinct(batch: int, n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """(batch, k) distinct integers in [0, n) per row, in random order."""
    if k > n:
        raise ValueError(f"cannot draw {k} distinct values from {n}")
    return torch.rand(batch, n, generator=g).argsort(dim=1)[:, :k]


def selective_copy(batch: int, seq_len: int, n_tokens: int = 16, vocab_size: int = 16,
                   g: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs / targets (batch, seq_len + n_tokens); see the module docstring."""
    if vocab_size < 3 or n_tokens < 1 or seq_len < n_tokens:
        raise ValueError(f"selective copy needs vocab_size >= 3 and 1 <= n_tokens <= seq_len, got "
                         f"vocab_size={vocab_size}, n_tokens={n_tokens}, seq_len={seq_len}")
    pos = _distinct(batch, seq_len, n_tokens, g).sort(dim=1).values
    data = torch.randint(2, vocab_size, (batch, n_tokens), generator=g)
    x = torch.zeros(batch, seq_len + n_tokens, dtype=torch.long)
    x.scatter_(1, pos, data)
    x[:, seq_len:] = 1
    y = torch.full_like(x, IGNORE)
    y[:, seq_len:] = data
    return x, y


def induction_heads(batch: int, seq_len: int, vocab_size: int = 16,
                    g: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs / targets (batch, seq_len); the only target is the last position's."""
    if vocab_size < 3 or seq_len < 4:
        raise ValueError(f"induction heads needs vocab_size >= 3 and seq_len >= 4, got {vocab_size}, {seq_len}")
    special = vocab_size - 1
    x = torch.randint(0, special, (batch, seq_len), generator=g)
    p = torch.randint(0, seq_len - 2, (batch,), generator=g)
    rows = torch.arange(batch)
    x[rows, p] = special
    answer = x[rows, p + 1].clone()
    x[:, -1] = special
    y = torch.full_like(x, IGNORE)
    y[:, -1] = answer
    return x, y


def mqar(batch: int, seq_len: int, n_pairs: int = 8, vocab_size: int = 8192, n_queries: int | None = None,
         g: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs / targets (batch, seq_len): k1 v1 ... kn vn, then noise with ``n_queries`` keys at
    random positions, each scored with its value."""
    n_queries = n_pairs if n_queries is None else n_queries
    half = vocab_size // 2
    if n_pairs < 1 or n_queries > n_pairs or 2 * n_pairs + n_queries > seq_len or half - 1 < n_pairs:
        raise ValueError(f"mqar needs 1 <= n_queries <= n_pairs < vocab_size / 2 and 2 n_pairs + n_queries <= "
                         f"seq_len, got n_pairs={n_pairs}, n_queries={n_queries}, seq_len={seq_len}, vocab_size={vocab_size}")
    keys = _distinct(batch, half - 1, n_pairs, g) + 1
    values = torch.randint(half, vocab_size, (batch, n_pairs), generator=g)
    x = torch.zeros(batch, seq_len, dtype=torch.long)
    x[:, 0:2 * n_pairs:2], x[:, 1:2 * n_pairs:2] = keys, values
    which = _distinct(batch, n_pairs, n_queries, g)
    qpos = _distinct(batch, seq_len - 2 * n_pairs, n_queries, g) + 2 * n_pairs
    x.scatter_(1, qpos, keys.gather(1, which))
    y = torch.full_like(x, IGNORE)
    y.scatter_(1, qpos, values.gather(1, which))
    return x, y


def parity(batch: int, seq_len: int, g: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs / targets (batch, seq_len): a start token 2, then seq_len - 1 bits; targets[t] = x_1 xor ... xor
    x_t for every bit t >= 1, IGNORE at the start. The model's vocabulary needs 3 tokens."""
    if seq_len < 2:
        raise ValueError(f"parity needs seq_len >= 2 (a start token and at least one bit), got {seq_len}")
    bits = torch.randint(0, 2, (batch, seq_len - 1), generator=g)
    x = torch.cat([torch.full((batch, 1), 2, dtype=torch.long), bits], dim=1)
    y = torch.cat([torch.full((batch, 1), IGNORE, dtype=torch.long), bits.cumsum(dim=1) % 2], dim=1)
    return x, y


TASKS = {"selective_copy": selective_copy, "induction_heads": induction_heads, "mqar": mqar, "parity": parity}


class _EvalSet(IterableDataset):
    """A fixed evaluation set: ``n_batches`` batches, batch i drawn from a seed of (seed, length, i)."""

    def __init__(self, fn, batch: int, n_batches: int, seq_len: int, seed: int, kwargs: dict):
        self.fn, self.batch, self.n_batches, self.seq_len, self.seed, self.kwargs = fn, batch, n_batches, seq_len, seed, kwargs

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self):
        for i in range(self.n_batches):
            g = torch.Generator().manual_seed(hash((self.seed, self.seq_len, i)) % 2**62)
            yield self.fn(self.batch, self.seq_len, g=g, **self.kwargs)


class SyntheticDataModule(pl.LightningDataModule):
    """Train on ``task`` at ``seq_len``; validate at ``val_lengths`` (default [seq_len]) and test at
    ``test_lengths`` (default: val_lengths), which may differ from the training length.

    task: selective_copy | induction_heads | mqar | parity; task_kwargs: the generator's keywords
    (n_tokens, vocab_size, n_pairs, n_queries). Evaluation sets hold ``eval_samples`` sequences,
    in batches of at most ``eval_batch_size`` sequences and ``eval_batch_tokens`` tokens.
    Evaluation sets are named "val" (the first), "val_L{length}" (the others), "test_L{length}".
    """

    def __init__(self, task: str = "selective_copy", seq_len: int = 256, batch_size: int = 32,
                 task_kwargs: dict | None = None, val_lengths: list[int] | None = None,
                 test_lengths: list[int] | None = None, eval_samples: int = 256, eval_batch_size: int = 64,
                 eval_batch_tokens: int = 2**18, seed: int = 0, num_workers: int = 0):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task: expected one of {sorted(TASKS)}, got {task!r}")
        self.task, self.fn, self.seq_len, self.batch_size = task, TASKS[task], seq_len, batch_size
        self.task_kwargs = dict(task_kwargs or {})
        self.val_lengths = list(val_lengths or [seq_len])
        self.test_lengths = list(test_lengths or self.val_lengths)
        self.eval_samples, self.eval_batch_size, self.eval_batch_tokens = eval_samples, eval_batch_size, eval_batch_tokens
        self.seed, self.num_workers = seed, num_workers
        self.val_names = ["val"] + [f"val_L{n}" for n in self.val_lengths[1:]]
        self.test_names = [f"test_L{n}" for n in self.test_lengths]
        self.fn(2, seq_len, g=torch.Generator().manual_seed(0), **self.task_kwargs)  # fail early on bad sizes

    def _make_batch(self, rng, j):
        return self.fn(self.batch_size, self.seq_len, g=_torch_gen(rng), **self.task_kwargs)

    def train_dataloader(self) -> DataLoader:
        return train_stream_loader(self._make_batch, self.seed, self.trainer, self.num_workers)

    def _eval_loader(self, length: int, offset: int) -> DataLoader:
        batch = max(1, min(self.eval_batch_size, self.eval_batch_tokens // length, self.eval_samples))
        n_batches = max(1, self.eval_samples // batch)
        return DataLoader(_EvalSet(self.fn, batch, n_batches, length, self.seed + offset, self.task_kwargs),
                          batch_size=None)

    def val_dataloader(self):
        loaders = [self._eval_loader(n, 1_000_003) for n in self.val_lengths]
        return loaders[0] if len(loaders) == 1 else loaders

    def test_dataloader(self):
        loaders = [self._eval_loader(n, 2_000_003) for n in self.test_lengths]
        return loaders[0] if len(loaders) == 1 else loaders
