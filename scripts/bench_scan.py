"""Benchmark the Triton selective scan and decode step against core's reference and mamba-ssm.

Run on a GPU from the repository root (the peer is optional, see shared/anchors/README.md):

    python scripts/bench_scan.py [--probe] [--json FILE]
    python scripts/bench_scan.py --resources      # no GPU needed: registers, spills, SASS mix

It first checks the kernels against mambazoo.core.selective_scan_ref on the GPU (forward and all
gradients, several layouts), then times, median of triton.testing.do_bench, bf16 inputs with D,
z gate, delta bias and softplus: our kernel, mamba-ssm's CUDA kernel (``selective_scan_cuda``
importable, else skipped) and core's chunked reference (forward, where it fits), with the peak
memory of forward+backward and the two floors (bytes once over the measured copy bandwidth; one
exp2 per (b, d, L, N) on the special-function units).  --probe instead times tile
configurations, L splits and the reverse scan (the data behind kernels/ops.py's CONFIG).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import types

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from mambazoo.core.scan import selective_scan_chunked, selective_scan_ref, selective_state_update_ref
from mambazoo.kernels import selective_scan_bidirectional_triton, selective_scan_triton, selective_state_update
from mambazoo.kernels.scan import ops

SHAPES = [(8, 1536, 2048, 16), (4, 4096, 4096, 16), (1, 1536, 65536, 16), (128, 384, 197, 16)]
DEV = "cuda"


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make(b, d, L, N, dtype=torch.bfloat16, groups=0, h0=False, gate=True):
    """Mamba-like inputs: A = -(1..N) (S4D-real), dt = softplus(delta + bias) around [1e-3, 1e-1]; gate=False: z
    None."""
    g = torch.Generator(device=DEV).manual_seed(b * 7 + d + L)
    rn = lambda *s, dt=dtype: torch.randn(*s, device=DEV, generator=g).to(dt)  # noqa: E731
    bc = (b, groups, N, L) if groups else (b, N, L)
    dt0 = torch.exp(torch.rand(d, device=DEV, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    x = dict(u=rn(b, d, L), delta=rn(b, d, L) * 0.5,
             A=-torch.arange(1, N + 1, device=DEV, dtype=torch.float32).repeat(d, 1),
             B=rn(*bc), C=rn(*bc), D=torch.ones(d, device=DEV), z=rn(b, d, L),
             delta_bias=dt0 + torch.log(-torch.expm1(-dt0)))
    x["initial_state"] = torch.randn(b, d, N, device=DEV, generator=g) if h0 else None
    if not gate:
        x["z"] = None
    return x


ORDER = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


# ------------------------------------------------------------------------------------------ peer
def load_peer():
    """mamba-ssm's CUDA scan (selective_scan_cuda) and its Triton decode step, or (None, None)."""
    try:
        import selective_scan_cuda
    except ImportError:
        return None, None
    upd = None
    for root in os.environ.get("PYTHONPATH", "").split(":"):
        if os.path.isdir(os.path.join(root, "mamba_ssm")):
            pkg = types.ModuleType("mamba_ssm")  # skip mamba_ssm/__init__.py (it imports every model)
            pkg.__path__ = [os.path.join(root, "mamba_ssm")]
            sys.modules["mamba_ssm"] = pkg
            try:
                from mamba_ssm.ops.triton.selective_state_update import selective_state_update as upd
            except Exception as e:  # noqa: BLE001
                print(f"peer decode step unavailable: {e!r}")
            break
    return selective_scan_cuda, upd


class PeerScan(torch.autograd.Function):
    """Autograd wrapper around mamba-ssm's selective_scan_cuda.fwd / bwd (z, D, delta bias)."""

    @staticmethod
    def forward(ctx, cuda_ext, u, delta, A, B, C, D, z, bias, softplus):
        B4, C4 = B.unsqueeze(1), C.unsqueeze(1)
        out, xs, *rest = cuda_ext.fwd(u, delta, A, B4, C4, D, z, bias, softplus)
        ctx.ext, ctx.softplus = cuda_ext, softplus
        ctx.save_for_backward(u, delta, A, B4, C4, D, z, bias, xs, out)
        return rest[0]

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B4, C4, D, z, bias, xs, out = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, dbias, dz = ctx.ext.bwd(u, delta, A, B4, C4, D, z, bias, dout.contiguous(), xs,
                                                          out, None, ctx.softplus, False)
        return None, du, ddelta, dA, dB.squeeze(1), dC.squeeze(1), dD, dz, dbias, None


