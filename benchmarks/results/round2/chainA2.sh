#!/bin/bash
while kill -0 $1 2>/dev/null; do sleep 20; done
echo "$(date +%T) e2-without-brand:0" >> /work/runs/calD-5a.progress
bash /work/runs/runs.sh /work/runs/calD-5a /work/runs/calD "e2-paper-weights:2 e2-lean:1" --model small --brands 12 --logo-scale 3 --label-scale 2
