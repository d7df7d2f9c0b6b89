#!/usr/bin/env bash
# Where the warps of the seed-shape decode kernels stall, instruction by instruction (Nsight
# Compute source page, SASS with CUDA lines). Run on the device machine after a build in
# build-dev: scripts/device_ncu_source.sh [S]. Writes ncu_source_<fused>.csv.gz and prints the
# stall summary. NCU_FUSED="on off" (default) picks the decode paths profiled.
set -uo pipefail
OUT=${OUT:-$PWD/device-out}
S=${1:-1024}
mkdir -p "$OUT"
for fused in ${NCU_FUSED:-on off}; do
  rep=/tmp/seed_$fused
  NSA_CUDA_FUSED_DECODE=$fused ncu --clock-control none --set full --import-source yes \
    --kernel-name regex:'nsa_' --launch-skip 60 --launch-count 8 -f -o $rep \
    ./build-dev/nsa bench decode --heads 4 --groups 2 --dk 64 --dv 64 --S_list "$S" --iters 16 \
    --warmup 4 --device cuda > /tmp/ncu_run_$fused.log 2>&1 || tail -20 /tmp/ncu_run_$fused.log
  ncu --import $rep.ncu-rep --page source --print-source cuda,sass --csv > /tmp/src_$fused.csv 2>&1 ||
    ncu --import $rep.ncu-rep --page source --csv > /tmp/src_$fused.csv 2>&1
  gzip -c /tmp/src_$fused.csv > "$OUT/ncu_source_$fused.csv.gz"
  echo "== fused=$fused: stall samples per kernel and per source line (scripts/ncu_stalls.py)"
  python3 scripts/ncu_stalls.py /tmp/src_$fused.csv "" 30
done
