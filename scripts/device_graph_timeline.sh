#!/usr/bin/env bash
# The graph-replayed decode step at the paper's shapes (B = 16, S = 64k by default, bf16) as a
# timeline of its nodes: each kernel's median duration and the median gap before it (from the
# previous node's end), from Nsight Systems with graph nodes traced one by one. This shows
# where a step's time sits between kernels, which per-kernel event timing cannot (it runs the
# kernels eagerly, one at a time). Run on the device machine after a build in build-dev:
#   scripts/device_graph_timeline.sh [B] [S]
# Writes graph_timeline.txt to $OUT. Needs nsys (Nsight Systems); says so and stops without it.
set -uo pipefail
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
B=${1:-16}
S=${2:-65536}
if ! command -v nsys > /dev/null; then
  echo "nsys (Nsight Systems) is not installed here: no graph timeline" | tee "$OUT/graph_timeline.txt"
  exit 0
fi
rep=/tmp/graph_timeline
nsys profile --cuda-graph-trace=node --trace=cuda -f true -o $rep ./build-dev/nsa bench decode \
  --B "$B" --dim 2560 --heads 64 --groups 4 --dk 192 --dv 128 --S_list "$S" --iters 20 --warmup 5 \
  --device cuda --dtype bf16 --fill random > /tmp/graph_timeline.log 2>&1 ||
  tail -20 /tmp/graph_timeline.log
nsys stats --report cuda_gpu_trace --format csv --force-export true -o $rep $rep.nsys-rep \
  > /dev/null 2>&1
python3 scripts/graph_timeline.py ${rep}_cuda_gpu_trace.csv | tee "$OUT/graph_timeline.txt"
