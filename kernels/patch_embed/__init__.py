"""Vision Mamba's patch embedding + position embedding in one kernel (ops.py).
Oracle: mambazoo.core.proj_ref.patch_tokens_ref."""

from mambazoo.kernels.patch_embed.ops import CONFIG, patch_tokens, patch_tokens_fit

__all__ = ["CONFIG", "patch_tokens", "patch_tokens_fit"]
