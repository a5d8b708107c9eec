"""scripts/bench_cpu.py runs end to end on toy shapes: every row, the fresh-process memory cases, the optional
peers (mambapy when installed, a --old-scan file) and the markdown table. Speed is not asserted here."""

import importlib.util
import math
import pathlib

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "bench_cpu.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_cpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_cpu_runs_on_tiny_shapes(tmp_path, capsys):
    old = tmp_path / "old_scan.py"  # stands in for an older core/scan.py: the sequential oracle
    old.write_text("from mambazoo.core.scan import selective_scan_ref\n\n\n"
                   "def selective_scan_chunked(*args, chunk_size=None, **kwargs):\n"
                   "    return selective_scan_ref(*args, **kwargs)\n")
    bench = load_script()
    rows = bench.main(["--tiny", "--rounds", "2", "--old-scan", str(old)])
    out = capsys.readouterr().out
    labels = [label for label, _, _ in rows]
    assert [lab.split(" (")[0] for lab in labels[:2]] == ["scan forward", "scan fwd+bwd"]
    assert any(lab.startswith("scan forward peak memory") for lab in labels)
    assert any(lab.startswith("LM train step") for lab in labels)
    assert any(lab.startswith("LM train step peak memory") for lab in labels)
    assert any(lab.startswith("mambabyte-tiny") for lab in labels)
    peers = {"mambazoo", "mambazoo-before"} | ({"mambapy"} if bench.have_mambapy() else set())
    for label, vals, unit in rows:
        assert set(vals) == peers, label
        for v in vals.values():
            samples = [v] if unit == "MiB" else v
            assert all(math.isfinite(s) and s >= 0 for s in samples), label
            if unit != "MiB":
                assert len(v) == 2 and all(s > 0 for s in v), label
    # the implementations agree before they are timed
    check = next(line for line in out.splitlines() if line.startswith("scan (1, 8, 33, 4):"))
    rels = [float(w) for w in check.replace(",", " ").split() if w[0].isdigit() and "e" in w]
    assert rels and max(rels) < 1e-5
    assert "| measure | mambazoo | mambazoo-before | mambapy |" in out
    if not bench.have_mambapy():
        assert "mambapy is not installed (pip install mambapy)" in out
