"""Times kernels/gated_proj.py (the Vim mixer's gate and out_proj, z formed on chip) beside what it replaces.

    python scripts/bench_gated_proj.py [--quick]

Per shape (M = 64 images x tokens, d_model, d_inner), bf16, on CUDA:
  out_proj      F.linear(y, wo): what the unfused path runs after the gated scans (cuBLAS)
  unfused       z = F.linear(h, wz); F.linear(y * silu(z), wo): the same math in PyTorch kernels
  fused (tile)  gated_out_proj(y, h, wz, wo) for each tile (block_m, block_c, stages, warps, tanh gate, z a chunk
                ahead); --quick: CONFIG's
TB/s counts the bytes the fused kernel must move (read y and h, write out). Each fused tile's output is compared
with the unfused math's (relative error, bf16). In the model the fused kernel also removes z from in_proj's output
and the scans' gate (3 x M x d_inner x 2 bytes per layer): bench_vision.py measures that whole trade.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from mambazoo.kernels.gated_proj import CONFIG, gated_out_proj

SHAPES = [("vim-tiny 1024 px", 64 * 4097, 192, 384), ("vim-tiny 1248 px", 64 * 6085, 192, 384)]
# (block_m, block_c, stages, warps, tanh, ahead)
TILES = [(128, 64, 3, 8, True, False), (128, 64, 3, 8, False, False), (128, 32, 4, 8, True, False),
         (128, 16, 4, 8, True, False), (64, 64, 2, 4, True, True), (64, 32, 3, 4, True, True),
         (64, 32, 2, 4, True, True), (64, 32, 3, 4, True, False), (64, 16, 3, 4, True, False),
         (64, 16, 4, 4, True, False), (64, 16, 3, 4, True, True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CONFIG's tile only")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gated_proj.py needs a CUDA GPU")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    c = CONFIG["cuda"]
    default = (c["block_m"], c["block_c"], c["stages"], c["warps"], c["tanh"], c["ahead"])
    tiles = [default] if a.quick else TILES
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, M, dm, di in SHAPES:
        rn = lambda *s: torch.randn(*s, device="cuda", generator=g).to(torch.bfloat16)  # noqa: E731
        y, h = rn(M, di), rn(M, dm)
        wz, wo = rn(di, dm) * dm ** -0.5, rn(dm, di) * di ** -0.5
        gb = (y.numel() + h.numel() + M * dm) * 2 / 1e9
        with torch.no_grad():
            want = F.linear(y * F.silu(F.linear(h, wz)), wo)
            t_out = do_bench(lambda: F.linear(y, wo), warmup=25, rep=200)
            t_unf = do_bench(lambda: F.linear(y * F.silu(F.linear(h, wz)), wo), warmup=25, rep=200)
            print(f"== {name}: M {M}, d_model {dm}, d_inner {di}; fused bytes {gb:.3f} GB")
            print(f"out_proj (cuBLAS) {t_out:.4f} ms   unfused z + gate + out_proj {t_unf:.4f} ms")
            best = None
            for tile in tiles:
                bm, bc, st, w, tanh, ahead = tile
                run = lambda: gated_out_proj(y, h, wz, wo, block_m=bm, block_c=bc, stages=st, warps=w,  # noqa: E731
                                             tanh=tanh, ahead=ahead)
                try:
                    err = ((run().float() - want.float()).norm() / want.float().norm()).item()
                    ms = do_bench(run, warmup=25, rep=200)
                except Exception as e:  # a tile that does not compile or fit: say why, go on
                    print(f"fused {tile} skipped: {type(e).__name__}: {str(e)[:100]}")
                    continue
                tag = " [default]" if tile == default else ""
                print(f"fused {tile}{tag} {ms:.4f} ms  {gb / ms:.2f} TB/s  rel err {err:.1e}", flush=True)
                if best is None or ms < best[0]:
                    best = (ms, tile)
            if best:
                print(f"best {name}: {best[1]} {best[0]:.4f} ms against out_proj alone {t_out:.4f} ms")


if __name__ == "__main__":
    main()
