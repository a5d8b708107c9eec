"""Sweep the attention ratio of the mqar-hybrid config (0, 1:7, 1:3, all attention) through CLI
overrides, then write a table and a plot of MQAR accuracy against the ratio.

    python scripts/sweep_mqar.py --out runs/mqar-sweep                       # the config as is
    python scripts/sweep_mqar.py --out /tmp/s --parallel -- --trainer.max_steps 500 --trainer.accelerator cpu
    python scripts/sweep_mqar.py --out runs/mqar-sweep-rope --rope          # attention with rotary positions

Everything after ``--`` is passed to every ``mambazoo fit`` run. Each ratio is one layer layout
string of the Jamba-style model (M = Mamba, A = attention, tiled over its 8 layers). Jamba's attention
has no positional encoding, so the all-attention point cannot tell which value follows which key;
``--rope`` gives every attention layer rotary positions (a fair attention-only baseline).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

from mambazoo.tasks.checkpointing import read_metrics_csv  # noqa: E402

RATIOS = {  # name -> (attention fraction, layout)
    "0": (0.0, "M"),
    "1:7": (1 / 8, "MMMMAMMM"),
    "1:3": (1 / 4, "MMAM"),
    "all": (1.0, "A"),
}


def run_args(name: str, layout: str, base_kwargs: dict, out: Path, extra: list[str], rope: bool = False) -> list[str]:
    kwargs = {**base_kwargs, "layout": layout, **({"rope": True} if rope else {})}
    return [sys.executable, "-m", "mambazoo.cli", "fit", "--config", "mqar-hybrid", "--run_dir", str(out / name.replace(":", "-")),
            "--model.init_args.model_kwargs", json.dumps(kwargs), "--trainer.enable_progress_bar", "false", *extra]


def final(run_dir: Path, key: str) -> float:
    logs = sorted((run_dir / "logs").glob("version_*/metrics.csv"))
    if not logs:
        return float("nan")
    series = read_metrics_csv(logs[-1]).get(key, [])
    return series[-1][1] if series else float("nan")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/mqar-sweep")
    ap.add_argument("--ratios", nargs="+", default=list(RATIOS), choices=list(RATIOS))
    ap.add_argument("--parallel", action="store_true", help="run the ratios at the same time")
    ap.add_argument("--rope", action="store_true", help="rotary position embedding in the attention layers")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load((ROOT / "configs" / "mqar-hybrid.yaml").read_text())["model"]["init_args"]["model_kwargs"]
    procs = {}
    for name in a.ratios:
        cmd = run_args(name, RATIOS[name][1], base, out, extra, a.rope)
        log = open(out / f"{name.replace(':', '-')}.log", "w")
        print("running:", " ".join(cmd), flush=True)
        procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        if not a.parallel:
            procs[name].wait()
    codes = {name: p.wait() for name, p in procs.items()}

    rows = []
    for name in a.ratios:
        run = out / name.replace(":", "-")
        rows.append((name, RATIOS[name][0], RATIOS[name][1], final(run, "val/acc"), final(run, "val/seq_acc"), codes[name]))
    table = ["| attention ratio | attention fraction | layout | val acc | val seq acc | exit |", "|---|---|---|---|---|---|"]
    table += [f"| {n} | {f:.3f} | {l} | {acc:.4f} | {sacc:.4f} | {c} |" for n, f, l, acc, sacc, c in rows]
    (out / "table.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(len(rows)), [r[3] for r in rows], marker="o")
    ax.set_xticks(range(len(rows)), [r[0] for r in rows])
    ax.set_xlabel("attention : Mamba layers"), ax.set_ylabel("MQAR accuracy"), ax.set_ylim(0, 1.02), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "mqar_sweep.png", dpi=100)
    print(f"wrote {out / 'table.md'} and {out / 'mqar_sweep.png'}")
    return 0 if all(c == 0 for c in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
