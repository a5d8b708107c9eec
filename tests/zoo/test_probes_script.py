"""scripts/probes.py (mambazoo.probes): the parity task, the plan (skips, sweeps, commands), the table's choice of
a sweep's run, and a smoke run of a subset end to end through ``mambazoo fit`` on the CPU."""

import json
import math
from pathlib import Path

import pytest
import torch

from mambazoo import probes
from mambazoo.data.synthetic import IGNORE, SyntheticDataModule, parity

ROOT = Path(__file__).resolve().parents[2]


def test_parity_targets_are_the_running_xor_of_the_bits():
    x, y = parity(8, 33, g=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 33) and (x[:, 0] == 2).all() and (y[:, 0] == IGNORE).all()
    bits = x[:, 1:]
    assert set(bits.unique().tolist()) == {0, 1}
    for row in range(8):
        acc = 0
        for t in range(32):
            acc ^= int(bits[row, t])
            assert int(y[row, t + 1]) == acc
    with pytest.raises(ValueError, match="seq_len >= 2"):
        parity(2, 1)


def test_parity_datamodule_tests_at_longer_lengths():
    dm = SyntheticDataModule(task="parity", seq_len=16, batch_size=4, val_lengths=[16, 64], test_lengths=[16, 64, 256],
                             eval_samples=8)
    assert dm.test_names == ["test_L16", "test_L64", "test_L256"]
    x, y = next(iter(dm.test_dataloader()[2]))
    assert x.shape[1] == 256 and (y[:, 1:] != IGNORE).all()


def test_hms_is_lightnings_max_time():
    assert probes.hms(300) == "00:00:05:00" and probes.hms(90061) == "01:01:01:01" and probes.hms(0.2) == "00:00:00:01"


def test_every_mixer_builds_for_every_probe_and_unknown_ones_are_skipped_with_the_reason():
    for probe in probes.PROBES:
        for mixer in probes.MIXERS:
            params, why = probes.check_mixer(mixer, probe)
            assert why is None and params > 1000, (probe.name, mixer.name, why)
    # the Mamba-3 rows build Mamba-3 mixers, SISO (rank 1) and MIMO (rank 4), at the probe's shape
    import torch

    from mambazoo.core.mamba3 import Mamba3
    from mambazoo.registry import create_model

    for name, rank in (("mamba3-siso", 1), ("mamba3-mimo", 4)):
        mixer = next(m for m in probes.MIXERS if m.name == name)
        with torch.device("meta"):
            model = create_model(mixer.model, **probes.model_kwargs(mixer, probes.PROBES[0]))
        kinds = [b.mixer for b in model.layers]
        assert all(isinstance(m, Mamba3) and m.mimo_rank == rank for m in kinds), (name, kinds)
    fake = probes.Mixer("nope", "No such mixer", "mamba-tiny", {"mixer": "nope"})
    params, why = probes.check_mixer(fake, probes.PROBES[0])
    assert params is None and "nope" in why


def test_plan_sweeps_attention_and_skips_without_running(tmp_path):
    fake = probes.Mixer("nope", "No such mixer", "mamba-tiny", {"mixer": "nope"})
    attn = next(m for m in probes.MIXERS if m.name == "attention")
    hybrid = next(m for m in probes.MIXERS if m.name == "hybrid-1:7")
    runs = probes.plan(tmp_path, [fake, attn, hybrid], list(probes.PROBES))
    assert [r.lr for r in runs if r.mixer is attn and r.probe.name == "parity"] == list(attn.lrs)
    assert {r.probe.name for r in runs if r.mixer is hybrid} == {"mqar"}
    assert all(r.skipped for r in runs if r.mixer is fake) and len([r for r in runs if r.mixer is fake]) == 4
    r = next(r for r in runs if r.mixer is attn and r.probe.name == "induction_heads" and r.lr == 1e-3)
    cmd = probes.command(r, 120, 500, smoke=False, extra=["--trainer.devices", "1"])
    i = cmd.index
    assert cmd[i("--config") + 1] == "induction-heads-mamba" and cmd[i("--monitor") + 1] == "val_L4096/loss"
    assert cmd[i("--trainer.max_time") + 1] == "00:00:02:00" and cmd[i("--trainer.max_steps") + 1] == "500"
    assert float(cmd[i("--model.init_args.lr") + 1]) == 1e-3 and cmd[-2:] == ["--trainer.devices", "1"]
    kw = json.loads(cmd[i("--model.init_args.model_kwargs") + 1])
    assert kw == {"vocab_size": 16, "n_layer": 2, "d_model": 64, "layout": "A", "rope": True, "n_heads": 4,
                  "n_kv_heads": 4}


