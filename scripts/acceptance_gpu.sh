#!/usr/bin/env bash
# The one-GPU (H100) acceptance runs of issue 6, launched concurrently as background processes:
#   vim-tiny-fashion (>= 92% Fashion-MNIST test accuracy), aum-digits (>= 95% on unseen voices),
#   mambabyte-stdlib (test bits per byte below xz -9 on the same held-out bytes),
#   selective-copy-mamba (>= 97%) vs selective-copy-s4d (far below),
#   induction-heads-mamba trained at length 256 (> 99% at 4096 and 16384).
# Each trains for TRAIN_MIN minutes (default 10, the issue's budget), then tests its best checkpoint.
#
# Prepared here on a CPU machine (the GPU machine has no espeak-ng, no jsonargparse, maybe no
# Fashion-MNIST), all in git-ignored folders that the device call must carry:
#   .whl/  jsonargparse + docstring-parser + typeshed-client wheels (py3.12; see docs/results.md)
#   .acc/  spoken_digits.tar.xz (scripts/make_spoken_digits.py, packed at 8 kHz by scripts/pack_wavs.py)
#          and fashion-mnist/*.gz (a copy of /usr/share/datasets/fashion-mnist)
#
# Usage (from the repository root, on the GPU machine; results go to $OUT, default ./acceptance-out):
#   scripts/acceptance_gpu.sh              launch, wait, summarize (TRAIN_MIN + ~3 min in all)
#   scripts/acceptance_gpu.sh launch       start the runs detached (setsid) and return at once
#   scripts/acceptance_gpu.sh wait         wait for launched runs, then summarize into $OUT
# With a 10-minute limit per command: TRAIN_MIN=7 scripts/acceptance_gpu.sh, or launch + wait in
# two calls. ONLY="name ..." launches a subset. WITH_MQAR=1 also runs scripts/sweep_mqar.py (4 small runs) alongside. EXTRA_ARGS is
# appended to every run (a CPU smoke test: EXTRA_ARGS="--trainer.max_steps 2 --trainer.accelerator cpu
# --trainer.precision 32 --trainer.limit_val_batches 1 --trainer.limit_test_batches 1").
set -u
cd "$(dirname "$0")/.."
MODE=${1:-all}
TRAIN_MIN=${TRAIN_MIN:-10}
OUT=${OUT:-$PWD/acceptance-out}
WORK=${ACC_WORK:-/tmp/mambazoo-acceptance}
mkdir -p "$OUT" "$WORK"
# mambazoo installs from this checkout (its folders map into the mambazoo namespace; PYTHONPATH=. no longer does)
python3 -m pip install -q --no-deps --no-build-isolation --no-index . || { echo "cannot install mambazoo from $PWD"; exit 1; }
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
ALL_RUNS="vim-tiny-fashion aum-digits mambabyte-stdlib selective-copy-mamba selective-copy-s4d induction-heads-mamba"
RUNS=${ONLY:-$ALL_RUNS}  # ONLY="a b" runs a subset
MAXTIME=$(printf "00:00:%02d:00" "$TRAIN_MIN")

