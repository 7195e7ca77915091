#!/bin/bash
# Caption controls on the calD data-seed-1 encoders (1,000 steps, seeds given as arguments), one core.
# usage: run.sh SEED...   (runs/calD-d1 holds the world and CLIP-FT, runs/calD-d1-e the E2 runs)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
R=${RUNS:-/work/runs}
for s in "$@"; do
  python benchmarks/caption_controls.py --family open_clip --model small --image-size 64 --quick \
      --train-h5 $R/calD-d1/data/fashionsynth_train.h5 --val-h5 $R/calD-d1/data/fashionsynth_validation.h5 \
      --encoder CLIP-FT=$R/calD-d1/clip-ft-b64-s$s/best --encoder E2=$R/calD-d1-e/e2-b64-s$s/best \
      --json $R/capctl/d1-s$s.json > $R/capctl/d1-s$s.log 2>&1
  echo "$(date +%T) capctl:$s rc=$?" >> $R/capctl/progress
done
# the text probe was added after these runs; it ran alone per seed (no decoders):
#   python benchmarks/caption_controls.py ... --conditions "text probe" --json $R/capctl/d1-textprobe-s$s.json
