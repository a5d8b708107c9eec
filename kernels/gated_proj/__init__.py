"""The bidirectional mixer's SiLU(z) gate and out_proj in one kernel, z formed on chip (ops.py).
Oracle: mambazoo.core.proj_ref.gated_out_proj_ref."""

from mambazoo.kernels.gated_proj.ops import CONFIG, gated_out_proj, gated_out_proj_fits

__all__ = ["CONFIG", "gated_out_proj", "gated_out_proj_fits"]
