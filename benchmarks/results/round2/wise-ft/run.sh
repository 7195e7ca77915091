#!/bin/bash
# WiSE-FT sweeps on the calD data-seed-1 encoders (1,000 steps), one core; seeds as arguments.
# The set: e2-adapter cir build --catalogue $R/calD-d1/data/fashionsynth_validation.h5 --out $R/cir-d1 --per-attribute 200 --seed 0
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
R=${RUNS:-/work/runs}
mkdir -p $R/wise
for s in "$@"; do
  python benchmarks/wise_ft.py --family open_clip --model small --image-size 64 --base $R/calD-d1/base.pt \
      --train-h5 $R/calD-d1/data/fashionsynth_train.h5 --val-h5 $R/calD-d1/data/fashionsynth_validation.h5 \
      --cir $R/cir-d1 --encoder CLIP-FT=$R/calD-d1/clip-ft-b64-s$s/best --encoder E2=$R/calD-d1-e/e2-b64-s$s/best \
      --alphas 0 0.25 0.5 0.75 1 --json $R/wise/d1-s$s.json > $R/wise/d1-s$s.log 2>&1
  echo "$(date +%T) wise:$s rc=$?" >> $R/wise/progress
done
