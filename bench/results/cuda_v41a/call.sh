#!/usr/bin/env bash
set -uo pipefail
mkdir -p "$OUT"; S=$OUT/summary.txt
log() { echo "== $* [$(date +%T)]" | tee -a "$S"; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee -a "$S"
export NSA_PREBUILT=1
. scripts/device_build.sh
BASE=./.deps/base/nsa
log "GPU suites"
./build-dev/tests/nsa_tests --gtest_filter='Cuda.*' > "$OUT/tests.log" 2>&1; echo "rc=$?" | tee -a "$S"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|tests ran" "$OUT/tests.log" | tail -25 | tee -a "$S"
BD="bench decode --dim 2560 --heads 64 --groups 4 --dk 192 --dv 128 --S_list 65536 --iters 20 --warmup 5 --device cuda --dtype bf16 --fill random"
SEED="bench decode --S_list 128,1024 --iters 50 --warmup 10 --device cuda --dtype bf16 --fill random"
for round in 1 2; do
log "round $round B16 64k: base / cluster=0 / cluster=1"
$BASE $BD --B 16 2>&1 | tail -1 | sed 's/^/base  /' | tee -a "$S"
NSA_CUDA_CLUSTER_SCORE=0 ./build-dev/nsa $BD --B 16 2>&1 | tail -1 | sed 's/^/cl0   /' | tee -a "$S"
NSA_CUDA_CLUSTER_SCORE=1 ./build-dev/nsa $BD --B 16 2>&1 | tail -1 | sed 's/^/cl1   /' | tee -a "$S"
log "round $round B1 64k"
$BASE $BD --B 1 2>&1 | tail -1 | sed 's/^/base  /' | tee -a "$S"
NSA_CUDA_CLUSTER_SCORE=0 NSA_CUDA_GEMV=0 ./build-dev/nsa $BD --B 1 2>&1 | tail -1 | sed 's/^/cl0g0 /' | tee -a "$S"
NSA_CUDA_GEMV=0 ./build-dev/nsa $BD --B 1 2>&1 | tail -1 | sed 's/^/cl1g0 /' | tee -a "$S"
./build-dev/nsa $BD --B 1 2>&1 | tail -1 | sed 's/^/cl1g1 /' | tee -a "$S"
log "round $round seed default: base / gemv0 / gemv1"
$BASE $SEED 2>&1 | tail -2 | sed 's/^/base  /' | tee -a "$S"
NSA_CUDA_GEMV=0 ./build-dev/nsa $SEED 2>&1 | tail -2 | sed 's/^/g0    /' | tee -a "$S"
./build-dev/nsa $SEED 2>&1 | tail -2 | sed 's/^/g1    /' | tee -a "$S"
done
log "header"; ./build-dev/nsa $BD --B 16 2>&1 | grep -m1 -i "p50" | tee -a "$S"
log "kernel times B16 cluster=1"
NSA_CUDA_KERNEL_TIMES=1 ./build-dev/nsa $BD --B 16 > "$OUT/ktimes.log" 2>&1; grep -iE "kernel|attn|score|select|gemv|gemm|combine|prepare" "$OUT/ktimes.log" | head -30 | tee -a "$S"
log "kernel times seed gemv=1"
NSA_CUDA_KERNEL_TIMES=1 ./build-dev/nsa $SEED >> "$OUT/ktimes.log" 2>&1
log "memcheck"
timeout 150 compute-sanitizer --tool memcheck ./build-dev/tests/nsa_tests --gtest_filter='Cuda.ClusterScoring*:Cuda.MultiTileSplits*:Cuda.FewRow*' > "$OUT/memcheck.log" 2>&1; echo "rc=$?" | tee -a "$S"; grep -E "ERROR SUMMARY|PASSED|FAILED" "$OUT/memcheck.log" | tail -5 | tee -a "$S"
log "racecheck"
timeout 150 compute-sanitizer --tool racecheck ./build-dev/tests/nsa_tests --gtest_filter='Cuda.ClusterScoring*:Cuda.FewRow*' > "$OUT/racecheck.log" 2>&1; echo "rc=$?" | tee -a "$S"; grep -E "RACECHECK SUMMARY|Race reported|PASSED|FAILED" "$OUT/racecheck.log" | grep -v nvjet | tail -8 | tee -a "$S"
log done
