#!/usr/bin/env bash
# BENCHMARKS.md §4 in one call on a lent device (at most 10 minutes a command, 15 in all):
# the CUDA-only tests while the data set is generated, then the recipe as configured and again
# without CUDA graphs (each all or nothing, so first), then the grid (saved cell by cell, so a
# cut costs only its last cells), then, if time is left, the compiled recipe and three epochs
# under torchrun (one rank: NCCL, DDP and SyncBatchNorm on the device), then each model family's
# img/s and peak memory (benchmarks/families.py). Every step has its
# own time limit inside BUDGET seconds, so the script reaches its end and packs the logs into one
# file (give the device call a limit above BUDGET: $OUT brings back at most 8 files).
#   bash benchmarks/gpu_session.sh OUT_DIR [BUDGET_S] [extra gpu.py arguments, e.g. --dry-run]
set -u
out=${1:?usage: gpu_session.sh OUT_DIR [BUDGET_S] [gpu.py arguments]}
budget=${2:-560}
shift $(($# < 2 ? $# : 2))
py=${PYTHON:-python3}
n=17736
size=256
crop=128
for arg in "$@"; do [ "$arg" = --dry-run ] && n=300 size=64 crop=48; done
export PYTHONUNBUFFERED=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
left() { echo $((budget - SECONDS)); }
step() {  # step NAME SECONDS COMMAND...: the command under its own limit, logged
    local name=$1 limit=$2 room=$(($(left) - 5))
    shift 2
    [ "$limit" -gt "$room" ] && limit=$room
    if [ "$limit" -lt 10 ]; then
        echo "== $name: skipped, $(left) s left"
        return
    fi
    echo "== $name (limit ${limit} s, $(left) s left)"
    local start=$SECONDS
    timeout "$limit" "$@"
    echo "== $name: exit $?, $((SECONDS - start)) s"
}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    "$py" -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda)'
    "$py" -m galaxydist.synthetic "$work/raw.h5" --n "$n" --size "$size" --seed 0 --force >"$work/gen.log" 2>&1 &
    generator=$!
    step cuda_tests 150 "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py
    wait "$generator"
    echo "== generate: exit $?, done at ${SECONDS} s: $(tail -n 1 "$work/gen.log")"
    step recipe 150 "$py" benchmarks/gpu.py --skip-grid --raw "$work/raw.h5" --out "$out/recipe.json" "$@"
    step recipe_no_graphs 150 "$py" benchmarks/gpu.py --skip-grid --raw "$work/raw.h5" \
        --out "$out/recipe_no_graphs.json" --recipe-override speed.cuda_graphs=false "$@"
    step grid $(($(left) - 30)) "$py" benchmarks/gpu.py --skip-recipe --out "$out/grid.json" "$@"
    if [ "$(left)" -ge 150 ]; then
        step recipe_compiled $(($(left) - 20)) "$py" benchmarks/gpu.py --skip-grid --raw "$work/raw.h5" \
            --out "$out/recipe_compiled.json" --recipe-runs compiled "$@"
    else
        echo "== recipe_compiled: skipped, $(left) s left"
    fi
    if [ "$(left)" -ge 60 ]; then
        step torchrun_one_rank $(($(left) - 15)) bash -c '"$0" -m galaxydist.prepare "$1/raw.h5" "$1/p.h5" \
            --crop "$2" --force && "$0" -m torch.distributed.run --standalone --nproc_per_node=1 \
            -m galaxydist.train --config configs/galaxy10.yaml data.path="$1/p.h5" output_dir="$1/ddp" \
            tracking.wandb=disabled stages.0.max_epochs=2 stages.1.max_epochs=1' \
            "$py" "$work" "$crop"
    else
        echo "== torchrun_one_rank: skipped, $(left) s left"
    fi
    # each model family at 128² (those whose library the image lacks are listed as skipped)
    step families $(($(left) - 10)) "$py" benchmarks/families.py --device cuda --size 128 --batch 256 \
        --steps 10 --out "$out/families.json"
} 2>&1 | tee "$out/session.log"
(cd "$out" && tar czf logs.tgz --remove-files ./*_logs 2>/dev/null)
ls -la "$out"
