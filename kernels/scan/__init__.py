"""The selective scan's Triton kernels: train.py (the forward that stores tile states and the recomputing backward),
infer.py (the inference forward for B / C pairs, one and two directions), ops.py (launchers, tile configs, the
torch.library ops scan_fwd / scan_bwd). Entry points: mambazoo.kernels.selective_scan_triton and
selective_scan_bidirectional_triton. Oracle: mambazoo.core.scan_ref."""
