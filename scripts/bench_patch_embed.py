"""Times kernels/patch_embed.py (image -> tokens with the position embedding, one kernel) against the unfused path.

    python scripts/bench_patch_embed.py

vim-tiny at 1024 and 1248 px, batch 64, bf16 autocast, inference: the unfused path (patches gathered and cast, the
GEMM, the position embedding added around the class token: PatchEmbed + VisionMamba._pos_embed) beside the fused
kernel for a few (patches per program, warps); max |difference| of the tokens. Floor: the image read once and the
fp32 tokens written once, at the copy bandwidth measured here.
"""

from __future__ import annotations

import sys

import timm
import torch
from triton.testing import do_bench

import mambazoo.vim  # noqa: F401  (registers vim_*_patch16_224 with timm)
from mambazoo.core.backend import backend
from mambazoo.kernels import patch_embed

TILES = [(64, 4), (64, 8), (128, 8), (32, 4)]


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench_patch_embed.py needs a CUDA GPU")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    buf = torch.empty(2 ** 28, device="cuda")
    bw = 2 * buf.numel() * 4 / do_bench(lambda: buf.clone(), warmup=10, rep=100) / 1e9  # TB/s
    print(f"copy bandwidth {bw:.2f} TB/s")
    for px in (1024, 1248):
        model = timm.create_model("vim_tiny_patch16_224", img_size=px, num_classes=0).cuda().eval()
        x = torch.randn(64, 3, px, px, device="cuda")
        grid = model.patch_embed.grid_for(x.shape[2:])
        floor = (x.numel() * 4 + 64 * (grid[0] * grid[1] + 1) * model.embed_dim * 4) / bw / 1e9
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            with backend(fused_patch=False):
                want = model._pos_embed(model.patch_embed(x), grid)
                t_plain = do_bench(lambda: model._pos_embed(model.patch_embed(x), grid), warmup=10, rep=200)
            print(f"== {px} px: unfused {t_plain:.3f} ms; floor {floor:.3f} ms")
            for bp, w in TILES:
                cfg = dict(patch_embed.CONFIG["cuda"])
                patch_embed.CONFIG["cuda"].update(block_p=bp, warps=w)
                got = model._patch_tokens(x, grid)
                ms = do_bench(lambda: model._patch_tokens(x, grid), warmup=10, rep=200)
                patch_embed.CONFIG["cuda"].update(cfg)
                print(f"fused (block_p {bp}, warps {w}) {ms:.3f} ms  max|diff| {(got - want).abs().max().item():.3g}",
                      flush=True)


if __name__ == "__main__":
    main()
