"""The Mamba paper's probes for every mixer, one budget per run, in one table (issue 27, part 1).

Each run is one ``mambazoo fit`` (the project's Lightning CLI, so jsonargparse is needed) of a probe's named
config with the mixer's model and overrides, ``--trainer.max_time`` set to the budget (and optionally the same
``max_steps``), then the test of its best checkpoint (the config's monitor). Runs go side by side, ``jobs`` at a
time; the table (markdown), a plot (PNG) and every run's numbers (JSON) are rewritten as each run ends, so a
call cut short still leaves what finished.

Two tables drive it: ``MIXERS`` (a registry model + model_kwargs over the probe's shape; several learning
rates make a sweep whose best run on validation is reported) and ``PROBES`` (a named config + the test metrics
it reports). A mixer the registry / LM cannot build (an unknown name or field) is skipped with the ValueError
that building it gave.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml


@dataclass(frozen=True)
class Mixer:
    """One row of the table: ``model`` (a registry name) with ``kwargs`` over the probe config's model_kwargs.
    ``lrs``: None keeps the config's learning rate; several values sweep it (the run with the best validation
    value of the probe's monitor is reported). ``probes``: None for every probe, else the probe names it runs."""

    name: str
    label: str
    model: str
    kwargs: dict = field(default_factory=dict)
    lrs: tuple[float, ...] | None = None
    probes: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Probe:
    """A named config and what the table shows of it: ``metrics`` are (logged test key, column label);
    ``monitor`` picks the best checkpoint (and the best learning rate of a sweep), lower is better. ``kwargs``
    go over the config's model_kwargs (under a mixer's) and ``args`` after every run's common pass-through
    arguments: a probe shrunk by ``--probe-args`` (see ``with_overrides``)."""

    name: str
    label: str
    config: str
    metrics: tuple[tuple[str, str], ...]
    monitor: str = "val/loss"
    kwargs: dict = field(default_factory=dict)
    args: tuple[str, ...] = ()


MIXERS: tuple[Mixer, ...] = (
    Mixer("mamba", "Mamba-1 (S6)", "mamba-tiny"),
    Mixer("s4d", "S4D (LTI)", "mamba-tiny", {"selective": False}),
    Mixer("mamba2", "Mamba-2 (SSD)", "mamba2-tiny"),
    # Mamba-3 (mixer: mamba3): 8 heads of 16, d_state 16, half the state rotary; MIMO of rank 4
    Mixer("mamba3-siso", "Mamba-3 SISO", "mamba3-tiny"),
    Mixer("mamba3-mimo", "Mamba-3 MIMO", "mamba3-tiny", {"is_mimo": True, "mimo_rank": 4}),
    # the fair all-attention point: rotary positions, heads of 16, its own learning rate (3 values)
    Mixer("attention", "Attention (RoPE)", "mamba-tiny", {"layout": "A", "rope": True, "n_heads": 4, "n_kv_heads": 4},
          lrs=(3e-4, 1e-3, 3e-3)),
    # the MQAR sweep's 1:7 hybrid (Jamba-style attention without positions), as a reference that solves MQAR
    Mixer("hybrid-1:7", "Mamba-1 + attention 1:7", "mamba-tiny", {"layout": "MMMMAMMM", "n_heads": 4, "n_kv_heads": 4},
          probes=("mqar",)),
)

PROBES: tuple[Probe, ...] = (
    Probe("selective_copy", "selective copying", "selective-copy-mamba", (("test_L256/acc", "acc"),)),
    Probe("induction_heads", "induction heads", "induction-heads-mamba",
          (("test_L256/acc", "256"), ("test_L4096/acc", "4,096"), ("test_L16384/acc", "16,384")),
          monitor="val_L4096/loss"),
    Probe("mqar", "MQAR (16 pairs / 128 tokens)", "mqar-mamba", (("test_L128/acc", "acc"),)),
    Probe("parity", "parity (state tracking)", "parity-mamba",
          (("test_L64/acc", "64"), ("test_L256/acc", "256"), ("test_L1024/acc", "1,024"))),
)

