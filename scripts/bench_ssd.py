"""Benchmark the SSD layer (Mamba-2) side by side with its peers, in one run.

CPU (the default without CUDA): core's chunked reference (mambazoo.core.ssd.ssd_chunked) against transformers'
Mamba2 torch path (transformers.models.mamba2.modeling_mamba2.mamba2_chunk_scan), fp32, same inputs and chunk
size, forward and forward+backward, median wall time of --reps runs after a warm-up (the two run alternately),
with the two outputs' relative difference (they compute the same function):

    python scripts/bench_ssd.py [--reps 7] [--threads 1]

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


def timed_pair(fa, fb, reps):
    """Median ms of fa and of fb, run alternately (a shared machine's load then hits both alike)."""
    fa(), fb()
    ta, tb = [], []
    for _ in range(reps):
        for fn, ts in ((fa, ta), (fb, tb)):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3


def cpu(args):
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    torch.set_num_threads(args.threads)
    rows = []
    for shape in CPU_SHAPES:
        inp = make(*shape)
        q = args.chunk

        def ours(inp=inp):
            return ssd_chunked(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], chunk_size=q, D=inp["D"],
                               dt_bias=inp["dt_bias"], dt_softplus=True)

        def peer(inp=inp):
            return mamba2_chunk_scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], q, D=inp["D"],
                                     dt_bias=inp["dt_bias"], dt_softplus=True)

        with torch.no_grad():
            diff = rel(ours(), peer())
            f_ours, f_peer = timed_pair(ours, peer, args.reps)
        leaves = {k: v.requires_grad_(True) for k, v in inp.items() if k in ("x", "dt", "B", "C")}
        w = torch.randn(shape[:4])

        def fb(fn):
            return lambda: torch.autograd.grad((fn() * w).sum(), list(leaves.values()))

        fb_ours, fb_peer = timed_pair(fb(ours), fb(peer), args.reps)
        for v in leaves.values():
            v.requires_grad_(False)
        row = dict(shape=shape, chunk=q, rel_diff=diff, fwd_ms_ours=f_ours, fwd_ms_transformers=f_peer,
                   fwdbwd_ms_ours=fb_ours, fwdbwd_ms_transformers=fb_peer)
        rows.append(row)
        print(f"(b, L, h, p, N) = {shape} chunk {q}: forward {f_ours:8.1f} ms ours | {f_peer:8.1f} ms transformers "
              f"({f_peer / f_ours:4.2f}x); fwd+bwd {fb_ours:8.1f} | {fb_peer:8.1f} ms ({fb_peer / fb_ours:4.2f}x); "
              f"outputs differ by {diff:.1e}", flush=True)
    return rows


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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", help="issue 26's GPU comparison (needs CUDA)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=64, help="CPU: the chunk size of both implementations")
    ap.add_argument("--gpu-chunk", type=int, default=256)
    ap.add_argument("--json", help="write the rows to this file")
    args = ap.parse_args()
    rows = gpu(args) if args.gpu else cpu(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
