"""Compile the SSD (Mamba-2) and Mamba-3 Triton kernels ahead of time for a GPU architecture, on a machine with no
GPU, and check their shared memory against the architecture's per-block limit.

    python scripts/check_kernel_resources.py [--arch 90] [--cases ssd mamba3] [--json out.json]

The interpreter (TRITON_INTERPRET=1, what CI runs) checks what the kernels compute, not whether they compile for a
GPU or fit its shared memory: both failures reached the first GPU run of these kernels (a plain global float in
the SSD kernels; 249,856 bytes of shared memory for the Mamba-3 forward at d_state 128 on an H100). This script
runs each public entry point at the published shapes on CPU tensors with the launches intercepted
(``JITFunction.run`` records its arguments instead of launching), then compiles every recorded launch with
``triton.compile`` for ``GPUTarget("cuda", arch, 32)`` (Triton's bundled ptxas; no driver) and prints, per kernel,
shared memory, registers, spills and compile time. Exit status 1 when a kernel fails to compile or needs more
shared memory than the architecture allows. Run it without TRITON_INTERPRET (it clears the variable).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# the opt-in shared memory per block (bytes): A100, H100 / H200
SMEM_LIMIT = {80: 166_912, 90: 232_448}
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
          torch.int64: "i64", torch.bool: "i1", torch.uint8: "u8"}
OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


class Recorder:
    """Replaces JITFunction.run inside the block: each launch appends (kernel, bound arguments, options)."""

    def __init__(self):
        self.launches = []

    def __enter__(self):
        self.saved = JITFunction.run
        rec = self

        def run(fn, *args, grid, warmup, **kwargs):
            opts = {k: kwargs.pop(k) for k in OPTIONS if k in kwargs}
            bound = dict(zip(fn.arg_names, args))
            bound.update(kwargs)
            rec.launches.append((fn, bound, opts))

        JITFunction.run = run
        return self

    def __exit__(self, *exc):
        JITFunction.run = self.saved


def signature_of(fn: JITFunction, bound: dict) -> tuple[dict, dict]:
    """Triton's signature ({name: type string}) and constexprs ({(index,): value}) of one recorded launch."""
    sig, const = {}, {}
    for i, p in enumerate(fn.params):
        v = bound.get(p.name, p.default)
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            const[(i,)] = v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + DTYPES[v.dtype]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        elif v is None:
            sig[p.name] = "constexpr"
            const[(i,)] = None
        else:
            raise TypeError(f"{fn.__name__}.{p.name}: no Triton type for {type(v).__name__}")
    return sig, const


def ssd_cases():
    """Mamba-2's published mixer shape (headdim 64, d_state 128, one group), bf16: forward + backward, and the
    decode step."""
    from mambazoo.kernels.ssd import ssd_step_triton, ssd_triton

    b, L, h, p, n = 1, 512, 2, 64, 128
    bf = torch.bfloat16
    x = torch.randn(b, L, h, p, dtype=bf, requires_grad=True)
    dt = torch.rand(b, L, h, dtype=bf, requires_grad=True)
    A = -torch.rand(h, requires_grad=True)
    B = torch.randn(b, L, 1, n, dtype=bf, requires_grad=True)
    C = torch.randn(b, L, 1, n, dtype=bf, requires_grad=True)
    D = torch.randn(h, requires_grad=True)
    bias = torch.randn(h, requires_grad=True)
    yield "ssd forward + backward (bf16, p 64, N 128, chunk 256)", lambda: ssd_triton(
        x, dt, A, B, C, 256, D=D, dt_bias=bias, dt_softplus=True).float().sum().backward()
    state = torch.zeros(b, h, p, n)
    yield "ssd decode step (bf16, p 64, N 128)", lambda: ssd_step_triton(
        state, x[:, 0].detach(), dt[:, 0].detach(), A.detach(), B[:, 0].detach(), C[:, 0].detach(), D=D.detach(),
        dt_bias=bias.detach(), dt_softplus=True)


