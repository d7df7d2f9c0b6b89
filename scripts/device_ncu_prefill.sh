#!/usr/bin/env bash
# Where the warps of the tiled prefill's kernels stall, instruction by instruction (Nsight
# Compute source page, SASS with CUDA lines), paper shapes, bf16. Run on the device machine after
# a build in build-dev: scripts/device_ncu_prefill.sh [T]. Profiles the second launch (rows
# 8192 ..) of each of the compressed kernel (nsa_prefill_cmp), the window kernel
# (nsa_prefill_win) and the selected pass (nsa_attn_tc); writes ncu_prefill.csv.gz (the source
# page) and ncu_prefill_details.txt (the per-kernel metrics) and prints the stall summary per
# kernel.
set -uo pipefail
OUT=${OUT:-$PWD/device-out}
T=${1:-16384}
mkdir -p "$OUT"
rep=/tmp/prefill_src
ncu --clock-control none --set full --import-source yes \
  --kernel-name regex:'nsa_prefill_cmp|nsa_prefill_win|nsa_attn_tc' --launch-skip 3 --launch-count 3 -f -o $rep \
  ./build-dev/nsa bench prefill --B 1 --dim 2560 --heads 64 --groups 4 --dk 192 --dv 128 \
  --S_list "$T" --iters 1 --warmup 0 --device cuda --dtype bf16 > /tmp/ncu_prefill_run.log 2>&1 ||
  tail -20 /tmp/ncu_prefill_run.log
ncu --import $rep.ncu-rep --page details > "$OUT/ncu_prefill_details.txt" 2>&1
grep -E "nsa_|Duration|Registers Per|Achieved Occupancy|Compute \(SM\) Throughput|Memory Throughput|Issue Slots Busy|L2 Hit|Executed Ipc A" \
  "$OUT/ncu_prefill_details.txt" | head -60
ncu --import $rep.ncu-rep --page source --print-source cuda,sass --csv > /tmp/src_prefill.csv 2>&1 ||
  ncu --import $rep.ncu-rep --page source --csv > /tmp/src_prefill.csv 2>&1
gzip -c /tmp/src_prefill.csv > "$OUT/ncu_prefill.csv.gz"
for k in nsa_prefill_cmp nsa_prefill_win nsa_attn_tc; do
  echo "== $k: stall samples per source line (scripts/ncu_stalls.py)"
  python3 scripts/ncu_stalls.py /tmp/src_prefill.csv "$k" 25
done
