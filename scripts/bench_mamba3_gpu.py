"""Mamba-3 mixer on the GPU, side by side with mamba-ssm's Mamba3 module (its Triton SISO kernels), in one run.

    python scripts/bench_mamba3_gpu.py [--json out.json]       # needs CUDA; mamba_ssm on the path for the peer

Both mixers hold the same weights (ours loaded from the peer's state dict with mamba3_from_state_dict), bf16
parameters and inputs, chunk 64. Per shape (batch, L, heads, headdim 64, N 128), d_model = heads * 64 / 2:
forward (no autograd) and forward+backward (gradients of the input and every parameter) in ms, the peak memory
of forward+backward, and the relative difference of the two outputs. Then one decode step at batch 64
(ours: Mamba3.step; the peer's step needs its CuteDSL kernel and is reported absent without it).
"""

from __future__ import annotations

import argparse
import json

import torch
from triton.testing import do_bench

from mambazoo.core.mamba3 import Mamba3, mamba3_from_state_dict

SHAPES = [(8, 2048, 48), (4, 8192, 64), (1, 65536, 48), (64, 256, 12)]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def timed(fn, reps=20):
    return do_bench(fn, warmup=5, rep=reps * 10)


def peak_of(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def fwd_bwd(m, x):
    def run():
        y = m(x)
        y.float().square().mean().backward()
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--shapes", default=None, help="b,L,H;... (default: issue 26's four)")
    args = ap.parse_args()
    shapes = SHAPES if not args.shapes else [tuple(map(int, s.split(","))) for s in args.shapes.split(";")]
    dev = torch.device("cuda")
    try:
        from mamba_ssm.modules.mamba3 import Mamba3 as PeerMamba3
    except Exception as e:  # noqa: BLE001  (any import failure leaves our columns)
        print(f"mamba_ssm's Mamba3 not importable ({e!r}): the peer's columns are skipped")
        PeerMamba3 = None
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    rows = []
    for b, L, H in shapes:
        d_model = H * 64 // 2
        torch.manual_seed(0)
        if PeerMamba3 is not None:
            peer = PeerMamba3(d_model, d_state=128, headdim=64, chunk_size=64, device=dev, dtype=torch.bfloat16)
            ours = mamba3_from_state_dict(peer.state_dict(), chunk_size=64).to(dev, torch.bfloat16)
        else:
            peer, ours = None, Mamba3(d_model, d_state=128, headdim=64, chunk_size=64).to(dev, torch.bfloat16)
        x = torch.randn(b, L, d_model, device=dev, dtype=torch.bfloat16, requires_grad=True)
        row = dict(shape=(b, L, H, 64, 128), d_model=d_model)
        with torch.no_grad():
            row["fwd_ms_ours"] = timed(lambda: ours(x))
            if peer is not None:
                row["fwd_ms_peer"] = timed(lambda: peer(x))
                row["rel_diff"] = rel(ours(x), peer(x))
        row["fwdbwd_ms_ours"] = timed(fwd_bwd(ours, x))
        row["peak_mib_ours"] = peak_of(fwd_bwd(ours, x))
        if peer is not None:
            row["fwdbwd_ms_peer"] = timed(fwd_bwd(peer, x))
            row["peak_mib_peer"] = peak_of(fwd_bwd(peer, x))
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        peer = ours = x = None
        torch.cuda.empty_cache()
    # decode step at batch 64, the first shape's width
    d_model = 48 * 64 // 2
    torch.manual_seed(0)
    step = dict(batch=64, d_model=d_model)
    peer = None
    if PeerMamba3 is not None:
        peer = PeerMamba3(d_model, d_state=128, headdim=64, chunk_size=64, device=dev, dtype=torch.bfloat16)
        ours = mamba3_from_state_dict(peer.state_dict(), chunk_size=64).to(dev, torch.bfloat16)
    else:
        ours = Mamba3(d_model, d_state=128, headdim=64, chunk_size=64).to(dev, torch.bfloat16)
    u = torch.randn(64, d_model, device=dev, dtype=torch.bfloat16)
    with torch.no_grad():
        st = ours.allocate_state(64)
        step["step_us_ours"] = 1e3 * timed(lambda: ours.step(u, st))
        if peer is not None:
            try:
                cache = peer.allocate_inference_cache(64, 1)
                step["step_us_peer"] = 1e3 * timed(lambda: peer.step(u, *cache))
            except Exception as e:  # noqa: BLE001  (the CuteDSL step kernel may be missing)
                step["step_peer"] = f"absent: {type(e).__name__}: {str(e)[:120]}"
    print("decode", step, flush=True)
    print("\n| (b, L, heads, headdim, N) | fwd ours | fwd mamba-ssm | ratio | fwd+bwd ours | fwd+bwd mamba-ssm | ratio "
          "| peak ours / peer MiB | rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fp, bp = r.get("fwd_ms_peer", float("nan")), r.get("fwdbwd_ms_peer", float("nan"))
        print(f"| {r['shape']} | {r['fwd_ms_ours']:.3f} ms | {fp:.3f} ms | {fp / r['fwd_ms_ours']:.2f}x "
              f"| {r['fwdbwd_ms_ours']:.3f} ms | {bp:.3f} ms | {bp / r['fwdbwd_ms_ours']:.2f}x "
              f"| {r['peak_mib_ours']:.0f} / {r.get('peak_mib_peer', float('nan')):.0f} "
              f"| {r.get('rel_diff', float('nan')):.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, decode=step), f, indent=1, default=str)


if __name__ == "__main__":
    main()
