"""The chunked reference of the selective scan (what CPU training runs) and, for existing imports, the names that
moved: the oracle and input checks to mambazoo.core.scan_ref, the dispatcher to mambazoo.core.dispatch.

``selective_scan_chunked`` computes ``selective_scan_ref``'s function chunk by chunk (exact, stable: only decays
exp(<= 0) are ever formed).
"""

from __future__ import annotations

from mambazoo.core.scan_ref import (  # noqa: F401  (re-exported)
    ScanShape,
    _bc_per_channel,
    _discretize,
    _finish,
    _segment_starts,
    _shape,
    check_low_rank_delta,
    check_scan_inputs,
    check_state_update_inputs,
    direction_pairs,
    low_rank_delta,
    low_rank_dtype,
    selective_scan_ref,
    selective_state_update_ref,
)

__all__ = [
    "ScanShape",
    "check_scan_inputs",
    "selective_scan_ref",
    "selective_scan_chunked",
    "selective_state_update_ref",
    "check_state_update_inputs",
]

_DISPATCH = ("selective_scan", "selective_scan_bidirectional", "scan_backend")


def __getattr__(name):
    """selective_scan, selective_scan_bidirectional and scan_backend live in mambazoo.core.dispatch (which imports
    this module: looked up on first use, not at import)."""
    if name in _DISPATCH:
        from mambazoo.core import dispatch

        return getattr(dispatch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The CPU backend lives in its own module (a checkpointed, cache-sized recurrence with a hand-written backward).
from mambazoo.core.chunked_scan import selective_scan_chunked  # noqa: E402

