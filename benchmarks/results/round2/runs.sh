#!/bin/bash
# fine-tuning runs on an already prepared world: runs.sh OUT PREPARED "VARIANT:SEED ..." WORLD-FLAGS...
renice -n -10 $$ >/dev/null; echo $$ > /sys/fs/cgroup/cpu/bench/cgroup.procs
out=$1; prepared=$2; runs=$3; shift 3
cd /work/benchwt
export PYTHONPATH=/work/benchwt OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
for r in $runs; do
  v=${r%%:*}; s=${r##*:}
  python benchmarks/fashionsynth.py --out $out --prepared $prepared --threads 1 --variants $v --seeds $s --steps 1000 "$@" >> $out.ft.log 2>&1
  echo "$(date +%T) $v:$s" >> $out.progress
done
echo done > $out.done
