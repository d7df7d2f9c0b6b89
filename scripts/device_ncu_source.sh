#!/usr/bin/env bash
# Where the warps of the seed-shape decode kernels stall, instruction by instruction (Nsight
# Compute source page, SASS with CUDA lines). Run on the device machine after a build in
# build-dev: scripts/device_ncu_source.sh [S]. Writes ncu_source_<path>.csv.gz and prints the
# stall summary. NCU_PATHS (default "short step") picks the decode paths profiled: short (the
# short-context kernel), step (the step kernels), fused (the fused kernel). NCU_REPLAY=application
# replays the whole program per pass instead of the kernel, so every profiled launch sees the
# caches as the program left them (the instruction caches included); the caches are never
# flushed here (--cache-control none).
set -uo pipefail
OUT=${OUT:-$PWD/device-out}
S=${1:-1024}
mkdir -p "$OUT"
for path in ${NCU_PATHS:-short step}; do
  case "$path" in
  short) knobs=(NSA_CUDA_SHORT_DECODE=on) ;;
  step) knobs=(NSA_CUDA_SHORT_DECODE=off) ;;
  fused) knobs=(NSA_CUDA_FUSED_DECODE=on) ;;
  *)
    echo "unknown path '$path'; allowed: short, step, fused" >&2
    exit 2
    ;;
  esac
  rep=/tmp/seed_$path
  env "${knobs[@]}" ncu --clock-control none --cache-control none \
    --replay-mode "${NCU_REPLAY:-kernel}" --set full --import-source yes \
    --kernel-name regex:'nsa_' --launch-skip 60 --launch-count 8 -f -o $rep \
    ./build-dev/nsa bench decode --heads 4 --groups 2 --dk 64 --dv 64 --S_list "$S" --iters 16 \
    --warmup 4 --device cuda > /tmp/ncu_run_$path.log 2>&1 || tail -20 /tmp/ncu_run_$path.log
  ncu --import $rep.ncu-rep --page details --csv 2>/dev/null |
    grep -E '"(Duration|Registers Per Thread|Achieved Occupancy|Warp Cycles Per Issued Instruction|Executed Ipc Active)"' |
    awk -F'","' '{print substr($5, 1, 40) ": " $(NF-2) " = " $NF}' | sort | uniq -c | head -40
  ncu --import $rep.ncu-rep --page source --print-source cuda,sass --csv > /tmp/src_$path.csv 2>&1 ||
    ncu --import $rep.ncu-rep --page source --csv > /tmp/src_$path.csv 2>&1
  gzip -c /tmp/src_$path.csv > "$OUT/ncu_source_$path.csv.gz"
  echo "== path=$path: stall samples per kernel and per source line (scripts/ncu_stalls.py)"
  python3 scripts/ncu_stalls.py /tmp/src_$path.csv "" 30
done
