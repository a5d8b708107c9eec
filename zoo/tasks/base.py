"""What every task shares: a model built by registry name + overrides, the optimizer rules,
training-step logging at the trainer's logging steps (with the throughput) and the non-finite-loss stop."""

from __future__ import annotations

import math
import os
import time

import lightning.pytorch as pl
import torch

from mambazoo.errors import NonFiniteLossError  # noqa: F401  (raised here; re-exported by mambazoo.tasks)
from mambazoo.registry import create_model
from mambazoo.tasks.optim import CosineWithWarmup, build_optimizer, check_optim_args


class ZooTask(pl.LightningModule):
    """Base LightningModule. ``model`` is a registry name (``mambazoo.list_models()``) and
    ``model_kwargs`` the overrides of its config, so a task is fully described by plain YAML.

    lr, weight_decay, betas: AdamW (decay on matrices only, see ``mambazoo.tasks.optim``);
    warmup_steps, min_lr_ratio: the cosine schedule; schedule_steps: its length (default: the
    trainer's max_steps / estimated stepping batches).
    compile: torch.compile the model in place before training. True: inductor, which fuses the
    elementwise work between the scan and conv kernels into fewer launches; 'reduce-overhead' (or another
    inductor mode name) adds CUDA graphs, which also remove the per-launch CPU cost; any other string names
    a torch.compile backend ('eager', 'aot_eager' to debug). The first steps are slower while it
    compiles; checkpoints keep the plain parameter names.
    pretrained: a Hub repo id, zoo name or folder (``mambazoo.from_pretrained``) whose weights start a fresh
    fit (fine-tuning); a classifier head or vocabulary of another size stays freshly initialized. A resumed
    fit (``--ckpt_path``) takes its weights from the checkpoint instead.
    """

    def __init__(self, model: str, model_kwargs: dict | None = None, lr: float = 1e-3,
                 weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                 warmup_steps: int = 100, min_lr_ratio: float = 0.1, schedule_steps: int | None = None,
                 compile: bool | str = False, pretrained: str | None = None):
        super().__init__()
        self.model_name = model
        self.model = create_model(model, **(model_kwargs or {}))
        if pretrained is not None and (not isinstance(pretrained, str) or not pretrained):
            raise ValueError(f"pretrained: expected a Hub repo id, zoo name or folder, got {pretrained!r}")
        self._pretrained = pretrained
        self._train_logs: dict[str, tuple[torch.Tensor | float, bool]] = {}  # this step's (value, prog_bar)
        self._window_start: float | None = None  # throughput window: its start (perf_counter) and items since
        self._window_items = 0
        self._window_unit = "samples"
        self._pending_guard = None  # (step, host flag, CUDA event) of the device-side non-finite guard
        self._guard_buffers = None  # (pinned host flag, CUDA event) reused by every step's guard
        check_optim_args(lr, weight_decay, betas, warmup_steps, min_lr_ratio, schedule_steps)
        if not isinstance(compile, (bool, str)):
            raise ValueError(f"compile: expected true, false or a torch.compile backend name, got {compile!r}")
        self._compile = compile

    def configure_model(self) -> None:
        """Compiles the model in place when ``compile`` asks (once; Lightning calls this before fit/validate/test)."""
        if self._compile and getattr(self.model, "_compiled_call_impl", None) is None:
            if self._compile is True:
                self.model.compile()
            elif self._compile in _INDUCTOR_MODES:
                self.model.compile(mode=self._compile)
            else:
                self.model.compile(backend=self._compile)

    # -- optimizer ---------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        total = hp.schedule_steps or self.trainer.estimated_stepping_batches
        return build_optimizer(self.model, hp.lr, hp.weight_decay, hp.betas, hp.warmup_steps, total,
                               hp.min_lr_ratio, fused=self._device_guard())

    # -- shared training-step plumbing -------------------------------------------------------
    def _device_guard(self) -> bool:
        """True when the non-finite guard runs on the device (no host synchronization per step): every
        parameter on CUDA, no fp16 loss scaler (bf16-mixed or fp32) and not FSDP. The optimizer is then
        PyTorch's fused AdamW, skipping its step on the device when the gradient norm is not finite."""
        trainer = getattr(self, "_trainer", None)
        if trainer is None or _is_fsdp(trainer):
            return False
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return False
        params = [p for p in self.model.parameters() if p.requires_grad]
        return bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)

    def check_finite(self, loss: torch.Tensor) -> None:
        """Stop with a clear message and a checkpoint when the loss is NaN or infinite.

        With the device guard (see ``_device_guard``) nothing waits here: the step whose gradients are not
        finite is skipped on the device, and the next step (or the end of training) raises, so the saved
        weights are still those before the bad step; elsewhere the check reads the loss at once."""
        if self._pending_guard is not None or _fused(self.trainer):
            self._raise_if_flagged()
            return
        if torch.isfinite(loss.detach()).all():
            return
        self._stop(self.global_step, f"non-finite training loss ({loss.item()})")

    def _stop(self, step: int, what: str) -> None:
        ckpt_dir = getattr(self.trainer.checkpoint_callback, "dirpath", None) or self.trainer.default_root_dir
        path = os.path.join(ckpt_dir, f"nonfinite-step{step}.ckpt")
        self.trainer.save_checkpoint(path)
        raise NonFiniteLossError(
            f"{what} at step {step}; training stopped. The weights "
            f"before this step are saved in {path}. Lower the learning rate, raise warmup or check the "
            f"data, then resume with --ckpt_path {path}")

    def _raise_if_flagged(self) -> None:
        """Reads the previous step's device flag (its copy to the host finished long ago, normally)."""
        pending, self._pending_guard = self._pending_guard, None
        if pending is None:
            return
        step, host_flag, event = pending
        if event is not None:
            event.synchronize()
        if host_flag.item():
            self._stop(step, "non-finite training loss or gradients (that step was skipped)")

    def _guard_step(self, optimizer, grad_norm: torch.Tensor) -> None:
        """Arms the fused optimizer's on-device skip with this step's flag, and queues the flag's copy.

        The copy goes to one pinned buffer and one event kept for the whole run: the previous step's flag has
        been read (``check_finite`` runs before the clipping) or dropped by then, so nothing reads it later."""
        flag = (~torch.isfinite(grad_norm)).float().reshape(())
        optimizer.found_inf = flag
        host, event = flag, None
        if flag.is_cuda:
            host, event = self._guard_host_buffers()
            host.copy_(flag, non_blocking=True)
            event.record()
        self._pending_guard = (self.global_step, host, event)

    def _guard_host_buffers(self) -> tuple[torch.Tensor, torch.cuda.Event]:
        """The pinned host float and the CUDA event of the device guard (made at the first guarded step)."""
        if self._guard_buffers is None:
            self._guard_buffers = (torch.empty((), dtype=torch.float32, pin_memory=True), torch.cuda.Event())
        return self._guard_buffers

    def on_fit_start(self) -> None:
        if self._pretrained and not self.trainer.ckpt_path:
            from mambazoo.hub import load_pretrained_into

            fresh = load_pretrained_into(self.model, self._pretrained)["fresh"]
            if self.trainer.global_rank == 0:
                kept = f"; freshly initialized: {', '.join(fresh)}" if fresh else ""
                print(f"weights from {self._pretrained}{kept}", flush=True)
        if self.trainer.world_size > 1:
            _throttle_distributed_checks(self.trainer, max(1, self.trainer.log_every_n_steps))

    def on_train_start(self) -> None:
        if self.trainer.ckpt_path:
            for line in self.apply_resume_overrides():
                if self.trainer.global_rank == 0:
                    print(line, flush=True)

    def apply_resume_overrides(self) -> list[str]:
        """After a checkpoint restored the optimizer and schedule: what resuming means here.

        The checkpoint's optimizer state and schedule position are kept. Settings that differ from what the
        checkpoint was trained with (given on the command line, so ``hparams`` hold them) are applied to the
        optimizer's parameter groups and the schedule, never dropped: lr (the schedule's base), weight_decay
        (the decayed group), betas, warmup_steps, min_lr_ratio, schedule_steps. A longer run (max_steps raised)
        keeps the schedule's length unless ``schedule_steps`` asks otherwise: the learning rate then stays
        at its minimum after the old end instead of jumping back up. Returns one line per change."""
        hp, lines = self.hparams, []
        for config in self.trainer.lr_scheduler_configs:
            sched, opt = config.scheduler, config.scheduler.optimizer
            fns = getattr(sched, "lr_lambdas", None)
            if not fns or not all(isinstance(f, CosineWithWarmup) for f in fns):
                continue  # not the task's schedule (a --lr_scheduler of the user's) or an old checkpoint
            step, before = sched.last_epoch, [g["lr"] for g in opt.param_groups]
            old_warmup, old_total, old_min = fns[0].settings()
            new_total = hp.schedule_steps or old_total
            if (hp.warmup_steps, new_total, hp.min_lr_ratio) != (old_warmup, old_total, old_min):
                for f in fns:
                    f.warmup_steps, f.total_steps, f.min_ratio = int(hp.warmup_steps), int(new_total), float(hp.min_lr_ratio)
                lines.append(f"resume: schedule warmup {old_warmup} -> {hp.warmup_steps}, length {old_total} -> "
                             f"{new_total}, min_lr_ratio {old_min} -> {hp.min_lr_ratio}")
            max_steps = self.trainer.max_steps
            if not hp.schedule_steps and max_steps and max_steps > 0 and max_steps != old_total:
                lines.append(f"resume: the cosine schedule keeps its length of {old_total} steps (max_steps is now "
                             f"{max_steps}; the learning rate stays at its minimum after step {old_total}); pass "
                             f"--model.init_args.schedule_steps {max_steps} to stretch it instead (the learning rate "
                             f"at step {step} then becomes {hp.lr * cosine_at(step, hp.warmup_steps, max_steps, hp.min_lr_ratio):.3g})")
            if any(b != hp.lr for b in sched.base_lrs):
                lines.append(f"resume: lr {sched.base_lrs[0]:g} -> {hp.lr:g} (applied to the optimizer)")
                sched.base_lrs = [float(hp.lr)] * len(sched.base_lrs)
                for g in opt.param_groups:
                    g["initial_lr"] = float(hp.lr)
            decayed = [g for g in opt.param_groups if g["weight_decay"] > 0]
            if decayed and decayed[0]["weight_decay"] != hp.weight_decay:
                lines.append(f"resume: weight_decay {decayed[0]['weight_decay']:g} -> {hp.weight_decay:g} (the decayed group)")
                for g in decayed:
                    g["weight_decay"] = float(hp.weight_decay)
            if tuple(opt.param_groups[0]["betas"]) != tuple(hp.betas):
                lines.append(f"resume: betas {tuple(opt.param_groups[0]['betas'])} -> {tuple(hp.betas)}")
                for g in opt.param_groups:
                    g["betas"] = tuple(float(b) for b in hp.betas)
            factors = [f(step) for f in fns]
            for g, base, k in zip(opt.param_groups, sched.base_lrs, factors):
                g["lr"] = base * k
            sched._last_lr = [g["lr"] for g in opt.param_groups]
            if before != sched._last_lr and lines:
                lines.append(f"resume: learning rate at step {step}: {before[0]:.3g} -> {sched._last_lr[0]:.3g}")
        return lines

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        for opt in self.trainer.optimizers:
            if hasattr(opt, "found_inf"):
                del opt.found_inf  # used by this step's optimizer.step only
        self._write_train_logs()

    def on_train_end(self) -> None:
        try:
            self._raise_if_flagged()  # the last step's flag
        finally:
            self._guard_buffers = None  # no CUDA event left on the task (it could not be copied or pickled)

    # -- training-step logging -------------------------------------------------------------------
    def log_train(self, name: str, value: torch.Tensor | float, prog_bar: bool = False) -> None:
        """Log a training-step scalar as ``self.log(name, value, prog_bar=prog_bar)`` in ``training_step`` would
        (on_step only), but only at the steps whose logs the trainer writes: the value is kept until
        ``on_train_batch_end`` and logged there if the trainer writes logs at this step (``_logs_this_step``).

        Each ``self.log`` call costs Lightning about half a millisecond of host time, and a CUDA value shown in
        the progress bar is read back (a device synchronization) after every step; here the values are copied
        to the host once per logging step instead, so the steps in between neither log nor wait on the device."""
        self._train_logs[name] = (value.detach() if isinstance(value, torch.Tensor) else value, prog_bar)

    def log_throughput(self, items: int, unit: str) -> None:
        """Count this step's items for ``train/{unit}_s`` (shown in the progress bar): items per second of the
        training loop over the steps since the last logged value, logged at the trainer's logging steps."""
        self._window_items += items
        self._window_unit = unit

    def _logs_this_step(self) -> bool:
        """Whether the trainer writes this training step's values to its loggers, by Lightning's own rule
        (``update_train_step_metrics``): every ``log_every_n_steps`` optimizer steps, at the step where
        training stops, every step under fast_dev_run; never while gradients accumulate."""
        trainer = self.trainer
        connector = getattr(trainer, "_logger_connector", None)
        should_accumulate = getattr(getattr(trainer, "fit_loop", None), "_should_accumulate", None)
        if connector is None or should_accumulate is None:  # no Lightning loop (or another Lightning): every step
            return True
        if self.automatic_optimization and should_accumulate():
            return False
        return bool(getattr(connector, "should_update_logs", True) or trainer.fast_dev_run)

    def _write_train_logs(self) -> None:
        """At a logging step, ``self.log`` this step's ``log_train`` values (copied to the host) and the throughput
        of the window that ends here; the kept values are dropped after every step."""
        logs, self._train_logs = self._train_logs, {}
        window_starts = self._window_start is None
        if window_starts:  # the first step after a (re)start: the window's time begins at its end
            self._window_start, self._window_items = time.perf_counter(), 0
        if not self._logs_this_step():
            return
        values = {name: (_host_value(v), prog_bar) for name, (v, prog_bar) in logs.items()}  # waits for the step
        rate = None if window_starts else self._end_window()
        if rate is not None:
            values[f"train/{self._window_unit}_s"] = (torch.tensor(rate, dtype=_log_dtype()), True)
        for name, (value, prog_bar) in values.items():
            self.log(name, value, prog_bar=prog_bar, on_step=True, on_epoch=False, sync_dist=False)

    def _end_window(self) -> float | None:
        """Items per second (all processes) since the throughput window started, or None when no items were
        counted; the next window starts now."""
        now, start, items = time.perf_counter(), self._window_start, self._window_items
        self._window_start, self._window_items = now, 0
        if not items or now <= start:
            return None
        return items * self.trainer.world_size / (now - start)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Lightning's clipping, except under FSDP, whose precision plugin refuses norm clipping: there the
        sharded module clips by the global norm itself (FullyShardedDataParallel.clip_grad_norm_)."""
        if _is_fsdp(self.trainer):
            if gradient_clip_val:
                if gradient_clip_algorithm not in (None, "norm"):
                    raise ValueError(f"gradient_clip_algorithm: only 'norm' is supported under FSDP, got "
                                     f"{gradient_clip_algorithm!r}")
                self.trainer.model.clip_grad_norm_(gradient_clip_val)
            return
        if _fused(self.trainer):
            # Lightning's mixed-precision plugin refuses clipping with a fused optimizer because of fp16
            # loss scaling; there is no scaler here (see _device_guard), so clip as its base class would
            self._guard_step(optimizer, _clip_and_norm(optimizer, gradient_clip_val, gradient_clip_algorithm))
            return
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                            gradient_clip_algorithm=gradient_clip_algorithm)

    def on_train_epoch_start(self) -> None:
        self._window_start = None

    def on_validation_epoch_start(self) -> None:
        self._window_start = None  # time spent validating is not training throughput


_INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _fused(trainer) -> bool:
    """The task's optimizer is the fused AdamW of the device guard (ZooTask._device_guard)."""
    opts = getattr(trainer, "optimizers", None) or []
    return bool(opts) and all(any(g.get("fused") for g in o.param_groups) for o in opts)


