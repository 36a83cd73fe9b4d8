#!/usr/bin/env bash
# Installs dependencies, builds, and runs every test that needs no GPU (CTest labels cpu and e2e).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
ctest --test-dir build -LE gpu --output-on-failure -j"$(nproc)"
