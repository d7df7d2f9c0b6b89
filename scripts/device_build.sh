# Sourced by the device scripts (after OUT and log are set): configures and builds build-dev
# with CUDA for sm_90a and sm_80, prints `nsa info`, and sets NSA; on a build failure, the log's
# tail goes to the summary and the script exits. NSA_PREBUILT=1 runs the binaries that
# scripts/prebuild_for_device.sh left in .deps/prebuilt/ instead (no build here), if they run.
prebuilt_ok=0
if [ "${NSA_PREBUILT:-0}" = 1 ] && [ -x .deps/prebuilt/nsa ]; then
  mkdir -p build-dev/tests
  cp .deps/prebuilt/nsa build-dev/nsa && cp .deps/prebuilt/nsa_tests build-dev/tests/nsa_tests
  export LD_LIBRARY_PATH="$PWD/.deps/prebuilt${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  if ./build-dev/nsa info 2>&1 | grep -q "cuda backend: built"; then
    prebuilt_ok=1
    cli=$(cat .deps/prebuilt/cli_path 2>/dev/null)
    if [ -n "$cli" ] && [ ! -e "$cli" ]; then
      mkdir -p "$(dirname "$cli")" && ln -s "$PWD/build-dev/nsa" "$cli" ||
        echo "cannot link $cli: Cuda.RunCliOnCuda will fail" | tee -a "$OUT/summary.txt"
    fi
    echo "prebuilt binaries of $(tr '\n' ' ' < .deps/prebuilt/commit)" | tee -a "$OUT/summary.txt"
  else
    ./build-dev/nsa info 2>&1 | tail -3 | tee -a "$OUT/summary.txt"
    echo "prebuilt binaries do not run here: building" | tee -a "$OUT/summary.txt"
  fi
fi
if [ $prebuilt_ok = 0 ]; then
  cmake -S . -B build-dev -G Ninja -DCMAKE_BUILD_TYPE=Release -DNSA_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="90a;80" > build-dev.log 2>&1 &&
    cmake --build build-dev -j 16 >> build-dev.log 2>&1 || { tail -40 build-dev.log | tee -a "$OUT/summary.txt"; exit 1; }
fi
NSA=./build-dev/nsa
$NSA info | tee -a "$OUT/summary.txt"
