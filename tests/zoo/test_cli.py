"""The mambazoo CLI end to end (in-process, CPU, a few steps each): every tiny config fits, resume is
exact, a non-finite loss stops with a checkpoint, a failed save keeps the last good checkpoint,
unknown configs and missing data get clear messages."""

import csv
import json
import os
import struct
import wave
from pathlib import Path

import pytest
import torch

from mambazoo.cli import CONFIG_DIR, config_description, config_names, main
from mambazoo.tasks import CausalLMTask

FAST = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.log_every_n_steps", "1", "--trainer.max_time", "null"]
TINY_MAMBA = json.dumps({"n_layer": 1, "d_model": 16, "d_state": 4})
STEPS = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "corpus.py"
    p.write_bytes(Path(os.__file__).read_bytes()[:30000])
    return p


def byte_lm(text_file, model_kwargs=TINY_MAMBA):
    return ["--data.init_args.path", str(text_file), "--data.init_args.seq_len", "16", "--data.init_args.batch_size",
            "2", "--data.init_args.val_max_windows", "2", "--model.init_args.model_kwargs", model_kwargs,
            "--model.init_args.sample_tokens", "4", *STEPS]


def synthetic(seq_len, vocab):
    return ["--data.init_args.seq_len", str(seq_len), "--data.init_args.batch_size", "2",
            "--data.init_args.eval_samples", "2", *STEPS]


@pytest.fixture(scope="module")
def wav_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("wavs")
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val", "test"):
        for label in range(10):
            d = root / split / str(label)
            d.mkdir(parents=True)
            x = (torch.randn(1600, generator=g) * 3000).short().tolist()
            with wave.open(str(d / "a.wav"), "wb") as w:
                w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
                w.writeframes(struct.pack(f"<{len(x)}h", *x))
    return root


def fit(run_dir, config, *extra):
    return main(["fit", "--config", config, "--run_dir", str(run_dir), *FAST, *extra])


