"""Decode-step benchmark: one layer's step and the whole model's step, fused kernels vs unfused.

    python scripts/bench_decode_step.py                  # GPU: mamba-130m shape, bf16, batch 1 and 64
    python scripts/bench_decode_step.py --json out.json  # also write the rows
    TRITON_INTERPRET=1 python scripts/bench_decode_step.py --device cpu   # CPU dry run (tiny model)

Modes (the switch is MAMBAZOO_FUSED_DECODE, read when the step is captured):
- fused:   add + RMSNorm, conv-state update and the A_log state update as single Triton kernels
           (core/decode.py, kernels/decode/): about 7 launches per Mamba layer;
- unfused: the PyTorch decode step around the state-update kernel (the path before the fusion).

Per (mode, batch): the step is captured once in a CUDA graph (torch.cuda.CUDAGraph) and timed as
graph replays: ``do_bench_ms`` is the median of triton.testing.do_bench (which empties the L2 cache
before each call: a cold-cache step) and ``loop_ms`` is the mean of back-to-back replays (what a
decode loop sees). ``kernels`` counts the CUDA kernels of one step (torch.profiler, one eager step
after warm-up; memcpy/memset not counted, listed apart). One layer = ``Block.step_residual`` of
layer 0 (a Mamba block); the model = ``CausalLM.step`` (embedding, n_layer blocks, norm, head).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch


from mambazoo import create_model  # noqa: E402

MODES = ("unfused", "fused")


@contextlib.contextmanager
def decode_mode(mode: str):
    """The backend's fused_decode switch for the duration (restored after)."""
    from mambazoo.core.backend import backend

    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    with backend(fused_decode=mode == "fused"):
        yield


def build_model(name: str, device: torch.device, dtype: torch.dtype):
    """The named model with random weights, on device in dtype, eval mode (built on the device when possible)."""
    try:
        with torch.device(device):
            model = create_model(name)
    except Exception:  # noqa: BLE001 - fall back to building on the CPU
        model = create_model(name)
    return model.to(device=device, dtype=dtype).eval()


def layer_step_fn(model, batch: int, device):
    """fn() running layer 0's decode step (Block.step_residual) on fixed inputs, under the model's autocast."""
    block = model.layers[0]
    cache = model.allocate_cache(batch, 16, device=device)
    d, dtype = model.config.d_model, next(model.parameters()).dtype
    hidden = torch.randn(batch, d, device=device, dtype=dtype)
    residual = torch.randn(batch, d, device=device, dtype=torch.float32)

    def fn():
        with model.autocast():
            return block.step_residual(hidden, residual, cache.layers[0])

    return fn


def model_step_fn(model, batch: int, device):
    """fn() running the whole model's decode step (CausalLM.step) on fixed tokens."""
    cache = model.allocate_cache(batch, 16, device=device)
    tokens = torch.randint(0, model.config.vocab_size, (batch,), device=device)
    return lambda: model.step(tokens, cache)


def capture(fn, device):
    """fn captured in a CUDA graph (after warm-up on a side stream, as mambazoo.generation.GraphDecoder)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        fn()
    return graph


def time_graph(graph, device, rep_ms: int, loop_iters: int) -> dict:
    import triton.testing

    med = triton.testing.do_bench(graph.replay, warmup=10, rep=rep_ms, return_mode="median")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(10):
        graph.replay()
    start.record()
    for _ in range(loop_iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize(device)
    return dict(do_bench_ms=round(med, 4), loop_ms=round(start.elapsed_time(end) / loop_iters, 4))


def count_kernels(fn, device) -> dict:
    """CUDA kernels (and memcpy/memset) launched by one eager call of fn, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        for _ in range(2):
            fn()  # compiled and warm: nothing but the step itself is profiled
        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize(device)
    kernels, copies, names = 0, 0, {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if ev.name.startswith(("Memcpy", "Memset")):
            copies += 1
            continue
        kernels += 1
        short = ev.name.split("(")[0][:60]
        names[short] = names.get(short, 0) + 1
    return dict(kernels=kernels, memcpy_memset=copies, kernel_names=names)


def bench_cpu(fn, iters: int) -> dict:
    with torch.inference_mode():
        fn()
        t = time.perf_counter()
        for _ in range(iters):
            fn()
    return dict(loop_ms=round(1e3 * (time.perf_counter() - t) / iters, 3))


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_decode_step: no CUDA device (use --device cpu with TRITON_INTERPRET=1 for a dry run)")
    name = args.model or ("mamba-130m" if device.type == "cuda" else "mamba-tiny")
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            print("note: CPU dry run without TRITON_INTERPRET=1: only the unfused mode runs", flush=True)
            args.modes = "unfused"
        else:
            os.environ.setdefault("MAMBAZOO_SCAN", "triton")  # the fused kernels on CPU tensors
            from mambazoo.core.backend import reload_from_env

            reload_from_env()  # the backend read the environment at import
    torch.manual_seed(0)
    model = build_model(name, device, dtype)
    cfg = model.config
    print(f"== {name}: {cfg.n_layer} layers x d_model {cfg.d_model}, {args.dtype}, device "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}", flush=True)
    rows = []
    for mode in args.modes.split(","):
        for batch in [int(b) for b in args.batches.split(",")]:
            for what, make in (("layer", layer_step_fn), ("model", model_step_fn)):
                with decode_mode(mode):
                    fn = make(model, batch, device)
                    row = dict(mode=mode, what=what, batch=batch)
                    try:
                        if device.type == "cuda":
                            row.update(count_kernels(fn, device))
                            graph = capture(fn, device)
                            row.update(time_graph(graph, device, args.rep_ms, args.loop_iters))
                            del graph
                        else:
                            row.update(bench_cpu(fn, args.cpu_iters))
                    except torch.OutOfMemoryError:
                        row["note"] = "OOM"
                rows.append(row)
                short = {k: v for k, v in row.items() if k != "kernel_names"}
                print(short, flush=True)
                if args.verbose and "kernel_names" in row:
                    for k, n in sorted(row["kernel_names"].items(), key=lambda kv: -kv[1]):
                        print(f"    {n:4d}  {k}")
    return rows


def print_table(rows) -> None:
    print("\n| mode | step | batch | kernels | do_bench median ms | back-to-back ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['what']} | {r['batch']} | {r.get('kernels', '')} | "
              f"{r.get('do_bench_ms', '')} | {r.get('loop_ms', r.get('note', ''))} |")
    by = {(r["mode"], r["what"], r["batch"]): r for r in rows}
    for (mode, what, batch), r in by.items():
        base = by.get(("unfused", what, batch))
        if mode == "fused" and base and "loop_ms" in r and "loop_ms" in base and r["loop_ms"]:
            print(f"speed-up {what} batch {batch}: {base['loop_ms'] / r['loop_ms']:.2f}x back-to-back"
                  + (f", {base['do_bench_ms'] / r['do_bench_ms']:.2f}x do_bench"
                     if r.get("do_bench_ms") and base.get("do_bench_ms") else ""))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--model", default=None, help="registered name (default mamba-130m on GPU, mamba-tiny on CPU)")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--rep-ms", type=int, default=200, help="do_bench's rep (ms of timed replays)")
    ap.add_argument("--loop-iters", type=int, default=200, help="back-to-back replays timed")
    ap.add_argument("--cpu-iters", type=int, default=3)
    ap.add_argument("--verbose", action="store_true", help="list the kernels of each step")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)
    rows = run(args)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, argv=sys.argv, torch=torch.__version__), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
