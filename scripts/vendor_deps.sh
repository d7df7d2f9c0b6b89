#!/usr/bin/env bash
# Copies the build's header-only dependencies and GoogleTest sources into .deps/ (git-ignored),
# for the GPU machine, which has no Debian packages: the device call carries .deps.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .deps && mkdir -p .deps/include
cp -r /usr/src/googletest .deps/googletest
cp -r /usr/include/CLI /usr/include/nlohmann /usr/include/fmt .deps/include/
du -sh .deps
