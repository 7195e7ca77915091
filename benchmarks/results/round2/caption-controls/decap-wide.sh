#!/bin/bash
# DeCap wider and deeper than --quick (4 layers, 4 heads, width 256 instead of 2 / 2 / 64; the rest as
# --quick) on the same encoders: is the quick decoder what holds both encoders at one BLEU@4?
# (captioning.py's full size, width 768 and 10 epochs, took over 14 minutes per decoder on one core: stopped.)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
R=${RUNS:-/work/runs}
# GAP=1: the "decap, gap removed" condition only (added after the first runs), into d1-decap-wide-gap-s*.json
conds=(decap "decap, own text"); tag=decap-wide
if [ "${GAP:-0}" = 1 ]; then conds=("decap, gap removed"); tag=decap-wide-gap; fi
for s in "$@"; do
  python benchmarks/caption_controls.py --family open_clip --model small --image-size 64 --quick \
      --set decap_layers=4 --set decap_heads=4 --set decap_width=256 \
      --conditions "${conds[@]}" \
      --train-h5 $R/calD-d1/data/fashionsynth_train.h5 --val-h5 $R/calD-d1/data/fashionsynth_validation.h5 \
      --encoder CLIP-FT=$R/calD-d1/clip-ft-b64-s$s/best --encoder E2=$R/calD-d1-e/e2-b64-s$s/best \
      --json $R/capctl/d1-$tag-s$s.json > $R/capctl/d1-$tag-s$s.log 2>&1
  echo "$(date +%T) $tag:$s rc=$?" >> $R/capctl/progress
done