PAPER_BARS = ("Bars from the papers: selective copying S6 99.8 % vs S4 18.3 % (Mamba, Table 1); induction heads "
              "exact to 2^20 tokens for Mamba trained at 256 (Mamba, Table 2); parity: Mamba-3 solves it, Mamba-2 "
              "does not (Mamba-3 paper, state tracking).")

# every run on the CPU for 2 steps, tiny batches and evaluation sets: checks the plumbing, not the models
SMOKE_ARGS = ["--trainer.max_steps", "2", "--trainer.accelerator", "cpu", "--trainer.precision", "32",
              "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
              "--trainer.log_every_n_steps", "1", "--data.init_args.batch_size", "2", "--data.init_args.eval_samples", "2",
              "--data.init_args.eval_batch_size", "2"]


def by_name(items, names, what: str):
    """The items whose .name is in names (all when names is None), in table order; unknown names raise ValueError."""
    if names is None:
        return list(items)
    known = [i.name for i in items]
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"{what}: expected some of {known}, got unknown {bad}")
    return [i for i in items if i.name in names]


def with_overrides(probes: list[Probe], specs: list[str]) -> list[Probe]:
    """The probes with per-probe overrides applied; each spec is ``PROBE=ARGS`` (ARGS split as a shell would).

    ARGS are ``mambazoo fit`` arguments for that probe's runs only, placed after the common ones (after ``--``),
    with two read here: ``--model_kwargs JSON`` merges into the probe's model_kwargs (the mixer's keys still win:
    e.g. fewer layers or a smaller vocabulary for every mixer), and ``--monitor KEY`` also becomes the key the
    table reads (needed when the validation lengths change). Specs of known probes not in ``probes`` are ignored;
    unknown probe names or a spec without '=' raise ValueError."""
    out = {p.name: p for p in probes}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        known = list(dict.fromkeys([*(p.name for p in PROBES), *out]))
        if not sep or name not in known:
            raise ValueError(f"--probe-args: expected PROBE=ARGS with PROBE one of {known}, got {spec!r}")
        if name not in out:  # a probe not selected this time (--probes): one command line serves any subset
            continue
        args, kwargs, monitor, words = [], dict(out[name].kwargs), out[name].monitor, shlex.split(rest)
        while words:
            w = words.pop(0)
            if w == "--model_kwargs" and words:
                try:
                    extra = json.loads(words[0])
                except json.JSONDecodeError:
                    extra = None
                words.pop(0)
                if not isinstance(extra, dict):
                    raise ValueError(f"--probe-args {name}: --model_kwargs expected a JSON object, got {extra!r}")
                kwargs.update(extra)
                continue
            if w == "--monitor" and words:
                monitor = words[0]
            args.append(w)
        # the shape in the label's parentheses (MQAR's "16 pairs / 128 tokens") no longer holds: the command says it
        out[name] = replace(out[name], label=re.sub(r" \(.*\)$", "", out[name].label),
                            kwargs=kwargs, monitor=monitor, args=out[name].args + tuple(args))
    return [out[p.name] for p in probes]


def probe_config(probe: Probe) -> dict:
    """The probe's named config (configs/NAME.yaml) as a dict."""
    from mambazoo.cli import resolve_config

    return yaml.safe_load(resolve_config(probe.config).read_text())


def model_kwargs(mixer: Mixer, probe: Probe) -> dict:
    """The probe config's model_kwargs (its shape: vocabulary, layers, width) with the mixer's on top."""
    base = dict(probe_config(probe)["model"]["init_args"].get("model_kwargs") or {})
    return {**base, **probe.kwargs, **mixer.kwargs}


def check_mixer(mixer: Mixer, probe: Probe) -> tuple[int | None, str | None]:
    """(parameter count, None) when the registry builds the mixer's model for this probe, else (None, why).
    Built on the meta device: no memory, no time."""
    import torch

    from mambazoo.registry import create_model

    try:
        with torch.device("meta"):
            model = create_model(mixer.model, **model_kwargs(mixer, probe))
    except ValueError as e:
        return None, f"{mixer.model} {json.dumps(mixer.kwargs)}: {str(e).split('; expected some of')[0]}"
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()), None


