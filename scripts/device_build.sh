# Sourced by the device scripts (after OUT and log are set): configures and builds build-dev
# with CUDA for sm_90a and sm_80, prints `nsa info`, and sets NSA; on a build failure, the log's
# tail goes to the summary and the script exits.
cmake -S . -B build-dev -G Ninja -DCMAKE_BUILD_TYPE=Release -DNSA_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="90a;80" > build-dev.log 2>&1 &&
  cmake --build build-dev -j 16 >> build-dev.log 2>&1 || { tail -40 build-dev.log | tee -a "$OUT/summary.txt"; exit 1; }
NSA=./build-dev/nsa
$NSA info | tee -a "$OUT/summary.txt"