# ------------------------------------------------------------------------------------------ checks
def check_against_reference():
    """Kernel vs the sequential oracle on the GPU: forward, last state and all gradients."""
    print("== correctness on GPU (relative error vs mambazoo.core.selective_scan_ref) ==")
    cases = [("fp32", dict(dtype=torch.float32, h0=True), 1e-4, {}),
             ("bf16", dict(dtype=torch.bfloat16, h0=True), 2e-2, {}),
             ("fp32 groups=2", dict(dtype=torch.float32, groups=2), 1e-4, {}),
             ("fp32 split=4", dict(dtype=torch.float32, h0=True), 1e-4, dict(nsplit=4)),
             ("fp32 no gate", dict(dtype=torch.float32, gate=False), 1e-4, {}),
             # the persistent backward: 3 programs take the 16 work items in turns
             ("fp32 persist.", dict(dtype=torch.float32, h0=True), 1e-4,
              dict(bwd_block_l=8, bwd_block_d=8, bwd_programs=3, nsplit=2))]
    worst = 0.0
    for name, kw, tol, overrides in cases:
        x = make(2, 64, 333, 16, **kw)
        outs = []
        for impl in ("triton", "ref"):
            old = dict(ops.CONFIG["cuda"])
            ops.CONFIG["cuda"].update(overrides)
            leaves = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in x.items()}
            args = [leaves[k] for k in ORDER]
            fn = selective_scan_triton if impl == "triton" else selective_scan_ref
            y, h = fn(*args, True, True, leaves["initial_state"])
            gen = torch.Generator(device=DEV).manual_seed(5)
            gy = torch.randn(y.shape, device=DEV, generator=gen)
            gh = torch.randn(h.shape, device=DEV, generator=gen)
            ((y.float() * gy).sum() + (h * gh).sum()).backward()
            ops.CONFIG["cuda"].clear()
            ops.CONFIG["cuda"].update(old)
            res = {"y": y, "last": h}
            res.update({"d" + k: v.grad for k, v in leaves.items() if v is not None})
            outs.append(res)
        errs = {k: rel(outs[0][k], outs[1][k]) for k in outs[1]}
        bad = {k: e for k, e in errs.items() if not e < tol}
        worst = max(worst, max(errs.values()) / tol)
        print(f"{name:14s} " + " ".join(f"{k}={e:.1e}" for k, e in errs.items()) + ("  FAIL" if bad else "  ok"))
    # seq_idx: packed sequences vs the oracle run per segment
    x = make(1, 64, 300, 16, dtype=torch.float32)
    seq = torch.tensor([[0] * 70 + [1] * 130 + [2] * 100], device=DEV, dtype=torch.int32)
    args = [x[k] for k in ORDER]
    y, h = selective_scan_triton(*args, True, True, None, seq)
    ys = []
    for s, e in ((0, 70), (70, 200), (200, 300)):
        cut = lambda t: t[..., s:e]  # noqa: E731
        yr, hr = selective_scan_ref(cut(x["u"]), cut(x["delta"]), x["A"], cut(x["B"]), cut(x["C"]), x["D"],
                                    cut(x["z"]), x["delta_bias"], True, True)
        ys.append(yr)
    e1, e2 = rel(y, torch.cat(ys, -1)), rel(h, hr)
    print(f"seq_idx        y={e1:.1e} last={e2:.1e}" + ("  ok" if max(e1, e2) < 1e-4 else "  FAIL"))
    # the mixer's layout: u, z, delta, B, C as (b, L, .) views (strided loads; the backward's paired
    # dB/dC lane shuffle must still pair channels), gradients taken through the views
    torch.manual_seed(7)
    bb, dd, LL, NN = 2, 64, 300, 16
    proj = dict(xz=torch.randn(bb, LL, 2 * dd, device=DEV), dl=torch.randn(bb, LL, dd, device=DEV) * 0.5,
                xp=torch.randn(bb, LL, 8 + 2 * NN, device=DEV))
    base = make(bb, dd, LL, NN, dtype=torch.float32)
    grads = []
    for strided in (True, False):
        p = {k: v.clone().requires_grad_() for k, v in proj.items()}
        v = dict(u=p["xz"][..., :dd].transpose(1, 2), z=p["xz"][..., dd:].transpose(1, 2),
                 delta=p["dl"].transpose(1, 2), B=p["xp"][..., 8:8 + NN].transpose(1, 2),
                 C=p["xp"][..., 8 + NN:].transpose(1, 2))
        if not strided:
            v = {k: t.contiguous() for k, t in v.items()}
        args = [v.get(k, base[k]) for k in ORDER]
        fn = selective_scan_triton if strided else selective_scan_ref
        (fn(*args, True) * torch.linspace(-1, 1, LL, device=DEV)).sum().backward()
        grads.append({k: t.grad for k, t in p.items()})
    e6 = max(rel(grads[0][k], grads[1][k]) for k in grads[1])
    print(f"strided views  max grad err={e6:.1e}" + ("  ok" if e6 < 1e-4 else "  FAIL"))
    e1 = max(e1, e6)
    # reverse=True (split into 3 stretches) vs the oracle on flipped inputs
    x = make(2, 64, 300, 16, dtype=torch.float32, h0=True)
    old = ops.CONFIG["cuda"]["nsplit"]
    ops.CONFIG["cuda"]["nsplit"] = 3
    yv, hv = selective_scan_triton(*[x[k] for k in ORDER], True, True, x["initial_state"], reverse=True)
    ops.CONFIG["cuda"]["nsplit"] = old
    fl = {k: (v.flip(-1) if k in ("u", "delta", "B", "C", "z") else v) for k, v in x.items()}
    yr, hr = selective_scan_ref(*[fl[k] for k in ORDER], True, True, x["initial_state"])
    e4, e5 = rel(yv, yr.flip(-1)), rel(hv, hr)
    print(f"reverse        y={e4:.1e} last={e5:.1e}" + ("  ok" if max(e4, e5) < 1e-4 else "  FAIL"))
    # inference as Vim runs it: no tile states, the reverse direction averaged with another output in its store
    other = torch.randn_like(yv)
    with torch.no_grad():
        ya = selective_scan_triton(*[x[k] for k in ORDER], True, False, x["initial_state"], reverse=True,
                                   average_with=other)
    e7 = rel(ya, (other + yr.flip(-1)) / 2)
    print(f"reverse + avg  y={e7:.1e} (no grad, no tile states)" + ("  ok" if e7 < 1e-4 else "  FAIL"))
    e1, e2 = max(e1, e4, e7), max(e2, e5)
    # the mixer's conv1d + SiLU kernel (both directions) against PyTorch's
    from mambazoo.kernels.conv1d import causal_conv1d

    xc, wc, bc = torch.randn(2, 64, 300, device=DEV), torch.randn(64, 4, device=DEV), torch.randn(64, device=DEV)
    e8 = 0.0
    for rev in (False, True):
        xin = xc.flip(-1) if rev else xc
        want = torch.nn.functional.silu(torch.nn.functional.conv1d(torch.nn.functional.pad(xin, (3, 0)), wc[:, None],
                                                                   bc, groups=64))
        e8 = max(e8, rel(causal_conv1d(xc, wc, bc, True, rev), want.flip(-1) if rev else want))
    from mambazoo.kernels.conv1d import causal_conv1d_pair

    with torch.no_grad():
        pf, pb = causal_conv1d_pair(xc, wc, bc, wc.flip(-1), -bc)
    e8 = max(e8, rel(pf, causal_conv1d(xc, wc, bc, True, False)),
             rel(pb, causal_conv1d(xc, wc.flip(-1), -bc, True, True)))
    print(f"conv1d + SiLU  y={e8:.1e} (both directions, and the pair kernel)" + ("  ok" if e8 < 1e-5 else "  FAIL"))
    # Vim inference: B / C as interleaved bf16 columns (read as pairs), the inference tiles and softplus polynomial
    proj = torch.randn(2, 300, 64 + 32, device=DEV).to(torch.bfloat16)
    xv = dict(x, delta=x["delta"] * 8, B=proj[..., 64::2].transpose(1, 2), C=proj[..., 65::2].transpose(1, 2))
    e9 = 0.0
    for rev in (False, True):
        with torch.no_grad():
            yp = selective_scan_triton(*[xv[k] for k in ORDER], True, False, reverse=rev)
        fl = (lambda t: t.flip(-1) if t.dim() == 3 else t) if rev else (lambda t: t)
        yq = selective_scan_ref(*[fl(xv[k].float()) if xv[k] is not None else None for k in ORDER], True)
        e9 = max(e9, rel(yp, fl(yq)))
    print(f"B/C pairs      y={e9:.1e} (inference tiles {ops.CONFIG['cuda'].get('inf_tiles')})"
          + ("  ok" if e9 < 1e-4 else "  FAIL"))
    # the inference kernel (kernels/scan_infer.py) at Vim's layout and batch (enough programs not to split L), in
    # bf16 as the mixer runs it (tolerance: bf16 rounding of y) and with an fp32 output (no tanh gate then)
    keep = ops.CONFIG["cuda"].get("infer")
    e10 = e11 = 0.0
    xi = vim_pair_inputs(64, 384, 300, 16)
    xi["delta"] = xi["delta"] * 4
    ref_in = {k: (xi[k].float() if xi[k] is not None else None) for k in ORDER}
    for mode in (keep, dict(block_d=8, block_l=8, stages=2, poly=False, tanh=False)):
        ops.CONFIG["cuda"]["infer"] = mode
        for rev in (False, True):
            fl = (lambda t: t.flip(-1) if t is not None and t.dim() == 3 else t) if rev else (lambda t: t)
            want = fl(selective_scan_ref(*[fl(ref_in[k]) for k in ORDER], True))
            with torch.no_grad():
                yb = selective_scan_triton(*[xi[k] for k in ORDER], True, False, reverse=rev)
                yf = selective_scan_triton(*[ref_in[k] if k in ("u", "z") else xi[k] for k in ORDER], True, False,
                                           reverse=rev)
            e10, e11 = max(e10, rel(yb, want)), max(e11, rel(yf, want))
    ops.CONFIG["cuda"]["infer"] = keep
    print(f"infer kernel   y={e10:.1e} (bf16 out, two tilings, both directions; bf16 rounding ~1e-3), "
          f"fp32 out {e11:.1e}" + ("  ok" if e10 < 4e-3 and e11 < 1e-4 else "  FAIL"))
    # low-rank dt (the mixer's default at inference): delta = dt_weight @ dt formed inside the inference kernel
    e12 = 0.0
    for fp32 in (False, True):  # bf16 pairs and dt, then fp32 (the mixer's _pair_projection)
        xl = vim_low_rank_inputs(64, 384, 300, 16, fp32=fp32)
        wdt = xl.pop("dt_weight")
        ref_in = dict({k: (xl[k].float() if xl[k] is not None else None) for k in ORDER},
                      delta=wdt.float() @ xl["delta"].to(torch.bfloat16).float())
        for rev in (False, True):
            fl = (lambda t: t.flip(-1) if t is not None and t.dim() == 3 else t) if rev else (lambda t: t)
            want = fl(selective_scan_ref(*[fl(ref_in[k]) for k in ORDER], True))
            with torch.no_grad():
                e12 = max(e12, rel(selective_scan_triton(*[xl[k] for k in ORDER], True, False, reverse=rev,
                                                         dt_weight=wdt), want))
    print(f"infer low rank y={e12:.1e} (bf16 out, both directions, bf16 and fp32 pairs)"
          + ("  ok" if e12 < 4e-3 else "  FAIL"))
    # both directions in the two-direction kernel (kernels/scan_infer.py, scan_bidir_infer_kernel), gated or not
    e13 = 0.0
    for gate in (False, True):
        pair = [vim_low_rank_inputs(64, 384, 301, 16, fp32=True, seed=s) for s in (3, 4)]
        z = pair[0]["z"] if gate else None
        want = 0
        for k, x in enumerate(pair):
            fl = (lambda t: t.flip(-1) if t is not None and t.dim() == 3 else t) if k else (lambda t: t)
            ref_in = dict({n: (x[n].float() if x[n] is not None else None) for n in ORDER},
                          delta=x["dt_weight"].float() @ x["delta"].to(torch.bfloat16).float(),
                          z=z.float() if gate else None)
            want = want + fl(selective_scan_ref(*[fl(ref_in[n]) for n in ORDER], True)) / 2
        bidir = []
        launch = ops.scan_bidirectional_infer
        ops.scan_bidirectional_infer = lambda *a: bidir.append(launch(*a)) or bidir[-1]
        with torch.no_grad():
            got = selective_scan_bidirectional_triton(*[tuple(x[n] for x in pair) for n in ORDER[:6]], z,
                                                      tuple(x["delta_bias"] for x in pair), True,
                                                      dt_weight=tuple(x["dt_weight"] for x in pair))
        ops.scan_bidirectional_infer = launch
        e13 = max(e13, rel(got, want) if bidir and bidir[0] is not None else float("inf"))
    print(f"bidirectional  y={e13:.1e} (bf16 out, fp32 pairs, low rank, gated and not; two-direction kernel)"
          + ("  ok" if e13 < 4e-3 else "  FAIL"))
    e1 = max(e1, e8, e9, e11, e10 / 40, e12 / 40, e13 / 40)
    # decode step
    st = torch.randn(4, 64, 16, device=DEV)
    d = make(4, 64, 1, 16, dtype=torch.float32)
    a = (d["u"][..., 0], d["delta"][..., 0], d["A"], d["B"][..., 0], d["C"][..., 0], d["D"], d["z"][..., 0],
         d["delta_bias"], True)
    st2 = st.clone()
    e3 = rel(selective_state_update(st, *a), selective_state_update_ref(st2, *a))
    print(f"decode step    y={e3:.1e} state={rel(st, st2):.1e}" + ("  ok" if e3 < 1e-5 else "  FAIL"))
    return worst < 1 and max(e1, e2) < 1e-4 and e3 < 1e-5


