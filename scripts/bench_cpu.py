"""CPU speed: mambazoo's selective scan, LM train step and generation against transformers' Mamba torch path and
mambapy (issue 23).

    python scripts/bench_cpu.py --threads 1 --rounds 3 [--cap 60] [--old-scan /tmp/old_scan.py] [--tiny]

Peers (optional, each skipped with a note when absent): ``pip install mambapy transformers``.

Rows: the selective scan forward and forward+backward at (batch, dim, L, N) = (2, 256, 1024, 16),
(1, 1536, 2048, 16), (8, 128, 4096, 16); the scan forward's peak memory at (1, 1536, 2048, 16); an LM train
step (d_model 256, 4 layers, vocab 256, d_state 16, batch 8 x 512, AdamW) in tokens/s and its peak memory; the
README job's model (mambabyte-tiny: 2 layers, d_model 64, d_state 8, batch 16 x 64) in train steps/s; greedy
generation at the mamba-130m shape (d_model 768, 24 layers, vocab 50280, d_state 16), batch 1, a 128-token prompt
and 128 new tokens: new tokens per second end to end, and the prefill (time from the call to the first new token).

Implementations, timed side by side in one process, one call each per round in turn (the first one rotating
from round to round), reported as median (min-max) over the rounds:
  mambazoo         ``mambazoo.core.scan.selective_scan`` on the CPU (its chunked backend), the models built on it,
                   ``mambazoo.generation.generate``;
  mambazoo-before  the same with ``selective_scan_chunked`` taken from the file --old-scan names, e.g. the one of
                   commit b71a621: ``git show b71a621:core/scan.py > /tmp/old_scan.py`` (skipped without it);
  transformers     transformers' Mamba on its torch path (no mamba_ssm / causal_conv1d kernels): the scan row times
                   ``transformers.models.mamba.modeling_mamba.mamba_selective_scan`` (the function MambaMixer's
                   torch path calls; its sequential loop over L), the models are ``MambaForCausalLM``
                   (``use_mambapy=False``) and generation is its ``generate``;
  transformers-mambapy  the same LM with ``use_mambapy=True`` (its training forward runs mambapy's pscan; the scan
                   rows would repeat the mambapy column, so it has only the model rows);
  mambapy          ``mambapy.pscan.pscan`` with mambapy's own discretisation and read-out, ``mambapy.mamba.Mamba``
                   inside an embedding / final norm / tied head, and its token-by-token ``step`` for generation.
Every scan computes softplus(delta), exp(dt A), dt B u, y = C h + D u from the same inputs, laid out
(batch, L, dim) in memory as a Mamba mixer produces them; the outputs are checked equal (rel. error printed)
before timing. The models (LM, mambabyte-tiny, generation) get the same random weights when transformers is
installed: a seeded ``MambaForCausalLM`` converted to mambazoo (``mambazoo.convert``) and to mambapy (same names);
the logits, and the greedy tokens of generation, are checked equal before timing. Without transformers the LMs are
the same size only.
Slow cases: transformers' sequential scan under autograd (the scan fwd+bwd rows and its LM train step) take minutes
to hours; each runs once in a fresh process stopped after --cap seconds, reported as "1 run" or "> cap".
Peak memory: each case in a fresh process, Linux's peak resident set (VmHWM, reset through /proc/self/clear_refs
once the inputs, model and optimizer state exist, before any forward pass) minus the resident set at that point,
with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_) so freed blocks leave the resident set.
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers' models are built here, never fetched

SCAN_SHAPES = [(2, 256, 1024, 16), (1, 1536, 2048, 16), (8, 128, 4096, 16)]
MEMORY_SHAPE = (1, 1536, 2048, 16)
LM = dict(d_model=256, n_layer=4, vocab=256, d_state=16, batch=8, L=512)
BYTE = dict(d_model=64, n_layer=2, vocab=256, d_state=8, batch=16, L=64, steps=20)
GEN = dict(d_model=768, n_layer=24, vocab=50280, d_state=16, prompt=128, new=128)
TINY_SCAN_SHAPES = [(1, 8, 33, 4)]
TINY_LM = dict(d_model=16, n_layer=2, vocab=32, d_state=4, batch=2, L=24)
TINY_BYTE = dict(d_model=16, n_layer=1, vocab=32, d_state=4, batch=2, L=16, steps=2)
TINY_GEN = dict(d_model=16, n_layer=2, vocab=64, d_state=4, prompt=8, new=8)
NAMES = ["mambazoo", "mambazoo-before", "transformers", "transformers-mambapy", "mambapy"]
SLOW = {("scan-fwdbwd", "transformers"), ("lm", "transformers")}  # run once, capped, in a fresh process


def have_mambapy() -> bool:
    return importlib.util.find_spec("mambapy") is not None


def have_transformers() -> bool:
    """transformers with a Mamba model whose torch-path scan is a function of its own (transformers 5)."""
    if importlib.util.find_spec("transformers") is None:
        return False
    try:
        from transformers.models.mamba import modeling_mamba
    except ImportError:
        return False
    return hasattr(modeling_mamba, "mamba_selective_scan")


def load_old_scan(path):
    """selective_scan_chunked from a file (an older core/scan.py; it must import nothing from mambazoo)."""
    spec = importlib.util.spec_from_file_location("_old_scan", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (its dataclasses look their module up)
    spec.loader.exec_module(mod)
    return mod.selective_scan_chunked


class use_scan:
    """Within the block, mambazoo's CPU dispatcher calls ``fn`` as its chunked backend (None: unchanged). The name is
    swapped where the dispatcher looks it up (mambazoo.core.dispatch) and where it is re-exported (core.scan)."""

    def __init__(self, fn):
        import mambazoo.core.dispatch as dispatch
        import mambazoo.core.scan as scan

        self.mods, self.fn = (dispatch, scan), fn

    def __enter__(self):
        self.saved = [m.selective_scan_chunked for m in self.mods]
        if self.fn is not None:
            for m in self.mods:
                m.selective_scan_chunked = self.fn

    def __exit__(self, *exc):
        for m, f in zip(self.mods, self.saved):
            m.selective_scan_chunked = f


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


def scan_transformers():
    from transformers.models.mamba.modeling_mamba import mamba_selective_scan

    def run(u, delta, A, B, C, D):  # mamba_ssm's layouts, as MambaMixer passes them
        y = mamba_selective_scan(u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2),
                                 D=D, delta_softplus=True)
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
    if have_transformers():
        impls["transformers"] = scan_transformers()
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
# With transformers installed every model starts from one seeded MambaForCausalLM: the same weights everywhere.

def hf_lm(cfg, use_mambapy=False, seed=0):
    """A seeded random transformers MambaForCausalLM of cfg's size (tied head, expand 2, d_conv 4, no eos)."""
    from transformers import MambaConfig, MambaForCausalLM

    config = MambaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["d_model"], num_hidden_layers=cfg["n_layer"],
                         state_size=cfg["d_state"], expand=2, conv_kernel=4, use_mambapy=use_mambapy,
                         tie_word_embeddings=True, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    model = MambaForCausalLM(config)
    model.generation_config.eos_token_id = None  # greedy runs its full length, as the others do
    model.generation_config.pad_token_id = 0
    return model


