"""Checkpoint files written atomically, and the PNG of training curves written at the end of fit."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mambazoo.optional import MissingExtraError, require


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file beside the target, fsync, then ``os.replace``: a save
    that fails (or is killed) part-way leaves the previous file at that path untouched."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        """Reads through the project's safe reader (``mambazoo.weights_io``): never executes pickled code,
        and a file that is not a checkpoint gets one line naming it and what it holds."""
        from mambazoo.weights_io import describe_object, load_file

        ckpt = load_file(path, map_location=map_location if map_location is not None else "cpu")
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            from mambazoo.errors import WeightsFileError

            raise WeightsFileError(f"{path}: expected a Lightning checkpoint (.ckpt written by `mambazoo fit`), "
                                   f"found {describe_object(ckpt)}")
        return ckpt


class LastCheckpoint(ModelCheckpoint):
    """Writes only ``last.ckpt`` (overwritten atomically through the trainer's checkpoint IO):
    after every validation, every ``every_n_train_steps`` steps when set, and at the end of each
    training epoch when there is no validation. Best checkpoints are a separate ModelCheckpoint."""

    def __init__(self, dirpath, every_n_train_steps: int | None = None):
        super().__init__(dirpath=dirpath, monitor=None, save_top_k=0, save_last=True,
                         every_n_train_steps=every_n_train_steps, enable_version_counter=False)

    def _save_topk_checkpoint(self, trainer, monitor_candidates) -> None:
        # no top-k files; marking the step as saved lets ModelCheckpoint go on to write last.ckpt
        self._last_global_step_saved = trainer.global_step


def read_metrics_csv(path: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """A CSVLogger metrics.csv -> {metric: [(step, value), ...]} (empty cells skipped)."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for k, v in row.items():
                if k in ("step", "epoch") or v in (None, ""):
                    continue
                series.setdefault(k, []).append((step, float(v)))
    return series


def plot_curves(metrics_csv: str | os.PathLike, out_png: str | os.PathLike, title: str = "") -> Path:
    """Training and validation loss (left) and the validation metrics bpb / acc (right) against step."""
    matplotlib = require("matplotlib", "curves.png")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = read_metrics_csv(metrics_csv)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("train/loss", "val/loss"):
        if key in s:
            steps, vals = zip(*s[key])
            ax1.plot(steps, vals, label=key, marker="o" if key.startswith("val") else None,
                     lw=1 if key.startswith("train") else 2)
    ax1.set_xlabel("step"), ax1.set_ylabel("loss (nats)"), ax1.legend(), ax1.grid(alpha=0.3)
    right = [k for k in s if k.split("/")[0].startswith("val") and k.split("/")[-1] in ("bpb", "acc")]
    for key in right:
        steps, vals = zip(*s[key])
        ax2.plot(steps, vals, label=key, marker="o")
    ax2.set_xlabel("step"), ax2.grid(alpha=0.3)
    if right:
        ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


class CurvesPNG(pl.Callback):
    """At the end of fit, plot the CSV logger's metrics to ``out_png`` (rank zero only)."""

    def __init__(self, out_png: str | os.PathLike, title: str = ""):
        self.out_png, self.title = Path(out_png), title

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        csv_loggers = [lg for lg in trainer.loggers if isinstance(lg, pl.loggers.CSVLogger)]
        if not csv_loggers:
            return
        logger = csv_loggers[0]
        logger.save()
        path = Path(logger.log_dir) / "metrics.csv"
        if path.is_file():
            try:
                print(f"training curves: {plot_curves(path, self.out_png, self.title)}", flush=True)
            except MissingExtraError as e:  # the run itself is fine: say why there is no PNG
                print(f"no training curves: {e}", flush=True)
