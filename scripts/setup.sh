#!/usr/bin/env bash
# Installs the Debian packages the project builds with (idempotent; a no-op when all are present).
set -euo pipefail
pkgs=(cmake ninja-build g++ libgtest-dev libcli11-dev nlohmann-json3-dev libfmt-dev libomp-dev
      clang-format python3-matplotlib)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null; }; then
    # A machine without a package registry (the GPU machine) builds from the carried .deps/.
    [ -d "$(dirname "$0")/../.deps/include" ] || { echo "setup: cannot install ${missing[*]}" >&2; exit 1; }
    echo "setup: apt-get failed; building with the headers in .deps/ (scripts/vendor_deps.sh)" >&2
  fi
fi
