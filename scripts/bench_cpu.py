"""CPU training speed: mambazoo's selective scan and LM train step against mambapy's parallel scan (issue 23).

    python scripts/bench_cpu.py --threads 1 --rounds 5 [--old-scan /tmp/old_scan.py] [--tiny]

Rows: the selective scan forward and forward+backward at (batch, dim, L, N) = (2, 256, 1024, 16),
(1, 1536, 2048, 16), (8, 128, 4096, 16); the scan forward's peak memory at (1, 1536, 2048, 16); an LM train
step (d_model 256, 4 layers, vocab 256, d_state 16, batch 8 x 512, AdamW) in tokens/s and its peak memory; the
README job's model (mambabyte-tiny: 2 layers, d_model 64, d_state 8, batch 16 x 64) in train steps/s.

Implementations, timed side by side in one process, one call each per round in turn (the first one rotating
from round to round), reported as median (min-max) over the rounds:
  mambazoo         ``mambazoo.core.scan.selective_scan`` on the CPU (its chunked backend), and the models built on it;
  mambazoo-before  the same with ``selective_scan_chunked`` taken from the file --old-scan names, e.g. the one of
                   commit b71a621: ``git show b71a621:core/scan.py > /tmp/old_scan.py`` (skipped without it);
  mambapy          ``mambapy.pscan.pscan`` with mambapy's own discretisation and read-out, and ``mambapy.lm.LM``
                   (``pip install mambapy``; skipped with a note when absent).
Every scan computes softplus(delta), exp(dt A), dt B u, y = C h + D u from the same inputs, laid out
(batch, L, dim) in memory as a Mamba mixer produces them; the outputs are checked equal (rel. error printed)
before timing. The LMs are the same size but not the same weights (their parameter counts are printed).
Peak memory: each case in a fresh process, Linux's peak resident set (VmHWM, reset through /proc/self/clear_refs
once the inputs, model and optimizer state exist, before any forward pass) minus the resident set at that point,
with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_) so freed blocks leave the resident set.
transformers' Mamba torch path is not timed here (its scan is inlined in MambaMixer.slow_forward).
--tiny runs every row on toy shapes in seconds (the CI test uses it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

SCAN_SHAPES = [(2, 256, 1024, 16), (1, 1536, 2048, 16), (8, 128, 4096, 16)]
MEMORY_SHAPE = (1, 1536, 2048, 16)
LM = dict(d_model=256, n_layer=4, vocab=256, d_state=16, batch=8, L=512)
BYTE = dict(d_model=64, n_layer=2, vocab=256, d_state=8, batch=16, L=64, steps=20)
TINY_SCAN_SHAPES = [(1, 8, 33, 4)]
TINY_LM = dict(d_model=16, n_layer=2, vocab=32, d_state=4, batch=2, L=24)
TINY_BYTE = dict(d_model=16, n_layer=1, vocab=32, d_state=4, batch=2, L=16, steps=2)


def have_mambapy() -> bool:
    return importlib.util.find_spec("mambapy") is not None


def load_old_scan(path):
    """selective_scan_chunked from a file (an older core/scan.py; it must import nothing from mambazoo)."""
    spec = importlib.util.spec_from_file_location("_old_scan", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (its dataclasses look their module up)
    spec.loader.exec_module(mod)
    return mod.selective_scan_chunked


class use_scan:
    """Within the block, mambazoo's CPU dispatcher calls ``fn`` as its chunked backend (None: unchanged)."""

    def __init__(self, fn):
        import mambazoo.core.scan as scan

        self.scan, self.fn = scan, fn

    def __enter__(self):
        self.saved = self.scan.selective_scan_chunked
        if self.fn is not None:
            self.scan.selective_scan_chunked = self.fn

    def __exit__(self, *exc):
        self.scan.selective_scan_chunked = self.saved


# ---- the scan ---------------------------------------------------------------------------------------------

def scan_inputs(shape, seed=0):
    """u, delta (batch, L, dim), A (dim, N), B, C (batch, L, N), D (dim,): a mixer's layouts."""
    b, d, L, N = shape
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, L, d, generator=g), torch.randn(b, L, d, generator=g) * 0.5 - 1.0,
            -torch.rand(d, N, generator=g) - 0.1, torch.randn(b, L, N, generator=g),
            torch.randn(b, L, N, generator=g), torch.randn(d, generator=g))


def scan_mambazoo(fn=None):
    from mambazoo.core.scan import selective_scan

    def run(u, delta, A, B, C, D):
        with use_scan(fn):
            y = selective_scan(u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D,
                               delta_softplus=True)
        return y.transpose(1, 2)

    return run


def scan_mambapy():
    from mambapy.pscan import pscan

    def run(u, delta, A, B, C, D):  # mambapy.mamba.MambaBlock.selective_scan, softplus included
        dt = F.softplus(delta)
        hs = pscan(torch.exp(dt.unsqueeze(-1) * A), dt.unsqueeze(-1) * B.unsqueeze(2) * u.unsqueeze(-1))
        return (hs @ C.unsqueeze(-1)).squeeze(3) + D * u

    return run


