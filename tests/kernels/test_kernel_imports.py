"""The kernels import only torch and triton (and their own modules): nothing from mambazoo.core or the zoo."""

import subprocess
import sys


def test_kernels_load_no_core_or_zoo_module():
    code = ("import sys, mambazoo.kernels, mambazoo.kernels.conv1d, mambazoo.kernels.decode, "
            "mambazoo.kernels.gated_proj, mambazoo.kernels.patch_embed, mambazoo.kernels.scan.ops; "
            "print(sorted(m for m in sys.modules "
            "if m.startswith('mambazoo') and not m.startswith('mambazoo.kernels')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "['mambazoo']", out  # the namespace package itself only
