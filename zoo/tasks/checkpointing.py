"""Checkpoint files written atomically, and the PNG of training curves written at the end of fit."""

from __future__ import annotations

import csv
import errno
import os
import re
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
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                err = OSError(errno.ENOSPC, f"no space left on device while saving {path} (the previous file "
                                            "at that path, if any, is unchanged)")
                err._zoo_during_save = True
                raise err from None
            if isinstance(e, Exception):
                e._zoo_during_save = True  # ZooCheckpoint.on_exception does not retry a failed save
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


_TMP = re.compile(r"^\..+\.tmp-(\d+)$")


def remove_orphan_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that saves killed part-way left in ``folder`` (AtomicCheckpointIO's
    ``.NAME.tmp-PID`` whose process is gone) and return their paths."""
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for f in folder.iterdir():
        m = _TMP.match(f.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            f.unlink(missing_ok=True)
            removed.append(f)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class ZooCheckpoint(ModelCheckpoint):
    """The run's one ModelCheckpoint: the best checkpoint by ``monitor`` (``best-step{step}.ckpt``, chosen after
    each validation) and ``last.ckpt`` (``save_last=True``), which always holds the latest weights: it is
    written after each validation, every ``every_n_train_steps`` steps when set, and whenever training stops
    (max_steps, max_time, early stopping, SIGTERM, an exception in the loop), so no step is lost.

    Saving last.ckpt every N steps does not go through ModelCheckpoint's step trigger, which would also try
    the best checkpoint with a stale metric; it writes last.ckpt alone."""

    def __init__(self, dirpath, monitor: str | None = "val/loss", mode: str = "min",
                 every_n_train_steps: int | None = None):
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(f"checkpoint_every_n_steps: expected a positive int or null, got {every_n_train_steps}")
        super().__init__(dirpath=dirpath, filename="best-step{step}", monitor=monitor, mode=mode, save_top_k=1,
                         save_last=True, auto_insert_metric_name=False, enable_version_counter=False)
        self.last_every_n_steps = every_n_train_steps
        self._last_written_step: int | None = None  # the global step last.ckpt holds (this process)

    @property
    def last_step(self) -> int | None:
        """The global step last.ckpt holds (None before this process wrote it)."""
        return self._last_written_step

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        last = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        # resumed from last.ckpt at this very step: nothing new to save until a step is taken
        resumed = getattr(trainer, "ckpt_path", None)
        if resumed and last.is_file() and Path(resumed).resolve() == last.resolve():
            self._last_written_step = trainer.global_step

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_written_step = trainer.global_step

    def write_last(self, trainer) -> None:
        """Write last.ckpt now unless it already holds this step (no effect on the best-checkpoint bookkeeping)."""
        if self._last_written_step == trainer.global_step or trainer.fast_dev_run or trainer.sanity_checking:
            return
        path = self.format_checkpoint_name(self._monitor_candidates(trainer), self.CHECKPOINT_NAME_LAST)
        self.last_model_path = path
        trainer.save_checkpoint(path, self.save_weights_only)
        self._last_written_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        n = self.last_every_n_steps
        if n and trainer.global_step % n == 0 and not self._should_skip_saving_checkpoint(trainer):
            self.write_last(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)  # the best checkpoint (and last.ckpt when it saved one)
        from lightning.pytorch.trainer.states import TrainerFn

        if trainer.state.fn == TrainerFn.FITTING:
            self.write_last(trainer)  # also after a validation that did not improve the monitor

    def on_train_end(self, trainer, pl_module) -> None:
        self.write_last(trainer)  # the final weights, whatever stopped training

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """Save the last good step before the exception propagates (one process only: under several
        processes a save is collective and the others may not have failed). A failed save (the disk) is not
        retried; a failing save here never hides the original exception."""
        if trainer.world_size != 1 or getattr(exception, "_zoo_during_save", False):
            return
        from lightning.pytorch.trainer.states import TrainerFn

        if trainer.state.fn != TrainerFn.FITTING or trainer.global_step == 0:
            return
        _drop_unfinished_batch(trainer)
        try:
            self.write_last(trainer)
        except Exception as e:  # noqa: BLE001  (reported, then the original exception goes on)
            print(f"could not save {self.last_model_path} after the error: {e}", flush=True)
            return
        if self._last_written_step == trainer.global_step:
            print(f"saved the weights of step {trainer.global_step} to {self.last_model_path} before stopping; "
                  "resume with --ckpt_path last", flush=True)


def _drop_unfinished_batch(trainer) -> None:
    """The batch that raised is not part of the saved state: its progress counters go back to the last
    completed batch, so a resume redoes that batch at the same step (and logs it under the same step)."""
    progress = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "batch_progress", None)
    for counter in (getattr(progress, "total", None), getattr(progress, "current", None)):
        if counter is not None and hasattr(counter, "completed"):
            counter.ready = counter.started = counter.processed = counter.completed


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


def read_run_metrics(paths) -> dict[str, list[tuple[int, float]]]:
    """The metrics of a whole run from the metrics.csv of each of its starts (version_0, version_1 after a
    resume, ...), in order: a later start replaces what an earlier one logged from its first step on (the
    steps after the checkpoint it resumed from were redone)."""
    merged: dict[str, list[tuple[int, float]]] = {}
    for path in paths:
        s = read_metrics_csv(path)
        steps = [st for vals in s.values() for st, _ in vals]
        if not steps:
            continue
        first = min(steps)
        merged = {k: [(st, v) for st, v in vals if st < first] for k, vals in merged.items()}
        for k, vals in s.items():
            merged.setdefault(k, []).extend(vals)
    return {k: v for k, v in merged.items() if v}


def _version_key(p: Path) -> int:
    m = re.search(r"version_(\d+)", str(p))
    return int(m.group(1)) if m else -1


def _is_val(key: str) -> bool:
    return key.split("/")[0].startswith("val")


def curve_panels(series: dict) -> list[tuple[str, list[str]]]:
    """The axes of curves.png as (y label, metric names): loss in nats (train and val), validation bits per
    byte, validation accuracies (0..1); each quantity on its own axes, empty ones left out."""
    panels = [("loss (nats)", [k for k in ("train/loss", "val/loss") if k in series]),
              ("bits per byte", [k for k in series if _is_val(k) and k.endswith("/bpb")]),
              ("accuracy", [k for k in series if _is_val(k) and k.rsplit("/", 1)[-1] in ("acc", "acc_top5", "seq_acc")])]
    return [p for p in panels if p[1]] or [("loss (nats)", [])]


def plot_curves(metrics_csv, out_png: str | os.PathLike, title: str = "") -> Path:
    """Loss (train and val, nats), validation bits per byte, and validation accuracies, each on its own axes,
    against the step. ``metrics_csv``: one metrics.csv, or a list of them (a resumed run, see
    ``read_run_metrics``)."""
    matplotlib = require("matplotlib", "curves.png")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    paths = [metrics_csv] if isinstance(metrics_csv, (str, os.PathLike)) else list(metrics_csv)
    s = read_run_metrics(paths)
    panels = curve_panels(s)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels) + 1, 4), squeeze=False)
    for ax, (ylabel, keys) in zip(axes[0], panels):
        for key in keys:
            steps, vals = zip(*sorted(s[key]))
            val = _is_val(key)
            ax.plot(steps, vals, label=key, marker="o" if val else None, lw=2 if val else 1,
                    markersize=4 if len(steps) > 20 else 6)
        ax.set_xlabel("step"), ax.set_ylabel(ylabel), ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))  # whole steps, also for short runs
        if ylabel == "accuracy":
            ax.set_ylim(-0.02, 1.02)
        if keys:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


class CurvesPNG(pl.Callback):
    """At the end of fit, plot the CSV logger's metrics to ``out_png`` (rank zero only): the whole run, earlier
    starts included (every ``version_*/metrics.csv`` under ``logs_dir``, when given)."""

    def __init__(self, out_png: str | os.PathLike, title: str = "", logs_dir: str | os.PathLike | None = None):
        self.out_png, self.title = Path(out_png), title
        self.logs_dir = Path(logs_dir) if logs_dir is not None else None

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
            paths = [path]
            if self.logs_dir is not None and Path(logger.log_dir).parent.resolve() == self.logs_dir.resolve():
                paths = sorted(self.logs_dir.glob("version_*/metrics.csv"), key=_version_key)
                paths = [p for p in paths if _version_key(p) <= _version_key(path)]
            try:
                print(f"training curves: {plot_curves(paths, self.out_png, self.title)}", flush=True)
            except MissingExtraError as e:  # the run itself is fine: say why there is no PNG
                print(f"no training curves: {e}", flush=True)
