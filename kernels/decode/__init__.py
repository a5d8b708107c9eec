"""The one-token decode step's kernels: ops.py (residual add + RMSNorm, conv-state update), state_update.py (the
selective state update, a torch.library op). Oracles: mambazoo.core.decode, mambazoo.core.scan_ref."""

from mambazoo.kernels.decode.ops import add_rms_norm, conv_state_update
from mambazoo.kernels.decode.state_update import check_state_update, launch_state_update, state_update

__all__ = ["add_rms_norm", "check_state_update", "conv_state_update", "launch_state_update", "state_update"]
