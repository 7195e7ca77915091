cd /work/benchwt
for s in $@; do
  python benchmarks/captioning.py --family open_clip --model small --image-size 64 --quick --seeds $s     --encoder CLIP-FT=/work/runs/calE/clip-ft-b64-s$s/best --encoder E2=/work/runs/calE/e2-b64-s$s/best     --train-h5 /work/runs/calE/data/fashionsynth_train.h5 --val-h5 /work/runs/calE/data/fashionsynth_validation.h5 --out /work/runs/down-calE/cap-s$s.json > /work/runs/down-calE/cap-s$s.log 2>&1
  echo "$(date +%T) cap:$s rc=$?" >> /work/runs/down-calE/progress
done
