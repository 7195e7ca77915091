cd /work/benchwt
for s in $@; do
  python benchmarks/composed_retrieval.py --family open_clip --model small --image-size 64 --data /work/runs/down-calE/cir-data-$s     --build-from /work/runs/calE/data/fashionsynth_validation.h5 --train-h5 /work/runs/calE/data/fashionsynth_train.h5     --encoder CLIP-FT=/work/runs/calE/clip-ft-b64-s$s/best --encoder E2=/work/runs/calE/e2-b64-s$s/best     --mapper-steps 300 --json /work/runs/down-calE/cir-s$s.json > /work/runs/down-calE/cir-s$s.log 2>&1
  echo "$(date +%T) cir:$s rc=$?" >> /work/runs/down-calE/progress
done
