#!/usr/bin/env bash
# The probes of issue 27 (scripts/probes.py) on one GPU, in one call: install mambazoo from this checkout,
# jsonargparse from the carried .whl/ when the machine lacks it (see docs/results.md, "Preparing the carried
# folders"), then every run side by side. Results (table.md, probes.png, results.json, logs/, metrics/) go to
# $OUT/probes (default ./probes-out/probes); the run folders (checkpoints) to /tmp/mambazoo-probes.
#
#   scripts/probes_gpu.sh                          # 300 s of training per run, all runs at once (~8 minutes)
#   scripts/probes_gpu.sh --budget-s 120 --probes parity --mixers mamba mamba2 attention
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/probes-out}
mkdir -p "$OUT/probes"
python3 -m pip install -q --no-deps --no-build-isolation --no-index . || { echo "cannot install mambazoo from $PWD"; exit 1; }
if ! python3 -c "import jsonargparse" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "cannot install .whl/*.whl (carry .whl)"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/probes/device.txt" 2>&1
exec python3 scripts/probes.py --out "$OUT/probes" --runs-dir /tmp/mambazoo-probes --budget-s 300 --grace-s 170 "$@"
