#!/usr/bin/env bash
# The test command: set-up, Release build + all tests, then the sanitizer build + all tests,
# then the format check. GPU tests skip themselves where no GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
for preset in default asan; do
  echo "== $preset: build and test" >&2
  cmake --preset "$preset" >/dev/null
  cmake --build --preset "$preset"
  ctest --preset "$preset"
done
scripts/format.sh --check
