#!/bin/bash
# Caption replay on calD data seed 1: CLIP-FT and faithful E2 fine-tuned 1,000 steps with 25% of the
# captions in the base's pre-training style ('{name}. {composition}'), seeds 0 and 1 (SEEDS="0 1"), then seed 2 in
# the next session (SEEDS=2), one core each,
# then their CIReVL / probe / retrieval readings with wise_ft.py (alpha 1: the fine-tuned model; 0.5:
# WiSE-FT on top). The runs without replay are runs/calD-d1 and runs/calD-d1-e (same world and base).
# The CIReVL set: e2-adapter cir build --catalogue $R/calD-d1/data/fashionsynth_validation.h5 --out $R/cir-d1 --per-attribute 200 --seed 0
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
R=${RUNS:-/work/runs}
W="--model small --brands 12 --logo-scale 3 --label-scale 2 --seed 1 --prepared $R/calD-d1"
chain() {  # OUT VARIANT
  for s in ${SEEDS:-0 1 2}; do
    python benchmarks/fashionsynth.py --out $R/$1 --threads 1 --variants $2 --seeds $s --steps 1000 $W >> $R/$1.ft.log 2>&1
  done
}
chain d1-replay-a clip-ft-replay &
chain d1-replay-b e2-replay &
wait
mkdir -p $R/wise
for s in ${SEEDS:-0 1 2}; do
  python benchmarks/wise_ft.py --family open_clip --model small --image-size 64 --base $R/calD-d1/base.pt \
      --train-h5 $R/calD-d1/data/fashionsynth_train.h5 --val-h5 $R/calD-d1/data/fashionsynth_validation.h5 \
      --cir $R/cir-d1 --encoder CLIP-FT-replay=$R/d1-replay-a/clip-ft-replay-b64-s$s/best \
      --encoder E2-replay=$R/d1-replay-b/e2-replay-b64-s$s/best \
      --alphas 0.5 1 --json $R/wise/d1-replay-s$s.json > $R/wise/d1-replay-s$s.log 2>&1 &
done
wait
