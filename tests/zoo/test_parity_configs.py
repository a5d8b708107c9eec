"""The named state-tracking configs (running parity on the CPU, issue 25): the three differ only in the mixer, each
builds the mixer it names and trains through `mambazoo fit` (2 steps, offline, CPU), and the last-bit accuracy of
mambazoo.probes.parity_accuracy scores the same test sets as `mambazoo test`."""

import copy
import csv
import dataclasses

import pytest
import torch
import yaml

from mambazoo.cli import CONFIG_DIR, config_description, config_names, main
from mambazoo.core.mamba import Mamba
from mambazoo.core.mamba2 import Mamba2
from mambazoo.core.mamba3 import Mamba3
from mambazoo.probes import parity_accuracy
from mambazoo.registry import create_model

CONFIGS = {"state-tracking-mamba": ("mamba", Mamba), "state-tracking-mamba2": ("mamba2", Mamba2),
           "state-tracking-mamba3": ("mamba3", Mamba3)}


def load(name: str) -> dict:
    return yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())


def test_configs_are_listed_with_a_description():
    for name in CONFIGS:
        assert name in config_names()
        assert "parity" in config_description(CONFIG_DIR / f"{name}.yaml")


def test_configs_differ_only_in_the_mixer():
    cfgs = {name: load(name) for name in CONFIGS}
    stripped = []
    for name, (mixer, _) in CONFIGS.items():
        c = copy.deepcopy(cfgs[name])
        assert c["model"]["init_args"]["model_kwargs"].pop("mixer") == mixer
        assert c["data"]["init_args"]["task"] == "parity"
        stripped.append(c)
    assert stripped[0] == stripped[1] == stripped[2]
    # the built models: the same LMConfig but for the mixer, every layer the mixer named
    built = {}
    for name, (mixer, cls) in CONFIGS.items():
        init = cfgs[name]["model"]["init_args"]
        with torch.device("meta"):
            model = create_model(init["model"], **init["model_kwargs"])
        assert all(type(block.mixer) is cls for block in model.layers)
        built[name] = dataclasses.asdict(dataclasses.replace(model.config, mixer="-"))
    assert len({repr(v) for v in built.values()}) == 1


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_fits_two_steps_and_scores_the_last_bit(tmp_path, name):
    cfg = load(name)
    lengths = cfg["data"]["init_args"]["test_lengths"]
    assert main(["fit", "--config", name, "--run_dir", str(tmp_path), "--trainer.max_steps", "2",
                 "--trainer.val_check_interval", "1", "--trainer.log_every_n_steps", "1",
                 "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                 "--data.init_args.batch_size", "4", "--data.init_args.eval_samples", "8",
                 "--test_after_fit", "true"]) == 0
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2
    assert ckpt["hyper_parameters"]["model_kwargs"]["mixer"] == CONFIGS[name][0]
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {n: float(r[f"test_L{n}/acc"]) for r in rows for n in lengths if r.get(f"test_L{n}/acc")}
    assert sorted(logged) == sorted(lengths)
    # the test ran on the best checkpoint: the same sets through parity_accuracy give the logged accuracy
    best = next((tmp_path / "checkpoints").glob("best-step*.ckpt"))
    acc = parity_accuracy(best, lengths, samples=8, seed=cfg["data"]["init_args"].get("seed", 0))
    assert sorted(acc) == sorted(lengths)
    for n in lengths:
        assert acc[n]["per_step"] == pytest.approx(logged[n], abs=1e-6)
        assert 0.0 <= acc[n]["last"] <= 1.0 and acc[n]["last"] * 8 == round(acc[n]["last"] * 8)


def test_parity_accuracy_scores_the_final_bit(tmp_path, monkeypatch):
    """A model that predicts 0 everywhere: per-step accuracy = the share of even prefixes, last-bit accuracy = the
    share of strings with even parity, each counted by hand on the same test sets."""
    from mambazoo.data.synthetic import IGNORE, SyntheticDataModule

    class Zeros(torch.nn.Module):
        def forward(self, x):
            logits = torch.zeros(*x.shape, 3)
            logits[..., 0] = 1.0
            return logits

    class Task:
        model = Zeros()

    monkeypatch.setattr("mambazoo.cli.load_task", lambda path: (Task(), path))
    acc = parity_accuracy(tmp_path / "any.ckpt", [8, 20], samples=16, seed=3)
    loaders = SyntheticDataModule(task="parity", seq_len=8, test_lengths=[8, 20], eval_samples=16,
                                  seed=3).test_dataloader()
    for n, loader in zip([8, 20], loaders):
        ys = torch.cat([y for _, y in loader])
        scored = ys[ys != IGNORE]
        assert acc[n]["per_step"] == pytest.approx((scored == 0).float().mean().item())
        assert acc[n]["last"] == pytest.approx((ys[:, -1] == 0).float().mean().item())
    with pytest.raises(ValueError, match="lengths >= 2"):
        parity_accuracy(tmp_path / "any.ckpt", [1])
