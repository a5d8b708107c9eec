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
    assert cmd[-4:] == ["--trainer.devices", "1", "--model.init_args.lr", "0.001"]  # the sweep's lr comes last
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
    run.metrics = {"test_L256/acc": 0.75, "test_L24/acc": 1.0}  # 2 lengths for 3 columns: nothing stands in
    assert probes.metric(run, probe, 0) is None and probes.metric(run, probe, 1) is None
    run.metrics = {"test_L64/acc": 1.0, "test_L256/acc": 0.5, "test_L1024/acc": 0.25}  # 256 is the 2nd column here
    assert [probes.metric(run, probe, i) for i in range(3)] == [1.0, 0.5, 0.25]
    run.metrics = {"test_L64/acc": 1.0, "test_L256/acc": 0.5, "test_L4096/acc": 0.25, "test_L16384/acc": 0.1}
    assert [probes.metric(run, probe, i) for i in range(3)] == [0.5, 0.25, 0.1]  # the config's keys, all there


def test_per_probe_overrides_shrink_one_probe_and_keep_the_sweep_and_mixer_keys(tmp_path):
    shrunk = probes.with_overrides(list(probes.PROBES), [
        "mqar=--model_kwargs '{\"n_layer\": 2, \"vocab_size\": 64, \"layout\": \"M\"}' --model.init_args.lr 0.01 "
        "--data.init_args.task_kwargs '{\"n_pairs\": 8, \"vocab_size\": 64}'",
        "induction_heads=--data.init_args.val_lengths [64,256] --monitor val_L256/loss"])
    mqar, ih = shrunk[2], shrunk[1]
    assert [p.name for p in shrunk] == [p.name for p in probes.PROBES] and shrunk[0] is probes.PROBES[0]
    assert ih.monitor == "val_L256/loss" and ih.label == "induction heads"
    assert mqar.label == "MQAR" and mqar.monitor == "val/loss"
    attn = next(m for m in probes.MIXERS if m.name == "attention")
    # the probe's kwargs go over the config's, the mixer's (layout A) over the probe's
    assert probes.model_kwargs(attn, mqar) == {"vocab_size": 64, "n_layer": 2, "d_model": 64, "layout": "A",
                                               "rope": True, "n_heads": 4, "n_kv_heads": 4}
    assert probes.model_kwargs(probes.MIXERS[0], mqar)["layout"] == "M"
    r = next(r for r in probes.plan(tmp_path, [attn], [mqar]) if r.lr == 3e-4)
    assert r.params is not None and r.skipped is None
    cmd = probes.command(r, 60, 10, smoke=False, extra=["--model.init_args.lr", "0.5"])
    i = cmd.index
    assert json.loads(cmd[i("--model.init_args.model_kwargs") + 1])["n_layer"] == 2
    assert cmd[i("--data.init_args.task_kwargs") + 1] == '{"n_pairs": 8, "vocab_size": 64}'
    assert "--model_kwargs" not in cmd and cmd[-2:] == ["--model.init_args.lr", "0.0003"]
    lrs = [cmd[j + 1] for j, w in enumerate(cmd) if w == "--model.init_args.lr"]
    assert lrs == ["0.5", "0.01", "0.0003"]  # common, per-probe, then the sweep's (the last one counts)
    assert probes.with_overrides([probes.PROBES[0]], ["mqar=--x 1"]) == [probes.PROBES[0]]  # not selected
    with pytest.raises(ValueError, match="PROBE=ARGS"):
        probes.with_overrides(list(probes.PROBES), ["nope=--x 1"])
    with pytest.raises(ValueError, match="PROBE=ARGS"):
        probes.with_overrides(list(probes.PROBES), ["mqar --x 1"])
    with pytest.raises(ValueError, match="JSON object"):
        probes.with_overrides(list(probes.PROBES), ["mqar=--model_kwargs [1]"])


def test_columns_name_the_lengths_the_runs_were_tested_at(tmp_path):
    ih, sc = (next(p for p in probes.PROBES if p.name == n) for n in ("induction_heads", "selective_copy"))
    runs = [probes.Run(m, ih, None, tmp_path) for m in probes.MIXERS[:2]]
    assert probes.column_labels(runs, ih) == ["256", "4,096", "16,384"]  # nothing ran yet: the config's
    for r, acc in zip(runs, (0.5, 0.25)):
        r.exit, r.cmd = 0, ["x"]
        r.metrics = {"test_L64/acc": 1.0, "test_L256/acc": acc, "test_L1024/acc": 0.1, "test_L64/loss": 0.2}
    assert probes.column_labels(runs, ih) == ["64", "256", "1,024"]
    header = {"budget": "b", "jobs": "j", "device": "d", "date": "t", "commit": "c", "command": "cmd"}
    md = probes.table(runs, probes.MIXERS[:2], [ih], header)
    assert "| mixer | induction heads 64 | induction heads 256 | induction heads 1,024 |" in md
    assert "| Mamba-1 (S6) | 1.000 | 0.500 | 0.100 |" in md
    runs[1].metrics = {"test_L128/acc": 0.3}  # runs tested at different lengths: the config's labels stay
    assert probes.column_labels(runs, ih) == ["256", "4,096", "16,384"]
    one = probes.Run(probes.MIXERS[0], sc, None, tmp_path)
    one.metrics = {"test_L64/acc": 0.4}
    assert probes.column_labels([one], sc) == ["L 64"]


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
