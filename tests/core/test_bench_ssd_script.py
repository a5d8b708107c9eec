"""scripts/bench_ssd.py's CPU mode runs end to end on a toy shape, with and without the Mamba-3 column: every
implementation timed forward and forward+backward, the Mamba-2 reference equal to transformers' torch path when
that is installed. Speed is not asserted here."""

import importlib.util
import math

import pytest

from helpers import load_script


def have_transformers() -> bool:
    return importlib.util.find_spec("transformers") is not None


@pytest.mark.parametrize("mamba3", [False, True])
def test_bench_ssd_cpu_runs_on_a_tiny_shape(mamba3, capsys):
    bench = load_script("bench_ssd")
    argv = ["--reps", "2", "--threads", "1", "--chunk", "8", "--shape", "1,20,2,4,8"] + (["--mamba3"] if mamba3 else [])
    rows = bench.main(argv)
    out = capsys.readouterr().out
    assert len(rows) == 1 and rows[0]["shape"] == (1, 20, 2, 4, 8) and rows[0]["chunk"] == 8
    names = {"ours"} | ({"transformers"} if have_transformers() else set()) | ({"mamba3"} if mamba3 else set())
    timed = {k.split("_ms_")[1] for k in rows[0] if "_ms_" in k}
    assert timed == names
    for name in names:
        for kind in ("fwd", "fwdbwd"):
            med, lo, hi = rows[0][f"{kind}_ms_{name}"]
            assert 0 < lo <= med <= hi and math.isfinite(hi), (kind, name)
    if have_transformers():
        assert rows[0]["rel_diff"] < 1e-5
        assert ("per-layer cost against transformers' Mamba2 path" in out) == mamba3
    else:
        assert "transformers is not installed" in out


def test_shape_argument_rejects_bad_input():
    bench = load_script("bench_ssd")
    assert bench.shape_arg("1,2,3,4,5") == (1, 2, 3, 4, 5)
    for bad in ("1,2,3", "1,2,3,4,x", "1,2,0,4,5"):
        with pytest.raises(bench.argparse.ArgumentTypeError, match="five positive ints"):
            bench.shape_arg(bad)
