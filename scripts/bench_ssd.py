"""Benchmark the SSD layer (Mamba-2) side by side with its peers, in one run.

CPU (the default without CUDA): core's chunked reference (mambazoo.core.ssd.ssd_chunked) against transformers'
Mamba2 torch path (transformers.models.mamba2.modeling_mamba2.mamba2_chunk_scan), fp32, same inputs and chunk
size, forward and forward+backward, median (min-max) wall time of --reps runs after a warm-up (the implementations
run alternately, call by call), with the two outputs' relative difference (they compute the same function).
Without transformers its columns are skipped with a note. ``--mamba3`` adds mambazoo's Mamba-3 SISO chunked scan
(mambazoo.core.mamba3_scan.mamba3_scan_chunked) at the same (batch, L, heads, headdim, N) and chunk, in the same
alternating rounds: dt = softplus(dt + dt_bias), adt = A dt, a trapezoid gate, rotary angles on half the state
(the mixer's default rope_fraction 0.5), B/C biases and D; fwd+bwd takes the gradients of x, dt, B, C as for
Mamba-2. Its recurrence does more work than Mamba-2's (trapezoid, rotary), so its column compares per-layer cost,
not the same function. ``--shape b,L,h,p,N`` (repeatable) replaces the default shapes:

    python scripts/bench_ssd.py [--reps 7] [--threads 1] [--mamba3] [--shape 1,512,8,64,64]

GPU (``--gpu``; issue 26's shapes, bf16, chunk 256): our Triton kernels (mambazoo.kernels.ssd.ssd_triton) against
mamba-ssm's ``mamba_chunk_scan_combined`` when importable (pip install mamba-ssm without its CUDA build), timed
with triton.testing.do_bench, forward and forward+backward, peak memory, and the byte floor (inputs read once
and y written once at the copy bandwidth measured in the same run); then the decode steps at batch 64:

    python scripts/bench_ssd.py --gpu [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from mambazoo.core.ssd import ssd_chunked, ssd_ref

CPU_SHAPES = [(1, 512, 8, 64, 64), (2, 1024, 24, 64, 128), (1, 4096, 8, 64, 64)]  # (batch, L, heads, headdim, N)
GPU_SHAPES = [(8, 2048, 48, 64, 128), (4, 8192, 64, 64, 128), (1, 65536, 48, 64, 128), (64, 256, 12, 64, 128)]


def make(b, L, h, p, n, device="cpu", dtype=torch.float32, groups=1, seed=0):
    """Mamba-2-like inputs: A = -U[1, 16] per head, dt = softplus(dt + dt_bias) around [1e-3, 1e-1], D (h,)."""
    g = torch.Generator(device=device).manual_seed(seed)
    rn = lambda *s: torch.randn(*s, device=device, generator=g).to(dtype)  # noqa: E731
    dt0 = torch.exp(torch.rand(h, device=device, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return dict(x=rn(b, L, h, p), dt=rn(b, L, h) * 0.5, A=-(torch.rand(h, device=device, generator=g) * 15 + 1),
                B=rn(b, L, groups, n), C=rn(b, L, groups, n), D=torch.ones(h, device=device),
                dt_bias=dt0 + torch.log(-torch.expm1(-dt0)))


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def timed_rounds(fns: dict, reps: int) -> dict:
    """{name: (median, min, max) ms} of each function, after one warm-up call each, the functions run call by
    call in ``reps`` rounds (a shared machine's load then hits all alike)."""
    for fn in fns.values():
        fn()
    ts = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            ts[k].append((time.perf_counter() - t) * 1e3)
    return {k: (statistics.median(v), min(v), max(v)) for k, v in ts.items()}


def make_mamba3(b, L, h, p, n, seed=1):
    """Mamba-3 SISO inputs at the Mamba-2 shape: raw dt (b, L, h) with dt_bias, A = -U[1, 16] per head, trap
    (b, L, h) in (0, 1), B, C (b, L, 1, 1, n), angles (b, L, h, n // 4) (rope_fraction 0.5), B/C biases
    (h, 1, n), D (h,)."""
    g = torch.Generator().manual_seed(seed)
    base = make(b, L, h, p, n, seed=seed)
    return dict(x=base["x"], dt=base["dt"], dt_bias=base["dt_bias"], A=base["A"], D=base["D"],
                B=base["B"][:, :, None].clone(), C=base["C"][:, :, None].clone(),
                trap=torch.sigmoid(torch.randn(b, L, h, generator=g)),
                angles=torch.randn(b, L, h, max(1, n // 4), generator=g),
                B_bias=torch.randn(h, 1, n, generator=g) * 0.1, C_bias=torch.randn(h, 1, n, generator=g) * 0.1)


def fmt(t) -> str:
    return f"{t[0]:8.1f} ms ({t[1]:.1f}-{t[2]:.1f})"


def cpu(args):
    try:
        from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan
    except ImportError:
        mamba2_chunk_scan = None
        print("transformers is not installed (pip install transformers): its columns are skipped")
    from mambazoo.core.mamba3_scan import mamba3_scan_chunked

    torch.set_num_threads(args.threads)
    rows = []
    for shape in args.shape or CPU_SHAPES:
        inp = make(*shape)
        q = args.chunk
        fns = {"ours": lambda inp=inp: ssd_chunked(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], chunk_size=q,
                                                   D=inp["D"], dt_bias=inp["dt_bias"], dt_softplus=True)}
        if mamba2_chunk_scan is not None:
            fns["transformers"] = lambda inp=inp: mamba2_chunk_scan(
                inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], q, D=inp["D"], dt_bias=inp["dt_bias"],
                dt_softplus=True)
        groups = [(inp, fns)]
        if args.mamba3:
            m3 = make_mamba3(*shape)

            def mamba3(m3=m3):
                dt = torch.nn.functional.softplus(m3["dt"] + m3["dt_bias"])
                return mamba3_scan_chunked(m3["x"], dt, m3["A"] * dt, m3["trap"], m3["B"], m3["C"], m3["angles"],
                                           m3["B_bias"], m3["C_bias"], D=m3["D"], chunk_size=q)[:, :, 0]

            groups.append((m3, {"mamba3": mamba3}))
        allf = {k: fn for _, g in groups for k, fn in g.items()}
        with torch.no_grad():
            outs = {k: fn() for k, fn in allf.items()}
            diff = rel(outs["ours"], outs["transformers"]) if "transformers" in outs else float("nan")
            fwd = timed_rounds(allf, args.reps)
        leaves = [v.requires_grad_(True) for d, _ in groups for k, v in d.items() if k in ("x", "dt", "B", "C")]
        w = torch.randn(shape[:4])
        fb = {k: (lambda fn=fn, d=d: torch.autograd.grad((fn() * w).sum(), [d[n] for n in ("x", "dt", "B", "C")]))
              for d, g in groups for k, fn in g.items()}
        fwdbwd = timed_rounds(fb, args.reps)
        for v in leaves:
            v.requires_grad_(False)
        row = dict(shape=shape, chunk=q, rel_diff=diff)
        for k in allf:
            row[f"fwd_ms_{k}"], row[f"fwdbwd_ms_{k}"] = fwd[k], fwdbwd[k]
        rows.append(row)
        line = f"(b, L, h, p, N) = {shape} chunk {q}: forward {fmt(fwd['ours'])} ours"
        if "transformers" in fwd:
            line += f" | {fmt(fwd['transformers'])} transformers ({fwd['transformers'][0] / fwd['ours'][0]:4.2f}x)"
        if "mamba3" in fwd:
            line += f" | {fmt(fwd['mamba3'])} mamba3"
        line += f"; fwd+bwd {fmt(fwdbwd['ours'])} ours"
        if "transformers" in fwdbwd:
            line += (f" | {fmt(fwdbwd['transformers'])} transformers "
                     f"({fwdbwd['transformers'][0] / fwdbwd['ours'][0]:4.2f}x)")
        if "mamba3" in fwdbwd:
            line += f" | {fmt(fwdbwd['mamba3'])} mamba3"
        print(line + f"; outputs differ by {diff:.1e}", flush=True)
        if "mamba3" in fwd and "transformers" in fwd:
            print(f"  mamba3 per-layer cost against transformers' Mamba2 path (not the same function): forward "
                  f"{fwd['transformers'][0] / fwd['mamba3'][0]:4.2f}x, fwd+bwd "
                  f"{fwdbwd['transformers'][0] / fwdbwd['mamba3'][0]:4.2f}x (above 1: mamba3 faster)", flush=True)
    return rows


def shape_arg(text: str) -> tuple:
    """'b,L,h,p,N' -> a 5-tuple of positive ints."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 5 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected five positive ints b,L,h,p,N, got {text!r}")
    return shape


def copy_bandwidth(dev) -> float:
    """Bytes read + written per second by a 256 MB device-to-device copy (triton.testing.do_bench median)."""
    from triton.testing import do_bench

    src = torch.empty(1 << 28, device=dev, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return 2 * src.numel() / (do_bench(lambda: dst.copy_(src)) * 1e-3)


def gpu(args):
    from triton.testing import do_bench

    from mambazoo.kernels.ssd import ssd_step_triton, ssd_triton

    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError:
        mamba_chunk_scan_combined = None
        print("mamba-ssm not importable: the peer's columns are skipped")
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update as peer_step
    except ImportError:
        peer_step = None
    dev = "cuda"
    bandwidth = copy_bandwidth(dev)
    rows = []
    for shape in GPU_SHAPES:
        b, L, h, p, n = shape
        inp = make(*shape, device=dev, dtype=torch.bfloat16)
        small = make(1, 64, h, p, n, device=dev, dtype=torch.float32)
        y = ssd_triton(**{k: v for k, v in small.items()}, chunk_size=64, dt_softplus=True)
        assert rel(y, ssd_ref(**small, dt_softplus=True)) < 1e-4, "kernel != oracle on the GPU"
        run = {"ours": lambda: ssd_triton(**inp, chunk_size=args.gpu_chunk, dt_softplus=True)}
        if mamba_chunk_scan_combined is not None:
            run["mamba_ssm"] = lambda: mamba_chunk_scan_combined(
                inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], args.gpu_chunk, D=inp["D"], dt_bias=inp["dt_bias"],
                dt_softplus=True)
        nbytes = sum(inp[k].numel() * inp[k].element_size() for k in ("x", "dt", "B", "C")) + \
            inp["x"].numel() * inp["x"].element_size()
        row = dict(shape=shape, chunk=args.gpu_chunk, floor_ms=nbytes / bandwidth * 1e3)
        leaves = [inp[k].requires_grad_(True) for k in ("x", "dt", "B", "C")]
        for name, fn in run.items():
            row[f"fwd_ms_{name}"] = do_bench(fn)
            dy = torch.randn(b, L, h, p, device=dev, dtype=torch.bfloat16)
            torch.cuda.reset_peak_memory_stats()
            row[f"fwdbwd_ms_{name}"] = do_bench(lambda fn=fn: torch.autograd.grad(fn(), leaves, dy))
            row[f"peak_gb_{name}"] = torch.cuda.max_memory_allocated() / 1e9
        for v in leaves:
            v.requires_grad_(False)
        rows.append(row)
        print(json.dumps(row), flush=True)
    # decode step, batch 64
    b, h, p, n = 64, 48, 64, 128
    st = torch.zeros(b, h, p, n, device=dev)
    x, dt = torch.randn(b, h, p, device=dev, dtype=torch.bfloat16), torch.randn(b, h, device=dev)
    B_, C_ = torch.randn(b, 1, n, device=dev), torch.randn(b, 1, n, device=dev)
    A, D, bias = -torch.rand(h, device=dev) * 15 - 1, torch.ones(h, device=dev), torch.zeros(h, device=dev)
    step = dict(shape=(b, h, p, n), step_us_ours=1e3 * do_bench(
        lambda: ssd_step_triton(st, x, dt, A, B_, C_, D=D, dt_bias=bias, dt_softplus=True)))
    if peer_step is not None:
        A3 = A[:, None, None].expand(h, p, n)
        step["step_us_mamba_ssm"] = 1e3 * do_bench(lambda: peer_step(
            st, x, dt[..., None].expand(b, h, p), A3, B_, C_, D=D[:, None].expand(h, p),
            dt_bias=bias[:, None].expand(h, p), dt_softplus=True))
    print(json.dumps(step), flush=True)
    return rows + [step]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", help="issue 26's GPU comparison (needs CUDA)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=64, help="CPU: the chunk size of both implementations")
    ap.add_argument("--gpu-chunk", type=int, default=256)
    ap.add_argument("--mamba3", action="store_true", help="CPU: also time the Mamba-3 SISO chunked scan")
    ap.add_argument("--shape", type=shape_arg, action="append", help="CPU: b,L,h,p,N (repeatable)")
    ap.add_argument("--json", help="write the rows to this file")
    args = ap.parse_args(argv)
    rows = gpu(args) if args.gpu else cpu(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
