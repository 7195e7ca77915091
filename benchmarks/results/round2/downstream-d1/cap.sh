cd /work/benchwt
for s in $@; do
  python benchmarks/captioning.py --family open_clip --model small --image-size 64 --quick --seeds $s     --encoder CLIP-FT=/work/runs/calD-d1/clip-ft-b64-s$s/best --encoder E2=/work/runs/calD-d1/e2-b64-s$s/best     --train-h5 /work/runs/calD-d1/data/fashionsynth_train.h5 --val-h5 /work/runs/calD-d1/data/fashionsynth_validation.h5 --out /work/runs/down-d1/cap-s$s.json > /work/runs/down-d1/cap-s$s.log 2>&1
  echo "$(date +%T) cap:$s rc=$?" >> /work/runs/down-d1/progress
done