def mamba3_cases(d_state=128, ranks=(1, 4)):
    """Mamba-3's published mixer shape (headdim 64, d_state 128, rope_fraction 0.5, chunk 64), bf16, SISO and MIMO
    rank 4: the inference forward, forward + backward, and the decode step."""
    from mambazoo.core.mamba3 import Mamba3

    for rank in ranks:
        kw = dict(is_mimo=True, mimo_rank=rank) if rank > 1 else {}
        m = Mamba3(256, d_state=d_state, headdim=64, **kw).to(torch.bfloat16)
        x = torch.randn(1, 128, 256, dtype=torch.bfloat16)
        tag = f"rank {rank}, bf16, p 64, N {d_state}, chunk 64"

        def forward(m=m, x=x):
            with torch.no_grad():
                m(x)

        yield f"mamba3 forward ({tag})", forward
        yield f"mamba3 forward + backward ({tag})", lambda m=m, x=x: m(x.requires_grad_()).float().sum().backward()
        state = m.allocate_state(1, dtype=torch.bfloat16)

        def step(m=m, x=x, s=state):
            with torch.no_grad():
                m.step(x[:, 0], s)

        yield f"mamba3 decode step ({tag})", step


CASES = {"ssd": ssd_cases, "mamba3": mamba3_cases}


def compile_launch(fn, bound, opts, arch):
    sig, const = signature_of(fn, bound)
    src = ASTSource(fn=fn, signature=sig, constexprs=const)
    t0 = time.perf_counter()
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    md = kernel.metadata
    return dict(shared=md.shared, seconds=round(time.perf_counter() - t0, 1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, choices=sorted(SMEM_LIMIT))
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--d-state", type=int, default=128, help="Mamba-3's d_state (default: the published 128)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 4], help="Mamba-3's MIMO ranks (1: SISO)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    CASES["mamba3"] = lambda: mamba3_cases(args.d_state, tuple(args.ranks))
    from mambazoo.core.backend import backend
    from mambazoo.kernels._host import compiling_for_cuda

    limit, rows, failed = SMEM_LIMIT[args.arch], [], 0
    for family in args.cases:
        # the kernels' own shapes: CUDA's chunk choices apply where the launchers look at the device
        # and CUDA's launch options (warps): the CPU's single warp compiles other GEMM layouts and shared memory
        with backend(ssd="triton", mamba3="triton"), compiling_for_cuda():
            for name, call in CASES[family]():
                with Recorder() as rec:
                    try:
                        call()
                    except Exception:  # noqa: BLE001  (the outputs of unlaunched kernels are garbage: only
                        pass  # the launches recorded before a failure matter here)
                seen = set()
                for fn, bound, opts in rec.launches:
                    key = (fn.__name__, tuple(sorted((k, v) for k, v in bound.items() if not isinstance(v, torch.Tensor)
                                                     and k in {p.name for p in fn.params if p.is_constexpr})))
                    if key in seen:
                        continue
                    seen.add(key)
                    row = dict(case=name, kernel=fn.__name__, options=opts)
                    try:
                        row.update(compile_launch(fn, bound, opts, args.arch))
                        row["fits"] = row["shared"] <= limit
                    except Exception as e:  # noqa: BLE001  (reported, and the exit status says so)
                        row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", fits=False)
                    failed += not row["fits"]
                    rows.append(row)
                    print(f"{name:55s} {fn.__name__:28s} " + (
                        f"smem {row['shared']:>7,d} B  "
                        f"{row['seconds']} s{'' if row['fits'] else '  OVER THE LIMIT'}" if "error" not in row
                        else row["error"]), flush=True)
                if not rec.launches:
                    rows.append(dict(case=name, error="no kernel launched", fits=False))
                    failed += 1
                    print(f"{name}: no kernel launched", flush=True)
    print(f"sm_{args.arch}: {len(rows)} kernel launches compiled, {failed} failed or over {limit:,d} bytes")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(arch=args.arch, limit=limit, rows=rows), f, indent=1, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
