"""The selective state-space core in plain PyTorch, device-agnostic."""

from core.scan import (
    check_scan_inputs,
    selective_scan,
    selective_scan_chunked,
    selective_scan_ref,
    selective_state_update_ref,
)

__all__ = [
    "check_scan_inputs",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_ref",
    "selective_state_update_ref",
]
