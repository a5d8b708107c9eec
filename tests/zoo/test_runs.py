"""Nothing lost (issue 21): last.ckpt holds the final step whatever stopped training, a crash saves the last
good step, an existing run is not overwritten, resuming applies or refuses what the command line changes; and
the Lightning conventions of issue 22 (default_root_dir, a user's ModelCheckpoint, --optimizer, curves.png)."""

import csv
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from mambazoo.cli import main
from mambazoo.tasks import CausalLMTask

FAST = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.log_every_n_steps", "1", "--trainer.max_time", "null", "--threads", "1"]
TINY = json.dumps({"n_layer": 1, "d_model": 16, "d_state": 4})


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "corpus.py"
    p.write_bytes(Path(os.__file__).read_bytes()[:30000])
    return p


def data(text_file):
    return ["--data.init_args.path", str(text_file), "--data.init_args.seq_len", "16", "--data.init_args.batch_size",
            "2", "--data.init_args.val_max_windows", "2", "--model.init_args.model_kwargs", TINY,
            "--model.init_args.sample_tokens", "0", "--model.init_args.warmup_steps", "2"]


def fit(run_dir, text_file, *extra, config="mambabyte-tiny"):
    return main(["fit", "--config", config, "--run_dir", str(run_dir), *FAST, *data(text_file), *extra])


def last_step(run_dir) -> int:
    return torch.load(Path(run_dir) / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]


def losses(run_dir, version=0) -> dict[int, float]:
    with open(Path(run_dir) / "logs" / f"version_{version}" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


# -- last.ckpt after every stop reason ---------------------------------------------------------------
@pytest.mark.parametrize("extra,want", [
    (["--trainer.max_steps", "5", "--trainer.val_check_interval", "4"], 5),        # max_steps after the last validation
    (["--trainer.max_steps", "5", "--trainer.val_check_interval", "5", "--checkpoint_every_n_steps", "3"], 5),
    (["--trainer.max_steps", "50", "--trainer.val_check_interval", "2", "--trainer.callbacks+=EarlyStopping",
      "--trainer.callbacks.monitor=val/loss", "--trainer.callbacks.mode=max", "--trainer.callbacks.patience=0"], 4),
])
def test_last_checkpoint_holds_the_final_step(tmp_path, text_file, capsys, extra, want):
    assert fit(tmp_path, text_file, *extra) == 0
    assert last_step(tmp_path) == want
    assert f"last.ckpt (step {want})" in capsys.readouterr().out


def test_max_time_saves_the_last_step(tmp_path, text_file, monkeypatch, capsys):
    import re
    import time

    real = CausalLMTask.training_step

    def slow(self, batch, batch_idx):
        time.sleep(0.4)
        return real(self, batch, batch_idx)

    monkeypatch.setattr(CausalLMTask, "training_step", slow)
    assert fit(tmp_path, text_file, "--trainer.max_steps", "100", "--trainer.val_check_interval", "100",
               "--trainer.max_time", json.dumps({"seconds": 1})) == 0
    steps = int(re.search(r"fit done in .* s, (\d+) steps", capsys.readouterr().out).group(1))
    assert 1 <= steps < 100 and last_step(tmp_path) == steps


def test_sigterm_saves_the_last_step(tmp_path, text_file, monkeypatch, capsys):
    real = CausalLMTask.training_step

    def term_at_3(self, batch, batch_idx):
        if self.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, batch, batch_idx)

    monkeypatch.setattr(CausalLMTask, "training_step", term_at_3)
    assert fit(tmp_path, text_file, "--trainer.max_steps", "8", "--trainer.val_check_interval", "8") == 143
    assert last_step(tmp_path) == 4  # step 3 completed, then the signal was acted on
    assert "--ckpt_path last" in capsys.readouterr().err


def test_a_crash_saves_the_last_good_step_and_resume_is_exact(tmp_path, text_file, monkeypatch, capsys):
    args = ["--trainer.max_steps", "6", "--trainer.val_check_interval", "2"]
    full = tmp_path / "full"
    assert fit(full, text_file, *args) == 0
    real = CausalLMTask.training_step

    def crash_at_3(self, batch, batch_idx):
        if self.global_step == 3:
            raise RuntimeError("simulated: a corrupt sample")
        return real(self, batch, batch_idx)

    monkeypatch.setattr(CausalLMTask, "training_step", crash_at_3)
    run = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="corrupt sample"):
        fit(run, text_file, *args)
    assert last_step(run) == 3  # not 2, the last validation
    assert "saved the weights of step 3" in capsys.readouterr().out
    monkeypatch.setattr(CausalLMTask, "training_step", real)
    assert fit(run, text_file, *args, "--ckpt_path", "last") == 0
    resumed, ref = losses(run, version=1), losses(full)
    assert sorted(resumed) == [3, 4, 5]
    for step in resumed:
        assert resumed[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7), step
    assert last_step(run) == 6


