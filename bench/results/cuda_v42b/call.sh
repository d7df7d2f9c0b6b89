#!/usr/bin/env bash
# Session 16, call 2: does the short kernel's time follow its code size? main (176 KB of SASS,
# fp32) against next/short-compact (77 KB), seed shape, same call; phase clocks; ncu stall reasons.
set -uo pipefail
mkdir -p "$OUT"; S=$OUT/summary.txt
log() { echo "== $* [$(date +%T)]" | tee -a "$S"; }
rows() { awk -v t="$1" '$1 ~ /^[0-9]+$/ {print t, $0}' | tee -a "$S"; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee -a "$S"
export NSA_PREBUILT=1
. scripts/device_build.sh
MAIN=./.deps/main/nsa; NEW=./build-dev/nsa
log "GPU suites (compact)"
./build-dev/tests/nsa_tests --gtest_filter='Cuda.*' > "$OUT/tests.log" 2>&1; echo "rc=$?" | tee -a "$S"
grep -E "^\[  (PASSED|FAILED)|FAILED  \]" "$OUT/tests.log" | tail -25 | tee -a "$S"
SEEDF="bench decode --heads 4 --groups 2 --dk 64 --dv 64 --S_list 128,256,512,1024 --iters 50 --warmup 10 --device cuda"
echo "columns: tag S ms_total ms_cmp ms_sel ms_win p50_total reads p50_attn attn_MB %bw" | tee -a "$S"
for round in 1 2 3; do
log "round $round seed shape fp32 (main.sh flags)"
$MAIN $SEEDF 2>&1 | rows main
$NEW $SEEDF 2>&1 | rows compact
log "round $round seed shape bf16"
$MAIN $SEEDF --dtype bf16 2>&1 | rows main_bf16
$NEW $SEEDF --dtype bf16 2>&1 | rows compact_bf16
done
log "kernel times and phase clocks (eager; per S: all, cmp, sel, win, attention only)"
NSA_CUDA_KERNEL_TIMES=1 $MAIN $SEEDF 2>&1 | grep -E "kernel us|phases" | sed 's/^/main /' | tee -a "$S"
NSA_CUDA_KERNEL_TIMES=1 $NEW $SEEDF 2>&1 | grep -E "kernel us|phases" | sed 's/^/compact /' | tee -a "$S"
log "ncu: short kernel stall reasons, S = 1024 fp32"
for b in main new; do
  bin=$MAIN; [ $b = new ] && bin=$NEW
  timeout 150 ncu --section WarpStateStats --section SchedulerStats --section SpeedOfLight --section InstructionStats \
    --kernel-name regex:short_decode --launch-skip 30 --launch-count 2 $bin bench decode --heads 4 --groups 2 --dk 64 --dv 64 \
    --S_list 1024 --iters 8 --warmup 4 --device cuda > "$OUT/ncu_$b.txt" 2>&1; echo "ncu $b rc=$?" | tee -a "$S"
  grep -E "Duration|Stall|Warp Cycles Per Issued|Executed Instructions |Issued Ipc|No Eligible" "$OUT/ncu_$b.txt" | head -40 | sed "s/^/$b /" | tee -a "$S"
done
log "memcheck + racecheck (compact: the short kernel's tests)"
timeout 120 compute-sanitizer --tool memcheck ./build-dev/tests/nsa_tests --gtest_filter='Cuda.ShortDecode*:Cuda.OneHotGates*:Cuda.GraphDecode*' > memcheck.log 2>&1; echo "rc=$?" | tee -a "$S"; grep -E "ERROR SUMMARY|FAILED" memcheck.log | tail -3 | tee -a "$S"
timeout 150 compute-sanitizer --tool racecheck ./build-dev/tests/nsa_tests --gtest_filter='Cuda.ShortDecode*' > racecheck.log 2>&1; echo "rc=$?" | tee -a "$S"; grep -E "RACECHECK SUMMARY|Race reported|FAILED" racecheck.log | grep -v nvjet | tail -5 | tee -a "$S"
log done
