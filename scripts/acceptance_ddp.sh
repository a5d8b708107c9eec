#!/usr/bin/env bash
# The two-GPU acceptance runs of issue 6 (nvidia-h200-x2), one after the other:
#   1. vim-tiny-fashion on 1 GPU (batch 512) and with DDP on 2 GPUs, EPOCHS epochs each: 2 x 256 (the same global
#      batch, so the same curve per step) and 2 x 512 (weak scaling, lr x 2: the same curve per epoch); compare
#      throughput (train/samples_s) and curves.
#   2. jamba-tiny trained under FSDP on 2 GPUs (bf16-mixed), STEPS steps.
# Needs the carried .whl/ (jsonargparse) and .acc/fashion-mnist as acceptance_gpu.sh does.
# Results: $OUT/{vim-1gpu,vim-ddp,jamba-fsdp}.log, $OUT/runs.tar.gz, $OUT/summary.md (printed last).
#   EPOCHS=6 STEPS=300 scripts/acceptance_ddp.sh      (about 8 minutes in all)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/acceptance-out}
WORK=${ACC_WORK:-/tmp/mambazoo-acceptance-ddp}
EPOCHS=${EPOCHS:-6}
STEPS=${STEPS:-300}
mkdir -p "$OUT" "$WORK"
# mambazoo installs from this checkout (its folders map into the mambazoo namespace; PYTHONPATH=. no longer does)
python3 -m pip install -q --no-deps --no-build-isolation --no-index . || { echo "cannot install mambazoo from $PWD"; exit 1; }
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
if ! python3 -c "import jsonargparse" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "cannot install .whl/*.whl (carry .whl)"; exit 1; }
    export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
FM=/usr/share/datasets/fashion-mnist
[ -f "$FM/train-images-idx3-ubyte.gz" ] || FM=$PWD/.acc/fashion-mnist
rm -rf "$WORK/runs" "$WORK"/*.log

run() {  # name, args...
    local name=$1; shift
    echo "== $name: mambazoo fit $*" | tee "$WORK/$name.log"
    local t0=$(date +%s)
    python3 -m mambazoo.cli fit --run_dir "$WORK/runs/$name" --trainer.enable_progress_bar false "$@" >> "$WORK/$name.log" 2>&1
    echo "exit $? seconds $(( $(date +%s) - t0 ))" | tee -a "$WORK/$name.log"
    cp "$WORK/$name.log" "$OUT/"
}

# COMPILE: the task's compile option (reduce-overhead: CUDA graphs; eager, this small model's step is bound by
# the host: 63 ms per step for 10.8 ms of GPU work at batch 256 on an H100); WORKERS: loader processes per GPU
# (default: the config's); PROFILE=1: Lightning's simple profiler (time per hook, printed at the end of each log);
# EXTRA: more arguments for the vim runs, after their own (so they override them), split at spaces
# (e.g. EXTRA="--trainer.strategy.init_args.static_graph false").
VIM=(--config vim-tiny-fashion --data.init_args.root "$FM" --trainer.max_epochs "$EPOCHS" --trainer.max_time null
     --model.init_args.warmup_steps 200 --model.init_args.compile "${COMPILE:-false}")
[ -n "${WORKERS:-}" ] && VIM+=(--data.init_args.num_workers "$WORKERS")
[ -n "${PROFILE:-}" ] && VIM+=(--trainer.profiler simple)
POST=(${EXTRA:-})
RUNS=${ONLY:-"vim-1gpu vim-ddp vim-ddp-b512 jamba-fsdp"}
for name in $RUNS; do
    case $name in
        vim-1gpu) run vim-1gpu "${VIM[@]}" --trainer.devices 1 --data.init_args.batch_size 512 ${POST[@]+"${POST[@]}"} ;;
        # the same global batch (same curve per step). DDP with static_graph (this model uses every parameter in every
        # step) and gradient_as_bucket_view (no per-parameter copy into DDP's buckets: 143 device copies a step): 44-49k
        # samples/s against 35k with plain `ddp` (2 x H200, session 5; the step is bound by the host on each rank)
        vim-ddp) run vim-ddp "${VIM[@]}" --trainer.devices 2 --trainer.strategy DDPStrategy \
            --trainer.strategy.init_args.static_graph true --trainer.strategy.init_args.gradient_as_bucket_view true \
            --data.init_args.batch_size 256 ${POST[@]+"${POST[@]}"} ;;
        # the same per-GPU batch (weak scaling: twice the samples per step), the learning rate doubled with the batch
        # (linear rule) and the warmup halved in steps (the same samples): the one-GPU curve per epoch at 63.8k samples/s
        # against 32.6k (1.96x; 2 x H200, session 6, COMPILE=reduce-overhead)
        vim-ddp-b512) run vim-ddp-b512 "${VIM[@]}" --trainer.devices 2 --trainer.strategy DDPStrategy \
            --trainer.strategy.init_args.static_graph true --trainer.strategy.init_args.gradient_as_bucket_view true \
            --data.init_args.batch_size 512 --model.init_args.lr 0.004 --model.init_args.warmup_steps 100 \
            ${POST[@]+"${POST[@]}"} ;;
        jamba-fsdp) run jamba-fsdp --config jamba-tiny --trainer.accelerator gpu --trainer.devices 2 --trainer.strategy fsdp \
            --trainer.precision bf16-mixed --trainer.max_steps "$STEPS" --trainer.val_check_interval 100 \
            --data.init_args.batch_size 32 --data.init_args.seq_len 256 ;;
    esac
done

tar -czf "$OUT/runs.tar.gz" -C "$WORK" --exclude='*.ckpt' runs
python3 - "$WORK" > "$OUT/summary.md" <<'PY'
import csv, glob, math, re, statistics, sys
work = sys.argv[1]
def series(name, key):
    out = []
    for f in sorted(glob.glob(f"{work}/runs/{name}/logs/version_*/metrics.csv")):
        out += [(int(r["step"]), float(r[key])) for r in csv.DictReader(open(f)) if r.get(key)]
    return out
def seconds(name):
    m = re.search(r"exit (\d+) seconds (\d+)", open(f"{work}/{name}.log").read())
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)
print("| run | exit | wall s | median throughput | final val/acc | val/acc per validation |\n|---|---|---|---|---|---|")
for name, unit in (("vim-1gpu", "samples_s"), ("vim-ddp", "samples_s"), ("vim-ddp-b512", "samples_s"),
                   ("jamba-fsdp", "tok_s")):
    if not glob.glob(f"{work}/{name}.log"):
        continue
    code, secs = seconds(name)
    thr = [v for _, v in series(name, f"train/{unit}")]
    key = "val/acc" if name.startswith("vim") else "val/bpb"
    vals = series(name, key)
    print(f"| {name} | {code} | {secs} | {statistics.median(thr) if thr else math.nan:.0f} {unit.replace('_s', '/s')} | "
          f"{vals[-1][1] if vals else math.nan:.4f} ({key}) | {' '.join(f'{v:.3f}' for _, v in vals)} |")
PY
echo; echo "===== DDP / FSDP summary ($OUT/summary.md) ====="; cat "$OUT/summary.md"
