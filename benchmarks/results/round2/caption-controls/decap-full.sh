#!/bin/bash
# DeCap at captioning.py's full size (4 layers, width 768, 10 epochs) instead of --quick, on the same
# encoders: is the quick decoder what holds both encoders at the same BLEU@4? One core; seeds as arguments.
# Stopped: the first decoder was still training after 14 minutes on one core (decap-wide.sh is the run measured).
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1
R=${RUNS:-/work/runs}
for s in "$@"; do
  python benchmarks/caption_controls.py --family open_clip --model small --image-size 64 \
      --conditions decap "decap, own text" \
      --train-h5 $R/calD-d1/data/fashionsynth_train.h5 --val-h5 $R/calD-d1/data/fashionsynth_validation.h5 \
      --encoder CLIP-FT=$R/calD-d1/clip-ft-b64-s$s/best --encoder E2=$R/calD-d1-e/e2-b64-s$s/best \
      --json $R/capctl/d1-decap-full-s$s.json > $R/capctl/d1-decap-full-s$s.log 2>&1
  echo "$(date +%T) decap-full:$s rc=$?" >> $R/capctl/progress
done
