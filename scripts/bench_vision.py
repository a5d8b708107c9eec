"""Inference throughput and peak memory of vim-tiny against timm's deit_tiny_patch16_224 (fused
attention) at several image sizes, bf16 autocast, forward_features only. Needs a CUDA GPU.

    python scripts/bench_vision.py --sizes 224 512 1024 1248 --batch 64

Each (model, size) starts at --batch and halves on out-of-memory. Prints a markdown table.
With --profile it also prints the top CUDA kernels of one vim-tiny batch at the largest size;
--compile runs both models through torch.compile (inductor) first; --cuda-graph replays each model's forward_features
from a CUDA graph (mambazoo.graphs.GraphedInference, captured in the warm-up; the replayed output is checked against an
eager call, and peak memory then counts the warm-up and capture, the graph's copy of the input included).
--rounds R (R > 1) then times vim-tiny and DeiT-Ti again at each size in R alternating rounds of --iters batches on
one input (the order flipped every round), and prints each model's median images/s and the median and range of the
per-round ratio vim-tiny / DeiT-Ti: a pairing that cancels the ~1% the machine drifts between separate runs.
"""

from __future__ import annotations

import argparse
import os
import time

import timm
import torch

import mambazoo.vim  # noqa: F401  (registers vim_*_patch16_224 with timm)


