set -uo pipefail
export OUT
scripts/device_run.sh quick 2>&1 | grep -vE "^\[ cuda" | tail -60
NSA=./build-dev/nsa
echo "== seed"
$NSA bench decode --heads 4 --groups 2 --dk 64 --dv 64 --S_list 128,256,512,1024 --iters 32 --warmup 8 --device cuda --csv $OUT/seed.csv 2>&1 | tail -6
echo "== paper B16"
$NSA bench decode --B 16 --dim 2560 --heads 64 --groups 4 --dk 192 --dv 128 --S_list 8192,65536 --iters 20 --warmup 5 --device cuda --dtype bf16 --fill random --csv $OUT/p16.csv 2>&1 | tail -4
echo "== profile seed"
NCU_SKIP=60 NCU_COUNT=40 scripts/device_profile.sh --heads 4 --groups 2 --dk 64 --dv 64 --S_list 1024 --iters 8 --warmup 2 --device cuda 2>&1 | tail -45
echo "== profile B16 64k"
NCU_SKIP=30 NCU_COUNT=30 scripts/device_profile.sh --B 16 --dim 2560 --heads 64 --groups 4 --dk 192 --dv 128 --S_list 65536 --iters 6 --warmup 2 --device cuda --dtype bf16 --fill random 2>&1 | tail -35
