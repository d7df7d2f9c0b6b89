#!/usr/bin/env bash
# Per-kernel GPU times of decode steps (Nsight Compute, clocks left alone), for finding where a
# step's time goes. Usage on the device machine: scripts/device_profile.sh [bench decode flags...]
set -uo pipefail
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
[ -x build-dev/nsa ] || { cmake -S . -B build-dev -G Ninja -DCMAKE_BUILD_TYPE=Release -DNSA_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="90a;80" > "$OUT/build.log" 2>&1 && cmake --build build-dev -j 16 >> "$OUT/build.log" 2>&1; }
ncu --clock-control none --cache-control none --kernel-name regex:'nsa_|gemm|gemv|Kernel' --launch-skip ${NCU_SKIP:-200} --launch-count ${NCU_COUNT:-40} \
  --metrics gpu__time_duration.sum,dram__bytes_read.sum \
  ./build-dev/nsa bench decode "$@" > "$OUT/ncu.log" 2>&1
grep -E "^  [a-zA-Z_].*\(|gpu__time_duration|dram__bytes_read" "$OUT/ncu.log" | paste - - - | \
  awk '{print}' | head -60
