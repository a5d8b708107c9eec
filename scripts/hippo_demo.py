"""HiPPO-LegS demo: compress a signal's whole history online into N coefficients, then rebuild it.

A signal (sum of sinusoids plus a seeded random smooth part) is fed one sample at a time through
the HiPPO-LegS recurrence c_{k+1} = Abar_k c_k + Bbar_k f_k. From the final state alone (N numbers)
the history is reconstructed with scaled Legendre polynomials; the plot shows the signal against
the reconstruction for several N, and the per-N MSE is printed.

    python scripts/hippo_demo.py                       # writes ./hippo_demo.png
    python scripts/hippo_demo.py --N 8 32 128 --length 2000 --method bilinear --out /tmp/h.png
"""

from __future__ import annotations

import argparse
import math
import os


import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from mambazoo.core.ssm import hippo_legs_reconstruct  # noqa: E402


def make_signal(length: int, seed: int = 0) -> torch.Tensor:
    """Two sinusoids plus a random smooth part (random low-frequency cosines) and a chirp. -> (L,) fp64."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, length, dtype=torch.float64)
    f = torch.sin(2 * math.pi * 4 * t) + 0.5 * torch.cos(2 * math.pi * 11 * t + 1.0)
    amps = torch.randn(8, generator=g, dtype=torch.float64) / torch.arange(1, 9)
    phases = 2 * math.pi * torch.rand(8, generator=g, dtype=torch.float64)
    for k in range(8):
        f = f + 0.6 * amps[k] * torch.cos(math.pi * (k + 1) * t + phases[k])
    return f + 0.3 * torch.sin(2 * math.pi * 6 * t ** 2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--N", type=int, nargs="+", default=[4, 16, 32, 64], help="state sizes to compare")
    p.add_argument("--length", type=int, default=1000, help="signal length L")
    p.add_argument("--method", choices=["zoh", "bilinear", "euler"], default="zoh",
                   help="per-step discretization of the LegS ODE (zoh is exact for held samples)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="hippo_demo.png", help="output PNG path (default ./hippo_demo.png)")
    args = p.parse_args(argv)
    if args.length < 2 or min(args.N) < 1:
        p.error("--length must be >= 2 and every --N >= 1")
    return args


def main(argv=None) -> dict[int, float]:
    args = parse_args(argv)
    f = make_signal(args.length, args.seed)
    x = torch.arange(args.length)
    fig, axes = plt.subplots(len(args.N), 1, figsize=(9, 2.2 * len(args.N)), sharex=True, squeeze=False)
    mses = {}
    for ax, N in zip(axes[:, 0], args.N):
        rec = hippo_legs_reconstruct(f, N, args.method)
        mses[N] = ((rec - f) ** 2).mean().item()
        ax.plot(x, f, color="0.3", lw=1.5, label="signal")
        ax.plot(x, rec, color="tab:red", lw=1.2, ls="--", label=f"reconstruction from {N} coefficients")
        ax.set_title(f"HiPPO-LegS, N = {N}: MSE {mses[N]:.3g}", fontsize=10)
        ax.legend(loc="upper right", fontsize=8)
        print(f"N = {N:4d}  MSE = {mses[N]:.4g}")
    axes[-1, 0].set_xlabel(f"time step (the state is read once, after step {args.length - 1})")
    fig.suptitle(f"Online function approximation with HiPPO-LegS ({args.method} discretization)")
    fig.tight_layout()
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")
    return mses


if __name__ == "__main__":
    main()
