"""torchmetrics metrics for sequence tasks, summed over batches and reduced across processes."""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric

IGNORE_INDEX = -100


class SequenceMetrics(Metric):
    """Token-level negative log-likelihood, perplexity, bits per byte and accuracy.

    ``update(logits (b, L, V), targets (b, L))``; positions whose target is ``IGNORE_INDEX`` count
    for nothing. ``compute()`` returns loss (mean nats per token), ppl = exp(loss),
    bpb = loss / ln 2 / bytes_per_token, acc (token accuracy) and seq_acc (fraction of sequences
    whose every target is right).
    """

    full_state_update = False

    def __init__(self, bytes_per_token: float = 1.0):
        super().__init__()
        self.bytes_per_token = bytes_per_token
        for name in ("nll", "tokens", "correct", "seq_correct", "seqs"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        mask = targets != IGNORE_INDEX
        logits = logits.float()
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, -2), targets.flatten(),
                                                ignore_index=IGNORE_INDEX, reduction="sum")
        right = (logits.argmax(-1) == targets) & mask
        self.nll += nll.double()
        self.tokens += mask.sum()
        self.correct += right.sum()
        has_target = mask.any(-1)
        self.seq_correct += ((right | ~mask).all(-1) & has_target).sum()
        self.seqs += has_target.sum()

    def compute(self) -> dict[str, torch.Tensor]:
        loss = self.nll / self.tokens.clamp(min=1)
        return {
            "loss": loss.float(),
            "ppl": torch.exp(loss.clamp(max=50)).float(),
            "bpb": (loss / math.log(2) / self.bytes_per_token).float(),
            "acc": (self.correct / self.tokens.clamp(min=1)).float(),
            "seq_acc": (self.seq_correct / self.seqs.clamp(min=1)).float(),
        }
