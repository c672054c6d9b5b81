#!/usr/bin/env bash
# One prepared GPU check (about 12-17 minutes on one H200 in all): trainer=gpu with bf16, DDP over
# NCCL with one process, and the benchmarks on the GPU. Prints one JSON object per line and
# writes them to ${OUT:-.}/gpu_check.jsonl. Never a test dependency (CI has no GPU).
#
# Usage: bash benchmarks/gpu_check.sh [CHECK ...]   (default: every check of CHECKS, in order).
# All of them run past the device tool's 600 s per command, so a session splits them over two
# calls, e.g. `... gpu_check.sh train_gpu train_ddp throughput_resnet20 throughput_resnet50
# gfnet_stage1` and `... gpu_check.sh spos_supernet fbnetv2_supernet compare_fashion_gpu` (each
# call writes its own gpu_check.jsonl).
#
# On this project's device machine python3 has torch, Lightning, timm and torchmetrics but not
# Hydra: carry its wheels in .whl/ (benchmarks/README.md says how); the package runs from src/.
set -uo pipefail
cd "$(dirname "$0")/.."
CHECKS="train_gpu train_ddp throughput_resnet20 throughput_resnet50 gfnet_stage1"
CHECKS+=" spos_supernet fbnetv2_supernet compare_fashion_gpu"
selected=" ${*:-$CHECKS} "
for name in $selected; do
    if [[ " $CHECKS " != *" $name "* ]]; then
        echo "gpu_check.sh: unknown check '$name'; choose from: $CHECKS" >&2
        exit 2
    fi
done
wanted() { [[ "$selected" == *" $1 "* ]]; }
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

# 1. The embedded default on one GPU in bf16, and 2. the same through DDP/NCCL with one process.
for trainer in gpu "ddp trainer.devices=1"; do
    wanted "train_${trainer%% *}" || continue
    dir=$OUT/runs/${trainer%% *}
    start=$SECONDS
    if timeout 150 $PY -m dynlab.apps.train trainer=$trainer logger=csv \
        trainer.enable_progress_bar=false hydra.run.dir="$dir" > "$dir.log" 2>&1; then
        status=ok
    else
        status="failed (see ${dir}.log)"; tail -20 "$dir.log" >&2
    fi
    secs=$((SECONDS - start))
    top1=$($PY -c "import json,sys;print(json.load(open(sys.argv[1]))['metrics'].get('test/top1'))" \
        "$dir/results.json" 2>/dev/null || echo null)
    emit "{\"check\": \"dynlab-train trainer=$trainer\", \"status\": \"$status\", \"seconds\": $secs, \"test_top1\": $top1}"
done

# 3. Lightning path vs plain loop on the GPU, where per-step overhead shows.
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
bench throughput_resnet20 throughput.py --batch-size 256 --steps 80 --num-workers 4
bench throughput_resnet50 throughput.py --backbone timm --backbone-name resnet50 --image-size 224 \
    --batch-size 128 --steps 40 --num-workers 8

# 4. One stage-1 epoch of GFNet (ResNet-50 encoders, P = 96) on 4,000 generated ImageNet-format
# images, bf16: img/s and peak memory (issue 9; figures go to experiments/gfnet/README.md).
bench gfnet_stage1 gfnet_stage1.py --batch-size 64 --per-class 4 --num-workers 8

# 5. SPOS (issue 11): supernet step vs the same path standalone on the ImageNet space at 224, batch
# 256, bf16 (target <= 1.15x), and the supernet's img/s with a new uniform path every step, with
# peak memory (figures go to benchmarks/README.md). About 1-3 minutes.
bench spos_supernet spos_supernet.py --device cuda --steps 10 --repeats 2

# 6. FBNetV2 (issue 12): the DMaskingNAS supernet step and search step vs the widest standalone net,
# time and peak memory, F space at 224, batch 128, bf16 (target <= 1.3x). About 1-2 minutes.
bench fbnetv2_supernet fbnetv2_supernet.py --device cuda --steps 10 --repeats 2

# 7. A few steps of the GPU comparison preset (experiments/compare/fashion_mnist_gpu.yaml): the
# static ResNet-20 and the SPOS entry, then S2DNAS from that ResNet-20 (the two stages), on the
# real Fashion-MNIST files where the machine has them, else on generated files of that layout.
# It checks that the preset runs on a GPU, not its accuracy. About 2-4 minutes.
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
