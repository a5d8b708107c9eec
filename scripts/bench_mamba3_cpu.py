"""CPU timing of the Mamba-3 mixer: forward + backward through the chunked reference against the sequential
oracle (the same mixer, the scan swapped), at one size. Median of --rounds after one warm-up.

    python scripts/bench_mamba3_cpu.py --d-model 256 --batch 2 --length 512 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import mambazoo.core.mamba3 as mixer_mod
from mambazoo.core.backend import reload_from_env
from mambazoo.core.mamba3 import Mamba3
from mambazoo.core.mamba3_scan import mamba3_scan_ref


def timed(m: Mamba3, x: torch.Tensor, rounds: int) -> float:
    """Median seconds of forward + backward."""
    times = []
    for i in range(rounds + 1):
        m.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        m(x).square().mean().backward()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--mimo-rank", type=int, default=0, help="0: SISO")
    p.add_argument("--chunks", type=int, nargs="+", default=[64], help="chunk sizes to time")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-oracle", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["MAMBAZOO_MAMBA3"] = "chunked"
    reload_from_env()  # the backend read the environment at import
    torch.manual_seed(0)
    kw = dict(is_mimo=args.mimo_rank > 0, mimo_rank=max(args.mimo_rank, 1))
    m = Mamba3(args.d_model, **kw)
    x = torch.randn(args.batch, args.length, args.d_model)
    tokens = args.batch * args.length
    print(f"Mamba3(d_model={args.d_model}, d_state={m.d_state}, headdim={m.headdim}, nheads={m.nheads}, "
          f"R={m.mimo_rank}), batch {args.batch} x L {args.length}, {args.threads} thread(s), "
          f"load average {os.getloadavg()[0]:.1f}")
    for T in args.chunks:
        m.chunk_size = T
        t = timed(m, x, args.rounds)
        print(f"chunked (T={T}): {t * 1e3:.0f} ms forward+backward, {tokens / t:.0f} tokens/s")
    if not args.skip_oracle:
        orig = mixer_mod.mamba3_scan

        def oracle(*a, chunk_size=None, **k):
            return mamba3_scan_ref(*a, **k)

        mixer_mod.mamba3_scan = oracle
        try:
            to = timed(m, x, 1)
        finally:
            mixer_mod.mamba3_scan = orig
        print(f"sequential oracle: {to * 1e3:.0f} ms forward+backward, {tokens / to:.0f} tokens/s "
              f"({to / t:.1f}x the chunked time)")


if __name__ == "__main__":
    main()