def lm_mambazoo(cfg, fn=None):
    """mambazoo's CausalLM: the seeded transformers model converted (zoo/convert.py), or built alone."""
    from mambazoo.lm import CausalLM, LMConfig, build_lm

    if have_transformers():
        from mambazoo.convert import convert_mamba, load_into, mamba_config_from_state_dict

        sd = hf_lm(cfg).state_dict()
        model = load_into(CausalLM(mamba_config_from_state_dict(sd, {"vocab_size": cfg["vocab"]})),
                          convert_mamba(sd))
    else:
        model = build_lm(LMConfig(vocab_size=cfg["vocab"], n_layer=cfg["n_layer"], d_model=cfg["d_model"]),
                         d_state=cfg["d_state"])
    return model, lambda ids: _with(fn, model, ids)


def _with(fn, model, ids):
    with use_scan(fn):
        return model(ids)


def lm_transformers(cfg, use_mambapy=False):
    model = hf_lm(cfg, use_mambapy)
    return model, lambda ids: model(input_ids=ids, use_cache=False).logits


def lm_mambapy(cfg):
    """mambapy.lm.LM's Mamba-1 model (embedding, mambapy.mamba.Mamba, RMSNorm, tied head), built here because
    mambapy.lm imports mamba_ssm (for its Mamba-2) at import time; the seeded transformers weights when present."""
    from mambapy.mamba import Mamba, MambaConfig, RMSNorm

    hf = hf_lm(cfg) if have_transformers() else None
    dt_rank = hf.config.time_step_rank if hf is not None else "auto"
    config = MambaConfig(d_model=cfg["d_model"], n_layers=cfg["n_layer"], d_state=cfg["d_state"], dt_rank=dt_rank)
    model = torch.nn.Sequential(torch.nn.Embedding(cfg["vocab"], cfg["d_model"]), Mamba(config),
                                RMSNorm(cfg["d_model"], config.rms_norm_eps),
                                torch.nn.Linear(cfg["d_model"], cfg["vocab"], bias=False))
    model[3].weight = model[0].weight  # tied, as the others
    if hf is not None:  # transformers' names are mambapy's below the backbone
        sd = {"0.weight": None, "2.weight": None}
        for k, v in hf.state_dict().items():
            if k == "backbone.embeddings.weight":
                sd["0.weight"] = v
            elif k == "backbone.norm_f.weight":
                sd["2.weight"] = v
            elif k.startswith("backbone.layers."):
                sd["1." + k[len("backbone."):]] = v
        sd["3.weight"] = sd["0.weight"]
        model.load_state_dict(sd, strict=True)
    return model, model


