"""The mixer's causal depthwise conv1d + SiLU (ops.py: kernels, launchers, tiles, the torch.library ops).
Oracle: mambazoo.core.conv_ref."""

from mambazoo.kernels.conv1d.ops import causal_conv1d, causal_conv1d_pair

__all__ = ["causal_conv1d", "causal_conv1d_pair"]
