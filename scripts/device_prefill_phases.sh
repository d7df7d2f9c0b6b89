#!/usr/bin/env bash
# A measurement-only device call for the prefill kernels (no sanitizer: a change still needs a
# scripts/device_run.sh call before it lands): build, the tiled-prefill GPU tests, then at the
# paper's shapes (bf16, B 1) the per-kernel times for each block size in NSA_WARPS (default
# "4 8"), the phase clocks of the compressed and window kernels (NSA_CUDA_KERNEL_TIMES=2), and
# the attention time per block size. Logs go to $OUT/summary.txt.
#   device run --carry .deps -- scripts/device_prefill_phases.sh [T_list, default 16384,65536]
set -uo pipefail
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
T_LIST=${1:-16384,65536}
log() { echo "== $* [$(date +%T)]" | tee -a "$OUT/summary.txt"; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv | tee -a "$OUT/summary.txt"
log "build"
. "$(dirname "$0")/device_build.sh"
log "tiled-prefill GPU tests"
./build-dev/tests/nsa_tests --gtest_filter='Cuda.TiledPrefill*:Cuda.PrefillWarps*:Cuda.PrefillThenDecode*' 2>&1 |
  grep -E "^\[  (FAILED|PASSED) |^\[       OK|Failure|error" | tee -a "$OUT/summary.txt"
PAPER=(--B 1 --dim 2560 --heads 64 --groups 4 --dk 192 --dv 128 --dtype bf16 --device cuda)
for w in ${NSA_WARPS:-4 8}; do
  log "NSA_CUDA_PREFILL_WARPS=$w: per-kernel times (one eager prefill per T), then attention"
  NSA_CUDA_PREFILL_WARPS=$w NSA_CUDA_KERNEL_TIMES=1 $NSA bench prefill "${PAPER[@]}" --S_list "$T_LIST" \
    --iters 1 --warmup 1 2>&1 | grep "kernel ms" | tee -a "$OUT/summary.txt"
  NSA_CUDA_PREFILL_WARPS=$w $NSA bench prefill "${PAPER[@]}" --S_list "$T_LIST" --iters 3 --warmup 1 \
    2>&1 | tee -a "$OUT/summary.txt"
done
log "phase clocks (NSA_CUDA_KERNEL_TIMES=2, default 4-warp blocks)"
NSA_CUDA_KERNEL_TIMES=2 $NSA bench prefill "${PAPER[@]}" --S_list "$T_LIST" --iters 1 --warmup 1 2>&1 |
  grep -E "phases|kernel ms" | tee -a "$OUT/summary.txt"
