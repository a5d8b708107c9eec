"""The selective state-space core in plain PyTorch, device-agnostic."""

from mambazoo.core.block import Block, drop_path
from mambazoo.core.cache import InferenceCache, MambaState
from mambazoo.core.mamba import Mamba, dt_bias_init, s4d_real_a_log
from mambazoo.core.mamba2 import Mamba2
from mambazoo.core.ssd import ssd, ssd_chunked, ssd_ref
from mambazoo.core.norm import RMSNorm
from mambazoo.core.ssm import (
    A_INIT_KINDS,
    LTISSM,
    a_log_init,
    discretize_b,
    discretize_bilinear_dense,
    discretize_gbt_dense,
    discretize_zoh,
    discretize_zoh_dense,
    fft_causal_conv,
    hippo_legs,
    hippo_legs_diag,
    hippo_legs_encode,
    hippo_legs_nplr,
    hippo_legs_reconstruct,
    hippo_legs_transitions,
    legendre_reconstruct,
    s4d_lin,
    s4d_real,
    ssm_kernel,
)
from mambazoo.core.backend import Backend, describe_backend  # backend(...): import it from mambazoo.core.backend
from mambazoo.core.dispatch import scan_backend, selective_scan
from mambazoo.core.scan import selective_scan_chunked
from mambazoo.core.scan_ref import check_scan_inputs, selective_scan_ref, selective_state_update_ref

__all__ = [
    "A_INIT_KINDS",
    "LTISSM",
    "a_log_init",
    "discretize_b",
    "discretize_bilinear_dense",
    "discretize_gbt_dense",
    "discretize_zoh",
    "discretize_zoh_dense",
    "fft_causal_conv",
    "hippo_legs",
    "hippo_legs_diag",
    "hippo_legs_encode",
    "hippo_legs_nplr",
    "hippo_legs_reconstruct",
    "hippo_legs_transitions",
    "legendre_reconstruct",
    "s4d_lin",
    "s4d_real",
    "ssm_kernel",
    "Backend",
    "Block",
    "InferenceCache",
    "Mamba",
    "MambaState",
    "Mamba2",
    "RMSNorm",
    "check_scan_inputs",
    "describe_backend",
    "drop_path",
    "dt_bias_init",
    "s4d_real_a_log",
    "scan_backend",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_ref",
    "selective_state_update_ref",
    "ssd",
    "ssd_chunked",
    "ssd_ref",
]