@dataclass
class Run:
    """One fit: a mixer on a probe at one learning rate (None: the config's)."""

    mixer: Mixer
    probe: Probe
    lr: float | None
    run_dir: Path
    params: int | None = None
    skipped: str | None = None
    cmd: list[str] = field(default_factory=list)
    exit: int | None = None
    wall_s: float | None = None
    steps: int | None = None
    best_step: int | None = None
    best_val: float | None = None
    metrics: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.probe.name}/{self.mixer.name}" + ("" if self.lr is None else f"/lr{self.lr:g}")

    def to_json(self) -> dict:
        return {"probe": self.probe.name, "mixer": self.mixer.name, "label": self.mixer.label, "model": self.mixer.model,
                "model_kwargs": model_kwargs(self.mixer, self.probe), "lr": self.lr, "params": self.params,
                "skipped": self.skipped, "command": self.cmd, "exit": self.exit, "wall_s": self.wall_s,
                "steps": self.steps, "best_step": self.best_step, "monitor": self.probe.monitor,
                "best_val": self.best_val, "metrics": self.metrics, "run_dir": str(self.run_dir)}


def plan(runs_dir: Path, mixers: list[Mixer], probes: list[Probe]) -> list[Run]:
    """Every (probe, mixer, lr) run, skipped ones included (with their reason); run folders under ``runs_dir``."""
    runs = []
    for probe in probes:
        for mixer in mixers:
            if mixer.probes is not None and probe.name not in mixer.probes:
                continue
            params, why = check_mixer(mixer, probe)
            for lr in mixer.lrs or (None,):
                folder = mixer.name.replace(":", "-") + ("" if lr is None else f"-lr{lr:g}")
                runs.append(Run(mixer, probe, lr, runs_dir / probe.name / folder, params, why))
    return runs


def hms(seconds: float) -> str:
    """Seconds -> Lightning's max_time 'DD:HH:MM:SS'."""
    s = max(1, int(round(seconds)))
    return f"{s // 86400:02d}:{s // 3600 % 24:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


def command(run: Run, budget_s: float, max_steps: int | None, smoke: bool, extra: list[str]) -> list[str]:
    """The ``mambazoo fit`` command line of one run."""
    cmd = [sys.executable, "-m", "mambazoo.cli", "fit", "--config", run.probe.config, "--run_dir", str(run.run_dir),
           "--overwrite", "true", "--model.init_args.model", run.mixer.model,
           "--model.init_args.model_kwargs", json.dumps(model_kwargs(run.mixer, run.probe)),
           "--monitor", run.probe.monitor, "--trainer.max_time", hms(budget_s), "--test_after_fit", "true",
           "--trainer.enable_progress_bar", "false", "--threads", "1"]
    if max_steps is not None:
        cmd += ["--trainer.max_steps", str(max_steps)]
    cmd += (SMOKE_ARGS if smoke else []) + list(extra) + list(run.probe.args)
    # a sweep's learning rate comes last: a common or per-probe --model.init_args.lr sets the others, not it
    return cmd + ([] if run.lr is None else ["--model.init_args.lr", repr(run.lr)])