def _clip_and_norm(optimizer, clip_val: float | None, algorithm) -> torch.Tensor:
    """Clips the optimizer's gradients as Lightning's base precision plugin would (by norm, or by value when
    ``algorithm`` is 'value') and returns their total 2-norm for the device guard: before clipping by norm,
    after clipping by value. Without clipping the norm is only measured."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if clip_val and algorithm == "value":
        torch.nn.utils.clip_grad_value_(params, clip_val)
    elif clip_val:
        return torch.nn.utils.clip_grad_norm_(params, clip_val)  # skips parameters without a gradient
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def _throttle_distributed_checks(trainer: pl.Trainer, every: int) -> None:
    """With several processes, Lightning 2.6 makes every training step wait for the GPU twice: the epoch loop
    broadcasts a SIGTERM flag from rank 0 and reads it back (``.item()``), and a ``max_time`` Timer broadcasts
    its stop decision. The host can then never run ahead of the GPU, so each step costs host time plus GPU
    time (DDP on 2 GPUs gave 1.28x one GPU's samples/s). Here both run every ``every`` training steps instead
    (this trainer only): a SIGTERM or the time limit is acted on at most ``every`` steps later, by all ranks
    together (the step counter is the same on every rank)."""
    from lightning.pytorch.callbacks import Timer

    loop = trainer.fit_loop.epoch_loop
    if not hasattr(loop, "_broadcast_sigterm_tensor") or not hasattr(loop, "total_batch_idx"):
        return  # a Lightning without the per-step SIGTERM broadcast (written against 2.6): nothing to throttle
    if not getattr(loop._broadcast_sigterm_tensor, "_zoo_every", None):
        broadcast = loop._broadcast_sigterm_tensor

        def sigterm_check_every() -> None:
            if loop.total_batch_idx % every == 0:
                broadcast()

        sigterm_check_every._zoo_every = every
        loop._broadcast_sigterm_tensor = sigterm_check_every
    for timer in (cb for cb in trainer.callbacks if isinstance(cb, Timer)):
        if getattr(timer.on_train_batch_end, "_zoo_every", None):
            continue
        check = timer.on_train_batch_end

        def timer_check_every(trainer, *args, _check=check, **kwargs) -> None:
            if trainer.fit_loop.epoch_loop.total_batch_idx % every == 0:
                _check(trainer, *args, **kwargs)

        timer_check_every._zoo_every = every
        timer.on_train_batch_end = timer_check_every


def _is_fsdp(trainer: pl.Trainer) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(trainer.strategy, FSDPStrategy)


def _log_dtype() -> torch.dtype:
    """The dtype Lightning stores a logged value in: the default dtype, at least float32."""
    dtype = torch.get_default_dtype()
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _host_value(value: torch.Tensor | float) -> torch.Tensor:
    """A logged scalar as a CPU tensor (the value ``self.log`` would store), so that Lightning's reads of it after
    every step (progress bar, callback metrics) never wait on the device."""
    if isinstance(value, torch.Tensor):
        return value.to("cpu")
    return torch.tensor(value, dtype=_log_dtype())


def cosine_at(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """The schedule's multiplier at ``step`` (``mambazoo.tasks.optim.cosine_with_warmup``)."""
    return CosineWithWarmup(warmup_steps, total_steps, min_ratio)(step)


def lr_of(trainer: pl.Trainer) -> float:
    """The current learning rate of the first parameter group (nan when there is no optimizer)."""
    opts = trainer.optimizers
    return opts[0].param_groups[0]["lr"] if opts else math.nan
