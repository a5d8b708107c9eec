"""scripts/bench_cpu.py runs end to end on toy shapes: every row, the fresh-process memory and capped one-run cases,
the optional peers (mambapy and transformers when installed, a --old-scan file), the equality checks and the markdown
table. Speed is not asserted here."""

import math

from helpers import load_script


def test_bench_cpu_runs_on_tiny_shapes(tmp_path, capsys):
    old = tmp_path / "old_scan.py"  # stands in for an older core/scan.py: the sequential oracle
    old.write_text("from mambazoo.core.scan import selective_scan_ref\n\n\n"
                   "def selective_scan_chunked(*args, chunk_size=None, **kwargs):\n"
                   "    return selective_scan_ref(*args, **kwargs)\n")
    bench = load_script("bench_cpu")
    rows = bench.main(["--tiny", "--rounds", "2", "--old-scan", str(old)])
    out = capsys.readouterr().out
    labels = [label for label, _, _ in rows]
    assert [lab.split(" (")[0] for lab in labels[:2]] == ["scan forward", "scan fwd+bwd"]
    for prefix in ("scan forward peak memory", "LM train step,", "LM train step peak memory", "mambabyte-tiny",
                   "generation,", "of which prefill"):
        assert any(lab.startswith(prefix) for lab in labels), prefix
    hf, mp = bench.have_transformers(), bench.have_mambapy()
    for label, vals, unit in rows:
        expected = {"mambazoo"} | ({"mambapy"} if mp else set())
        if not label.startswith(("generation", "of which")):
            expected.add("mambazoo-before")
        if hf:
            expected.add("transformers")
            if mp and label.startswith(("LM", "mambabyte")):
                expected.add("transformers-mambapy")
        assert set(vals) == expected, label
        for k, v in vals.items():
            if isinstance(v, bench.Capped):  # transformers' sequential path under autograd: one capped run
                assert (label.startswith("scan fwd+bwd") or label.startswith("LM train step,")) and k == "transformers"
                assert v.seconds is not None and 0 < v.seconds < v.cap, label  # toy shapes finish
            elif isinstance(v, str):
                assert label.startswith("LM train step peak memory") and k == "transformers", label
            elif unit == "MiB":
                assert math.isfinite(v) and v >= 0, label
            else:
                assert len(v) == 2 and all(math.isfinite(s) and s > 0 for s in v), label
    # the implementations agree before they are timed
    check = next(line for line in out.splitlines() if line.startswith("scan (1, 8, 33, 4):"))
    rels = [float(w) for w in check.replace(",", " ").split() if w[0].isdigit() and "e" in w]
    assert rels and max(rels) < 1e-5
    if hf or mp:
        gen = next(line for line in out.splitlines() if line.startswith("generation:"))
        assert gen.count("greedy tokens equal") == hf + mp, gen
        lm = next(line for line in out.splitlines() if line.startswith("LM logits:"))
        assert max(float(w) for w in lm.replace(",", " ").split() if w[0].isdigit() and "e" in w) < 1e-5, lm
    header = "| measure | mambazoo | mambazoo-before | transformers | transformers-mambapy | mambapy |"
    assert header in out
    if not mp:
        assert "mambapy is not installed (pip install mambapy)" in out
    if not hf:
        assert "transformers" in out and "is not installed" in out


def test_capped_run_is_reported_as_a_bound():
    """A slow case stopped at the cap is shown as "> cap" (a rate as "< work / cap"), its speed-up as a bound."""
    bench = load_script("bench_cpu")
    capped = bench.Capped(None, 5.0, scale=100)
    assert repr(capped) == "> 5 s (stopped)"
    assert bench.cell(capped, "tok/s") == "< 20 tok/s (a step > 5 s, stopped)"
    assert bench.speedup({"mambazoo": [40.0, 40.0], "transformers": capped}, "transformers", "tok/s") == "> 2.00x"
    assert bench.speedup({"mambazoo": [0.5], "transformers": bench.Capped(None, 5.0)}, "transformers", "s") \
        == "> 10.00x"