def lm_impls(cfg, old_scan, mambapy_path=True):
    impls = {"mambazoo": lambda: lm_mambazoo(cfg)}
    if old_scan:
        impls["mambazoo-before"] = lambda: lm_mambazoo(cfg, load_old_scan(old_scan))
    if have_transformers():
        impls["transformers"] = lambda: lm_transformers(cfg)
        if mambapy_path and have_mambapy():
            impls["transformers-mambapy"] = lambda: lm_transformers(cfg, use_mambapy=True)
    if have_mambapy():
        impls["mambapy"] = lambda: lm_mambapy(cfg)
    return impls


def train_step_fn(build, cfg, seed=0):
    """A closure running one AdamW train step of next-token loss on a fixed random batch."""
    torch.manual_seed(seed)
    model, forward = build()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["L"] + 1), generator=torch.Generator().manual_seed(1))

    def step():
        logits = forward(ids[:, :-1])[..., :cfg["vocab"]]
        loss = F.cross_entropy(logits.reshape(-1, cfg["vocab"]), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    step.opt, step.forward, step.ids = opt, forward, ids
    return model, step


def check_logits(steps: dict, cfg) -> str:
    """Relative error of every model's logits on the train batch against mambazoo's (before any step)."""
    with torch.no_grad():
        outs = {k: s.forward(s.ids[:, :-1])[..., :cfg["vocab"]] for k, s in steps.items()}
    return ", ".join(f"{k} vs mambazoo rel {rel(v, outs['mambazoo']):.1e}" for k, v in outs.items() if k != "mambazoo")


# ---- generation -------------------------------------------------------------------------------------------

class Gen:
    """A greedy generator: gen(ids (1, prompt)) -> new tokens (1, new); records each call's prefill seconds (from
    the call to the first new token: the prompt's forward pass and its argmax)."""

    def __init__(self, run, logits):
        self.run, self.logits, self.prefill = run, logits, []  # logits: ids (1, L) -> (1, L, vocab), one forward

    def __call__(self, ids, new):
        t0 = time.perf_counter()
        with torch.inference_mode():
            out, first = self.run(ids, new, t0)
        self.prefill.append(first - t0)
        return out


def gen_mambazoo(cfg):
    from mambazoo.generation import generate

    model, _ = lm_mambazoo(cfg)
    model.eval()

    def run(ids, new, t0):
        first = []
        out = generate(model, ids, max_new_tokens=new, do_sample=False, cuda_graph=False,
                       streamer=lambda tok: first or first.append(time.perf_counter()))
        return out[:, ids.shape[1]:], first[0]

    return Gen(run, model)


def gen_transformers(cfg):
    from transformers.generation.streamers import BaseStreamer

    model = hf_lm(cfg).eval()

    class FirstToken(BaseStreamer):  # generate puts the prompt, then each new token
        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:
                self.first = time.perf_counter()

        def end(self):
            pass

    def run(ids, new, t0):
        s = FirstToken()
        out = model.generate(ids, max_new_tokens=new, do_sample=False, streamer=s,
                             use_cache=True)
        return out[:, ids.shape[1]:], s.first

    return Gen(run, lambda ids: model(input_ids=ids, use_cache=False).logits)


def gen_mambapy(cfg):
    model, _ = lm_mambapy(cfg)
    model.eval()
    emb, mamba, norm, head = model
    c = mamba.config

    def run(ids, new, t0):  # mambapy.lm.LM.generate's loop: the prompt token by token through Mamba.step
        caches = [(None, torch.zeros(ids.shape[0], c.d_inner, c.d_conv - 1)) for _ in mamba.layers]
        for t in range(ids.shape[1]):
            x, caches = mamba.step(emb(ids[:, t]), caches)
        tok = head(norm(x)).argmax(-1)
        first, out = time.perf_counter(), [tok]
        for _ in range(new - 1):
            x, caches = mamba.step(emb(tok), caches)
            tok = head(norm(x)).argmax(-1)
            out.append(tok)
        return torch.stack(out, 1), first

    return Gen(run, model)


def check_generation(gens: dict, ids, outs: dict, cfg) -> str:
    """The peers' greedy tokens against mambazoo's, and their logits over the prompt and mambazoo's continuation
    (one parallel forward each: mambapy's is its pscan forward, not its step path). Where tokens differ, mambazoo's top-2 logit gap there says whether it was a near tie
    (random weights give some; fp32 rounding then decides)."""
    full = torch.cat([ids, outs["mambazoo"]], 1)
    with torch.inference_mode():
        logits = {k: g.logits(full)[0, :, :cfg["vocab"]].float() for k, g in gens.items()}
    notes = []
    for k in gens:
        if k == "mambazoo":
            continue
        note = f"{k} logits rel {rel(logits[k], logits['mambazoo']):.1e}, greedy tokens "
        diff = (outs[k] != outs["mambazoo"])[0]
        if not bool(diff.any()):
            notes.append(note + "equal")
            continue
        i = int(diff.int().argmax())
        top = logits["mambazoo"][ids.shape[1] - 1 + i].topk(2).values
        notes.append(note + f"equal up to new token {i} (there mambazoo's top-2 logit gap is {float(top[0] - top[1]):.2g})")
    return "; ".join(notes) or "one implementation"


def gen_impls(cfg):
    impls = {"mambazoo": lambda: gen_mambazoo(cfg)}
    if have_transformers():
        impls["transformers"] = lambda: gen_transformers(cfg)
    if have_mambapy():
        impls["mambapy"] = lambda: gen_mambapy(cfg)
    return impls


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


class Capped:
    """One run of a slow case in a fresh process: ``seconds``, or None when it was stopped at ``cap`` seconds."""

    def __init__(self, seconds, cap, scale=None):
        self.seconds, self.cap, self.scale = seconds, cap, scale  # scale: the work of one run (tokens), if a rate

    def value(self):
        return self.cap if self.seconds is None else self.seconds

    def __repr__(self):
        return f"> {self.cap:g} s (stopped)" if self.seconds is None else f"{self.seconds:.3g} s (1 run)"


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


def child(args):
    """In a fresh process: one case's peak memory (--memory) or one timed call (--once), printed as JSON."""
    torch.set_num_threads(args.threads)
    kind = args.memory or args.once
    if kind in ("scan", "scan-fwdbwd"):
        fn = scan_case(scan_impls(args.old_scan)[args.impl], scan_inputs(tuple(args.shape)),
                       backward=kind == "scan-fwdbwd")
    else:
        cfg = TINY_LM if args.tiny else LM
        model, fn = train_step_fn(lm_impls(cfg, args.old_scan)[args.impl], cfg)
        for q in model.parameters():  # the optimizer's state, without a forward pass first
            q.grad = torch.zeros_like(q)
        fn.opt.step()
        fn.opt.zero_grad(set_to_none=True)
    if args.memory:
        print(json.dumps({"mib": peak_above_now(fn)}))
    else:
        t = time.perf_counter()
        fn()
        print(json.dumps({"s": time.perf_counter() - t}))


def _child_cmd(flag, kind, impl, args, shape=None):
    cmd = [sys.executable, os.path.abspath(__file__), flag, kind, "--impl", impl, "--threads", str(args.threads)]
    cmd += ["--shape", *map(str, shape)] if shape else []
    cmd += ["--old-scan", args.old_scan] if args.old_scan else []
    cmd += ["--tiny"] if args.tiny else []
    return cmd


def memory_in_fresh_process(kind, impl, args, shape=None):
    # a fixed mmap threshold: every large block is its own mapping, returned on free, so the resident set follows the
    # live tensors (glibc's adaptive threshold would keep freed activations resident and hide them from the peak)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run(_child_cmd("--memory", kind, impl, args, shape), check=True, capture_output=True,
                         text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["mib"]


def once_in_fresh_process(kind, impl, args, shape=None) -> Capped:
    """One timed call in a fresh process, stopped after args.cap seconds of the call (plus 60 s to start up)."""
    try:
        out = subprocess.run(_child_cmd("--once", kind, impl, args, shape), check=True, capture_output=True,
                             text=True, timeout=args.cap + 60).stdout
    except subprocess.TimeoutExpired:
        return Capped(None, args.cap)
    return Capped(json.loads(out.strip().splitlines()[-1])["s"], args.cap)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _median(v):
    return v.value() if isinstance(v, Capped) else statistics.median(v)


def cell(v, unit):
    if v is None:
        return "skipped"
    if isinstance(v, str):
        return v
    if unit == "MiB":
        return f"{v:,.1f} MiB"
    if isinstance(v, Capped):
        if unit == "s":
            return repr(v)
        per = v.scale / v.value()  # a throughput: work per second of the one run
        return f"< {per:.3g} {unit} (a step > {v.cap:g} s, stopped)" if v.seconds is None else \
            f"{per:.3g} {unit} (1 run)"
    return fmt(v, unit=unit)


def speedup(vals, peer, unit):
    """mambazoo against peer: time ratio for seconds, throughput ratio otherwise ('>' where the peer was stopped)."""
    a, b = vals.get(peer), vals.get("mambazoo")
    if a is None or b is None or isinstance(a, str) or unit == "MiB":
        return ""
    ours = _median(b)
    theirs = _median(a) if unit == "s" else (a.scale / a.value() if isinstance(a, Capped) else _median(a))
    ratio = theirs / ours if unit == "s" else ours / theirs
    return f"{'> ' if isinstance(a, Capped) and a.seconds is None else ''}{ratio:.2f}x"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cap", type=float, default=60.0, help="seconds after which a slow case's one run is stopped")
    p.add_argument("--old-scan", default=None, help="a file defining selective_scan_chunked, timed as mambazoo-before")
    p.add_argument("--tiny", action="store_true", help="toy shapes (seconds): checks the script runs")
    p.add_argument("--skip", nargs="*", default=[], choices=["scan", "memory", "lm", "byte", "gen"])
    p.add_argument("--memory", choices=["scan", "lm"], help=argparse.SUPPRESS)
    p.add_argument("--once", choices=["scan-fwdbwd", "lm"], help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--shape", type=int, nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory or args.once:
        return child(args)
    torch.set_num_threads(args.threads)
    print(f"# bench_cpu: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {args.threads} torch thread(s), {args.rounds} rounds; median (min-max)")
    if not have_mambapy():
        print("note: mambapy is not installed (pip install mambapy): its columns are skipped")
    if not have_transformers():
        print("note: transformers (5.x, with modeling_mamba.mamba_selective_scan) is not installed "
              "(pip install transformers): its columns are skipped")
    else:
        import transformers

        print(f"# transformers {transformers.__version__}, torch path (mamba_ssm: "
              f"{importlib.util.find_spec('mamba_ssm') is not None}, causal_conv1d: "
              f"{importlib.util.find_spec('causal_conv1d') is not None})")
        transformers.utils.logging.set_verbosity_error()  # (its "falling back to the PyTorch implementation" notes)
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
                slow = [k for k in impls if backward and ("scan-fwdbwd", k) in SLOW]
                t = rounds({k: scan_case(f, inputs, backward) for k, f in impls.items() if k not in slow}, args.rounds)
                for k in slow:
                    t[k] = once_in_fresh_process("scan-fwdbwd", k, args, shape)
                rows.append((f"scan {'fwd+bwd' if backward else 'forward'} {shape}", t, "s"))
                print(rows[-1][0], {k: cell(v, "s") for k, v in t.items()}, flush=True)

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
        print(f"LM logits: {check_logits(steps, cfg) or 'one implementation'}", flush=True)
        slow = [k for k in steps if ("lm", k) in SLOW]
        t = rounds({k: s for k, s in steps.items() if k not in slow}, args.rounds)
        toks = cfg["batch"] * cfg["L"]
        vals = {k: [toks / s for s in v] for k, v in t.items()}
        for k in slow:
            vals[k] = once_in_fresh_process("lm", k, args)
            vals[k].scale = toks
        rows.append((f"LM train step, d_model {cfg['d_model']}, {cfg['n_layer']} layers, vocab {cfg['vocab']}, "
                     f"batch {cfg['batch']} x {cfg['L']}", vals, "tok/s"))
        print(rows[-1][0], {k: cell(v, "tok/s") for k, v in vals.items()}, flush=True)
        del steps
    if "memory" not in args.skip:
        cfg = TINY_LM if args.tiny else LM
        mem = {k: ("not run (the sequential path)" if ("lm", k) in SLOW else memory_in_fresh_process("lm", k, args))
               for k in lm_impls(cfg, args.old_scan)}
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
        del steps

    if "gen" not in args.skip:
        cfg = TINY_GEN if args.tiny else GEN
        gens = {k: build() for k, build in gen_impls(cfg).items()}
        ids = torch.randint(0, cfg["vocab"], (1, cfg["prompt"]), generator=torch.Generator().manual_seed(2))
        outs = {k: g(ids, cfg["new"]) for k, g in gens.items()}  # also the warm-up
        print(f"generation: {check_generation(gens, ids, outs, cfg)}", flush=True)
        for g in gens.values():
            g.prefill.clear()
        t = rounds({k: (lambda g: lambda: g(ids, cfg["new"]))(g) for k, g in gens.items()}, args.rounds, warmup=0)
        rows.append((f"generation, {cfg['d_model']} d_model, {cfg['n_layer']} layers, vocab {cfg['vocab']}, "
                     f"batch 1, {cfg['prompt']} + {cfg['new']} tokens, greedy",
                     {k: [cfg["new"] / s for s in v] for k, v in t.items()}, "tok/s"))
        print(rows[-1][0], {k: fmt(v, unit="tok/s") for k, v in rows[-1][1].items()}, flush=True)
        rows.append((f"of which prefill of the {cfg['prompt']}-token prompt", {k: g.prefill for k, g in gens.items()},
                     "s"))
        print(rows[-1][0], {k: fmt(v) for k, v in rows[-1][1].items()}, flush=True)
        del gens

    print("\n| measure | " + " | ".join(NAMES) + " | mambazoo speed-up over mambapy | over transformers |")
    print("|---|" + "---|" * (len(NAMES) + 2))
    for label, vals, unit in rows:
        cells = [cell(vals.get(n), unit) for n in NAMES]
        cells += [speedup(vals, "mambapy", unit), speedup(vals, "transformers", unit)]
        print(f"| {label} | " + " | ".join(cells) + " |")
    return rows


if __name__ == "__main__":
    main()
