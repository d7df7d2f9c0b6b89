#!/usr/bin/env bash
# Builds nsa and nsa_tests here in build-device/ (CUDA for sm_90a and sm_80, as device_build.sh
# does; its own folder, so the build/ of the README's commands keeps its options) and copies
# them, with the one shared library the GPU machine lacks (libfmt), into .deps/prebuilt/, which a
# device call carries with .deps. device_build.sh then runs them (NSA_PREBUILT=1) instead of
# building there, which saves ~150 s of device time per cold call; it builds if they do not run.
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build-device -DCMAKE_BUILD_TYPE=Release -DNSA_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="90a;80" > /dev/null
cmake --build build-device -j 2
rm -rf .deps/prebuilt && mkdir -p .deps/prebuilt
cp build-device/nsa build-device/tests/nsa_tests .deps/prebuilt/
cp "$(ldd build-device/nsa | awk '/libfmt/ {print $3}')" .deps/prebuilt/
# The tests run the CLI by the absolute path they were built with (NSA_CLI); device_build.sh
# links it there.
echo "$PWD/build-device/nsa" > .deps/prebuilt/cli_path
git rev-parse --short HEAD > .deps/prebuilt/commit
if ! git diff --quiet HEAD -- src include tools tests cmake CMakeLists.txt; then
  echo "+dirty" >> .deps/prebuilt/commit
fi
du -sh .deps
