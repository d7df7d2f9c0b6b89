#!/usr/bin/env bash
# Session 16, call 1: the landed binary (main 7734f6a = c85d1e3's kernels) under the GPU suites and
# the sanitizers; the seed shape with the GEMV; the L2-logits branch side by side; the graph timeline.
set -uo pipefail
mkdir -p "$OUT"; S=$OUT/summary.txt
log() { echo "== $* [$(date +%T)]" | tee -a "$S"; }
rows() { awk -v t="$1" '$1 ~ /^[0-9]+$/ {print t, $0}' | tee -a "$S"; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee -a "$S"
export NSA_PREBUILT=1
. scripts/device_build.sh
BASE=./.deps/base/nsa; NEW=./build-dev/nsa; L2=./.deps/l2/nsa
log "GPU suites (main)"
./build-dev/tests/nsa_tests --gtest_filter='Cuda.*' > "$OUT/tests.log" 2>&1; echo "rc=$?" | tee -a "$S"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]" "$OUT/tests.log" | tail -25 | tee -a "$S"
log "L2 branch: its test and the decode suites"
./.deps/l2/nsa_tests --gtest_filter='Cuda.L2Logits*:Cuda.GraphDecode*:Cuda.Decode*:Cuda.OneHot*' > "$OUT/tests_l2.log" 2>&1; echo "rc=$?" | tee -a "$S"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]|OK \]" "$OUT/tests_l2.log" | tail -12 | tee -a "$S"
SEEDF="bench decode --heads 4 --groups 2 --dk 64 --dv 64 --S_list 128,256,512,1024 --iters 50 --warmup 10 --device cuda"
BD="bench decode --dim 2560 --heads 64 --groups 4 --dk 192 --dv 128 --S_list 65536 --iters 20 --warmup 5 --device cuda --dtype bf16 --fill random"
echo "columns: tag S ms_total ms_cmp ms_sel ms_win p50_total reads p50_attn attn_MB %bw" | tee -a "$S"
for round in 1 2; do
log "round $round seed shape (main.sh flags, default dtype and fill)"
$BASE $SEEDF 2>&1 | rows base
NSA_CUDA_GEMV=0 $NEW $SEEDF 2>&1 | rows main_gemv0
$NEW $SEEDF 2>&1 | rows main_gemv1
log "round $round B16 64k: main / l2=0 / l2=1"
$NEW $BD --B 16 2>&1 | rows main
NSA_CUDA_L2_LOGITS=0 $L2 $BD --B 16 2>&1 | rows l2_0
NSA_CUDA_L2_LOGITS=1 $L2 $BD --B 16 2>&1 | rows l2_1
log "round $round B1 64k"
$NEW $BD --B 1 2>&1 | rows main
NSA_CUDA_L2_LOGITS=0 $L2 $BD --B 1 2>&1 | rows l2_0
NSA_CUDA_L2_LOGITS=1 $L2 $BD --B 1 2>&1 | rows l2_1
done
log "seed shape bf16 (for the record)"
$NEW $SEEDF --dtype bf16 2>&1 | rows main_bf16
log "kernel times (eager)"
NSA_CUDA_KERNEL_TIMES=1 $NEW $SEEDF 2>&1 | grep "kernel us" | sed 's/^/seed_main /' | tee -a "$S"
NSA_CUDA_KERNEL_TIMES=1 NSA_CUDA_L2_LOGITS=0 $L2 $BD --B 16 2>&1 | grep -m1 "kernel us" | sed 's/^/l2_0_16 /' | tee -a "$S"
NSA_CUDA_KERNEL_TIMES=1 NSA_CUDA_L2_LOGITS=1 $L2 $BD --B 16 2>&1 | grep -m1 "kernel us" | sed 's/^/l2_1_16 /' | tee -a "$S"
log "dense SDPA decode"
PYTHONUNBUFFERED=1 timeout 120 python3 bench/dense_sdpa_decode.py --S_list 65536 --B_list 1,16 2>&1 | tail -4 | tee -a "$S"
log "graph timeline (main, B16 64k)"
timeout 120 scripts/device_graph_timeline.sh 16 65536 2>&1 | tail -30 | tee -a "$S"
log "memcheck (main, whole sanitizer list) + L2 test"
LIST='Cuda.OneHotGates*:Cuda.GraphDecode*:Cuda.TensorCorePathSmall*:Cuda.TiledPrefillSmall*:Cuda.FusedDecodeSmall*:Cuda.ShortDecode*:Cuda.SelectionRadixShort*:Cuda.FewRow*'
timeout 200 compute-sanitizer --tool memcheck ./build-dev/tests/nsa_tests --gtest_filter="$LIST" > "$OUT/memcheck.log" 2>&1; echo "rc=$?" | tee -a "$S"; grep -E "ERROR SUMMARY|FAILED" "$OUT/memcheck.log" | tail -5 | tee -a "$S"
timeout 60 compute-sanitizer --tool memcheck ./.deps/l2/nsa_tests --gtest_filter='Cuda.L2Logits*' > "$OUT/memcheck_l2.log" 2>&1; echo "rc=$?" | tee -a "$S"; grep -E "ERROR SUMMARY|FAILED" "$OUT/memcheck_l2.log" | tail -3 | tee -a "$S"
log "racecheck (main: top-n users and GEMV)"
timeout 150 compute-sanitizer --tool racecheck ./build-dev/tests/nsa_tests --gtest_filter='Cuda.SelectionRadixShort*:Cuda.FusedDecodeSmall*:Cuda.FewRow*' > "$OUT/racecheck.log" 2>&1; echo "rc=$?" | tee -a "$S"; grep -E "RACECHECK SUMMARY|Race reported|FAILED|OK \]" "$OUT/racecheck.log" | grep -v nvjet | tail -8 | tee -a "$S"
log done
