"""mambazoo.tasks: optimizer rules, schedule, MoE aux losses, metrics, mixup/cutmix, the LTI swap."""

import math

import pytest
import torch
from torch import nn

import mambazoo
from mambazoo.core.mamba import Mamba
from mambazoo.tasks import (CausalLMTask, ClassificationTask, collect_aux_loss, cosine_with_warmup, mix_batch,
                       param_groups, split_decay)
from mambazoo.tasks.metrics import SequenceMetrics

TINY_LM = dict(n_layer=2, d_model=16, d_state=4)


def test_weight_decay_only_on_matrices():
    model = mambazoo.create_model("jamba-tiny", n_layer=2, d_model=32, layout="MA", n_heads=2, n_kv_heads=2)
    model.register_parameter("flagged", nn.Parameter(torch.zeros(3, 3)))
    model.flagged._no_weight_decay = True
    decay, no_decay = split_decay(model)
    assert "layers.0.mixer.in_proj.weight" in decay
    assert "layers.0.mixer.fwd.x_proj.weight" in decay and "layers.0.mixer.out_proj.weight" in decay
    for name in ("layers.0.mixer.fwd.A_log", "layers.0.mixer.fwd.D", "layers.0.mixer.fwd.dt_proj.bias",
                 "layers.0.norm.weight", "norm_f.weight", "embedding.weight", "flagged"):
        assert name in no_decay, name
    # every parameter is in exactly one group
    groups = param_groups(model, 0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()})
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0


def test_tied_head_gets_no_decay_and_lti_params_none():
    model = mambazoo.create_model("mambabyte-tiny", selective=False, **TINY_LM)
    decay, no_decay = split_decay(model)
    assert "embedding.weight" in no_decay and not any(n.startswith("lm_head") for n in decay)
    lti = [n for n in no_decay if ".lti." in n]
    assert lti and not any(".lti." in n for n in decay)  # B, C (2-d) of the LTI SSM stay undecayed


def test_cosine_schedule_with_warmup():
    f = [cosine_with_warmup(s, 10, 110, 0.1) for s in range(130)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:110], f[11:111]))  # non-increasing after warmup
    assert f[60] == pytest.approx(0.55) and f[110] == pytest.approx(0.1) and f[129] == pytest.approx(0.1)


def test_moe_aux_loss_is_added_and_cleared():
    task = CausalLMTask("moe-mamba-tiny", dict(n_layer=2, d_model=16, d_state=4), aux_loss_weight=2.0)
    x = torch.randint(0, 256, (2, 9))
    task.model(x[:, :-1])
    aux = collect_aux_loss(task.model)
    assert aux is not None and aux.item() > 0
    assert collect_aux_loss(task.model) is None  # cleared once read
    plain = CausalLMTask("mambabyte-tiny", TINY_LM)
    plain.model(x[:, :-1])
    assert collect_aux_loss(plain.model) is None


def test_lm_task_step_loss_plus_aux(monkeypatch):
    task = CausalLMTask("moe-mamba-tiny", dict(n_layer=2, d_model=16, d_state=4), aux_loss_weight=3.0)
    monkeypatch.setattr(task, "log_throughput", lambda *a: None)
    monkeypatch.setattr(task, "_trainer", type("T", (), {"optimizers": [], "world_size": 1})())
    batch = torch.randint(0, 256, (2, 9))
    total = task.training_step(batch, 0)
    logged = {k: v for k, (v, _prog_bar) in task._train_logs.items()}  # kept for the step's end (log_train)
    assert total.item() == pytest.approx(logged["train/loss"].item() + 3.0 * logged["train/aux_loss"].item(), rel=1e-5)


