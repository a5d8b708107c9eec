"""Fused Triton kernels for the selective scan; core.scan holds their reference."""
