#!/bin/bash
renice -n -10 $$ >/dev/null; echo $$ > /sys/fs/cgroup/cpu/bench/cgroup.procs
cd /work/benchwt
export PYTHONPATH=/work/benchwt OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
W="--model small --brands 12 --logo-scale 3 --label-scale 2"
python benchmarks/entity_ceiling.py --out /work/runs/calD-season --prepared /work/runs/calD --threads 1 --entities season --steps 1000 $W > /work/runs/calD-season.ceiling.log 2>&1
echo "$(date +%T) season-only ceiling" >> /work/runs/calD-3b.progress
bash /work/runs/runs.sh /work/runs/calD-3b /work/runs/calD "clip-ft-tags:1 e2-gated:1 clip-ft-tags:2" $W