def test_the_table_reports_the_sweeps_best_run_on_validation_and_names_skips(tmp_path):
    attn = next(m for m in probes.MIXERS if m.name == "attention")
    fake = probes.Mixer("nope", "No such mixer", "mamba-tiny", {"mixer": "nope"})
    probe = next(p for p in probes.PROBES if p.name == "mqar")
    runs = probes.plan(tmp_path, [attn, fake], [probe])
    for r, val, acc in zip([r for r in runs if r.mixer is attn], [2.0, 0.5, math.nan], [0.1, 0.9, 0.99]):
        r.exit, r.best_val, r.metrics, r.cmd = 0, val, {"test_L128/acc": acc}, ["x"]
    best = probes.chosen(runs, probe, attn)
    assert best.lr == attn.lrs[1]  # lowest validation loss, not the highest test accuracy
    header = {"budget": "b", "jobs": "j", "device": "d", "date": "t", "commit": "c", "command": "cmd"}
    md = probes.table(runs, [attn, fake], [probe], header)
    assert "| Attention (RoPE) | 0.900 |" in md and "| No such mixer | skipped |" in md and "'nope'" in md


def test_overridden_lengths_stand_in_for_the_configs_in_order(tmp_path):
    probe = next(p for p in probes.PROBES if p.name == "induction_heads")
    run = probes.Run(probes.MIXERS[0], probe, None, tmp_path)
    run.metrics = {"test_L96/acc": 0.5, "test_L24/acc": 1.0, "test_L384/acc": 0.25, "test_L24/loss": 0.1}
    assert [probes.metric(run, probe, i) for i in range(3)] == [1.0, 0.5, 0.25]
    run.metrics = {"test_L256/acc": 0.75, "test_L24/acc": 1.0}
    assert probes.metric(run, probe, 0) == 0.75 and probes.metric(run, probe, 1) is None


def test_smoke_subset_end_to_end(tmp_path):
    """Two runs side by side, 2 steps each on the CPU, through `mambazoo fit`: table, plot and JSON written."""
    out = tmp_path / "probes"
    status = probes.main(["--smoke", "--out", str(out), "--probes", "parity", "--mixers", "mamba", "s4d",
                          "--budget-s", "60"])
    assert status == 0
    res = json.loads((out / "results.json").read_text())
    assert [(r["mixer"], r["exit"], r["steps"]) for r in res["runs"]] == [("mamba", 0, 2), ("s4d", 0, 2)]
    for r in res["runs"]:
        assert set(r["metrics"]) >= {"test_L64/acc", "test_L256/acc", "test_L1024/acc"}
        assert all(0.0 <= r["metrics"][k] <= 1.0 for k in ("test_L64/acc", "test_L1024/acc"))
        assert math.isfinite(r["best_val"]) and r["params"] > 1000
    assert res["summary"]["parity/mamba"]["exit"] == 0
    md = (out / "table.md").read_text()
    assert "| Mamba-1 (S6) |" in md and "| S4D (LTI) |" in md and "smoke" in md
    assert (out / "probes.png").stat().st_size > 5000
    assert sorted(p.name for p in (out / "metrics").glob("*.csv")) == ["parity__mamba.csv", "parity__s4d.csv"]
