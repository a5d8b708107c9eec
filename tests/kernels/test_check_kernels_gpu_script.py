"""scripts/check_kernels_gpu.py (compiled kernels against core's references on a GPU) runs on the CPU through the
interpreter: its comparisons pass at a short length, and --cases selects by name or refuses names it lacks."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check_kernels_gpu.py"


def run(*args):
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def test_ssd_case_passes_through_the_interpreter(tmp_path):
    out = tmp_path / "check.json"
    r = run("--length", "40", "--cases", "ssd", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert len(lines) == 1 and lines[0].startswith("ok   ssd"), r.stdout
    assert out.exists() and "ssd (p 64, N 128, chunk 256)" in out.read_text()


def test_unknown_case_is_refused():
    r = run("--cases", "no-such-kernel")
    assert r.returncode == 2
    assert "expected parts of these case names" in r.stderr and "no-such-kernel" in r.stderr