setup() {
    if ! python3 -c "import jsonargparse" 2>/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            || { echo "cannot install .whl/*.whl (carry .whl)"; exit 1; }
        export PYTHONPATH=/tmp/site:$PYTHONPATH
    fi
    FM=/usr/share/datasets/fashion-mnist
    if [ ! -f "$FM/train-images-idx3-ubyte.gz" ]; then  # copy out of the tree: a later call may not carry .acc
        FM=$WORK/fashion-mnist
        [ -f "$FM/train-images-idx3-ubyte.gz" ] || { mkdir -p "$FM" && cp .acc/fashion-mnist/*.gz "$FM/"; } \
            || { echo "no Fashion-MNIST (carry .acc)"; exit 1; }
    fi
    SD=$WORK/spoken_digits
    if [ ! -d "$SD/train" ]; then
        mkdir -p "$SD" && tar -xJf .acc/spoken_digits.tar.xz -C "$SD" || { echo "cannot unpack .acc/spoken_digits.tar.xz (carry .acc)"; exit 1; }
    fi
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$WORK/device.txt" 2>&1
}

launch_one() {  # name, extra args...: one detached session (survives the calling command) per run
    local name=$1; shift
    echo "mambazoo fit --config $name --trainer.max_time $MAXTIME --test_after_fit true $*" >> "$WORK/commands.txt"
    setsid bash -c 'echo "start $(date +%s)"; python3 -m mambazoo.cli fit --config "$@"; echo "exit $? end $(date +%s)"' _ \
        "$name" --run_dir "$WORK/runs/$name" --trainer.max_time "$MAXTIME" --trainer.enable_progress_bar false \
        --test_after_fit true "$@" ${EXTRA_ARGS:-} > "$WORK/$name.log" 2>&1 < /dev/null &
}

launch() {
    setup
    rm -rf "$WORK/runs" "$WORK"/*.log "$WORK/commands.txt"
    for name in $RUNS; do
        case $name in
            vim-tiny-fashion) launch_one "$name" --data.init_args.root "$FM" ;;
            aum-digits) launch_one "$name" --data.init_args.root "$SD" ;;
            *) launch_one "$name" ;;
        esac
    done
    if [ "${WITH_MQAR:-0}" = 1 ]; then
        setsid python3 scripts/sweep_mqar.py --out "$WORK/runs/mqar-sweep" --parallel -- \
            --trainer.max_time "00:00:$(printf %02d $((TRAIN_MIN / 2))):00" > "$WORK/mqar-sweep.log" 2>&1 < /dev/null &
    fi
    # xz -9 on exactly the bytes the mambabyte test set scores (held-out stdlib files, 1024-byte windows)
    python3 -m mambazoo.data.text dump-val --seq-len 1024 --out "$WORK/val.bin" > "$WORK/xz.txt" 2>&1
    if command -v xz > /dev/null; then
        echo "xz_bytes $(xz -9 -k -c "$WORK/val.bin" | wc -c) raw_bytes $(stat -c %s "$WORK/val.bin")" >> "$WORK/xz.txt"
    else
        python3 -c "import lzma,sys; d=open(sys.argv[1],'rb').read(); print('xz_bytes', len(lzma.compress(d, preset=9)), 'raw_bytes', len(d), '(python lzma, preset 9)')" "$WORK/val.bin" >> "$WORK/xz.txt"
    fi
    echo "launched at $(date); logs in $WORK"
}

wait_runs() {
    local deadline=$(( $(date +%s) + TRAIN_MIN * 60 + 600 ))
    while pgrep -f "mambazoo.cli fit --config" > /dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 10; done
    pgrep -fa "mambazoo.cli fit --config" && echo "some runs still going at the deadline"
}

fp32_eval() {  # induction heads: test the best checkpoint again in fp32 (is a shortfall precision or training?)
    [ "${FP32_EVAL:-1}" = 1 ] || return 0  # FP32_EVAL=0: skip (the config already trains and tests in fp32)
    local best
    best=$(ls "$WORK"/runs/induction-heads-mamba/checkpoints/best-*.ckpt "$WORK"/runs/induction-heads-mamba/checkpoints/last.ckpt 2>/dev/null | head -1)
    [ -n "$best" ] || return 0
    echo "mambazoo test --config induction-heads-mamba --ckpt_path $best --trainer.precision 32" >> "$WORK/commands.txt"
    python3 -m mambazoo.cli test --config induction-heads-mamba --ckpt_path "$best" --trainer.precision 32 \
        --run_dir "$WORK/runs/induction-heads-fp32" --trainer.enable_progress_bar false ${EXTRA_ARGS:-} \
        > "$WORK/induction-heads-fp32.log" 2>&1
}

summarize() {
    for name in $RUNS induction-heads-fp32 mqar-sweep; do cp "$WORK/$name.log" "$OUT/$name.log" 2>/dev/null; done
    tar -czf "$OUT/runs.tar.gz" -C "$WORK" --exclude='*.ckpt' --exclude='val.bin' runs commands.txt xz.txt device.txt 2>/dev/null
    python3 - "$WORK" > "$OUT/summary.md" <<'PY'
import csv, glob, math, re, sys
work = sys.argv[1]
def last(name, key):
    files = sorted(glob.glob(f"{work}/runs/{name}/logs/version_*/metrics.csv"))
    val = math.nan
    for f in files:
        for row in csv.DictReader(open(f)):
            if row.get(key):
                val = float(row[key])
    return val
def secs(name):
    try:
        t = open(f"{work}/{name}.log").read()
        s, e = re.search(r"start (\d+)", t), re.search(r"exit (\d+) end (\d+)", t)
        if not s:
            return "-"
        return f"exit {e.group(1)}, {int(e.group(2)) - int(s.group(1))} s" if e else "did not finish"
    except OSError:
        return "no log"
xz = open(f"{work}/xz.txt").read()
m = re.search(r"xz_bytes (\d+) raw_bytes (\d+)", xz)
xz_bpb = 8 * int(m.group(1)) / int(m.group(2)) if m else math.nan
rows = [
    ("vim-tiny-fashion", "test/acc", ">= 0.92", lambda v: v >= 0.92),
    ("aum-digits", "test/acc", ">= 0.95 (unseen voices)", lambda v: v >= 0.95),
    ("mambabyte-stdlib", "test/bpb", f"< xz -9: {xz_bpb:.4f} bpb", lambda v: v < xz_bpb),
    ("selective-copy-mamba", "test_L256/acc", ">= 0.97", lambda v: v >= 0.97),
    ("selective-copy-s4d", "test_L256/acc", "far below Mamba", lambda v: v < 0.5),
    ("induction-heads-mamba", "test_L256/acc", "(train length)", lambda v: v > 0.99),
    ("induction-heads-mamba", "test_L4096/acc", "> 0.99", lambda v: v > 0.99),
    ("induction-heads-mamba", "test_L16384/acc", "> 0.99", lambda v: v > 0.99),
    ("induction-heads-fp32", "test_L4096/acc", "> 0.99 (same checkpoint, fp32 test)", lambda v: v > 0.99),
    ("induction-heads-fp32", "test_L16384/acc", "> 0.99 (same checkpoint, fp32 test)", lambda v: v > 0.99),
]
print("| run | metric | value | target | pass | process |\n|---|---|---|---|---|---|")
for name, key, target, ok in rows:
    if not glob.glob(f"{work}/runs/{name}"):
        continue
    v = last(name, key)
    print(f"| {name} | {key} | {v:.4f} | {target} | {'yes' if v == v and ok(v) else 'NO'} | {secs(name)} |")
print(f"\n{xz.strip()}\ndevice: {open(work + '/device.txt').read().strip() if glob.glob(work + '/device.txt') else '?'}")
PY
    if [ -f "$WORK/mqar-sweep.log" ]; then
        { echo; echo "MQAR accuracy vs attention ratio (scripts/sweep_mqar.py):"; cat "$WORK/runs/mqar-sweep/table.md" 2>/dev/null || tail -5 "$WORK/mqar-sweep.log"; } >> "$OUT/summary.md"
    fi
    echo; echo "===== acceptance summary ($OUT/summary.md) ====="; cat "$OUT/summary.md"
}

case "$MODE" in
    launch) launch ;;
    wait) setup > /dev/null; wait_runs; fp32_eval; summarize ;;
    all) launch; wait_runs; fp32_eval; summarize ;;
    *) echo "usage: $0 [all|launch|wait]"; exit 2 ;;
esac