def losses(run_dir, version=0) -> dict[int, float]:
    with open(Path(run_dir) / "logs" / f"version_{version}" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


# -- list / unknown names ---------------------------------------------------------------------------
def test_backend_command_describes_the_choices(capsys):
    from mambazoo.core.backend import backend

    with backend(ssd="ref"):
        assert main(["backend"]) == 0
    out = capsys.readouterr().out
    assert "ssd            ref      set in code" in out and "on cpu: scan chunked, ssd ref, mamba3 chunked, conv torch" in out
    assert main(["backend", "--scan"]) == 2
    assert "expected no arguments" in capsys.readouterr().err


def test_list_shows_every_config_with_a_description(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("mambabyte-tiny", "mamba-tiny", "moe-mamba-tiny", "jamba-tiny", "vim-tiny-fashion", "aum-digits",
                 "selective-copy-mamba", "selective-copy-s4d", "induction-heads-mamba", "mqar-hybrid", "mamba-2.8b",
                 "jamba-v0.1", "vim-base"):
        assert name in config_names() and name in out
        assert config_description(CONFIG_DIR / f"{name}.yaml")


def test_unknown_config_lists_close_matches(capsys):
    assert main(["fit", "--config", "mambabyte-tny"]) == 2
    err = capsys.readouterr().err
    assert "unknown config 'mambabyte-tny'" in err and "mambabyte-tiny" in err


def test_every_config_parses(capsys):
    for name in config_names():
        with pytest.raises(SystemExit) as e:
            main(["fit", "--config", name, "--print_config"])
        assert e.value.code in (0, None), name
    assert "class_path: mambazoo.tasks" in capsys.readouterr().out


# -- few-step fits of the tiny configs --------------------------------------------------------------
@pytest.fixture(scope="module")
def byte_run(tmp_path_factory, text_file):
    """An uninterrupted 4-step mambabyte-tiny run, shared by the checks below."""
    run = tmp_path_factory.mktemp("runs") / "full"
    args = byte_lm(text_file)[:-4] + ["--trainer.max_steps", "4", "--trainer.val_check_interval", "2"]
    assert fit(run, "mambabyte-tiny", *args) == 0
    return run, args


def test_fit_writes_checkpoints_logs_curves(byte_run, capsys):
    run, _ = byte_run
    assert (run / "checkpoints" / "last.ckpt").is_file() and list((run / "checkpoints").glob("best-step*.ckpt"))
    assert (run / "curves.png").stat().st_size > 1000
    assert (run / "logs" / "version_0" / "metrics.csv").is_file()
    assert (run / "logs" / "version_0" / "config.yaml").is_file()
    assert sorted(losses(run)) == [0, 1, 2, 3]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4 and ckpt["hyper_parameters"]["model"] == "mambabyte-tiny"


def test_generate_from_checkpoint(byte_run, capsys):
    run, _ = byte_run
    assert main(["generate", "--checkpoint", str(run / "checkpoints" / "last.ckpt"), "--prompt", "def ",
                 "--max_new_tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("def ")


@pytest.mark.parametrize("config,extra", [
    ("mamba-tiny", None), ("moe-mamba-tiny", json.dumps({"n_layer": 2, "d_model": 16, "d_state": 4, "n_experts": 2})),
    ("jamba-tiny", json.dumps({"n_layer": 2, "d_model": 16, "layout": "MA", "n_heads": 2, "n_kv_heads": 2,
                               "d_ffn": 16, "n_experts": 2})),
])
def test_tiny_lm_configs_fit(tmp_path, text_file, config, extra):
    assert fit(tmp_path, config, *byte_lm(text_file, extra or TINY_MAMBA)) == 0
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("config,seq_len", [("selective-copy-mamba", 24), ("selective-copy-s4d", 24),
                                            ("induction-heads-mamba", 24), ("mqar-hybrid", 48)])
def test_synthetic_configs_fit(tmp_path, config, seq_len):
    vocab = 512 if config == "mqar-hybrid" else 16
    kw = {"vocab_size": vocab, "n_layer": 2, "d_model": 16, "d_state": 4}
    if config == "mqar-hybrid":
        kw.update(layout="MA", n_heads=2, n_kv_heads=2)
    extra = ["--model.init_args.model_kwargs", json.dumps(kw)]
    if config == "induction-heads-mamba":
        extra += ["--data.init_args.test_lengths", "[24, 96]", "--test_after_fit", "true"]
    assert fit(tmp_path, config, *synthetic(seq_len, vocab), *extra) == 0
    if config == "induction-heads-mamba":
        with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
            keys = set(next(csv.reader(f)))
        assert {"test_L24/acc", "test_L96/acc"} <= keys


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist not installed")
def test_vim_fashion_config_fits(tmp_path):
    assert fit(tmp_path, "vim-tiny-fashion", "--trainer.max_steps", "2", "--trainer.limit_train_batches", "2",
               "--trainer.limit_val_batches", "1", "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
               "--model.init_args.model_kwargs", json.dumps({"depth": 1, "embed_dim": 32})) == 0


def test_aum_digits_config_fits(tmp_path, wav_tree):
    assert fit(tmp_path, "aum-digits", "--data.init_args.root", str(wav_tree), "--trainer.max_steps", "2",
               "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--data.init_args.batch_size", "4",
               "--data.init_args.num_workers", "0", "--model.init_args.model_kwargs",
               json.dumps({"depth": 1, "embed_dim": 32})) == 0


# -- resume, non-finite loss, failed saves ----------------------------------------------------------
def test_resume_from_last_continues_exactly(byte_run, tmp_path, monkeypatch):
    full, args = byte_run
    real_step = CausalLMTask.training_step

    def crash_at_2(self, batch, batch_idx):
        if self.global_step == 2:
            raise RuntimeError("simulated crash")
        return real_step(self, batch, batch_idx)

    monkeypatch.setattr(CausalLMTask, "training_step", crash_at_2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path, "mambabyte-tiny", *args)
    monkeypatch.setattr(CausalLMTask, "training_step", real_step)
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert fit(tmp_path, "mambabyte-tiny", *args, "--ckpt_path", "last") == 0
    resumed, ref = losses(tmp_path, version=1), losses(full)
    assert sorted(resumed) == [2, 3]
    for step in (2, 3):
        assert resumed[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7), step


def test_non_finite_loss_stops_with_step_and_checkpoint(tmp_path, text_file, monkeypatch, capsys):
    real_loss = CausalLMTask._loss

    def nan_at_1(self, batch):
        loss, *rest = real_loss(self, batch)
        return (loss * float("nan") if self.global_step == 1 else loss, *rest)

    monkeypatch.setattr(CausalLMTask, "_loss", nan_at_1)
    assert fit(tmp_path, "mambabyte-tiny", *byte_lm(text_file)) == 1
    err = capsys.readouterr().err
    assert "non-finite training loss" in err and "at step 1" in err
    ckpt = tmp_path / "checkpoints" / "nonfinite-step1.ckpt"
    assert str(ckpt) in err
    state = torch.load(ckpt, weights_only=False)
    assert state["global_step"] == 1
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_failed_save_keeps_the_last_good_checkpoint(tmp_path, text_file, monkeypatch):
    import mambazoo.tasks.checkpointing as ck

    real_save, calls = torch.save, []

    def dying_save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) >= 2:  # the second save dies half-way through writing
            f.write(b"partial checkpoint bytes")
            raise OSError("simulated: killed during save")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ck.torch, "save", dying_save)
    with pytest.raises(OSError, match="killed during save"):
        fit(tmp_path, "mambabyte-tiny", *byte_lm(text_file)[:-4], "--trainer.max_steps", "3",
            "--trainer.val_check_interval", "3", "--checkpoint_every_n_steps", "1")
    monkeypatch.setattr(ck.torch, "save", real_save)
    files = list((tmp_path / "checkpoints").iterdir())
    assert [f.name for f in files] == ["last.ckpt"]  # no temporary file left behind
    assert torch.load(files[0], weights_only=False)["global_step"] == 1


def test_atomic_io_unit(tmp_path, monkeypatch):
    from mambazoo.tasks.checkpointing import AtomicCheckpointIO

    io, path = AtomicCheckpointIO(), tmp_path / "c.ckpt"
    io.save_checkpoint({"v": 1}, path)
    monkeypatch.setattr("mambazoo.tasks.checkpointing.torch.save", lambda o, f: (f.write(b"xx"), (_ for _ in ()).throw(KeyboardInterrupt()))[1])
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"v": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["v"] == 1 and [p.name for p in tmp_path.iterdir()] == ["c.ckpt"]


# -- missing data -----------------------------------------------------------------------------------
def test_missing_text_data(tmp_path, capsys):
    assert fit(tmp_path, "mambabyte-tiny", "--data.init_args.path", str(tmp_path / "nope" / "*.txt"), *STEPS) == 2
    assert "no text found at" in capsys.readouterr().err


def test_missing_token_files_say_how_to_build_them(tmp_path, capsys):
    assert fit(tmp_path, "mamba-130m", "--model.init_args.model_kwargs", TINY_MAMBA, "--trainer.strategy", "auto",
               "--data.init_args.train_path", str(tmp_path / "t.npy"), *STEPS) == 2
    assert "python -m mambazoo.data.text export" in capsys.readouterr().err


def test_missing_image_and_audio_data(tmp_path, capsys):
    tiny = ["--model.init_args.model_kwargs", json.dumps({"depth": 1, "embed_dim": 32})]
    assert fit(tmp_path, "vim-tiny-fashion", "--data.init_args.root", str(tmp_path / "fm"), *tiny) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
    assert fit(tmp_path, "aum-digits", "--data.init_args.root", str(tmp_path / "sd"), *tiny) == 2
    assert "make_spoken_digits.py" in capsys.readouterr().err


def test_device_guard_skips_the_bad_step_and_stops_at_the_next(tmp_path, text_file, monkeypatch, capsys):
    """The GPU path of the non-finite stop (fused AdamW, no host synchronization), run on the CPU: the
    step with the NaN is skipped by the optimizer itself, the next step stops with that step's number
    and a checkpoint whose weights are finite (those from before the bad step)."""
    from mambazoo.tasks.base import ZooTask

    real_loss = CausalLMTask._loss

    def nan_at_1(self, batch):
        loss, *rest = real_loss(self, batch)
        return (loss * float("nan") if self.global_step == 1 else loss, *rest)

    monkeypatch.setattr(CausalLMTask, "_loss", nan_at_1)
    monkeypatch.setattr(ZooTask, "_device_guard", lambda self: True)
    assert fit(tmp_path, "mambabyte-tiny", *byte_lm(text_file)) == 1
    err = capsys.readouterr().err
    assert "non-finite training loss or gradients (that step was skipped) at step 1" in err
    ckpt = tmp_path / "checkpoints" / "nonfinite-step1.ckpt"
    state = torch.load(ckpt, weights_only=False)
    assert state["global_step"] == 2  # saved while checking, one step later
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    assert any(g.get("fused") for g in state["optimizer_states"][0]["param_groups"])
