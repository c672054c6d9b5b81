#!/usr/bin/env bash
# One prepared GPU check, ordered by value and held to a time budget (GPU_CHECK_BUDGET seconds,
# default 480: a slot of about 8 minutes with time to spare). Each check has an estimate; one
# that would overrun the budget is not started but reported as skipped, so a short slot runs the
# most important checks and says which it left. Prints one JSON object per line and writes them to
# ${OUT:-.}/gpu_check.jsonl. Never a test dependency (CI has no GPU).
#
# Usage: bash benchmarks/gpu_check.sh [CHECK ...]   (default: every check of CHECKS, in order);
# a second call with the skipped names runs the rest.
#
# On this project's device machine python3 has torch, Lightning, timm and torchmetrics but not
# Hydra: carry its wheels in .whl/ (benchmarks/README.md says how); the package runs from src/.
set -uo pipefail
cd "$(dirname "$0")/.."
# By value: every paper preset's real steps (bf16 against fp32), the embedded default, the search
# supernets' overhead targets, GFNet's throughput, DDP over NCCL, then throughput and the chart.
CHECKS="preset_steps train_gpu spos_supernet fbnetv2_supernet gfnet_stage1 train_ddp"
CHECKS+=" throughput_resnet20 throughput_resnet50 compare_fashion_gpu"
declare -A ESTIMATE=([preset_steps]=300 [train_gpu]=60 [spos_supernet]=120 [fbnetv2_supernet]=90
    [gfnet_stage1]=120 [train_ddp]=60 [throughput_resnet20]=45 [throughput_resnet50]=60
    [compare_fashion_gpu]=200)
BUDGET=${GPU_CHECK_BUDGET:-480}
selected=" ${*:-$CHECKS} "
for name in $selected; do
    if [[ " $CHECKS " != *" $name "* ]]; then
        echo "gpu_check.sh: unknown check '$name'; choose from: $CHECKS" >&2
        exit 2
    fi
done
skipped=()
# Selected, and its estimate fits what is left of the budget (else it is reported as skipped).
wanted() {
    [[ "$selected" == *" $1 "* ]] || return 1
    if (( SECONDS + ${ESTIMATE[$1]} > BUDGET )); then
        skipped+=("$1"); return 1
    fi
}
OUT=${OUT:-.}
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} WANDB_MODE=offline DYNLAB_OUTPUTS=$OUT/runs
if [ -d .whl ]; then
    $PY -m pip install --quiet --no-index --no-build-isolation --find-links .whl hydra-core >/dev/null
