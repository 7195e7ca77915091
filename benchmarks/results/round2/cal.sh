#!/bin/bash
# calibration: supervised ceilings (joint brand+season) then CLIP-FT seed 0, for one setting
renice -n -10 $$ >/dev/null; echo $$ > /sys/fs/cgroup/cpu/bench/cgroup.procs
name=$1; shift
cd /work/benchwt
export PYTHONPATH=/work/benchwt OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
python benchmarks/entity_ceiling.py --out /work/runs/$name --threads 1 --joint --entities brand season --steps 1000 "$@" > /work/runs/$name.ceiling.log 2>&1
python benchmarks/fashionsynth.py --out /work/runs/$name --threads 1 --variants clip-ft --seeds 0 --steps 1000 "$@" > /work/runs/$name.ft.log 2>&1
echo done > /work/runs/$name.done
