#!/usr/bin/env bash
# The device check of issue 15, for one GPU, at most 8 minutes (each step has its own time limit,
# 480 s in all). It prints, and writes into gpu_check.md (to paste into docs/performance.md):
#   1. perf train: the fast path next to the textbook loop, PreAct ResNet-18, PGD-10 AT, batch 128
#   2. perf train: the same for WRN-34-10
#   3. perf eval: AutoAttack standard on 1,000 CIFAR-shaped inputs, PreAct ResNet-18 trained one
#      epoch of PGD-AT (on random data nearly every sample stays robust: the slowest case)
#   4. perf eval --against fp32: every registered attack on 100 of those inputs, the fast path
#      (TF32, channels_last, cudnn.benchmark) against the fp32 reference path: seconds and the
#      per-sample agreement of the verdicts (budgets cut where marked, to fit the time)
# Usage: scripts/gpu_check.sh   (or make gpu-check; PY, OUT, DATA_DIR may be set)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-gpu_check.md}
WORK=$(mktemp -d -t atbench-gpu-check.XXXX)  # the check's store and checkpoints, not the user's
DATA=${DATA_DIR:+--data-dir $DATA_DIR}
STORE="--db $WORK/results.db --checkpoints $WORK/checkpoints"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: no usable CUDA device (this check needs one GPU; see docs/performance.md)" >&2
  exit 2
fi

{
  echo "## GPU check ($(date -u +%Y-%m-%d), scripts/gpu_check.sh at $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
  echo
  echo "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader -i 0 2>/dev/null || echo '?')"
  echo "- $("$PY" -c "import torch, platform; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, Python {platform.python_version()}')")"
  echo
} > "$OUT"

step() {  # step SECONDS TITLE COMMAND...: run it with a time limit, show and record its output
  local limit=$1 title=$2
  shift 2
  echo "### $title" | tee -a "$OUT"
  echo '```' >> "$OUT"
  echo "\$ bench ${*:3}" >> "$OUT"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v "^\s*$" | tee -a "$OUT"
  local rc=${PIPESTATUS[0]}
  echo "(exit $rc after $((SECONDS - start)) s$([ "$rc" = 124 ] && echo ", stopped at its $limit s limit"))" | tee -a "$OUT"
  echo '```' >> "$OUT"
  echo >> "$OUT"
}

step 90 "perf train: PreAct ResNet-18, PGD-10 AT, batch 128" \
  "$PY" -m bench perf train --model preact_resnet18 --batch-size 128 --steps 20 --rounds 3 --warmup 5 $DATA
step 100 "perf train: WRN-34-10, PGD-10 AT, batch 128" \
  "$PY" -m bench perf train --model wrn --model-param depth=34 --model-param width=10 --batch-size 128 \
  --steps 8 --rounds 2 --warmup 3 $DATA
step 170 "perf eval: AutoAttack standard, 1,000 CIFAR-shaped inputs, PreAct ResNet-18 after one epoch" \
  "$PY" -m bench perf eval --model preact_resnet18 --shape 3x32x32 --train-epochs 1 --n-samples 1000 \
  --attack autoattack --against none --repeats 1 $STORE $DATA
step 120 "perf eval --against fp32: every attack, 100 inputs, fast path vs fp32 reference" \
  "$PY" -m bench perf eval --model preact_resnet18 --shape 3x32x32 --train-epochs 1 --n-samples 100 \
  --against fp32 --repeats 1 $STORE $DATA \
  --attack fgsm --attack pgd20=pgd:steps=20 --attack pgd10_r3=pgd:steps=10,restarts=3 --attack mim \
  --attack cw_linf --attack apgd_ce --attack apgd_dlr --attack apgd_t --attack fab50=fab:steps=50 \
  --attack fab50_t=fab:steps=50,targeted=true --attack deepfool \
  --attack 'cw_l2_cut=cw_l2:norm="L2",eps=0.5,binary_steps=3,steps=100' \
  --attack mt50=multi_targeted:steps=50 --attack square1k=square:queries=1000 \
  --attack rays2k=rays:queries=2000,early_stop=true --attack transfer --attack noise \
  --attack aa_sq1k=autoattack:square_queries=1000

rm -rf "$WORK"
echo "figures written to $OUT: paste them into docs/performance.md in place of its 'Not yet measured on a GPU' section"
