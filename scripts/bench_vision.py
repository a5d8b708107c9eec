"""Inference throughput and peak memory of vim-tiny against timm's deit_tiny_patch16_224 (fused
attention) at several image sizes, bf16 autocast, forward_features only. Needs a CUDA GPU.

    PYTHONPATH=. python scripts/bench_vision.py --sizes 224 512 1024 1248 --batch 64

Each (model, size) starts at --batch and halves on out-of-memory. Prints a markdown table.
With --profile it also prints the top CUDA kernels of one vim-tiny batch at the largest size;
--compile runs both models through torch.compile (inductor) first.
"""

from __future__ import annotations

import argparse
import os
import time

import timm
import torch

import zoo.vim  # noqa: F401  (registers vim_*_patch16_224 with timm)


def measure(name: str, img_size: int, batch: int, iters: int, warmup: int, compile: bool = False,
            **kwargs) -> dict:
    """Images/s and peak memory (GB) of ``forward_features`` on random images (torch.compile'd when
    ``compile``: the first warmup call compiles)."""
    torch.cuda.empty_cache()
    model = timm.create_model(name, img_size=img_size, num_classes=0, **kwargs).cuda().eval()
    forward = torch.compile(model.forward_features) if compile else model.forward_features
    x = torch.randn(batch, 3, img_size, img_size, device="cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(warmup):
            forward(x)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(iters):
            forward(x)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 1e9
    del model, x
    return {"img_s": batch * iters / elapsed, "peak_gb": peak, "batch": batch}


def measure_fitting(name: str, img_size: int, batch: int, iters: int, warmup: int, compile: bool = False,
                    **kwargs) -> dict:
    while batch >= 1:
        try:
            return measure(name, img_size, batch, iters, warmup, compile, **kwargs)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            batch //= 2
    return {"img_s": float("nan"), "peak_gb": float("nan"), "batch": 0}


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
    ap.add_argument("--scan-config", default=None, metavar="JSON",
                    help='overrides of kernels.ops.CONFIG["cuda"], e.g. \'{"fwd_stages": 2}\' (scan tuning)')
    ap.add_argument("--conv-tile", default=None, metavar="BL,BD,W",
                    help="kernels.conv1d forward tile (BLOCK_L, BLOCK_D, warps), e.g. 64,128,4 (conv tuning)")
    args = ap.parse_args()
    if args.conv_tile:
        from kernels import conv1d

        conv1d.FWD_BLOCK_L, conv1d.FWD_BLOCK_D, conv1d.FWD_WARPS = (int(v) for v in args.conv_tile.split(","))
    if not torch.cuda.is_available():
        raise SystemExit("bench_vision needs a CUDA GPU")
    if args.scan_config:
        import json

        from kernels import ops

        ops.CONFIG["cuda"].update(json.loads(args.scan_config))
    models = [m for key, m in (("vim", ("vim-tiny", "vim_tiny_patch16_224", True)),
                               ("deit", ("DeiT-Ti (fused attn)", "deit_tiny_patch16_224", True))) if key in args.models]
    if args.unfused:
        models.append(("DeiT-Ti (unfused attn)", "deit_tiny_patch16_224", False))
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, timm {timm.__version__}, "
          f"scan backend: {os.environ.get('MAMBAZOO_SCAN') or 'default (triton on CUDA)'}, "
          f"compiled: {args.compile}")
    rows = []
    for size in args.sizes:
        for label, name, fused in models:
            timm.layers.set_fused_attn(fused)  # read by timm's Attention when it is built
            r = measure_fitting(name, size, args.batch, args.iters, args.warmup, compile=args.compile)
            timm.layers.set_fused_attn(True)
            rows.append((size, label, r))
            print(f"  {size:5d} px  {label:24s} batch {r['batch']:3d}  {r['img_s']:9.1f} img/s  "
                  f"{r['peak_gb']:6.2f} GB", flush=True)
    print("\n| image size | model | batch | images/s | peak memory (GB) |\n|---|---|---|---|---|")
    for size, label, r in rows:
        print(f"| {size} | {label} | {r['batch']} | {r['img_s']:,.1f} | {r['peak_gb']:.2f} |")
    if args.profile:
        profile_vim(max(args.sizes), args.profile_batch)


if __name__ == "__main__":
    main()