# ------------------------------------------------------------------------------------------ timing
def bench(fn, grad_to_none=None, rep=100):
    return do_bench(fn, warmup=25, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def copy_bandwidth():
    a = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    return 2 * a.numel() / ms / 1e9  # TB/s, read + write


def peak_mib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def fwd_bwd_fns(impl, x, peer=None):
    """(forward fn, forward+backward fn, leaves) for one implementation on inputs x."""
    leaves = {k: (v.detach().clone().requires_grad_(v.is_floating_point()) if v is not None else None)
              for k, v in x.items() if k in ORDER}
    args = [leaves[k] for k in ORDER]
    if impl == "ours":
        f = lambda: selective_scan_triton(*args, True)  # noqa: E731
    elif impl == "peer":
        f = lambda: PeerScan.apply(peer, *args, True)  # noqa: E731
    else:
        f = lambda: selective_scan_chunked(*args, True)  # noqa: E731
    dy = torch.randn_like(x["u"])

    def fb():
        f().backward(dy)

    def fwd():
        with torch.no_grad():
            return f()

    return fwd, fb, list(leaves.values())


def floors(b, d, L, N, bw):
    X, Y = b * d * L * 2, b * N * L * 2
    fwd_bytes, fb_bytes = 4 * X + 2 * Y, 11 * X + 6 * Y
    exp_ms = b * d * L * N / (132 * 16 * 1.755e9) * 1e3
    return fwd_bytes / bw / 1e9, fb_bytes / bw / 1e9, exp_ms


def probe():
    """Where the time goes: tile configurations, L splits at Vim-like shapes, and the reverse scan.  Prints one line
    per point. (The backward ablations, which needed an experiment-only switch in the production kernel, were removed
    on 2026-12-05; they are at commit b71a621 and their findings in docs/kernel_notes.md.)"""
    base = dict(ops.CONFIG["cuda"])
    out = []

    def reset():
        ops.CONFIG["cuda"].clear()
        ops.CONFIG["cuda"].update(base)

    def timed(shape, reverse=False, bwd=True):
        x = make(*shape)
        args = [x[k] for k in ORDER]
        y, last, hs = ops.scan_forward(*args, None, None, True, reverse)
        tf = bench(lambda: ops.scan_forward(*args, None, None, True, reverse), rep=50)
        tb = float("nan")
        if bwd:
            dy = torch.randn_like(y)
            tb = bench(lambda: ops.scan_backward(dy, None, *args, None, hs, True, False, reverse), rep=50)
        return tf, tb

    def record(tag, shape, tf, tb, **kw):
        out.append(dict(tag=tag, shape=shape, fwd=tf, bwd=tb, **kw))
        print(f"{tag:10s} {str(shape):24s} {kw}  fwd {tf:.3f}  bwd {tb:.3f} ms", flush=True)

    vim = (64, 384, 4097, 16)
    print("== probe: forward tiles (block_l, block_d, warps) ==")
    for shape in (SHAPES[0], SHAPES[1], SHAPES[3], vim):
        for bl, bd, w in ((8, 16, 1), (16, 8, 1), (8, 8, 1), (4, 16, 1), (8, 16, 2)):
            ops.CONFIG["cuda"].update(fwd_block_l=bl, block_d=bd, fwd_warps=w)
            record("fwd-tile", shape, timed(shape, bwd=False)[0], float("nan"), block_l=bl, block_d=bd, warps=w)
        reset()
    print("== probe: backward tiles ==")
    for shape in (SHAPES[0], SHAPES[1], vim, SHAPES[3]):
        for bl, bd, w in ((4, 8, 1), (4, 16, 1), (8, 8, 1), (2, 16, 1)):
            ops.CONFIG["cuda"].update(bwd_block_l=bl, bwd_block_d=bd, bwd_warps=w)
            record("bwd-tile", shape, float("nan"), timed(shape)[1], block_l=bl, block_d=bd, warps=w)
        reset()
    print("== probe: L splits (forced nsplit) ==")
    for shape in ((16, 384, 6085, 16), SHAPES[2], (4, 1536, 8192, 16), SHAPES[0]):
        for ns in (1, 4, 8, 16, 32):
            ops.CONFIG["cuda"]["nsplit"] = ns
            record("split", shape, *timed(shape), nsplit=ns)
        reset()
    print("== probe: reverse ==")
    for shape in (vim, SHAPES[0]):
        for rev in (False, True):
            record("reverse", shape, *timed(shape, reverse=rev), reverse=rev)
    return out


# (session 5: (4, 32), (2, 32), (4, 64, 2 warps) and (4, 16) tiles, all slower than (8, 16), were dropped)
FWD_TILES = [dict(fwd_block_l=bl, block_d=bd, fwd_warps=w, fwd_stages=st) for bl, bd, w, st in (
    (8, 16, 1, 3), (8, 16, 1, 2), (8, 16, 1, 4), (8, 32, 1, 3), (16, 16, 1, 3))]
# L split (timed on the forward): split below split_below programs, aiming at min_programs
FWD_SPLITS = [dict(split_below=sb, min_programs=mp) for sb, mp in (
    (512, 3072), (2048, 3072), (2048, 4096), (4096, 6144), (4096, 4096), (8192, 8192))]


def vim_inputs(b, d, L, N, dt_rank=12):
    """Inputs laid out as a Vim mixer hands them to the scan: u, z (b, d, L) views of one (b, L, 2d) in_proj
    output, delta a (b, d, L) view of a (b, L, d) buffer, B / C views of the (b, L, dt_rank + 2N) x_proj output."""
    x = make(b, d, L, N)
    g = torch.Generator(device=DEV).manual_seed(3)
    rn = lambda *s: torch.randn(*s, device=DEV, generator=g).to(torch.bfloat16)  # noqa: E731
    xz, xp = rn(b, L, 2 * d), rn(b, L, dt_rank + 2 * N)
    x.update(u=xz[..., :d].transpose(1, 2), z=xz[..., d:].transpose(1, 2), delta=(rn(b, L, d) * 0.5).transpose(1, 2),
             B=xp[..., dt_rank:dt_rank + N].transpose(1, 2), C=xp[..., dt_rank + N:].transpose(1, 2))
    return x


def vim_pair_inputs(b, d, L, N):
    """Inputs as the Vim mixer hands them to the scan at inference: u, z views of in_proj's output, delta and B / C
    views of the folded x_proj output [delta (d) | B_0 C_0 B_1 C_1 ...] (B / C read as int32 pairs)."""
    x = make(b, d, L, N)
    g = torch.Generator(device=DEV).manual_seed(3)
    rn = lambda *s: torch.randn(*s, device=DEV, generator=g).to(torch.bfloat16)  # noqa: E731
    xz, out = rn(b, L, 2 * d), rn(b, L, d + 2 * N)
    out[..., :d] *= 0.5
    x.update(u=xz[..., :d].transpose(1, 2), z=xz[..., d:].transpose(1, 2), delta=out[..., :d].transpose(1, 2),
             B=out[..., d::2].transpose(1, 2), C=out[..., d + 1::2].transpose(1, 2))
    assert ops.bc_pairs(x["B"], x["C"])
    return x


def vim_low_rank_inputs(b, d, L, N, rank=16, fp32=False, seed=3):
    """As vim_pair_inputs, but as the mixer's low-rank x_proj GEMM hands them over: B / C pairs and low-rank dt
    views of one (b, L, 2N + rank) projection [B_0 C_0 B_1 C_1 ... | dt] (bf16, or fp32 as mambazoo.core.mamba's
    _pair_projection writes it), delta = dt (b, rank, L) with the (d, rank) bf16 weight under "dt_weight"."""
    x = make(b, d, L, N)
    g = torch.Generator(device=DEV).manual_seed(seed)
    rn = lambda *s: torch.randn(*s, device=DEV, generator=g).to(torch.bfloat16)  # noqa: E731
    xz, out = rn(b, L, 2 * d), rn(b, L, 2 * N + rank)
    if fp32:
        out = out.float()
    x.update(u=xz[..., :d].transpose(1, 2), z=xz[..., d:].transpose(1, 2), delta=out[..., 2 * N:].transpose(1, 2),
             B=out[..., 0:2 * N:2].transpose(1, 2), C=out[..., 1:2 * N:2].transpose(1, 2),
             dt_weight=torch.randn(d, rank, device=DEV).to(torch.bfloat16) * 0.3)
    assert ops.bc_pairs(x["B"], x["C"], out.dtype)
    return x


def _vim_inference_calls(low_rank: bool = False, fp32: bool = False):
    """(L, reverse, call) for the scan forwards of vim-tiny's inference at batch 64, 1024 and 1248 px (B / C pairs, no
    tile states): the forward direction alone, then the reverse direction averaging with the forward's output.
    low_rank: delta as low-rank dt with its weight, else the folded GEMM's delta; fp32: the low-rank projection in
    fp32 (the mixer's default)."""
    for L in (4097, 6085):
        x = vim_low_rank_inputs(64, 384, L, 16, fp32=fp32) if low_rank else vim_pair_inputs(64, 384, L, 16)
        wdt = x.pop("dt_weight", None)
        args = [x[k] for k in ORDER]
        other = ops.new_output(x["u"], x["z"]).normal_()
        for rev in (False, True):
            yield L, rev, lambda args=args, rev=rev, other=other, wdt=wdt: ops.scan_forward(
                *args, None, None, True, rev, other if rev else None, False, dt_weight=wdt)


# inference tiles (block_l, stages, softplus polynomial), the same for both directions here; ops.CONFIG's
# "inf_tiles" picks one per direction
INF_TILES = [(8, 3, False), (8, 3, True), (16, 4, False), (16, 4, True), (16, 3, False), (16, 2, False)]


def tune_inference(rep: int = 50):
    """Times the scan forward as vim-tiny's inference runs it (batch 64 at 1024 and 1248 px; B / C pairs, no tile
    states): the forward direction alone and the reverse direction averaging with the forward's output, for each
    INF_TILES entry, with the inference kernel off (its tiles are tune_infer's). Prints ms per call and the fastest
    entry per direction; leaves ops.CONFIG unchanged."""
    keep, keep_infer = ops.CONFIG["cuda"].get("inf_tiles"), ops.CONFIG["cuda"].get("infer")
    ops.CONFIG["cuda"]["infer"] = None
    rows = []
    print(f"== inference tiles (block_l, stages, polynomial softplus): ms per call; default {keep} ==")
    for L, rev, run in _vim_inference_calls():
        times = []
        for tile in INF_TILES:
            ops.CONFIG["cuda"]["inf_tiles"] = dict(fwd=tile, rev=tile)
            times.append(bench(run, rep=rep))
            rows.append(dict(L=L, reverse=rev, tile=tile, ms=times[-1]))
        best = INF_TILES[min(range(len(times)), key=times.__getitem__)]
        print(f"L={L} {'reverse + average' if rev else 'forward':17s} " + "  ".join(
            f"{t}: {ms:.3f}" for t, ms in zip(INF_TILES, times)) + f"  best {best}", flush=True)
    ops.CONFIG["cuda"]["inf_tiles"], ops.CONFIG["cuda"]["infer"] = keep, keep_infer
    return rows


# the inference kernel (kernels/scan_infer.py): ops.CONFIG["cuda"]["infer"] candidates; block_d 16 gives 2 lane
# slices of N, 32 none, 8 four
_T = dict(block_d=16, block_l=16, stages=3, poly=True, tanh=True)
INFER_TILES = [_T, dict(_T, stages=2), dict(_T, stages=4), dict(_T, block_l=8, stages=4),
               dict(_T, block_l=32, stages=2), dict(_T, poly=False), dict(_T, tanh=False), dict(_T, block_d=8),
               dict(_T, block_d=32)]


def tune_infer(rep: int = 50):
    """Times the inference kernel as vim-tiny runs it (batch 64 at 1024 and 1248 px; B / C pairs), per direction, for
    each INFER_TILES entry, beside the general forward with its inference tiles (infer=None): first with the folded
    GEMM's delta, then with low-rank dt as a bf16 projection and as an fp32 one (the mixer's default; entries with
    block_l < 16 fall back to forming delta first there, as ops._rank_fits says). Prints ms per call and the fastest entry over all calls; leaves
    ops.CONFIG unchanged."""
    keep = ops.CONFIG["cuda"].get("infer")
    totals = [0.0] * len(INFER_TILES)
    print(f"== inference kernel: ms per call; default {keep} ==")
    for i, tile in enumerate(INFER_TILES):
        print(f"#{i}: {tile}")
    for (L, rev, run), kind in [(c, "") for c in _vim_inference_calls()] + [
            (c, "low-rank dt ") for c in _vim_inference_calls(low_rank=True)] + [
            (c, "low-rank fp32 ") for c in _vim_inference_calls(low_rank=True, fp32=True)]:
        ops.CONFIG["cuda"]["infer"] = None
        line = [f"{kind}general {bench(run, rep=rep):.3f}"]
        for i, tile in enumerate(INFER_TILES):
            ops.CONFIG["cuda"]["infer"] = tile
            ms = bench(run, rep=rep)
            totals[i] += ms
            line.append(f"#{i} {ms:.3f}")
        print(f"L={L} {'reverse + average' if rev else 'forward':17s} " + "  ".join(line), flush=True)
    ops.CONFIG["cuda"]["infer"] = keep
    best = min(range(len(totals)), key=totals.__getitem__)
    print(f"best (sum over both sizes and directions): #{best} {INFER_TILES[best]}")
    return dict(totals=totals, tiles=INFER_TILES, best=INFER_TILES[best])


def tune_bidir(rep: int = 50):
    """Both directions of vim-tiny's inference scans (batch 64 at 1024 and 1248 px; low-rank dt, fp32 B / C pairs as
    the mixer hands them over; ungated, as with the gate in out_proj's kernel): the forward kernel then the reverse +
    average (one direction per launch: both_in_one=False) against the two-direction kernel, for INFER_TILES' tile
    and stage entries (the two-direction kernel takes ops.CONFIG["cuda"]["infer"] too); their outputs' difference
    (bf16: the forward half's average rounds the other direction's y first). Leaves ops.CONFIG unchanged."""
    keep = ops.CONFIG["cuda"].get("infer")
    tiles = [t for t in INFER_TILES if t["block_d"] == 16 and t["block_l"] >= 16 and t["poly"] and t["tanh"]]
    rows = []
    print(f"== both scan directions: one per launch vs the two-direction kernel, ms per layer; default {keep} ==")
    for L in (4097, 6085):
        pair = [vim_low_rank_inputs(64, 384, L, 16, fp32=True, seed=s) for s in (3, 4)]
        for x in pair:  # u as the pair conv writes it: a (b, L, d) buffer of its own
            x["u"] = x["u"].transpose(1, 2).contiguous().transpose(1, 2)
        args = [tuple(x[n] for x in pair) for n in ORDER[:6]] + [None, tuple(x["delta_bias"] for x in pair), True]
        wdt = tuple(x["dt_weight"] for x in pair)
        y = torch.empty(64, L, 384, device=DEV, dtype=torch.bfloat16).transpose(1, 2)  # the mixer's (b, L, d) output
        run = lambda: selective_scan_bidirectional_triton(*args, out=y, dt_weight=wdt)  # noqa: E731
        run_apart = lambda: selective_scan_bidirectional_triton(*args, out=y, dt_weight=wdt,  # noqa: E731
                                                                both_in_one=False)
        for tile in tiles:
            ops.CONFIG["cuda"]["infer"] = tile
            with torch.no_grad():
                apart = run_apart().clone()
                t_apart = bench(run_apart, rep=rep)
                diff = rel(run(), apart)
                t_bidir = bench(run, rep=rep)
            rows.append(dict(L=L, tile=tile, apart=t_apart, bidir=t_bidir, rel_diff=diff))
            print(f"L={L} {tile}: one direction per launch {t_apart:.3f}  two-direction kernel {t_bidir:.3f} "
                  f"({t_apart / t_bidir:.3f}x); outputs differ by {diff:.1e}", flush=True)
    ops.CONFIG["cuda"]["infer"] = keep
    return rows


def tune_forward(candidates, label: str, rep: int = 30):
    """Times the forward for each candidate (a dict of ops.CONFIG["cuda"] keys): at the table's shapes as the
    training forward (contiguous inputs, tile states stored) and at vim-tiny's (batch 64 at 1024 and 1248 px) as
    its unfolded layout gives them (the mixer's strided views with B / C as x_proj's, no tile states; at 1248 the
    reverse direction averaged with the forward's output; --tune-inf times the folded inference layout). Keeps the candidate with the least total time in ops.CONFIG for the rest of
    this run and returns every point."""
    shapes = [(*s, False) for s in SHAPES] + [(64, 384, 4097, 16, False), (64, 384, 6085, 16, True)]
    inputs = {sh: (vim_inputs(*sh[:4]) if sh[1] == 384 and sh[0] == 64 else make(*sh[:4])) for sh in shapes}
    for sh in shapes:  # the forward direction's output to average with, in the layout the scan gives y
        inputs[sh]["other"] = ops.new_output(inputs[sh]["u"], inputs[sh]["z"]).normal_()
    rows, totals = [], []
    print(f"== forward tuning: {label}: ms per shape {[sh[:4] for sh in shapes]} ==")
    for cand in candidates:
        ops.CONFIG["cuda"].update(cand)
        times = []
        for sh in shapes:
            args = [inputs[sh][k] for k in ORDER]
            vim = sh[0] == 64 and sh[1] == 384
            other = inputs[sh]["other"] if sh[4] else None
            try:
                t = bench(lambda: ops.scan_forward(*args, None, None, True, sh[4], other, not vim), rep=rep)
            except Exception as e:  # noqa: BLE001  (a candidate that does not compile is reported, not fatal)
                print(f"  {cand} {sh}: {type(e).__name__}: {str(e)[:120]}")
                t = float("inf")
            times.append(t)
            rows.append(dict(candidate=cand, shape=sh, fwd=t))
        totals.append(sum(times))
        print(f"{str(tuple(cand.values())):18s} " + " ".join(f"{t:7.3f}" for t in times) + f"  total {totals[-1]:.3f}",
              flush=True)
    best = candidates[min(range(len(candidates)), key=totals.__getitem__)]
    ops.CONFIG["cuda"].update(best)
    print(f"best {label}: {best} (total {min(totals):.3f} ms)")
    return dict(points=rows, best=best)


def ab_pair_reduce():
    """Backward with and without pair_reduce at three shapes; keeps the faster (total) for the table."""
    rows, total = [], {}
    for pr in (False, True):
        ops.CONFIG["cuda"]["pair_reduce"] = pr
        for shape in (SHAPES[0], SHAPES[1], (64, 384, 4097, 16)):
            x = make(*shape)
            args = [x[k] for k in ORDER]
            y, last, hs = ops.scan_forward(*args, None, None, True)
            dy = torch.randn_like(y)
            tb = bench(lambda: ops.scan_backward(dy, None, *args, None, hs, True, False), rep=50)
            rows.append(dict(pair_reduce=pr, shape=shape, bwd=tb))
            total[pr] = total.get(pr, 0.0) + tb
            print(f"bwd pair_reduce={pr!s:5s} {str(shape):22s} {tb:.3f} ms", flush=True)
    ops.CONFIG["cuda"]["pair_reduce"] = total[True] < total[False]
    print("adopted pair_reduce =", ops.CONFIG["cuda"]["pair_reduce"], flush=True)
    return rows


def scan_table(peer, bw):
    rows = []
    for shape in SHAPES:
        b, d, L, N = shape
        x = make(*shape)
        ff, fb_ms, exp_ms = floors(*shape, bw)
        row = dict(shape=shape, floor_fwd=ff, floor_fb=fb_ms, floor_exp=exp_ms)
        for impl in ("ours", "peer", "ref"):
            if impl == "peer" and peer is None:
                continue
            if impl == "ref" and shape not in (SHAPES[0], SHAPES[3]):
                continue
            fwd, fb, leaves = fwd_bwd_fns(impl, x, peer)
            try:
                row[f"{impl}_fwd"] = bench(fwd, rep=100 if impl != "ref" else 300)
                if impl != "ref":
                    row[f"{impl}_fb"] = bench(fb, grad_to_none=leaves)
                    row[f"{impl}_peak"] = peak_mib(fb)
            except torch.OutOfMemoryError:
                row[f"{impl}_fwd"] = float("nan")
            torch.cuda.empty_cache()
        if peer is not None:  # the two kernels agree on the first shape's output
            with torch.no_grad():
                row["ours_vs_peer"] = rel(fwd_bwd_fns("ours", x)[0](), fwd_bwd_fns("peer", x, peer)[0]())
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows


def decode_table(peer_upd):
    b, d, N = 64, 1536, 16
    x = make(b, d, 1, N)
    st = torch.randn(b, d, N, device=DEV)
    a = (x["u"][..., 0], x["delta"][..., 0], x["A"], x["B"][..., 0], x["C"][..., 0], x["D"], x["z"][..., 0],
         x["delta_bias"])
    row = dict(ours=bench(lambda: selective_state_update(st, *a, True)))
    # graph replay: the kernel without Python launch overhead
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            selective_state_update(st, *a, True)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        selective_state_update(st, *a, True)
    row["ours_graph"] = bench(g.replay)
    if peer_upd is not None:
        row["peer"] = bench(lambda: peer_upd(st, *a, dt_softplus=True))
        st1, st2 = st.clone(), st.clone()
        row["ours_vs_peer"] = rel(selective_state_update(st1, *a, True), peer_upd(st2, *a, dt_softplus=True))
    row["floor_us"] = (2 * b * d * N * 4) / 3.0e12 * 1e6
    print("decode", {k: round(v, 5) for k, v in row.items()}, flush=True)
    return row


def conv_note(bw):
    """Depthwise causal conv1d (width 4) as the mixer runs it (F.conv1d), vs our scan, shape 1."""
    b, d, L = 8, 1536, 2048
    x = torch.randn(b, d, L, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(d, 1, 4, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    f = lambda: torch.nn.functional.silu(torch.nn.functional.conv1d(x, w, bias, padding=3, groups=d)[..., :L])  # noqa
    dy = torch.randn(b, d, L, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        tf = bench(f)
    tfb = bench(lambda: f().backward(dy), grad_to_none=[x, w, bias])
    print(f"conv1d+silu (8,1536,2048) bf16: fwd {tf:.3f} ms, fwd+bwd {tfb:.3f} ms; "
          f"floor fwd {2 * x.numel() * 2 / bw / 1e9:.3f} ms", flush=True)
    # mambazoo.kernels.conv1d (MAMBAZOO_CONV=triton) on the mixer's own layout: a (b, L, d) view of in_proj's output
    from mambazoo.kernels.conv1d import causal_conv1d

    proj = torch.randn(b, L, 2 * d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    xv = proj[..., :d].transpose(1, 2)
    g = lambda: causal_conv1d(xv, w, bias, silu=True)  # noqa: E731
    err = rel(g(), torch.nn.functional.silu(torch.nn.functional.conv1d(xv, w, bias, padding=3, groups=d)[..., :L]))
    with torch.no_grad():
        tf2 = bench(g)
    dy_bld = dy.transpose(1, 2).contiguous().transpose(1, 2)  # the scan's du arrives in this (b, L, d) layout
    tfb2 = bench(lambda: g().backward(dy_bld), grad_to_none=[proj, w, bias])
    print(f"triton causal_conv1d on the (b, L, d) view: fwd {tf2:.3f} ms, fwd+bwd {tfb2:.3f} ms "
          f"(rel. error vs torch {err:.1e})", flush=True)
    return dict(fwd=tf, fb=tfb, triton_fwd=tf2, triton_fb=tfb2, triton_err=err)


CONV_TILES = ((32, 64, 4), (64, 64, 4), (32, 128, 4), (64, 128, 4), (64, 128, 8), (128, 64, 4), (16, 128, 4))


PAIR_TILES = ((16, 128, 4), (32, 128, 4), (64, 128, 4), (32, 64, 4), (64, 64, 4), (128, 64, 4), (64, 128, 8),
              (32, 256, 8), (128, 128, 8))


def tune_conv_pair(rep: int = 50):
    """Tiles (BLOCK_L, BLOCK_D, warps) of mambazoo.kernels.conv1d.causal_conv1d_pair (both directions' convs from one read) on
    the mixer's (b, L, 2d) in_proj view at vim-tiny's batch-64 shapes (1024 and 1248 px): ms per tile, checked against
    the first tile's outputs; prints the fastest in total and leaves the module's tile unchanged."""
    from mambazoo.kernels.conv1d import ops as conv1d

    keep = (conv1d.PAIR_BLOCK_L, conv1d.PAIR_BLOCK_D, conv1d.PAIR_WARPS)
    data = {}
    for L in (4097, 6085):
        xz = torch.randn(64, L, 768, device=DEV, dtype=torch.bfloat16)
        data[L] = (xz[..., :384].transpose(1, 2), torch.randn(384, 4, device=DEV), torch.randn(384, device=DEV))
    print(f"== conv pair tiles (BLOCK_L, BLOCK_D, warps): ms at L = {list(data)}; default {keep} ==")
    ref, totals = {}, {}
    with torch.no_grad():
        for tile in PAIR_TILES:
            conv1d.PAIR_BLOCK_L, conv1d.PAIR_BLOCK_D, conv1d.PAIR_WARPS = tile
            times = []
            for L, (x, w, bias) in data.items():
                run = lambda: conv1d.causal_conv1d_pair(x, w, bias, w.flip(-1), -bias)  # noqa: E731
                yf, yb = run()
                ref.setdefault(L, (yf, yb))
                if max(rel(yf, ref[L][0]), rel(yb, ref[L][1])) > 1e-3:
                    print(f"  {tile} L={L}: WRONG")
                times.append(bench(run, rep=rep))
            totals[tile] = sum(times)
            print(f"{str(tile):16s} " + " ".join(f"{t:7.3f}" for t in times), flush=True)
    conv1d.PAIR_BLOCK_L, conv1d.PAIR_BLOCK_D, conv1d.PAIR_WARPS = keep
    best = min(totals, key=totals.get)
    print(f"best conv pair tile: {best}")
    return dict(totals={str(k): v for k, v in totals.items()}, best=best)


def tune_low_rank(rep: int = 50, sizes=(4097, 6085), batch: int = 64, d: int = 384):
    """One vim-tiny mixer layer's x_proj + dt_proj + both scans at batch 64 (1024 and 1248 px), after the pair conv,
    three ways: folded (per direction the GEMM to [delta | B/C pairs], the scan reading delta), low rank (the GEMM to
    [B/C pairs | dt], 48 columns, the scan forming delta = W_dt dt per tile) and low rank with that GEMM's output in
    fp32 (the mixer's default). ms per piece and per layer."""
    from mambazoo.core.mamba import _pair_projection
    from mambazoo.kernels.conv1d import ops as conv1d

    g = torch.Generator(device=DEV).manual_seed(5)
    rn = lambda *s: torch.randn(*s, device=DEV, generator=g)  # noqa: E731
    N, R = 16, 16
    wf, wb, bf, bb = rn(d, 4) * 0.5, rn(d, 4) * 0.5, rn(d), rn(d)
    wx_f, wx_b = (rn(2 * N + R, d) * d ** -0.5).to(torch.bfloat16), (rn(2 * N + R, d) * d ** -0.5).to(torch.bfloat16)
    wdt = (rn(d, R) * 0.3).to(torch.bfloat16)
    fold_f, fold_b = ((wdt.float() @ w[2 * N:].float()).to(torch.bfloat16) for w in (wx_f, wx_b))
    fold_f, fold_b = torch.cat([fold_f, wx_f[:2 * N]]), torch.cat([fold_b, wx_b[:2 * N]])
    A, Dv, bias = -torch.rand(d, N, device=DEV) - 0.5, rn(d), rn(d) * 0.1
    rows = []
    print("== x_proj + dt_proj + both scans per layer: folded vs low-rank dt (ms) ==")
    with torch.no_grad():
        for L in sizes:
            xz = rn(batch, L, 2 * d).to(torch.bfloat16)
            xs, z = xz[..., :d].transpose(1, 2), xz[..., d:].transpose(1, 2)
            uf, ub = conv1d.causal_conv1d_pair(xs, wf, bf, wb, bb)

            def folded():
                sf = F.linear(uf.transpose(1, 2), fold_f)
                y = ops.scan_forward(uf, sf[..., :d].transpose(1, 2), A, sf[..., d::2].transpose(1, 2),
                                     sf[..., d + 1::2].transpose(1, 2), Dv, z, bias, None, None, True, False, None,
                                     False)[0]
                sb = F.linear(ub.transpose(1, 2), fold_b)
                ops.scan_forward(ub, sb[..., :d].transpose(1, 2), A, sb[..., d::2].transpose(1, 2),
                                 sb[..., d + 1::2].transpose(1, 2), Dv, z, bias, None, None, True, True, y, False, y_out=y)
                return y

            def low_rank():
                qf = F.linear(uf.transpose(1, 2), wx_f)
                y = ops.scan_forward(uf, qf[..., 2 * N:].transpose(1, 2), A, qf[..., 0:2 * N:2].transpose(1, 2),
                                     qf[..., 1:2 * N:2].transpose(1, 2), Dv, z, bias, None, None, True, False, None,
                                     False, dt_weight=wdt)[0]
                qb = F.linear(ub.transpose(1, 2), wx_b)
                ops.scan_forward(ub, qb[..., 2 * N:].transpose(1, 2), A, qb[..., 0:2 * N:2].transpose(1, 2),
                                 qb[..., 1:2 * N:2].transpose(1, 2), Dv, z, bias, None, None, True, True, y, False,
                                 y_out=y, dt_weight=wdt)
                return y

            def low_rank_fp32():  # the mixer's default: the projection in fp32 (mambazoo.core.mamba._pair_projection)
                qf = _pair_projection(uf, wx_f)
                y = ops.scan_forward(uf, qf[..., 2 * N:].transpose(1, 2), A, qf[..., 0:2 * N:2].transpose(1, 2),
                                     qf[..., 1:2 * N:2].transpose(1, 2), Dv, z, bias, None, None, True, False, None,
                                     False, dt_weight=wdt)[0]
                qb = _pair_projection(ub, wx_b)
                ops.scan_forward(ub, qb[..., 2 * N:].transpose(1, 2), A, qb[..., 0:2 * N:2].transpose(1, 2),
                                 qb[..., 1:2 * N:2].transpose(1, 2), Dv, z, bias, None, None, True, True, y, False,
                                 y_out=y, dt_weight=wdt)
                return y

            err, err32 = rel(low_rank(), folded()), rel(low_rank_fp32(), folded())
            t_fold_gemm = bench(lambda: (F.linear(uf.transpose(1, 2), fold_f), F.linear(ub.transpose(1, 2), fold_b)),
                                rep=rep)
            t_low_gemm = bench(lambda: (F.linear(uf.transpose(1, 2), wx_f), F.linear(ub.transpose(1, 2), wx_b)),
                               rep=rep)
            t_low32_gemm = bench(lambda: (_pair_projection(uf, wx_f), _pair_projection(ub, wx_b)), rep=rep)
            t_fold, t_low, t_low32 = bench(folded, rep=rep), bench(low_rank, rep=rep), bench(low_rank_fp32, rep=rep)
            print(f"L={L} folded {t_fold:.3f} (GEMMs {t_fold_gemm:.3f})  low rank {t_low:.3f} (GEMMs {t_low_gemm:.3f})  "
                  f"low rank fp32 {t_low32:.3f} (GEMMs {t_low32_gemm:.3f}); outputs differ from folded by {err:.1e} / "
                  f"{err32:.1e} (bf16)", flush=True)
            rows.append(dict(L=L, folded=t_fold, folded_gemms=t_fold_gemm, low_rank=t_low, low_rank_gemms=t_low_gemm,
                             low_rank_fp32=t_low32, low_rank_fp32_gemms=t_low32_gemm, err=err, err_fp32=err32))
    return rows


def tune_conv():
    """Forward tiles (BLOCK_L, BLOCK_D, warps) of mambazoo.kernels.conv1d on the mixer's (b, L, 2d) in_proj view at Vim's
    batch-64 shapes (both directions at 1248 px) and shape 1; prints ms per tile and keeps the fastest in total
    for the rest of this run. Results are checked against the first tile's output."""
    from mambazoo.kernels.conv1d import ops as conv1d

    shapes = [(64, 384, 6085, False), (64, 384, 6085, True), (64, 384, 4097, False), (8, 1536, 2048, False)]
    data, ref, totals = {}, {}, {}
    for b, d, L, rev in shapes:
        xz = torch.randn(b, L, 2 * d, device=DEV, dtype=torch.bfloat16)
        data[(b, d, L, rev)] = (xz[..., :d].transpose(1, 2), torch.randn(d, 4, device=DEV), torch.randn(d, device=DEV))
    print(f"== conv1d forward tiles (BLOCK_L, BLOCK_D, warps): ms at {list(data)} ==")
    for tile in CONV_TILES:
        conv1d.FWD_BLOCK_L, conv1d.FWD_BLOCK_D, conv1d.FWD_WARPS = tile
        times = []
        with torch.no_grad():
            for sh, (x, w, bias) in data.items():
                y = conv1d.causal_conv1d(x, w, bias, True, sh[3]).float()
                ref.setdefault(sh, y)
                if rel(y, ref[sh]) > 1e-3:
                    print(f"  {tile} {sh}: WRONG (rel. error {rel(y, ref[sh]):.1e})")
                times.append(bench(lambda: conv1d.causal_conv1d(x, w, bias, True, sh[3]), rep=50))
        totals[tile] = sum(times)
        print(f"{str(tile):16s} " + " ".join(f"{t:7.3f}" for t in times) + f"  total {totals[tile]:.3f}", flush=True)
    best = min(totals, key=totals.get)
    conv1d.FWD_BLOCK_L, conv1d.FWD_BLOCK_D, conv1d.FWD_WARPS = best
    print(f"best conv tile: {best}")
    return dict(totals={str(k): v for k, v in totals.items()}, best=best)


def resources(configs=((8, 16, 1, "fwd"), (4, 8, 1, "bwd"), (4, 16, 1, "bwd"), (8, 8, 1, "bwd"))):
    """Compile the scan kernels for sm_90 without a GPU (Triton's bundled ptxas) and print registers,
    spills and the SASS instruction mix: the cheap first look before spending device time.  Pointers,
    sizes and strides are marked divisible by 16 as the GPU launch specializes them at (8, 1536, 2048, 16)
    (without that, Triton picks other load layouts and the counts differ)."""
    import collections
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mambazoo.kernels.scan.train import scan_bwd_kernel, scan_fwd_kernel

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    # B and C reach the kernels in fp32 (ops._bc_layout), the rest in bf16
    bf16 = {name + end for name in ("u", "dl", "z", "y", "dout", "du", "ddl", "dz") for end in ("_ptr", "_base")}
    pointer = lambda n: n.endswith(("_ptr", "_base"))  # noqa: E731
    for bl, bd, w, kind in configs:
        fn = scan_fwd_kernel if kind == "fwd" else scan_bwd_kernel
        consts = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, HAS_SEQ=False, SOFTPLUS=True, B_INV=False,
                      C_INV=False, STATE_ONLY=False, HAS_H0=False, BLOCK_D=bd, BLOCK_N=16, BLOCK_L=bl, FAST=True)
        if kind == "fwd":  # the training forward (tile states stored every K = chunk / block_l tiles)
            consts.update(STAGES=ops.CONFIG["cuda"]["fwd_stages"], K=ops.CONFIG["cuda"]["chunk"] // bl,
                          STORE_STATES=True, HAS_YO=False, yo_ptr=None, BC_PAIRS=False, SOFTPLUS_POLY=False)
        if kind == "bwd":
            consts.update(HAS_QIN=False, PAIR_REDUCE=bool(ops.CONFIG["cuda"].get("pair_reduce")), PERSISTENT=False)
        consts.update({n: 1 for n in fn.arg_names if n.startswith("s") and n.endswith("l") and len(n) <= 5})
        consts["REVERSE"] = False
        sig = {n: "constexpr" if n in consts else ("*bf16" if n in bf16 else "*i32" if n == "seq_ptr" else
                                                   "*fp32" if pointer(n) else "i32") for n in fn.arg_names}
        div16 = {"dim", "L", "N", "dpg_b", "dpg_c", "tiles_per_split", "n_tiles_total", "n_chunks", "K"}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n not in consts and
                 (pointer(n) or n in div16 or (n.startswith("s") and len(n) <= 5))}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options=dict(num_warps=w))
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            res = subprocess.run([f"{tools}/cuobjdump", "-res-usage", f.name], capture_output=True, text=True).stdout
            sass = subprocess.run([f"{tools}/cuobjdump", "-sass", f.name], capture_output=True, text=True).stdout
        m = re.search(r"REG:\d+ STACK:\d+", res)
        ops_ = collections.Counter(o.split(".")[0] for o in re.findall(r"/\*[0-9a-f]{4}\*/\s+([A-Z0-9_.]+)", sass))
        print(f"{kind} block_l={bl} block_d={bd} warps={w}: {m.group(0) if m else '?'}, {sum(ops_.values())} SASS "
              f"instructions, top {dict(ops_.most_common(8))}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None, help="write all numbers to this file")
    p.add_argument("--probe", action="store_true", help="check, then ablations / tiles / splits / reverse only")
    p.add_argument("--ab", action="store_true", help="before the table, time the backward with and without "
                   "pair_reduce and keep the faster")
    p.add_argument("--tune-fwd", action="store_true", help="before the table, time forward tiles and pipeline "
                   "depths (FWD_TILES) and use the fastest")
    p.add_argument("--tune-split", action="store_true", help="before the table, time the forward's L-split "
                   "thresholds (FWD_SPLITS) and use the fastest")
    p.add_argument("--tune-conv", action="store_true", help="time mambazoo.kernels.conv1d forward tiles (CONV_TILES) at "
                   "Vim's shapes and use the fastest; then the pair conv's tiles (PAIR_TILES, reported)")
    p.add_argument("--tune-inf", action="store_true", help="time the inference tiles (INF_TILES) per direction at "
                   "Vim's shapes with B / C pairs (reported, CONFIG unchanged)")
    p.add_argument("--tune-infer", action="store_true", help="time the inference kernel's tilings (INFER_TILES) at "
                   "Vim's shapes beside the general forward (reported, CONFIG unchanged)")
    p.add_argument("--tune-bidir", action="store_true", help="time vim-tiny's two scan directions one per launch "
                   "against the two-direction kernel (scan_bidir_infer_kernel), per inference tile")
    p.add_argument("--tune-low-rank", action="store_true", help="time a vim-tiny layer's x_proj + dt_proj + scans, "
                   "folded and with low-rank dt (reported)")
    p.add_argument("--check-only", action="store_true", help="only check every path against the reference on the "
                   "GPU (exit status 1 on a failure)")
    p.add_argument("--tune-only", action="store_true", help="with --tune-*: stop after tuning")
    p.add_argument("--scan-config", default=None, metavar="JSON", help='overrides of ops.CONFIG["cuda"] for the run')
    p.add_argument("--resources", action="store_true", help="compile for sm_90 (no GPU needed) and print "
                   "registers, spills and SASS instruction counts, then exit")
    a = p.parse_args()
    if a.resources:
        resources()
        return
    t0 = time.time()
    if a.scan_config:
        ops.CONFIG["cuda"].update(json.loads(a.scan_config))
    print(torch.cuda.get_device_name(), torch.__version__, "config", ops.CONFIG["cuda"])
    ok = check_against_reference()
    if not ok and ops.CONFIG["cuda"].get("pair_reduce"):
        print("CORRECTNESS CHECK FAILED with pair_reduce: checking again without it")
        ops.CONFIG["cuda"]["pair_reduce"] = False
        ok = check_against_reference()
    if not ok:
        print("CORRECTNESS CHECK FAILED")
    if a.check_only:
        raise SystemExit(0 if ok else 1)
    peer, peer_upd = load_peer()
    print("peer:", "selective_scan_cuda loaded" if peer else "absent (skipped)",
          "| decode step:", "loaded" if peer_upd else "absent")
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw:.2f} TB/s")
    out = dict(device=torch.cuda.get_device_name(), bandwidth=bw, config=dict(ops.CONFIG["cuda"]), ok=ok)
    if a.probe:
        out["probe"] = probe()
        if a.json:
            with open(a.json, "w") as fh:
                json.dump(out, fh, indent=1, default=str)
        print(f"total {time.time() - t0:.0f} s")
        return
    if a.tune_fwd:
        out["tune_fwd"] = tune_forward(FWD_TILES, "tiles and pipeline stages")
    if a.tune_split:
        out["tune_split"] = tune_forward(FWD_SPLITS, "L splits")
    if a.tune_conv:
        out["tune_conv"] = tune_conv()
        out["tune_conv_pair"] = tune_conv_pair()
    if a.tune_inf:
        out["tune_inf"] = tune_inference()
    if a.tune_infer:
        out["tune_infer"] = tune_infer()
    if a.tune_low_rank:
        out["tune_low_rank"] = tune_low_rank()
    if a.tune_bidir:
        out["tune_bidir"] = tune_bidir()
    if a.tune_fwd or a.tune_split or a.tune_conv or a.tune_inf or a.tune_infer or a.tune_low_rank or a.tune_bidir:
        out["config"] = dict(ops.CONFIG["cuda"])
        if a.tune_only:
            if a.json:
                with open(a.json, "w") as fh:
                    json.dump(out, fh, indent=1, default=str)
            print(f"total {time.time() - t0:.0f} s")
            return
    if a.ab and ops.CONFIG["cuda"].get("pair_reduce"):
        out["ab"] = ab_pair_reduce()
    out["decode"] = decode_table(peer_upd)
    out["conv"] = conv_note(bw)
    out["scan"] = scan_table(peer, bw)
    print("\n| shape (b, d, L, N) | pass | ours | mamba-ssm | chunked ref | floor (bytes / exp) | peak ours / peer |")
    print("|---|---|---|---|---|---|---|")
    f = lambda v: f"{v:.3f} ms" if isinstance(v, float) and v == v else "-"  # noqa: E731
    for r in out["scan"]:
        s = ", ".join(map(str, r["shape"]))
        print(f"| {s} | fwd | {f(r.get('ours_fwd'))} | {f(r.get('peer_fwd'))} | {f(r.get('ref_fwd'))} | "
              f"{r['floor_fwd']:.3f} / {r['floor_exp']:.3f} ms | |")
        pk = f"{r.get('ours_peak', 0):.0f} / {r.get('peer_peak', 0):.0f} MiB"
        print(f"| {s} | fwd+bwd | {f(r.get('ours_fb'))} | {f(r.get('peer_fb'))} | - | "
              f"{r['floor_fb']:.3f} / {2 * r['floor_exp']:.3f} ms | {pk} |")
    dd = out["decode"]
    print(f"\ndecode step (64, 1536, 16): ours {dd['ours']*1e3:.1f} us (graph replay {dd['ours_graph']*1e3:.1f} us), "
          f"peer {dd.get('peer', float('nan'))*1e3:.1f} us")
    print(f"total {time.time() - t0:.0f} s")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
