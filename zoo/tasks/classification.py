"""Image and audio classification (Vision Mamba, the audio Mamba): top-1 / top-5 accuracy,
label smoothing, mixup / cutmix."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from mambazoo.tasks.base import ZooTask, lr_of


def mix_batch(x: torch.Tensor, y: torch.Tensor, mixup_alpha: float, cutmix_alpha: float,
              generator: torch.Generator | None = None):
    """Mixup or cutmix (chosen at random when both are on) on inputs x (b, ..., H, W) or (b, ..., T).

    Returns (mixed x, y, y of the partner sample, lam): the loss is
    lam * CE(logits, y) + (1 - lam) * CE(logits, y_partner)."""
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or torch.rand(1, generator=generator).item() < 0.5)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(x.shape[0], device="cpu", generator=generator).to(x.device)
    if not use_cutmix:
        return lam * x + (1 - lam) * x[perm], y, y[perm], lam
    H, W = (x.shape[-2], x.shape[-1]) if x.dim() >= 4 else (1, x.shape[-1])
    cut_h, cut_w = int(H * (1 - lam) ** 0.5), int(W * (1 - lam) ** 0.5)
    cy, cx = torch.randint(H, (1,), generator=generator).item(), torch.randint(W, (1,), generator=generator).item()
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
    x = x.clone()
    if x.dim() >= 4:
        x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    else:
        x[..., x0:x1] = x[perm][..., x0:x1]
    lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)  # the area actually swapped
    return x, y, y[perm], lam


def _check_batch(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) with float inputs and integer labels (b,), else ValueError naming what came (raw uint8
    images, say, which the data module's transform normalizes). Dtypes and shapes only: no device sync."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError(f"batch: expected (inputs, labels), got {type(batch).__name__}")
    x, y = batch
    if not x.is_floating_point():
        raise ValueError(f"inputs: expected float tensors (normalized images or waveforms), got {x.dtype} "
                         f"{tuple(x.shape)}; raw uint8 images need the data module's normalization")
    if y.is_floating_point() or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"labels: expected integer class indices ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}")
    return x, y


class ClassificationTask(ZooTask):
    """Class logits from ``create_model(model, num_classes=num_classes, **model_kwargs)``;
    batches are (inputs, labels (b,) long). Cross-entropy with ``label_smoothing``; mixup / cutmix
    with probability ``mix_prob`` when their alpha > 0. Logs top-1 and top-5 accuracy."""

    def __init__(self, model: str = "vim-tiny", num_classes: int = 10, model_kwargs: dict | None = None,
                 lr: float = 1e-3, weight_decay: float = 0.05, betas: tuple[float, float] = (0.9, 0.999),
                 warmup_steps: int = 100, min_lr_ratio: float = 0.01, schedule_steps: int | None = None,
                 label_smoothing: float = 0.0, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 mix_prob: float = 1.0, compile: bool | str = False, pretrained: str | None = None):
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes: expected an int >= 2 (a classifier tells classes apart), got {num_classes!r}")
        if not 0 <= label_smoothing < 1 or not 0 <= mix_prob <= 1 or mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"label_smoothing in [0, 1), mix_prob in [0, 1], mixup_alpha and cutmix_alpha >= 0: got "
                             f"{label_smoothing}, {mix_prob}, {mixup_alpha}, {cutmix_alpha}")
        super().__init__(model, {"num_classes": num_classes, **(model_kwargs or {})}, lr, weight_decay, betas,
                         warmup_steps, min_lr_ratio, schedule_steps, compile=compile, pretrained=pretrained)
        self.save_hyperparameters()
        k = min(5, num_classes)
        for stage in ("val", "test"):
            setattr(self, f"{stage}_top1", MulticlassAccuracy(num_classes, top_k=1, average="micro"))
            setattr(self, f"{stage}_top5", MulticlassAccuracy(num_classes, top_k=k, average="micro"))
            setattr(self, f"{stage}_loss", MeanMetric())

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        n = getattr(dm, "num_classes", None)
        if n is not None and n != self.hparams.num_classes:
            raise ValueError(f"the data has {n} classes but the task was built for "
                             f"{self.hparams.num_classes}: set --model.init_args.num_classes {n}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = _check_batch(batch)
        hp = self.hparams
        if (hp.mixup_alpha > 0 or hp.cutmix_alpha > 0) and torch.rand(1).item() < hp.mix_prob:
            x, ya, yb, lam = mix_batch(x, y, hp.mixup_alpha, hp.cutmix_alpha)
            logits = self.model(x).float()
            loss = (lam * F.cross_entropy(logits, ya, label_smoothing=hp.label_smoothing)
                    + (1 - lam) * F.cross_entropy(logits, yb, label_smoothing=hp.label_smoothing))
        else:
            logits = self.model(x).float()
            loss = F.cross_entropy(logits, y, label_smoothing=hp.label_smoothing)
        self.check_finite(loss)
        self.log_train("train/loss", loss, prog_bar=True)
        self.log_train("train/lr", lr_of(self.trainer))
        self.log_throughput(x.shape[0], "samples")
        return loss

    def _eval_step(self, stage, batch):
        x, y = _check_batch(batch)
        logits = self.model(x).float()
        getattr(self, f"{stage}_loss").update(F.cross_entropy(logits, y), weight=y.shape[0])
        getattr(self, f"{stage}_top1").update(logits, y)
        getattr(self, f"{stage}_top5").update(logits, y)
        self.log(f"{stage}/loss", getattr(self, f"{stage}_loss"), prog_bar=stage == "val")
        self.log(f"{stage}/acc", getattr(self, f"{stage}_top1"), prog_bar=stage == "val")
        self.log(f"{stage}/acc_top5", getattr(self, f"{stage}_top5"))

    def validation_step(self, batch, batch_idx):
        self._eval_step("val", batch)

    def test_step(self, batch, batch_idx):
        self._eval_step("test", batch)