fi
log=$OUT/gpu_check.jsonl
mkdir -p "$OUT/runs"
: > "$log"
emit() { echo "$1" | tee -a "$log"; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/# /'

# A few steps of every paper preset on generated data of its size, in its precision and, where
# that is bf16, in fp32 from the same seed, losses compared (benchmarks/preset_steps.py).
if wanted preset_steps; then
    log_file=$OUT/runs/preset_steps.log
    timeout $((ESTIMATE[preset_steps] + 60)) $PY benchmarks/preset_steps.py \
        --budget $((ESTIMATE[preset_steps] - 30)) 2> "$log_file" | tee -a "$log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || { emit '{"check": "preset_steps", "status": "failed (see runs/preset_steps.log)"}'; tail -20 "$log_file" >&2; }
fi

# The embedded default through dynlab-train on one GPU in bf16 (train_gpu), or through DDP over
# NCCL with one process (train_ddp).
train_check() {
    local name=$1 trainer=$2
    wanted "$name" || return 0
    local dir=$OUT/runs/$name start=$SECONDS status=ok
    if ! timeout 150 $PY -m dynlab.apps.train trainer=$trainer logger=csv \
        trainer.enable_progress_bar=false hydra.run.dir="$dir" > "$dir.log" 2>&1; then
        status="failed (see ${dir}.log)"; tail -20 "$dir.log" >&2
    fi
    local top1
    top1=$($PY -c "import json,sys;print(json.load(open(sys.argv[1]))['metrics'].get('test/top1'))" \
        "$dir/results.json" 2>/dev/null || echo null)
    emit "{\"check\": \"dynlab-train trainer=$trainer\", \"status\": \"$status\", \"seconds\": $((SECONDS - start)), \"test_top1\": $top1}"
}

# A benchmark script on the GPU; its last line is its JSON result.
bench() {
    local name=$1 script=$2; shift 2
    wanted "$name" || return 0
    if ! timeout 240 $PY "benchmarks/$script" --trainer gpu "$@" > "$OUT/runs/$name.log" 2>&1; then
        tail -20 "$OUT/runs/$name.log" >&2
        emit "{\"benchmark\": \"$name\", \"status\": \"failed (see runs/$name.log)\"}"
        return
    fi
    emit "$(tail -1 "$OUT/runs/$name.log")"
}

train_check train_gpu gpu

# SPOS: supernet step vs the same path standalone on the ImageNet space at 224, batch 256, bf16
# (target <= 1.15x), and the supernet's img/s with a new uniform path every step, with peak memory
# (figures go to benchmarks/README.md).
bench spos_supernet spos_supernet.py --device cuda --steps 10 --repeats 2

# FBNetV2: the DMaskingNAS supernet step and search step vs the widest standalone net, time and
# peak memory, F space at 224, batch 128, bf16 (target <= 1.3x).
bench fbnetv2_supernet fbnetv2_supernet.py --device cuda --steps 10 --repeats 2

# One stage-1 epoch of GFNet (ResNet-50 encoders, P = 96) on 4,000 generated ImageNet-format
# images: img/s and peak memory (figures go to experiments/gfnet/README.md).
bench gfnet_stage1 gfnet_stage1.py --batch-size 64 --per-class 4 --num-workers 8

train_check train_ddp "ddp trainer.devices=1"

# Lightning path vs plain loop on the GPU, where per-step overhead shows.
bench throughput_resnet20 throughput.py --batch-size 256 --steps 80 --num-workers 4
bench throughput_resnet50 throughput.py --backbone timm --backbone-name resnet50 --image-size 224 \
    --batch-size 128 --steps 40 --num-workers 8

# A few steps of the GPU comparison preset (experiments/compare/fashion_mnist_gpu.yaml): the
# static ResNet-20 and the SPOS entry, then S2DNAS from that ResNet-20 (the two stages), on the
# real Fashion-MNIST files where the machine has them, else on generated files of that layout.
# It checks that the preset runs on a GPU, not its accuracy.
if wanted compare_fashion_gpu; then
    data=/usr/share/datasets/fashion-mnist
    if [ ! -d "$data" ]; then
        data=$OUT/runs/fashion_mnist
        $PY -c "import sys; from dynlab.data.fake import write_fake_fashion_mnist as w; \
w(sys.argv[1], num_train=8000, num_test=2000)" "$data"
    fi
    sweep=$OUT/runs/compare_fashion_gpu
    start=$SECONDS
    status=ok
    for entries in baseline,spos_small s2dnas_from_static; do
        if ! timeout 300 $PY -m dynlab.apps.train -m +experiment=compare/fashion_mnist_gpu \
            +compare=$entries seed=0 dataset.root="$data" trainer.max_epochs=2 \
            +trainer.limit_train_batches=10 logger=csv trainer.enable_progress_bar=false \
            hydra.sweep.dir="$sweep" >> "$sweep.log" 2>&1; then
            status="failed (see runs/compare_fashion_gpu.log)"; tail -20 "$sweep.log" >&2
            break
        fi
    done
    emit "{\"check\": \"compare/fashion_mnist_gpu, 2 x 10 steps\", \"status\": \"$status\", \"seconds\": $((SECONDS - start)), \"data\": \"$data\"}"
fi

emit "{\"gpu_check\": \"done\", \"seconds\": $SECONDS, \"budget\": $BUDGET, \"skipped\": \"${skipped[*]}\"}"
