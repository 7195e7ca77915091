#!/bin/bash
# One world on one core: its data and base, then fine-tuning runs in the order given, into one --out
# (results.json gains a row as each run ends; rerunning the same command resumes a stopped run).
# usage: cpu_chain.sh NAME "VARIANT:SEED ..." WORLD-FLAGS...   (code from a frozen worktree: git worktree add /work/benchwt HEAD)
name=$1; runs=$2; shift 2
cd /work/benchwt
export PYTHONPATH=/work/benchwt OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p /work/runs
for r in $runs; do
  v=${r%%:*}; s=${r##*:}
  python benchmarks/fashionsynth.py --out /work/runs/$name --threads 1 --variants $v --seeds $s --steps 1000 "$@" >> /work/runs/$name.ft.log 2>&1
  rc=$?; echo "$(date +%T) $v:$s rc=$rc" >> /work/runs/$name.progress
done
echo done > /work/runs/$name.done