def scan_impls(old_scan):
    impls = {"mambazoo": scan_mambazoo()}
    if old_scan:
        impls["mambazoo-before"] = scan_mambazoo(load_old_scan(old_scan))
    if have_mambapy():
        impls["mambapy"] = scan_mambapy()
    return impls


def scan_case(f, inputs, backward):
    if not backward:
        def fwd():
            with torch.no_grad():
                f(*inputs)
        return fwd

    def step():
        leaves = [x.detach().requires_grad_() for x in inputs]
        f(*leaves).square().sum().backward()
    return step


# ---- the models -------------------------------------------------------------------------------------------

def lm_mambazoo(cfg, fn=None):
    from mambazoo.lm import LMConfig, build_lm

    model = build_lm(LMConfig(vocab_size=cfg["vocab"], n_layer=cfg["n_layer"], d_model=cfg["d_model"]),
                     d_state=cfg["d_state"])
    return model, lambda ids: _with(fn, model, ids)


def _with(fn, model, ids):
    with use_scan(fn):
        return model(ids)


def lm_mambapy(cfg):
    """mambapy.lm.LM's Mamba-1 model (embedding, mambapy.mamba.Mamba, RMSNorm, head), built here because
    mambapy.lm imports mamba_ssm (for its Mamba-2) at import time."""
    from mambapy.mamba import Mamba, MambaConfig, RMSNorm

    config = MambaConfig(d_model=cfg["d_model"], n_layers=cfg["n_layer"], d_state=cfg["d_state"])
    model = torch.nn.Sequential(torch.nn.Embedding(cfg["vocab"], cfg["d_model"]), Mamba(config),
                                RMSNorm(cfg["d_model"], config.rms_norm_eps),
                                torch.nn.Linear(cfg["d_model"], cfg["vocab"], bias=False))
    model[3].weight = model[0].weight  # tied, as mambazoo's
    return model, model


def lm_impls(cfg, old_scan):
    impls = {"mambazoo": lambda: lm_mambazoo(cfg)}
    if old_scan:
        impls["mambazoo-before"] = lambda: lm_mambazoo(cfg, load_old_scan(old_scan))
    if have_mambapy():
        impls["mambapy"] = lambda: lm_mambapy(cfg)
    return impls


def train_step_fn(build, cfg, seed=0):
    """A closure running one AdamW train step of next-token loss on a fixed random batch."""
    torch.manual_seed(seed)
    model, forward = build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["L"] + 1), generator=torch.Generator().manual_seed(1))

    def step():
        logits = forward(ids[:, :-1])[..., :cfg["vocab"]]
        loss = F.cross_entropy(logits.reshape(-1, cfg["vocab"]), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    step.opt = opt
    return model, step


# ---- timing and memory ------------------------------------------------------------------------------------

def rounds(cases: dict, n_rounds: int, warmup: int = 1) -> dict:
    """{name: [seconds per call]}: each round calls every case once, the first one rotating."""
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name]()
    times = {name: [] for name in names}
    for r in range(n_rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - t)
    return times


def fmt(ts, scale=1.0, unit="s"):
    v = [t * scale for t in ts]
    return f"{statistics.median(v):.3g} {unit} ({min(v):.3g}-{max(v):.3g})"


def _status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_above_now(fn) -> float:
    """MiB: the peak resident set while fn runs, above the resident set before it (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def memory_child(args):
    """In a fresh process: one case's peak memory, printed as JSON."""
    torch.set_num_threads(args.threads)
    if args.memory == "scan":
        f = scan_impls(args.old_scan)[args.impl]
        inputs = scan_inputs(tuple(args.shape))
        mib = peak_above_now(scan_case(f, inputs, backward=False))
    else:
        cfg = TINY_LM if args.tiny else LM
        model, step = train_step_fn(lm_impls(cfg, args.old_scan)[args.impl], cfg)
        for q in model.parameters():  # the optimizer's state, without a forward pass first
            q.grad = torch.zeros_like(q)
        step.opt.step()
        step.opt.zero_grad(set_to_none=True)
        mib = peak_above_now(step)
    print(json.dumps({"mib": mib}))