def test_disk_full_names_the_file_and_keeps_the_previous(tmp_path, monkeypatch):
    import errno

    import mambazoo.tasks.checkpointing as ck

    io, path = ck.AtomicCheckpointIO(), tmp_path / "c.ckpt"
    io.save_checkpoint({"v": 1}, path)

    def full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", full)
    with pytest.raises(OSError, match=f"no space left on device while saving {path}"):
        io.save_checkpoint({"v": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["v"] == 1 and [p.name for p in tmp_path.iterdir()] == ["c.ckpt"]


# -- an existing run is not overwritten; --ckpt_path last needs something to resume -------------------
def test_refuses_to_overwrite_a_run_and_says_how_to_resume_or_start_over(tmp_path, text_file, capsys):
    steps = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2"]
    assert fit(tmp_path, text_file, *steps) == 0
    before = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    capsys.readouterr()
    assert fit(tmp_path, text_file, *steps) == 2
    err = capsys.readouterr().err
    assert "already holds checkpoints" in err and "--ckpt_path last" in err and "--overwrite true" in err
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == before
    # orphans of a killed save are removed at the next start
    orphan = tmp_path / "checkpoints" / ".last.ckpt.tmp-999999999"
    orphan.write_bytes(b"half a checkpoint")
    assert fit(tmp_path, text_file, *steps, "--overwrite", "true") == 0
    assert not orphan.exists() and last_step(tmp_path) == 2


def test_ckpt_path_last_with_nothing_to_resume(tmp_path, text_file, capsys):
    assert fit(tmp_path, text_file, "--trainer.max_steps", "2", "--ckpt_path", "last") == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and str(tmp_path / "checkpoints" / "last.ckpt") in err


# -- overrides given with --ckpt_path ----------------------------------------------------------------
def test_resume_applies_command_line_overrides_and_refuses_another_model(tmp_path, text_file, capsys):
    steps = ["--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--model.init_args.lr", "0.005"]
    assert fit(tmp_path, text_file, *steps) == 0
    ckpt = str(tmp_path / "checkpoints" / "last.ckpt")
    capsys.readouterr()
    # a lower learning rate on resume reaches the optimizer (it used to be dropped silently)
    more = ["--trainer.max_steps", "6", "--trainer.val_check_interval", "6"]
    assert fit(tmp_path, text_file, *more, "--model.init_args.lr", "1e-5", "--ckpt_path", ckpt) == 0
    out = capsys.readouterr().out
    assert "resume: lr 0.005 -> 1e-05 (applied to the optimizer)" in out
    assert "keeps its length of 4 steps" in out and "schedule_steps 6" in out  # the max_steps change, explained
    state = torch.load(ckpt, weights_only=True)
    assert state["global_step"] == 6 and state["hyper_parameters"]["lr"] == 1e-5
    assert state["lr_schedulers"][0]["base_lrs"] == [1e-5, 1e-5]
    assert all(g["lr"] <= 1e-5 + 1e-12 for g in state["optimizer_states"][0]["param_groups"])
    # a checkpoint of another model family under this config is refused
    assert main(["fit", "--config", "moe-mamba-tiny", "--run_dir", str(tmp_path / "other"), *FAST,
                 *data(text_file), "--ckpt_path", ckpt]) == 2
    assert "a checkpoint of 'mambabyte-tiny', but the config builds 'moe-mamba-tiny'" in capsys.readouterr().err
    # the architecture cannot change on resume
    assert fit(tmp_path, text_file, *more, "--ckpt_path", ckpt, "--model.init_args.model_kwargs",
               json.dumps({"n_layer": 2, "d_model": 16, "d_state": 4})) == 2
    assert "architecture cannot change on resume" in capsys.readouterr().err


@pytest.mark.parametrize("arg,value,message", [
    ("--model.init_args.lr", "0", "lr: expected a finite number > 0"),
    ("--model.init_args.min_lr_ratio", "1.5", "min_lr_ratio: expected a number in [0, 1]"),
    ("--data.init_args.val_fraction", "1.5", "val_fraction: expected a number in (0, 1)"),
    ("--data.init_args.val_fraction", "-0.5", "val_fraction: expected a number in (0, 1)"),
    ("--threads", "-1", "--threads: expected a positive int"),
    ("--checkpoint_every_n_steps", "0", "checkpoint_every_n_steps: expected a positive int"),
])
def test_numeric_arguments_are_checked_at_the_boundary(tmp_path, text_file, capsys, arg, value, message):
    assert fit(tmp_path, text_file, "--trainer.max_steps", "2", arg, value) == 2
    assert message in capsys.readouterr().err


def test_empty_yaml_config(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert main(["fit", "--config", str(empty)]) == 2
    assert f"{empty}: an empty config" in capsys.readouterr().err


# -- Lightning conventions (issue 22) -----------------------------------------------------------------
def test_default_root_dir_is_the_run_folder(tmp_path, text_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "elsewhere"
    assert main(["fit", "--config", "mambabyte-tiny", *FAST, *data(text_file), "--trainer.max_steps", "2",
                 "--trainer.val_check_interval", "2", "--trainer.default_root_dir", str(root)]) == 0
    assert (root / "checkpoints" / "last.ckpt").is_file() and (root / "logs" / "version_0" / "metrics.csv").is_file()
    assert not (tmp_path / "runs").exists()


def test_a_users_own_model_checkpoint_works_beside_the_runs(tmp_path, text_file):
    mine = tmp_path / "mine"
    assert fit(tmp_path / "run", text_file, "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
               "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.monitor=val/loss",
               f"--trainer.callbacks.dirpath={mine}", "--trainer.callbacks.save_top_k=2") == 0
    assert len(list(mine.glob("*.ckpt"))) == 2
    assert last_step(tmp_path / "run") == 4


def test_optimizer_from_the_command_line_keeps_the_decay_split(tmp_path, text_file, capsys):
    assert fit(tmp_path, text_file, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
               "--optimizer", "AdamW", "--optimizer.init_args.lr", "0.002", "--optimizer.init_args.weight_decay", "0.05",
               "--lr_scheduler", "StepLR", "--lr_scheduler.init_args.step_size", "1") == 0
    out = capsys.readouterr().out
    assert "--optimizer AdamW replaces the task's AdamW" in out and "--lr_scheduler StepLR replaces" in out
    groups = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["optimizer_states"][0]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert all(len(g["params"]) > 0 for g in groups)


def test_curves_show_the_whole_run_after_a_resume_on_separate_axes(tmp_path):
    from mambazoo.tasks.checkpointing import curve_panels, plot_curves, read_run_metrics

    def write(path, rows):
        path.parent.mkdir(parents=True)
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, ["epoch", "step", "train/loss", "val/loss", "val/bpb", "val/acc"])
            w.writeheader()
            w.writerows(rows)

    v0, v1 = tmp_path / "version_0" / "metrics.csv", tmp_path / "version_1" / "metrics.csv"
    write(v0, [{"step": s, "train/loss": 5 - s * 0.1} for s in range(6)] + [{"step": 3, "val/loss": 4.5, "val/acc": 0.2}])
    write(v1, [{"step": s, "train/loss": 4 - s * 0.1} for s in range(4, 9)] + [{"step": 7, "val/bpb": 6.0, "val/acc": 0.3}])
    s = read_run_metrics([v0, v1])
    assert [st for st, _ in s["train/loss"]] == [0, 1, 2, 3, 4, 5, 6, 7, 8]  # steps 4-5 of the first start were redone
    assert s["train/loss"][4][1] == pytest.approx(3.6)
    assert s["val/acc"] == [(3, 0.2), (7, 0.3)]
    assert curve_panels(s) == [("loss (nats)", ["train/loss", "val/loss"]), ("bits per byte", ["val/bpb"]),
                               ("accuracy", ["val/acc"])]
    assert plot_curves([v0, v1], tmp_path / "curves.png").stat().st_size > 1000


@pytest.mark.parametrize("kwargs,message", [
    (dict(model="vim-tiny", num_classes=1), "num_classes: expected an int >= 2"),
    (dict(model="vim-tiny", num_classes=3, label_smoothing=1.0), "label_smoothing in [0, 1)"),
    (dict(model="vim-tiny", num_classes=3, lr=0.0), "lr: expected a finite number > 0"),
    (dict(model="vim-tiny", num_classes=3, betas=(0.9, 1.5)), "betas: expected two numbers in [0, 1)"),
])
def test_task_arguments_are_checked(kwargs, message):
    from mambazoo.tasks import ClassificationTask

    with pytest.raises(ValueError) as e:
        ClassificationTask(model_kwargs={"depth": 1, "embed_dim": 32}, **kwargs)
    assert message in str(e.value)


@pytest.mark.parametrize("kind", ["random", "json", "malicious", "weights-only"])
def test_bad_ckpt_path_is_one_line_naming_the_file(tmp_path, text_file, capsys, kind):
    path = tmp_path / "bad.ckpt"
    marker = tmp_path / "PWNED"
    if kind == "random":
        path.write_bytes(bytes(range(7, 256)) * 3)
    elif kind == "json":
        path.write_text('{"not": "a checkpoint"}')
    elif kind == "malicious":
        class Payload:
            def __reduce__(self):
                return (open, (str(marker), "w"))

        torch.save({"state_dict": {}, "x": Payload()}, path)
    else:
        torch.save({"w": torch.zeros(2)}, path)
    assert fit(tmp_path / "run", text_file, "--trainer.max_steps", "2", "--ckpt_path", str(path)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("mambazoo: error: ") and str(path) in err
    assert {"random": "unrecognised data", "json": "JSON", "malicious": "refused",
            "weights-only": "expected a Lightning checkpoint"}[kind] in err
    assert not marker.exists()


def test_last_checkpoint_follows_every_validation_even_without_improvement(tmp_path, text_file, monkeypatch):
    seen = {}
    real = CausalLMTask.training_step

    def spy(self, batch, batch_idx):
        if self.global_step in (3, 5):  # what a SIGKILL here would leave
            seen[self.global_step] = last_step(tmp_path)
        return real(self, batch, batch_idx)

    monkeypatch.setattr(CausalLMTask, "training_step", spy)
    # mode max on a falling loss: only the first validation is a "best"
    assert fit(tmp_path, text_file, "--trainer.max_steps", "6", "--trainer.val_check_interval", "2",
               "--monitor_mode", "max") == 0
    assert seen == {3: 2, 5: 4}
    assert [p.name for p in (tmp_path / "checkpoints").glob("best-*.ckpt")] == ["best-step2.ckpt"]


def test_class_paths_naming_one_class_are_one_task():
    from mambazoo.cli import _resolve_class

    assert _resolve_class("mambazoo.tasks.CausalLMTask") is _resolve_class("mambazoo.tasks.lm.CausalLMTask")
    assert _resolve_class("mambazoo.tasks.CausalLMTask") is not _resolve_class("mambazoo.tasks.ClassificationTask")


def test_classification_batches_of_the_wrong_kind_are_named():
    from mambazoo.tasks import ClassificationTask

    task = ClassificationTask(model="vim-tiny", num_classes=3, model_kwargs={"depth": 1, "embed_dim": 32, "img_size": 32})
    imgs, labels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), torch.tensor([0, 2])
    with pytest.raises(ValueError, match=r"inputs: expected float tensors .* got torch.uint8 \(2, 3, 32, 32\)"):
        task.validation_step((imgs, labels), 0)
    with pytest.raises(ValueError, match="labels: expected integer class indices"):
        task.validation_step((imgs.float(), labels.float()), 0)


def test_fit_starts_from_pretrained_weights_and_a_resume_does_not(tmp_path, text_file, capsys):
    """--model.init_args.pretrained FOLDER: the first step starts from those weights; a resumed fit keeps the
    checkpoint's weights (the pretrained folder may be gone by then)."""
    import mambazoo
    from mambazoo.hub import save_pretrained

    source = mambazoo.create_model("mambabyte-tiny", **json.loads(TINY))
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.5)  # far from a fresh init, so a copy is unmistakable
    save_pretrained(source, tmp_path / "pre")
    args = ["--model.init_args.pretrained", str(tmp_path / "pre"), "--model.init_args.lr", "1e-12",
            "--model.init_args.warmup_steps", "0"]
    assert fit(tmp_path / "run", text_file, "--trainer.max_steps", "1", *args) == 0
    assert f"weights from {tmp_path / 'pre'}" in capsys.readouterr().out
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    for name, p in source.state_dict().items():  # lr 1e-12: one step leaves the copied weights as they were
        torch.testing.assert_close(ckpt["state_dict"][f"model.{name}"], p, atol=1e-6, rtol=0)
    (tmp_path / "pre" / "model.safetensors").unlink()
    assert fit(tmp_path / "run", text_file, "--trainer.max_steps", "2", "--ckpt_path", "last", *args) == 0
    assert "weights from" not in capsys.readouterr().out
