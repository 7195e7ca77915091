#!/bin/bash
# The composed-retrieval controls (README: "Why CIReVL goes the wrong way"), one thread, from the repo root.
# R: the runs folder (calD-d1 encoders and base, d1-abl / d1-lean / d1-abl2 ablations, down-d1 / down-calE sets).
R=${R:-runs}; M="--family open_clip --model small --image-size 64"
D1="--catalogue $R/calD-d1/data/fashionsynth_validation.h5"
for s in 0 1 2; do  # CLIP-FT and faithful, CIReVL and Pic2Word queries -> d1-s$s.json
  python benchmarks/cir_controls.py $M --data $R/down-d1/cir-data-$s $D1 --train-h5 $R/calD-d1/data/fashionsynth_train.h5 \
    --encoder CLIP-FT=$R/calD-d1/clip-ft-b64-s$s/best --encoder E2=$R/calD-d1/e2-b64-s$s/best --json d1-s$s.json
done
for s in 0 1; do    # every E2 variant, text queries only -> d1-variants-s$s.json, d1-noregion-s$s.json, d1-nofusion-s$s.json
  python benchmarks/cir_controls.py $M --data $R/down-d1/cir-data-$s $D1 \
    --encoder CLIP-FT=$R/calD-d1/clip-ft-b64-s$s/best --encoder E2=$R/calD-d1/e2-b64-s$s/best \
    --encoder lean=$R/d1-lean/e2-lean-b64-s$s/best --encoder region-1=$R/d1-abl/e2-region-1-b64-s$s/best \
    --encoder no-season=$R/d1-abl/e2-without-season-b64-s$s/best --encoder no-composition=$R/d1-abl/e2-without-composition-b64-s$s/best \
    --encoder no-subcategory=$R/d1-abl/e2-without-subcategory-b64-s$s/best --json d1-variants-s$s.json
  python benchmarks/cir_controls.py $M --data $R/down-d1/cir-data-$s $D1 \
    --encoder no-region-loss=$R/d1-abl2/e2-no-region-loss-b64-s$s/best --json d1-noregion-s$s.json
  python benchmarks/cir_controls.py $M --data $R/down-d1/cir-data-$s $D1 \
    --encoder no-fusion=$R/d1-abl2/e2-no-fusion-b64-s$s/best --json d1-nofusion-s$s.json
done
# the pre-trained base (the three seeds' sets are the same set)
python benchmarks/cir_controls.py $M --data $R/down-d1/cir-data-0 $D1 --encoder base=$R/calD-d1/base.pt \
  --encoder CLIP-FT=$R/calD-d1/clip-ft-b64-s0/best --encoder E2=$R/calD-d1/e2-b64-s0/best --json d1-base-s0.json
for s in 0 1 2; do  # calE (24 brands)
  python benchmarks/cir_controls.py $M --data $R/down-calE/cir-data-$s --catalogue $R/calE/data/fashionsynth_validation.h5 \
    --train-h5 $R/calE/data/fashionsynth_train.h5 --encoder CLIP-FT=$R/calE/clip-ft-b64-s$s/best \
    --encoder E2=$R/calE/e2-b64-s$s/best --json calE-s$s.json
done
python benchmarks/cir_controls.py --aggregate d1-s0.json d1-s1.json d1-s2.json
