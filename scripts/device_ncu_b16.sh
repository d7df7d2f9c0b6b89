#!/usr/bin/env bash
# Nsight Compute on the paper-shape decode step at B = 16, S = 64k (bf16): per-kernel memory and
# occupancy metrics and per-line warp stalls of the step kernels. Run on the device machine after
# a build in build-dev: scripts/device_ncu_b16.sh. Writes ncu_b16_metrics.txt and
# ncu_b16_stalls.txt to $OUT. NCU_KERNELS (a regex) narrows the kernels profiled; NCU_SAMPLING
# sets the stall sampler's period to 2^(5 + value) cycles (default auto, which leaves a kernel of
# ~20k cycles only a few samples per multiprocessor: 0 gave the top-n kernel ~14 times more);
# NCU_SKIP and NCU_COUNT: the matching launches skipped and profiled (default 30 and 12).
set -uo pipefail
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
rep=/tmp/b16
ncu --clock-control none --set full --import-source yes \
  --warp-sampling-interval "${NCU_SAMPLING:-auto}" \
  --kernel-name regex:"${NCU_KERNELS:-nsa_(attn_tc|score|select|prepare|combine)}" --launch-skip "${NCU_SKIP:-30}" --launch-count "${NCU_COUNT:-12}" \
  -f -o $rep ./build-dev/nsa bench decode --B 16 --dim 2560 --heads 64 --groups 4 --dk 192 --dv 128 \
  --S_list 65536 --iters 4 --warmup 2 --device cuda --dtype bf16 --fill random > /tmp/ncu_b16.log 2>&1 ||
  tail -20 /tmp/ncu_b16.log
ncu --import $rep.ncu-rep --page details --csv > /tmp/b16_details.csv 2>&1
python3 - /tmp/b16_details.csv > "$OUT/ncu_b16_metrics.txt" <<'PY'
import csv, sys
want = ["Duration", "Elapsed Cycles", "Memory Throughput", "DRAM Throughput", "L2 Hit Rate",
        "L1/TEX Hit Rate", "Achieved Occupancy", "Theoretical Occupancy", "Registers Per Thread",
        "Executed Ipc Active", "Waves Per SM"]
rows = list(csv.reader(open(sys.argv[1])))
kernels = {}
for r in rows[1:]:
    if len(r) > 14 and r[12] in want:
        kernels.setdefault((r[0], r[4][:60], r[8]), {})[r[12]] = f"{r[14]} {r[13]}"
for (i, name, grid), m in kernels.items():
    print(f"{i} {name} grid {grid}: " + "; ".join(f"{k} {m[k]}" for k in want if k in m))
PY
ncu --import $rep.ncu-rep --page source --print-source cuda,sass --csv > /tmp/b16_src.csv 2>&1
# NCU_LINES: the kernels whose stalls are listed per source line (default: the tensor-core
# passes, then the small kernels, whose ~12 us each docs/perf-cuda-decode.md asks about).
: > "$OUT/ncu_b16_stalls.txt"
for k in ${NCU_LINES:-attn_tc select prepare}; do
  python3 scripts/ncu_stalls.py /tmp/b16_src.csv "$k" 25 >> "$OUT/ncu_b16_stalls.txt"
done
cat "$OUT/ncu_b16_metrics.txt"; head -120 "$OUT/ncu_b16_stalls.txt"
