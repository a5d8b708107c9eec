"""LightningModules: a task holds a registry model (name + overrides) and its training rules."""

from mambazoo.tasks.base import NonFiniteLossError, ZooTask
from mambazoo.tasks.classification import ClassificationTask, mix_batch
from mambazoo.tasks.lm import CausalLMTask, collect_aux_loss, split_batch
from mambazoo.tasks.optim import build_optimizer, cosine_with_warmup, param_groups, split_decay

__all__ = ["CausalLMTask", "ClassificationTask", "NonFiniteLossError", "ZooTask", "build_optimizer",
           "collect_aux_loss", "cosine_with_warmup", "mix_batch", "param_groups", "split_batch", "split_decay"]