def memory_in_fresh_process(kind, impl, args, shape=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--memory", kind, "--impl", impl, "--threads", str(args.threads)]
    cmd += ["--shape", *map(str, shape)] if shape else []
    cmd += ["--old-scan", args.old_scan] if args.old_scan else []
    cmd += ["--tiny"] if args.tiny else []
    # a fixed mmap threshold: every large block is its own mapping, returned on free, so the resident set follows the
    # live tensors (glibc's adaptive threshold would keep freed activations resident and hide them from the peak)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["mib"]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--old-scan", default=None, help="a file defining selective_scan_chunked, timed as mambazoo-before")
    p.add_argument("--tiny", action="store_true", help="toy shapes (seconds): checks the script runs")
    p.add_argument("--skip", nargs="*", default=[], choices=["scan", "memory", "lm", "byte"])
    p.add_argument("--memory", choices=["scan", "lm"], help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--shape", type=int, nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory:
        return memory_child(args)
    torch.set_num_threads(args.threads)
    print(f"# bench_cpu: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {args.threads} torch thread(s), {args.rounds} rounds; median (min-max)")
    if not have_mambapy():
        print("note: mambapy is not installed (pip install mambapy): its columns are skipped")
    if not args.old_scan:
        print("note: no --old-scan file: the mambazoo-before column is skipped")
    rows = []

    if "scan" not in args.skip:
        impls = scan_impls(args.old_scan)
        for shape in TINY_SCAN_SHAPES if args.tiny else SCAN_SHAPES:
            inputs = scan_inputs(shape)
            with torch.no_grad():
                outs = {k: f(*inputs) for k, f in impls.items()}
            check = ", ".join(f"{k} vs mambazoo rel {rel(v, outs['mambazoo']):.1e}" for k, v in outs.items()
                              if k != "mambazoo")
            del outs
            print(f"scan {shape}: {check or 'one implementation'}", flush=True)
            for backward in (False, True):
                t = rounds({k: scan_case(f, inputs, backward) for k, f in impls.items()}, args.rounds)
                rows.append((f"scan {'fwd+bwd' if backward else 'forward'} {shape}", t, "s"))
                print(rows[-1][0], {k: fmt(v) for k, v in t.items()}, flush=True)

    if "memory" not in args.skip:
        shape = TINY_SCAN_SHAPES[0] if args.tiny else MEMORY_SHAPE
        mem = {k: memory_in_fresh_process("scan", k, args, shape) for k in scan_impls(args.old_scan)}
        rows.append((f"scan forward peak memory above inputs {shape}", mem, "MiB"))
        print(rows[-1][0], mem, flush=True)

    if "lm" not in args.skip:
        cfg = TINY_LM if args.tiny else LM
        steps = {}
        for k, build in lm_impls(cfg, args.old_scan).items():
            model, steps[k] = train_step_fn(build, cfg)
            print(f"LM {k}: {sum(q.numel() for q in model.parameters()):,} parameters", flush=True)
        t = rounds(steps, args.rounds)
        toks = cfg["batch"] * cfg["L"]
        rows.append((f"LM train step, d_model {cfg['d_model']}, {cfg['n_layer']} layers, vocab {cfg['vocab']}, "
                     f"batch {cfg['batch']} x {cfg['L']}", {k: [toks / s for s in v] for k, v in t.items()}, "tok/s"))
        print(rows[-1][0], {k: fmt(v, unit="tok/s") for k, v in rows[-1][1].items()}, flush=True)
        del steps
    if "memory" not in args.skip:
        cfg = TINY_LM if args.tiny else LM
        mem = {k: memory_in_fresh_process("lm", k, args) for k in lm_impls(cfg, args.old_scan)}
        rows.append((f"LM train step peak memory above model + optimizer (d_model {cfg['d_model']}, batch "
                     f"{cfg['batch']} x {cfg['L']})", mem, "MiB"))
        print(rows[-1][0], mem, flush=True)

    if "byte" not in args.skip:
        cfg = TINY_BYTE if args.tiny else BYTE
        steps = {}
        for k, build in lm_impls(cfg, args.old_scan).items():
            _, one = train_step_fn(build, cfg)
            steps[k] = (lambda one: lambda: [one() for _ in range(cfg["steps"])])(one)
        t = rounds(steps, args.rounds)
        rows.append((f"mambabyte-tiny train steps (batch {cfg['batch']} x {cfg['L']})",
                     {k: [cfg["steps"] / s for s in v] for k, v in t.items()}, "steps/s"))
        print(rows[-1][0], {k: fmt(v, unit="steps/s") for k, v in rows[-1][1].items()}, flush=True)

    names = ["mambazoo", "mambazoo-before", "mambapy"]
    print("\n| measure | " + " | ".join(names) + " | mambazoo speed-up over mambapy |")
    print("|---|" + "---|" * (len(names) + 1))
    for label, vals, unit in rows:
        cells = []
        for n in names:
            v = vals.get(n)
            cells.append("skipped" if v is None else f"{v:,.1f} MiB" if unit == "MiB" else fmt(v, unit=unit))
        if "mambapy" in vals and unit != "MiB":
            a, b = statistics.median(vals["mambapy"]), statistics.median(vals["mambazoo"])
            cells.append(f"{(a / b if unit == 's' else b / a):.2f}x")
        else:
            cells.append("")
        print(f"| {label} | " + " | ".join(cells) + " |")
    return rows


if __name__ == "__main__":
    main()
