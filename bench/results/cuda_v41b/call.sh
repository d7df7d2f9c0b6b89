#!/usr/bin/env bash
set -uo pipefail
mkdir -p "$OUT"; S=$OUT/summary.txt
log() { echo "== $* [$(date +%T)]" | tee -a "$S"; }
rows() { awk -v t="$1" '$1 ~ /^[0-9]+$/ {print t, $0}' | tee -a "$S"; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee -a "$S"
export NSA_PREBUILT=1
. scripts/device_build.sh
BASE=./.deps/base/nsa; NEW=./build-dev/nsa
log "GPU suites"
./build-dev/tests/nsa_tests --gtest_filter='Cuda.*' > "$OUT/tests.log" 2>&1; echo "rc=$?" | tee -a "$S"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]" "$OUT/tests.log" | tail -25 | tee -a "$S"
BD="bench decode --dim 2560 --heads 64 --groups 4 --dk 192 --dv 128 --S_list 65536 --iters 20 --warmup 5 --device cuda --dtype bf16 --fill random"
SEED="bench decode --S_list 128,256,512,1024 --iters 50 --warmup 10 --device cuda --dtype bf16 --fill random"
echo "columns: tag S ms_total ms_cmp ms_sel ms_win p50_total reads p50_attn attn_MB %bw" | tee -a "$S"
for round in 1 2; do
log "round $round B16 64k"
$BASE $BD --B 16 2>&1 | rows base
$NEW $BD --B 16 2>&1 | rows new
log "round $round B1 64k"
$BASE $BD --B 1 2>&1 | rows base
NSA_CUDA_GEMV=0 $NEW $BD --B 1 2>&1 | rows new_g0
$NEW $BD --B 1 2>&1 | rows new_g1
log "round $round seed default"
$BASE $SEED 2>&1 | rows base
NSA_CUDA_GEMV=0 $NEW $SEED 2>&1 | rows new_g0
$NEW $SEED 2>&1 | rows new_g1
done
log "kernel times B16"
NSA_CUDA_KERNEL_TIMES=1 $BASE $BD --B 16 2>&1 | grep -m3 "kernel us" | sed 's/^/base /' | tee -a "$S"
NSA_CUDA_KERNEL_TIMES=1 $NEW $BD --B 16 2>&1 | grep -m3 "kernel us" | sed 's/^/new  /' | tee -a "$S"
log "kernel times B1"
NSA_CUDA_KERNEL_TIMES=1 $BASE $BD --B 1 2>&1 | grep -m3 "kernel us" | sed 's/^/base /' | tee -a "$S"
NSA_CUDA_KERNEL_TIMES=1 $NEW $BD --B 1 2>&1 | grep -m3 "kernel us" | sed 's/^/new  /' | tee -a "$S"
log "memcheck"
timeout 200 compute-sanitizer --tool memcheck ./build-dev/tests/nsa_tests --gtest_filter='Cuda.Selection*:Cuda.FewRow*:Cuda.GraphDecode*:Cuda.TensorCorePathSmall*' > "$OUT/memcheck.log" 2>&1; echo "rc=$?" | tee -a "$S"; grep -E "ERROR SUMMARY|PASSED|FAILED" "$OUT/memcheck.log" | tail -5 | tee -a "$S"
log "racecheck"
timeout 240 compute-sanitizer --tool racecheck ./build-dev/tests/nsa_tests --gtest_filter='Cuda.SelectionTies*' > "$OUT/racecheck.log" 2>&1; echo "rc=$?" | tee -a "$S"; grep -E "RACECHECK SUMMARY|Race reported|PASSED|FAILED|OK" "$OUT/racecheck.log" | grep -v nvjet | tail -8 | tee -a "$S"
log done
