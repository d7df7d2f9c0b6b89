#!/usr/bin/env bash
# The main job: set-up, build, then the seed's decode benchmark (SPEC.md section 6) on the GPU when
# one is present, else on the CPU. Extra arguments go to `nsa bench decode`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cmake --preset default >/dev/null
cmake --build --preset default
mkdir -p bench/results
./build/nsa info
exec ./build/nsa bench decode --heads 4 --groups 2 --dk 64 --dv 64 --S_list 128,256,512,1024 \
  --iters 32 --warmup 8 --device auto --csv bench/results/decode_latest.csv "$@"