def _rate(fn, x: torch.Tensor, iters: int) -> float:
    """Images/s of ``iters`` calls fn(x) (queued, then waited for)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn(x)
    torch.cuda.synchronize()
    return x.shape[0] * iters / (time.perf_counter() - start)


def measure(name: str, img_size: int, batch: int, iters: int, warmup: int, compile: bool = False,
            graph: bool = False, **kwargs) -> dict:
    """Images/s and peak memory (GB) of ``forward_features`` on random images (torch.compile'd when
    ``compile``: the first warmup call compiles; replayed from a CUDA graph when ``graph``: the first warmup call
    captures, and the result says whether the replayed output equals an eager call's)."""
    from mambazoo.graphs import GraphedInference

    torch.cuda.empty_cache()
    model = timm.create_model(name, img_size=img_size, num_classes=0, **kwargs).cuda().eval()
    forward = torch.compile(model.forward_features) if compile else model.forward_features
    if graph:
        forward = GraphedInference(forward, clone=False)
    x = torch.randn(batch, 3, img_size, img_size, device="cuda")
    same = None
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        if graph:
            torch.cuda.reset_peak_memory_stats()  # the capture allocates what the replays reuse
        for _ in range(warmup):
            forward(x)
        if graph:
            same = torch.equal(forward(x), model.forward_features(x))
        torch.cuda.synchronize()
        if not graph:
            torch.cuda.reset_peak_memory_stats()
        img_s = _rate(forward, x, iters)
    peak = torch.cuda.max_memory_allocated() / 1e9
    del model, x, forward
    return {"img_s": img_s, "peak_gb": peak, "batch": batch, "graph_equal": same}


def measure_fitting(name: str, img_size: int, batch: int, iters: int, warmup: int, compile: bool = False,
                    graph: bool = False, **kwargs) -> dict:
    while batch >= 1:
        try:
            return measure(name, img_size, batch, iters, warmup, compile, graph, **kwargs)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            batch //= 2
    return {"img_s": float("nan"), "peak_gb": float("nan"), "batch": 0}


def _median(v: list[float]) -> float:
    v = sorted(v)
    return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2


def paired_rounds(img_size: int, batch: int, iters: int, warmup: int, rounds: int, graph: bool = False) -> dict:
    """vim-tiny and DeiT-Ti (fused attention) built once, timed in ``rounds`` alternating rounds of ``iters`` batches
    of ``forward_features`` (replayed from CUDA graphs when ``graph``) on the same random images (bf16 autocast):
    images/s per round for each and the per-round ratio vim-tiny / DeiT-Ti."""
    from mambazoo.graphs import GraphedInference

    torch.cuda.empty_cache()
    names = {"vim": "vim_tiny_patch16_224", "deit": "deit_tiny_patch16_224"}
    models = {k: timm.create_model(n, img_size=img_size, num_classes=0).cuda().eval() for k, n in names.items()}
    fns = {k: GraphedInference(m.forward_features, clone=False) if graph else m.forward_features
           for k, m in models.items()}
    x = torch.randn(batch, 3, img_size, img_size, device="cuda")
    rates = {k: [] for k in models}
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for f in fns.values():
            for _ in range(warmup):
                f(x)
        for r in range(rounds):
            for k in (("vim", "deit") if r % 2 == 0 else ("deit", "vim")):
                rates[k].append(_rate(fns[k], x, iters))
    del models, fns, x
    ratios = [v / d for v, d in zip(rates["vim"], rates["deit"])]
    return {"rates": rates, "ratios": ratios}


def profile_vim(img_size: int, batch: int, rows: int = 20) -> None:
    """Print the CUDA kernels that take the most time in one vim-tiny forward_features batch."""
    from torch.profiler import ProfilerActivity, profile

    model = timm.create_model("vim_tiny_patch16_224", img_size=img_size, num_classes=0).cuda().eval()
    x = torch.randn(batch, 3, img_size, img_size, device="cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(2):
            model.forward_features(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model.forward_features(x)
            torch.cuda.synchronize()
    print(f"\nvim-tiny, {img_size} px, batch {batch}: top CUDA kernels")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 512, 1024, 1248])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=["vim", "deit"], choices=["vim", "deit"],
                    help="which of vim-tiny and DeiT-Ti (fused attention) to time")
    ap.add_argument("--unfused", action="store_true", help="also DeiT-Ti with unfused attention")
    ap.add_argument("--profile", action="store_true", help="also profile vim-tiny at the largest size")
    ap.add_argument("--profile-batch", type=int, default=16, help="batch of the --profile run")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models' forward_features")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="replay each model's forward_features from a CUDA graph (mambazoo.graphs.GraphedInference)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="R > 1: also time vim-tiny against DeiT-Ti in R alternating rounds per size (paired ratio; with "
                         "--cuda-graph from graphs)")
    ap.add_argument("--scan-config", default=None, metavar="JSON",
                    help='overrides of mambazoo.kernels.scan.ops.CONFIG["cuda"], e.g. \'{"fwd_stages": 2}\' (scan tuning)')
    ap.add_argument("--conv-tile", default=None, metavar="BL,BD,W",
                    help="mambazoo.kernels.conv1d forward tile (BLOCK_L, BLOCK_D, warps), e.g. 64,128,4 (conv tuning)")
    args = ap.parse_args()
    if args.conv_tile:
        from mambazoo.kernels.conv1d import ops as conv1d

        conv1d.FWD_BLOCK_L, conv1d.FWD_BLOCK_D, conv1d.FWD_WARPS = (int(v) for v in args.conv_tile.split(","))
    if not torch.cuda.is_available():
        raise SystemExit("bench_vision needs a CUDA GPU")
    if args.scan_config:
        import json

        from mambazoo.kernels.scan import ops

        ops.CONFIG["cuda"].update(json.loads(args.scan_config))
    models = [m for key, m in (("vim", ("vim-tiny", "vim_tiny_patch16_224", True)),
                               ("deit", ("DeiT-Ti (fused attn)", "deit_tiny_patch16_224", True))) if key in args.models]
    if args.unfused:
        models.append(("DeiT-Ti (unfused attn)", "deit_tiny_patch16_224", False))
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, timm {timm.__version__}, "
          f"scan backend: {os.environ.get('MAMBAZOO_SCAN') or 'default (triton on CUDA)'}, "
          f"compiled: {args.compile}, CUDA graphs: {args.cuda_graph}")
    rows = []
    for size in args.sizes:
        for label, name, fused in models:
            timm.layers.set_fused_attn(fused)  # read by timm's Attention when it is built
            r = measure_fitting(name, size, args.batch, args.iters, args.warmup, compile=args.compile,
                                graph=args.cuda_graph)
            timm.layers.set_fused_attn(True)
            rows.append((size, label, r))
            same = "" if r.get("graph_equal") is None else f"  graph output == eager: {r['graph_equal']}"
            print(f"  {size:5d} px  {label:24s} batch {r['batch']:3d}  {r['img_s']:9.1f} img/s  "
                  f"{r['peak_gb']:6.2f} GB{same}", flush=True)
    print("\n| image size | model | batch | images/s | peak memory (GB) |\n|---|---|---|---|---|")
    for size, label, r in rows:
        print(f"| {size} | {label} | {r['batch']} | {r['img_s']:,.1f} | {r['peak_gb']:.2f} |")
    if args.rounds > 1:
        print(f"\n| image size | batch | vim-tiny images/s (median of {args.rounds}) | DeiT-Ti images/s | "
              f"vim-tiny / DeiT-Ti per round: median (min - max) |\n|---|---|---|---|---|")
        for size in args.sizes:
            fitted = [r["batch"] for s_, _, r in rows if s_ == size and r["batch"] > 0]
            batch = min(fitted) if fitted else args.batch
            p = paired_rounds(size, batch, args.iters, args.warmup, args.rounds, graph=args.cuda_graph)
            q = p["ratios"]
            print(f"| {size} | {batch} | {_median(p['rates']['vim']):,.1f} | {_median(p['rates']['deit']):,.1f} | "
                  f"{_median(q):.4f} ({min(q):.4f} - {max(q):.4f}) |", flush=True)
    if args.profile:
        profile_vim(max(args.sizes), args.profile_batch)


if __name__ == "__main__":
    main()