def collect(run: Run) -> None:
    """Read a finished run's metrics.csv: test metrics, steps, the best validation value and its step."""
    from mambazoo.tasks.checkpointing import read_run_metrics

    logs = sorted((run.run_dir / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    series = read_run_metrics(logs) if logs else {}
    run.metrics = {key: series[key][-1][1] for key in sorted(series) if key.startswith("test")}
    run.steps = max((s for vals in series.values() for s, _ in vals), default=None)
    vals = series.get(run.probe.monitor, [])
    if vals:
        step, best = min(vals, key=lambda sv: sv[1])
        run.best_val, run.best_step = best, step
    for ckpt in (run.run_dir / "checkpoints").glob("best-step*.ckpt"):
        m = re.match(r"best-step(\d+)", ckpt.name)
        run.best_step = int(m.group(1)) if m else run.best_step


def keep_metrics(run: Run, folder: Path) -> None:
    """Copy the run's last metrics.csv to folder/<probe>__<mixer>[__lr].csv (the run folders may lie elsewhere)."""
    logs = sorted((run.run_dir / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    if logs:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / (run.key.replace("/", "__").replace(":", "-") + ".csv")).write_bytes(logs[-1].read_bytes())


def chosen(runs: list[Run], probe: Probe, mixer: Mixer) -> Run | None:
    """The run a table cell reports: the only one, or the sweep's run with the lowest validation monitor."""
    mine = [r for r in runs if r.probe is probe and r.mixer is mixer and r.skipped is None]
    done = [r for r in mine if r.best_val is not None and math.isfinite(r.best_val)]
    if done:
        return min(done, key=lambda r: r.best_val)
    return mine[0] if len(mine) == 1 else None


def metric(run: Run, probe: Probe, i: int) -> float | None:
    """The run's value of the probe's i-th metric; when lengths were overridden (``-- --data.init_args.seq_len``),
    the i-th of the run's test accuracies in order of length stands in (test_L64/acc for test_L256/acc), also
    where one of them happens to carry a config key (tested at 64 / 256 / 1,024: 256 is the second column)."""
    key = probe.metrics[i][0]
    if all(k in run.metrics for k, _ in probe.metrics):
        return run.metrics[key]
    suffix = key.rsplit("/", 1)[-1]
    found = sorted((k for k in run.metrics if re.fullmatch(rf"test_L\d+/{suffix}", k)),
                   key=lambda k: int(k.split("/")[0][len("test_L"):]))
    return run.metrics[found[i]] if len(found) == len(probe.metrics) else None


def column_labels(runs: list[Run], probe: Probe) -> list[str]:
    """The probe's metric labels; when every finished run of the probe was tested at the same other lengths (the
    lengths overridden), those lengths instead (so a column never names a length nobody was tested at)."""
    labels = [lab for _, lab in probe.metrics]
    suffix = probe.metrics[0][0].rsplit("/", 1)[-1]
    seen = {tuple(sorted((int(k.split("/")[0][len("test_L"):]) for k in r.metrics
                          if re.fullmatch(rf"test_L\d+/{suffix}", k))))
            for r in runs if r.probe is probe and r.metrics}
    if len(seen) == 1:
        lengths = seen.pop()
        keys = tuple(f"test_L{n}/{suffix}" for n in lengths)
        if len(lengths) == len(labels) and keys != tuple(k for k, _ in probe.metrics):
            return [f"L {n:,}" if len(labels) == 1 else f"{n:,}" for n in lengths]
    return labels


def fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def table(runs: list[Run], mixers: list[Mixer], probes: list[Probe], header: dict) -> str:
    """The markdown: setup lines, the summary (one row per mixer, one column per probe metric), every run."""
    lines = [f"Budget: {header['budget']}; {header['jobs']}. Device: {header['device']}; {header['date']}; "
             f"commit {header['commit']}.", "", f"    {header['command']}", "", PAPER_BARS, ""]
    cols = [(p, i, f"{p.label} {lab}" if len(p.metrics) > 1 or lab != p.metrics[0][1] else p.label)
            for p in probes for i, lab in enumerate(column_labels(runs, p))]
    lines.append("| mixer | " + " | ".join(c for _, _, c in cols) + " |")
    lines.append("|---|" + "---|" * len(cols))
    notes = []
    for m in mixers:
        cells = []
        for p, i, _ in cols:
            if m.probes is not None and p.name not in m.probes:
                cells.append("")
                continue
            r = chosen(runs, p, m)
            skipped = [x for x in runs if x.probe is p and x.mixer is m and x.skipped]
            if skipped:
                cells.append("skipped")
                note = f"{m.label}: skipped ({skipped[0].skipped})"
                notes += [note] if note not in notes else []
            elif r is None or r.exit is None:
                cells.append("(running)" if r is not None and r.cmd else "-")
            else:
                v = metric(r, p, i)
                cells.append(fmt(v) + ("" if r.exit == 0 else f" (exit {r.exit})"))
        lines.append(f"| {m.label} | " + " | ".join(cells) + " |")
    lines += [""] + [f"- {n}" for n in notes] + ([""] if notes else [])
    lines += ["Every run (accuracy is token accuracy on the scored positions of the test set, best checkpoint by "
              "the monitor on validation; `*` marks the learning rate a sweep reports):", "",
              "| probe | mixer | lr | params | steps | best step | monitor (best val) | test metrics | wall s | exit |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if r.skipped:
            continue
        star = "*" if r.lr is not None and chosen(runs, r.probe, r.mixer) is r else ""
        accs = sorted((k for k in r.metrics if k.endswith("/acc")), key=lambda k: (len(k.split("/")[0]), k))
        tm = ", ".join(f"{k.removeprefix('test_')} {r.metrics[k]:.3f}" for k in accs)
        lines.append(f"| {r.probe.name} | {r.mixer.label} | {'config' if r.lr is None else f'{r.lr:g}{star}'} | "
                     f"{r.params or '-'} | {r.steps if r.steps is not None else '-'} | {r.best_step or '-'} | "
                     f"{r.probe.monitor} {fmt(r.best_val)} | {tm or '-'} | "
                     f"{'-' if r.wall_s is None else f'{r.wall_s:.0f}'} | {'-' if r.exit is None else r.exit} |")
    return "\n".join(lines) + "\n"


def plot(runs: list[Run], mixers: list[Mixer], probes: list[Probe], path: Path, title: str) -> None:
    """One panel per probe: a group of bars per test metric, one bar per mixer that ran (a run without the metric:
    no bar; skipped mixers are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(probes), figsize=(4.2 * len(probes), 3.8), squeeze=False)
    colors, drawn = {m.name: plt.cm.tab10(i % 10) for i, m in enumerate(mixers)}, set()
    for ax, p in zip(axes[0], probes):
        mine = [m for m in mixers if any(r.probe is p and r.mixer is m and not r.skipped for r in runs)]
        width = 0.8 / max(1, len(mine))
        for j, m in enumerate(mine):
            r = chosen(runs, p, m)
            vals = [math.nan if r is None or metric(r, p, i) is None else metric(r, p, i) for i in range(len(p.metrics))]
            xs = [i + (j - (len(mine) - 1) / 2) * width for i in range(len(p.metrics))]
            bars = ax.bar(xs, [0 if math.isnan(v) else v for v in vals], width, color=colors[m.name],
                          label=m.label if m.name not in drawn else None)
            drawn.add(m.name)
            ax.bar_label(bars, labels=["" if math.isnan(v) else f"{v:.2f}" for v in vals], fontsize=6)
        ax.set_xticks(range(len(p.metrics)), column_labels(runs, p) if len(p.metrics) > 1 else ["test"])
        ax.set_title(p.label, fontsize=10)
        ax.set_ylim(0, 1.05), ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    fig.legend(loc="lower center", ncol=min(7, len(mixers)), fontsize=8, frameon=False)
    fig.suptitle("\n".join(textwrap.wrap(title, 60 * len(probes))), fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def device_line(smoke: bool) -> str:
    """The accelerator (or the CPU) the runs use, in words."""
    import torch

    if not smoke and torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), torch {torch.__version__}"


def git_commit(root: Path) -> str:
    """The checkout's commit (plus '-dirty' with local changes), else $MAMBAZOO_COMMIT, else 'unknown'."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("MAMBAZOO_COMMIT", "unknown")


def write_outputs(out: Path, runs: list[Run], mixers: list[Mixer], probes: list[Probe], header: dict) -> None:
    """table.md, results.json and probes.png in ``out`` (rewritten whole each time)."""
    md = table(runs, mixers, probes, header)
    (out / "table.md").write_text(md)
    summary = {f"{p.name}/{m.name}": (lambda r: None if r is None else {
        "lr": r.lr, "metrics": {k: metric(r, p, i) for i, (k, _) in enumerate(p.metrics)}, "steps": r.steps,
        "exit": r.exit})(
        chosen(runs, p, m)) for p in probes for m in mixers if m.probes is None or p.name in m.probes}
    (out / "results.json").write_text(json.dumps({"header": header, "summary": summary,
                                                  "runs": [r.to_json() for r in runs]}, indent=1))
    try:
        plot(runs, mixers, probes, out / "probes.png", f"{header['budget']}; {header['device']}; {header['date']}")
    except ImportError as e:  # no matplotlib: the table and the JSON still count
        print(f"no plot ({e})", flush=True)


def estimate_wall_s(n_runs: int, jobs: int, budget_s: float, overhead_s: float = 120.0) -> float:
    """Rough wall time: waves of ``jobs`` runs, each the budget plus start-up and test (``overhead_s``)."""
    return math.ceil(n_runs / max(1, jobs)) * (budget_s + overhead_s) if n_runs else 0.0


def main(argv: list[str] | None = None) -> int:
    """Entry point of scripts/probes.py (see its docstring)."""
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(prog="scripts/probes.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/probes", help="table.md, probes.png, results.json, logs/ (each run's output) "
                    "and metrics/ (each run's metrics.csv) go here")
    ap.add_argument("--runs-dir", default=None, help="the run folders (checkpoints, Lightning logs; default OUT/runs)")
    ap.add_argument("--budget-s", type=float, default=300.0, help="training seconds per run (--trainer.max_time)")
    ap.add_argument("--max-steps", type=int, default=None, help="also cap every run at this many steps (the same "
                    "step budget; it is also the cosine schedule's length)")
    ap.add_argument("--jobs", type=int, default=0, help="runs at the same time (0: all at once)")
    ap.add_argument("--grace-s", type=float, default=300.0,
                    help="a run still going budget + grace seconds after its start is stopped (SIGTERM)")
    ap.add_argument("--probes", nargs="+", default=None, help=f"some of {[p.name for p in PROBES]}")
    ap.add_argument("--mixers", nargs="+", default=None, help=f"some of {[m.name for m in MIXERS]}")
    ap.add_argument("--probe-args", action="append", default=[], metavar="PROBE=ARGS",
                    help="fit arguments for one probe's runs only, after the common ones (repeatable); "
                    "'--model_kwargs JSON' in ARGS merges into that probe's model_kwargs, '--monitor KEY' is also read "
                    "by the table (mambazoo.probes.with_overrides)")
    ap.add_argument("--smoke", action="store_true", help="every run for 2 steps on the CPU, tiny batches (a plumbing check)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the commands, run nothing")
    a = ap.parse_args(argv)
    if a.budget_s <= 0 or a.jobs < 0 or (a.max_steps is not None and a.max_steps < 1):
        raise ValueError(f"--budget-s > 0, --jobs >= 0, --max-steps >= 1: got {a.budget_s}, {a.jobs}, {a.max_steps}")
    probes, mixers = by_name(PROBES, a.probes, "--probes"), by_name(MIXERS, a.mixers, "--mixers")
    probes = with_overrides(probes, a.probe_args)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan(Path(a.runs_dir) if a.runs_dir else out / "runs", mixers, probes)
    todo = [r for r in runs if r.skipped is None]
    for r in todo:
        r.cmd = command(r, a.budget_s, a.max_steps, a.smoke, extra)
    jobs = a.jobs or len(todo) or 1
    budget = (f"{a.budget_s:g} s of training per run" + (f", at most {a.max_steps} steps" if a.max_steps else "")
              + ", then the test of the best checkpoint" + (" (smoke: 2 steps on the CPU)" if a.smoke else ""))
    header = {"budget": budget, "jobs": f"{len(todo)} runs, {jobs} at a time", "device": device_line(a.smoke),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": git_commit(Path.cwd()),
              "command": shlex.join(["python", "scripts/probes.py", *argv, *(["--", *extra] if extra else [])])}
    print(f"{len(todo)} runs ({len(runs) - len(todo)} skipped), {jobs} at a time, {budget}; expected wall time "
          f"~{estimate_wall_s(len(todo), jobs, a.budget_s if not a.smoke else 0, 120 if not a.smoke else 30):.0f} s",
          flush=True)
    for r in runs:
        if r.skipped:
            print(f"skip {r.key}: {r.skipped}", flush=True)
    if a.dry_run:
        for r in todo:
            print(" ".join(r.cmd))
        return 0
    status = execute(todo, jobs, a.budget_s + a.grace_s, out,
                     lambda: write_outputs(out, runs, mixers, probes, header))
    print(f"\n{(out / 'table.md').read_text()}\nwrote {out / 'table.md'}, {out / 'probes.png'}, {out / 'results.json'}")
    return status


def execute(todo: list[Run], jobs: int, limit_s: float, out: Path, on_change) -> int:
    """Run the fits ``jobs`` at a time (logs in out/logs/), each stopped after ``limit_s``; ``on_change()`` after
    every start and end. Returns 0 when every run exited 0, else 1."""
    (out / "logs").mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending, live = list(todo), {}
    on_change()
    try:
        while pending or live:
            while pending and len(live) < jobs:
                r = pending.pop(0)
                log = open(out / "logs" / (r.key.replace("/", "__").replace(":", "-") + ".log"), "w")
                print(f"start {r.key}", flush=True)
                live[r.key] = (r, subprocess.Popen(r.cmd, stdout=log, stderr=subprocess.STDOUT, env=env), time.time(), log)
            time.sleep(0.5)
            for key, (r, proc, t0, log) in list(live.items()):
                if proc.poll() is None and time.time() - t0 > limit_s:
                    print(f"stop {key}: past {limit_s:.0f} s", flush=True)
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(60)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                if proc.poll() is None:
                    continue
                r.exit, r.wall_s = proc.returncode, time.time() - t0
                log.close()
                collect(r)
                keep_metrics(r, out / "metrics")
                del live[key]
                print(f"done  {key}: exit {r.exit}, {r.wall_s:.0f} s, {r.steps} steps, "
                      + ", ".join(f"{k} {v:.3f}" for k, v in r.metrics.items() if k.endswith("/acc")), flush=True)
                on_change()
    finally:
        for r, proc, _, log in live.values():  # interrupted: stop the runs this call started
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            log.close()
    return 0 if all(r.exit == 0 for r in todo) else 1


def parity_accuracy(checkpoint: str | os.PathLike, lengths: list[int], samples: int = 1024,
                    seed: int = 0) -> dict[int, dict[str, float]]:
    """Per-step and last-bit accuracy of a parity run's checkpoint (a CausalLMTask .ckpt) at each length.

    The sets are the parity test sets ``mambazoo test`` scores (SyntheticDataModule's test loaders with this
    ``seed`` and ``samples``), so "per_step" equals the logged test_L{n}/acc; "last" is the accuracy on the final
    bit alone (the parity of all L - 1 bits, chance 0.5), which the token accuracy averages away.
    Returns {length: {"per_step": float, "last": float}}; lengths must be >= 2."""
    import torch

    from mambazoo.cli import load_task
    from mambazoo.data.synthetic import IGNORE, SyntheticDataModule

    if not lengths or any(int(n) < 2 for n in lengths):
        raise ValueError(f"lengths: expected lengths >= 2 (a start token and a bit), got {lengths}")
    model = load_task(str(checkpoint))[0].model.eval()
    dm = SyntheticDataModule(task="parity", seq_len=int(lengths[0]), test_lengths=[int(n) for n in lengths],
                             eval_samples=samples, seed=seed)
    loaders = dm.test_dataloader()
    loaders = loaders if isinstance(loaders, list) else [loaders]
    out = {}
    with torch.no_grad():
        for n, loader in zip(lengths, loaders):
            right = scored = last_right = seqs = 0
            for x, y in loader:
                pred = model(x).argmax(-1)  # (b, L)
                mask = y != IGNORE
                right += int(((pred == y) & mask).sum())
                scored += int(mask.sum())
                last_right += int((pred[:, -1] == y[:, -1]).sum())
                seqs += y.shape[0]
            out[int(n)] = {"per_step": right / scored, "last": last_right / seqs}
    return out
