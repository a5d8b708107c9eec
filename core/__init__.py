"""The selective state-space core in plain PyTorch, device-agnostic."""

from core.block import Block, drop_path
from core.cache import InferenceCache, MambaState
from core.mamba import Mamba, dt_bias_init, s4d_real_a_log
from core.norm import RMSNorm
from core.scan import (
    check_scan_inputs,
    scan_backend,
    selective_scan,
    selective_scan_chunked,
    selective_scan_ref,
    selective_state_update_ref,
)

__all__ = [
    "Block",
    "InferenceCache",
    "Mamba",
    "MambaState",
    "RMSNorm",
    "check_scan_inputs",
    "drop_path",
    "dt_bias_init",
    "s4d_real_a_log",
    "scan_backend",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_ref",
    "selective_state_update_ref",
]
