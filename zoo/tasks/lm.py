"""Causal language modelling (Mamba LM, MambaByte, MoE-Mamba, Jamba) and the synthetic sequence
probes (selective copying, induction heads, MQAR), which are the same task with most targets ignored."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mambazoo.mambabyte.tokenizer import ByteTokenizer
from mambazoo.tasks.base import ZooTask, _is_fsdp, lr_of
from mambazoo.tasks.metrics import IGNORE_INDEX, SequenceMetrics


def collect_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the auxiliary (MoE load-balancing / router) losses the model's blocks kept from the
    last forward, each cleared once read. None when the model has none."""
    total = None
    for m in model.modules():
        aux = getattr(m, "aux_loss", None)
        if isinstance(aux, torch.Tensor):
            total = aux.float() if total is None else total + aux.float()
            m.aux_loss = None
    return total


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch is either token windows (b, L+1) -> inputs [:, :-1], targets [:, 1:], or a pair
    (inputs (b, L), targets (b, L)) already aligned, IGNORE_INDEX (-100) marking unscored positions."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() != 2 or batch.shape[1] < 2:
            raise ValueError(f"token batch: expected (batch, L+1) with L >= 1, got {tuple(batch.shape)}")
        return batch[:, :-1], batch[:, 1:]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, y = batch
        if x.shape != y.shape:
            raise ValueError(f"(inputs, targets): expected equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
        return x, y
    raise ValueError(f"batch: expected a (batch, L+1) tensor or an (inputs, targets) pair, got {type(batch).__name__}")


def get_codec(tokenizer: str | None):
    """'bytes' -> ByteTokenizer; None -> no text codec (prompts and outputs are token ids)."""
    if tokenizer is None:
        return None
    if tokenizer == "bytes":
        return ByteTokenizer()
    raise ValueError(f"tokenizer: expected 'bytes' or None, got {tokenizer!r}")


@torch.no_grad()
def sample(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """input_ids (b, L) -> (b, L + max_new_tokens). Uses ``model.generate`` (recurrent cache) when
    the model has one, else re-runs the whole sequence per token."""
    if hasattr(model, "generate"):
        return model.generate(input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    ids = input_ids
    for _ in range(max_new_tokens):
        logits = model(ids)[:, -1].float() / max(temperature, 1e-5)
        if top_k:
            kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        ids = torch.cat([ids, torch.multinomial(logits.softmax(-1), 1)], dim=1)
    return ids


class CausalLMTask(ZooTask):
    """Next-token prediction: cross-entropy (ignoring IGNORE_INDEX targets) plus ``aux_loss_weight``
    x the sum of the blocks' auxiliary losses (MoE). Logs loss, perplexity, bits per byte
    (``bytes_per_token``: 1 for byte models; None to skip) and token / sequence accuracy.

    Validation / test sets are named by the datamodule's ``val_names`` / ``test_names``
    (default "val" / "test"): several loaders (e.g. test lengths) log under their own names.
    ``sample_prompt``: at the end of fit, print a sample of ``sample_tokens`` tokens after it
    (``tokenizer`` 'bytes' for byte models).
    """

    def __init__(self, model: str = "mambabyte-tiny", model_kwargs: dict | None = None, lr: float = 1e-3,
                 weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95), warmup_steps: int = 100,
                 min_lr_ratio: float = 0.1, schedule_steps: int | None = None, aux_loss_weight: float = 1.0,
                 bytes_per_token: float | None = None, tokenizer: str | None = None,
                 sample_prompt: str | None = None, sample_tokens: int = 200, sample_temperature: float = 0.8,
                 sample_top_k: int | None = None, compile: bool | str = False, pretrained: str | None = None):
        if aux_loss_weight < 0 or (bytes_per_token is not None and not bytes_per_token > 0) or sample_tokens < 0:
            raise ValueError(f"aux_loss_weight >= 0, bytes_per_token > 0 or null, sample_tokens >= 0: got "
                             f"{aux_loss_weight}, {bytes_per_token}, {sample_tokens}")
        if not (sample_temperature >= 0) or (sample_top_k is not None and sample_top_k < 1):
            raise ValueError(f"sample_temperature >= 0 and sample_top_k >= 1 or null: got {sample_temperature}, "
                             f"{sample_top_k}")
        super().__init__(model, model_kwargs, lr, weight_decay, betas, warmup_steps, min_lr_ratio, schedule_steps,
                         compile=compile, pretrained=pretrained)
        self.save_hyperparameters()
        self.codec = get_codec(tokenizer)
        self.eval_metrics = nn.ModuleDict()

    # -- metrics per evaluation set ----------------------------------------------------------
    def _names(self, stage: str) -> list[str]:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return list(getattr(dm, f"{stage}_names", None) or [stage])

    def setup(self, stage: str) -> None:
        for s in ("val", "test"):
            for name in self._names(s):
                if name not in self.eval_metrics:
                    self.eval_metrics[name] = SequenceMetrics(self.hparams.bytes_per_token or 1.0)

    def _metric(self, stage: str, idx: int) -> tuple[str, SequenceMetrics]:
        names = self._names(stage)
        name = names[idx] if idx < len(names) else f"{stage}{idx}"
        if name not in self.eval_metrics:
            self.eval_metrics[name] = SequenceMetrics(self.hparams.bytes_per_token or 1.0).to(self.device)
        return name, self.eval_metrics[name]

    # -- steps -------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (b, L) long -> logits (b, L, vocab)."""
        return self.model(input_ids)

    def _loss(self, batch):
        x, y = split_batch(batch)
        logits = self.model(x)
        loss = F.cross_entropy(logits.float().flatten(0, -2), y.flatten(), ignore_index=IGNORE_INDEX)
        return loss, logits, x, y

    def training_step(self, batch, batch_idx):
        loss, logits, x, y = self._loss(batch)
        aux = collect_aux_loss(self.model)
        total = loss if aux is None else loss + self.hparams.aux_loss_weight * aux
        self.check_finite(total)
        self.log_train("train/loss", loss, prog_bar=True)
        if aux is not None:
            self.log_train("train/aux_loss", aux)
        if self.hparams.bytes_per_token:
            self.log_train("train/bpb", loss / math.log(2) / self.hparams.bytes_per_token)
        self.log_train("train/lr", lr_of(self.trainer))
        self.log_throughput(x.numel(), "tok")
        return total

    def _eval_step(self, stage, batch, idx):
        x, y = split_batch(batch)
        logits = self.model(x)
        collect_aux_loss(self.model)
        _, metric = self._metric(stage, idx)
        metric.update(logits, y)

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step("test", batch, dataloader_idx)

    def _eval_end(self, stage):
        for name in self._names(stage):
            metric = self.eval_metrics[name] if name in self.eval_metrics else None
            if metric is None or not metric.update_called:
                continue
            for key, value in metric.compute().items():
                if key == "bpb" and not self.hparams.bytes_per_token:
                    continue
                self.log(f"{name}/{key}", value, prog_bar=key in ("loss", "bpb") and name == self._names(stage)[0],
                         sync_dist=False)
            metric.reset()

    def on_validation_epoch_end(self):
        self._eval_end("val")

    def on_test_epoch_end(self):
        self._eval_end("test")

    # -- a sample at the end of fit ------------------------------------------------------------
    def generate_text(self, prompt: str, max_new_tokens: int, temperature: float = 0.8,
                      top_k: int | None = None) -> str:
        """Decode ``max_new_tokens`` after ``prompt`` (needs a text tokenizer)."""
        if self.codec is None:
            raise ValueError("this task has no text tokenizer (tokenizer: null); pass token ids instead")
        ids = torch.tensor([self.codec.encode(prompt)], dtype=torch.long, device=self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            out = sample(self.model, ids, max_new_tokens, temperature=temperature, top_k=top_k)
        finally:
            self.model.train(was_training)
        new = out[0, ids.shape[1]:].tolist()
        # a model whose vocabulary is wider than its tokenizer's (padded embeddings) can sample ids no text has
        return self.codec.decode([i for i in new if i < self.codec.vocab_size])

    def on_fit_end(self):
        hp = self.hparams
        if hp.sample_prompt is None or not hp.sample_tokens or self.codec is None or self.global_rank != 0:
            return
        if _is_fsdp(self.trainer):  # the weights are sharded across ranks here: sample from the checkpoint
            print("\n(no sample under FSDP: the weights are sharded; run `mambazoo generate --checkpoint ...`)",
                  flush=True)
            return
        text = self.generate_text(hp.sample_prompt, hp.sample_tokens, hp.sample_temperature, hp.sample_top_k)
        print(f"\n----- sample after {self.global_step} steps -----\n{hp.sample_prompt}{text}\n"
              f"-----------------------------------------", flush=True)
