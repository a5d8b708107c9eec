"""Named Vim configs: the published shapes (Zhu et al., 2024) and a small Fashion-MNIST one."""

from __future__ import annotations

# Every field is a keyword of mambazoo.vim.model.VisionMamba.
VIM_CONFIGS: dict[str, dict] = {
    # depth 24, embed 192 / 384 / 768, patch 16, middle class token: ~7M / 26M / 98M parameters.
    "vim-tiny": dict(img_size=224, patch_size=16, embed_dim=192, depth=24, drop_path_rate=0.0),
    "vim-small": dict(img_size=224, patch_size=16, embed_dim=384, depth=24, drop_path_rate=0.05),
    "vim-base": dict(img_size=224, patch_size=16, embed_dim=768, depth=24, drop_path_rate=0.1),
    # 28x28 grey images, 7x7 patches of 4 px, 10 classes: trains in minutes on a laptop CPU.
    "vim-tiny-fashion": dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=128,
                             depth=8, drop_path_rate=0.05),
    # vim-tiny's shape with the bidirectional Mamba-3 mixer: 6 heads of 64, d_state 64 (half the LM's published
    # 128: 197 tokens need less memory than language, and the kernels' tiles are half as large)
    "vim-tiny-mamba3": dict(img_size=224, patch_size=16, embed_dim=192, depth=24, drop_path_rate=0.0,
                            mixer="mamba3", d_state=64, headdim=64),
}

DESCRIPTIONS = {
    "vim-tiny": "Vision Mamba tiny: depth 24, width 192, patch 16 at 224 px (~7M parameters)",
    "vim-small": "Vision Mamba small: depth 24, width 384, patch 16 at 224 px (~26M parameters)",
    "vim-base": "Vision Mamba base: depth 24, width 768, patch 16 at 224 px (~98M parameters)",
    "vim-tiny-fashion": "Vision Mamba for 28x28 Fashion-MNIST: depth 8, width 128, patch 4, 1 channel, 10 classes",
    "vim-tiny-mamba3": "Vision Mamba tiny with bidirectional Mamba-3 mixers: depth 24, width 192, d_state 64",
}

# timm architecture name -> our config name.
TIMM_NAMES = {
    "vim_tiny_patch16_224": "vim-tiny",
    "vim_small_patch16_224": "vim-small",
    "vim_base_patch16_224": "vim-base",
}
