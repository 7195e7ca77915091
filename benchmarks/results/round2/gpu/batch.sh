#!/bin/bash
# One device call: prepare the worlds (and smoke-test every variant meanwhile), then run the job list with N parallel workers until a deadline,
# syncing every finished result into $OUT as it lands (what ends unfinished is lost with the machine).
# usage: batch.sh JOBS WORKERS DEADLINE_S
#   JOBS lines: "world NAME SETTING-FLAGS..." | "run WORLD VARIANT SEED [EXTRA FLAGS]" | "ceiling WORLD [EXTRA FLAGS]"
#               | "cmd NAME COMMAND..." (its output in NAME.log; $root is the results folder)
set -u
jobs=$1; workers=$2; deadline=$3
start=$(date +%s)
root=/tmp/gpuruns; export root; mkdir -p $root
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
sync_out() {  # results only (no checkpoints, no data): one archive
  tar czf $OUT/results.tgz.part -C $root --exclude='*.pt' --exclude='*.h5' --exclude='*.safetensors' \
      --exclude='pretrain' . 2>/dev/null && mv $OUT/results.tgz.part $OUT/results.tgz
}
(while true; do sleep 20; sync_out; done) & syncer=$!
trap "kill $syncer 2>/dev/null; sync_out" EXIT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, open_clip, e2_adapter; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 1
declare -A flags
while read -r kind name rest; do
  [ "$kind" = world ] && flags[$name]="$rest"
done < $jobs
# 1. every world's data and base, in parallel
preps=()
for w in "${!flags[@]}"; do
  python3 benchmarks/fashionsynth.py --out $root/$w --prepare-only ${flags[$w]} > $root/prep-$w.log 2>&1 &
  preps+=($!)
done
# 2. meanwhile a smoke run of every variant in the list (4 steps, a tiny world): a variant that crashes
#    stops the call here instead of failing each of its jobs after the long preparation
tiny="--model small --products 64 --val-products 32 --pretrain-steps 4"
python3 benchmarks/fashionsynth.py --out $root/smoke --prepare-only $tiny > $root/smoke.log 2>&1 || { cat $root/smoke.log; exit 1; }
declare -A smokes
for v in $(awk '$1 == "run" {print $3}' $jobs | sort -u); do
  python3 benchmarks/fashionsynth.py --out $root/smoke/$v --prepared $root/smoke --variants $v --seeds 0 --steps 4 $tiny \
      > $root/smoke/$v.log 2>&1 &
  smokes[$v]=$!
done
for v in "${!smokes[@]}"; do
  wait ${smokes[$v]} || { echo "smoke run of $v failed:"; tail -5 $root/smoke/$v.log; kill "${preps[@]}" 2>/dev/null; exit 1; }
done
echo "smoke runs passed (${!smokes[*]}) after $(( $(date +%s) - start )) s"
wait "${preps[@]}"  # not the syncer
for w in "${!flags[@]}"; do
  tail -1 $root/prep-$w.log; [ -s $root/$w/base.pt ] || { cat $root/prep-$w.log; exit 1; }  # the EXIT trap syncs
done
echo "prepared after $(( $(date +%s) - start )) s"
# 3. the jobs, in file order, WORKERS at a time
n=0; : > $root/commands
while read -r kind w rest; do
  n=$((n + 1)); set -- $rest
  case $kind in
    run) v=$1; s=$2; shift 2
         echo "python3 benchmarks/fashionsynth.py --out $root/$w/r$n-$v-s$s --prepared $root/$w --variants $v --seeds $s --steps 1000 --threads 1 ${flags[$w]} $* > $root/$w/r$n-$v-s$s.log 2>&1; rc=\$?; echo \"\$(date +%T) done r$n $w $v $s rc=\$rc\"" >> $root/commands ;;
    ceiling) echo "python3 benchmarks/entity_ceiling.py --out $root/$w/c$n --prepared $root/$w --joint --entities brand season --steps 1000 --device auto --threads 1 ${flags[$w]} $* > $root/$w/c$n.log 2>&1; rc=\$?; echo \"\$(date +%T) done c$n $w ceiling rc=\$rc\"" >> $root/commands ;;
    cmd) echo "$rest > $root/$w.log 2>&1; rc=\$?; echo \"\$(date +%T) done $w rc=\$rc\"" >> $root/commands ;;
  esac
done < $jobs
left=$(( deadline - ($(date +%s) - start) ))
timeout $left xargs -P $workers -I{} -d '\n' bash -c {} < $root/commands
echo "stopped after $(( $(date +%s) - start )) s"
ls -la $OUT