def test_sequence_metrics_values():
    m = SequenceMetrics(bytes_per_token=1.0)
    logits = torch.zeros(2, 3, 4)
    logits[0, :, 1] = 5.0  # predicts 1 everywhere in row 0
    targets = torch.tensor([[1, 1, -100], [2, -100, -100]])
    m.update(logits, targets)
    out = m.compute()
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert out["loss"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert out["bpb"].item() == pytest.approx(ce.item() / math.log(2), rel=1e-5)
    assert out["ppl"].item() == pytest.approx(math.exp(ce.item()), rel=1e-4)
    assert out["acc"].item() == pytest.approx(2 / 3) and out["seq_acc"].item() == pytest.approx(0.5)


def test_mixup_and_cutmix():
    x = torch.arange(4.0)[:, None, None, None].expand(4, 1, 8, 8).clone()
    y = torch.arange(4)
    g = torch.Generator().manual_seed(0)
    xm, ya, yb, lam = mix_batch(x, y, mixup_alpha=0.4, cutmix_alpha=0.0, generator=g)
    perm = [int(v) for v in yb]
    assert torch.allclose(xm[:, 0, 0, 0], lam * y.float() + (1 - lam) * torch.tensor(perm).float())
    xc, ya, yb, lam = mix_batch(x, y, mixup_alpha=0.0, cutmix_alpha=1.0, generator=g)
    for i in range(4):  # the fraction of pixels kept from the sample itself is lam
        own = (xc[i] == float(i)).float().mean().item()
        assert own == pytest.approx(lam) or int(yb[i]) == i


def test_selective_false_builds_lti_mixers():
    model = mambazoo.create_model("mambabyte-tiny", selective=False, **TINY_LM)
    mixers = [m for m in model.modules() if isinstance(m, Mamba)]
    assert mixers and all(not m.selective for m in mixers)
    assert model(torch.randint(0, 256, (1, 12))).shape == (1, 12, 256)


def test_classification_task_trains_a_step():
    task = ClassificationTask("vim-tiny-fashion", num_classes=10, model_kwargs=dict(depth=1, embed_dim=32),
                              mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    task.log = lambda *a, **k: None
    task.log_throughput = lambda *a: None
    task._trainer = type("T", (), {"optimizers": [], "world_size": 1})()
    loss = task.training_step((x, y), 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in task.model.parameters() if p.requires_grad)


def test_gradient_clipping_under_fsdp_uses_the_sharded_module(monkeypatch):
    """Lightning's FSDP precision plugin refuses norm clipping; the task clips through the FSDP module."""
    import types

    import mambazoo.tasks.base as base

    calls = []
    task = CausalLMTask("mambabyte-tiny", TINY_LM)
    task._trainer = types.SimpleNamespace(model=types.SimpleNamespace(clip_grad_norm_=calls.append))
    monkeypatch.setattr(base, "_is_fsdp", lambda trainer: True)
    task.configure_gradient_clipping(None, 0.5, "norm")
    task.configure_gradient_clipping(None, None, None)  # no clipping asked: nothing happens
    assert calls == [0.5]
    with pytest.raises(ValueError, match="only 'norm'"):
        task.configure_gradient_clipping(None, 0.5, "value")


def test_no_sample_at_fit_end_under_fsdp(monkeypatch, capsys):
    """Sharded weights cannot decode on one rank: the end-of-fit sample is skipped with a pointer."""
    import types

    import mambazoo.tasks.lm as lm

    task = CausalLMTask("mambabyte-tiny", TINY_LM, tokenizer="bytes", sample_prompt="def ", sample_tokens=4)
    task._trainer = types.SimpleNamespace(global_rank=0, global_step=3)
    monkeypatch.setattr(lm, "_is_fsdp", lambda trainer: True)
    monkeypatch.setattr(task, "generate_text", lambda *a, **k: pytest.fail("sampled under FSDP"))
    task.on_fit_end()
    assert "no sample under FSDP" in capsys.readouterr().out


def test_compile_option_compiles_in_place_and_keeps_checkpoint_names():
    task = CausalLMTask("mambabyte-tiny", model_kwargs=TINY_LM, compile="eager")
    names = set(task.state_dict())
    x = torch.randint(0, 256, (2, 9))
    before = task.model(x)
    task.configure_model()
    assert task.model._compiled_call_impl is not None  # the module's calls now go through torch.compile
    torch.testing.assert_close(task.model(x), before)
    assert set(task.state_dict()) == names  # no "_orig_mod." prefixes: checkpoints stay loadable either way
    with pytest.raises(ValueError, match="compile"):
        CausalLMTask("mambabyte-tiny", model_kwargs=TINY_LM, compile=3)


class _RecordingTask(ClassificationTask):
    """Records each training step's loss and learning rate, and the step at which each ``self.log`` happens."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen, self.logged = [], []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.seen.append((loss.item(), self.trainer.optimizers[0].param_groups[0]["lr"]))
        return loss

    def log(self, name, value, *args, **kwargs):
        self.logged.append((len(self.seen) - 1, name))
        super().log(name, value, *args, **kwargs)


def test_training_scalars_are_logged_at_logging_steps_only(tmp_path, monkeypatch):
    """train/loss and train/lr are logged (self.log) only at the trainer's logging steps, with that step's values;
    train/samples_s is the rate over the steps since the previous logged value (a fake clock, 1 s apart)."""
    import csv
    import types

    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    import mambazoo.tasks.base as base

    clock = iter(range(1, 100))  # read once per throughput-window boundary
    monkeypatch.setattr(base, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    data = TensorDataset(torch.randn(48, 1, 28, 28), torch.randint(0, 10, (48,)))
    task = _RecordingTask(model="vim-tiny-fashion", num_classes=10, model_kwargs=dict(depth=1, embed_dim=32),
                          warmup_steps=3)
    trainer = pl.Trainer(accelerator="cpu", max_steps=10, log_every_n_steps=4, gradient_clip_val=1.0,
                         logger=CSVLogger(tmp_path, name="logs"), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, DataLoader(data, batch_size=4))

    names = {"train/loss", "train/lr", "train/samples_s"}
    assert sorted(set(task.logged)) == sorted((step, name) for step in (3, 7) for name in names)
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
        rows = {int(r["step"]): r for r in csv.DictReader(f) if r.get("train/loss")}
    assert sorted(rows) == [3, 7]
    for step, row in rows.items():
        loss, lr = task.seen[step]
        assert float(row["train/loss"]) == pytest.approx(loss, rel=1e-6)
        assert float(row["train/lr"]) == pytest.approx(lr, rel=1e-6)
    # windows: end of step 0 (t=1) .. end of step 3 (t=2): 3 steps of 4 samples; then 4 steps until t=3
    assert float(rows[3]["train/samples_s"]) == 12.0 and float(rows[7]["train/samples_s"]) == 16.0
    assert trainer.progress_bar_metrics["train/loss"] == pytest.approx(task.seen[7][0], rel=1e-6)


def test_device_guard_clipping_measures_the_norm():
    """The fused optimizer's clipping (ZooTask with the device guard): by norm it returns the norm before
    clipping, by value the norm after, without clipping only the norm (gradients untouched); parameters
    without a gradient are skipped."""
    from lightning.pytorch.utilities import GradClipAlgorithmType

    from mambazoo.tasks.base import _clip_and_norm

    def optimizer_with_grads():
        a, b, c = (nn.Parameter(torch.zeros(3)) for _ in range(3))
        a.grad, b.grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 4.0, -0.5])  # c has none
        return torch.optim.AdamW([{"params": [a]}, {"params": [b, c]}]), a, b

    total = math.sqrt(9 + 16 + 0.25)
    opt, a, b = optimizer_with_grads()
    assert _clip_and_norm(opt, None, None).item() == pytest.approx(total)
    assert a.grad.tolist() == [3.0, 0.0, 0.0] and b.grad.tolist() == [0.0, 4.0, -0.5]
    opt, a, b = optimizer_with_grads()
    assert _clip_and_norm(opt, 1.0, GradClipAlgorithmType.NORM).item() == pytest.approx(total)
    assert torch.cat([a.grad, b.grad]).norm().item() == pytest.approx(1.0, rel=1e-5)
    opt, a, b = optimizer_with_grads()
    assert _clip_and_norm(opt, 1.0, GradClipAlgorithmType.VALUE).item() == pytest.approx(math.sqrt(1 + 1 + 0.25))
    assert a.grad.tolist() == [1.0, 0.0, 0.0] and b.grad.tolist() == [0.0, 1.0, -0.5]


def test_task_attributes_still_register_parameters_and_modules():
    """Setting the task's per-step attributes (Lightning's hook name, the training-step state) leaves
    nn.Module's registration of parameters and submodules as it was."""
    task = ClassificationTask("vim-tiny-fashion", num_classes=10, model_kwargs=dict(depth=1, embed_dim=32))
    task.extra = nn.Linear(2, 2)
    task.scale = nn.Parameter(torch.ones(1))
    task._current_fx_name = "training_step"
    assert "extra.weight" in task.state_dict() and "scale" in dict(task.named_parameters())
    assert vars(task)["_current_fx_name"] == "training_step"


def test_distributed_checks_run_every_n_steps():
    """With several processes the per-step SIGTERM broadcast and the max_time Timer's broadcast (each a wait on
    the GPU) run every n steps, once wrapped however often the wrapping is asked for."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import Timer

    from mambazoo.tasks.base import _throttle_distributed_checks

    sigterm_checks, timer_checks = [], []

    class Loop:
        total_batch_idx = 0

        def _broadcast_sigterm_tensor(self):
            sigterm_checks.append(self.total_batch_idx)

    loop = Loop()
    timer = Timer(duration="00:00:01:00")  # checked every step by default
    timer._check_time_remaining = lambda trainer: timer_checks.append(loop.total_batch_idx)
    trainer = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=loop), callbacks=[timer])
    _throttle_distributed_checks(trainer, 4)
    _throttle_distributed_checks(trainer, 4)
    for step in range(10):
        loop.total_batch_idx = step
        loop._broadcast_sigterm_tensor()
        timer.on_train_batch_end(trainer, None, None, None, step)
    assert sigterm_checks == [0, 4, 8] and timer_checks == [0, 4, 8]
