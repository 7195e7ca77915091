#!/bin/bash
# one world: supervised ceiling (joint brand+season), then fine-tuning runs in the order given
# usage: chain.sh NAME "VARIANT:SEED ..." WORLD-FLAGS...
renice -n -10 $$ >/dev/null; echo $$ > /sys/fs/cgroup/cpu/bench/cgroup.procs
name=$1; runs=$2; shift 2
cd /work/benchwt
export PYTHONPATH=/work/benchwt OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
if [ ! -s /work/runs/$name/ceiling.jsonl ]; then
  python benchmarks/entity_ceiling.py --out /work/runs/$name --threads 1 --joint --entities brand season --steps 1000 "$@" > /work/runs/$name.ceiling.log 2>&1
fi
for r in $runs; do
  v=${r%%:*}; s=${r##*:}
  python benchmarks/fashionsynth.py --out /work/runs/$name --threads 1 --variants $v --seeds $s --steps 1000 "$@" >> /work/runs/$name.ft.log 2>&1
  echo "$(date +%T) $v:$s" >> /work/runs/$name.progress
done
echo done > /work/runs/$name.done
