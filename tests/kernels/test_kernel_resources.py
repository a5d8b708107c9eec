"""The SSD and Mamba-3 kernels compile for an H100 (sm_90) and fit its shared memory at the published shapes.

The interpreter runs the kernels' arithmetic, not the GPU compiler: a kernel can pass every other test and still
fail to compile or ask for more shared memory than the GPU has (both happened on the first GPU run of these
kernels). scripts/check_kernel_resources.py compiles each launch ahead of time with Triton's bundled ptxas, on
this CPU machine, and exits 1 on either failure. The two families compile in two processes side by side (each
takes one to two minutes on a 2-core machine).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check_kernel_resources.py"
EXPECTED = {
    "ssd": {"_chunk_state_kernel", "_state_pass_kernel", "_chunk_out_kernel", "_dstate_kernel",
            "_dstate_pass_kernel", "_chunk_bwd_kernel", "_step_kernel"},
    "mamba3": {"mamba3_chunk_fwd_kernel", "mamba3_chunk_bwd_kernel", "mamba3_step_kernel"},
}


def test_kernels_compile_for_sm90_within_shared_memory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {}
    for family in EXPECTED:  # Mamba-3 at the published SISO shape (d_state 128, headdim 64)
        out = tmp_path / f"{family}.json"
        extra = ["--ranks", "1"] if family == "mamba3" else []
        procs[family] = (out, subprocess.Popen(
            [sys.executable, str(SCRIPT), "--arch", "90", "--cases", family, *extra, "--json", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    for family, (out, proc) in procs.items():
        log, _ = proc.communicate(timeout=1200)
        assert proc.returncode == 0, log[-4000:]
        report = json.loads(out.read_text())
        assert report["limit"] == 232_448
        assert {r["kernel"] for r in report["rows"]} == EXPECTED[family], log[-4000:]
        assert all(r["fits"] and 0 <= r["shared"] <= report["limit"] for r in report["rows"]), report["rows"]
