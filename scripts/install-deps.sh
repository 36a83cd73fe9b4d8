#!/usr/bin/env bash
# Installs the Debian 12 packages that build, test and run kvcompact. Used by .ci/run, the
# Dockerfile and the README's commands, so the three cannot drift apart. `--build-only` leaves
# out what only the tests need (the image's build stage uses it). Also works on Ubuntu 24.04,
# the base of NVIDIA's CUDA images.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
PACKAGES=(
  build-essential cmake pkg-config git ca-certificates curl
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler grpc-proto
  libabsl-dev libspdlog-dev prometheus-cpp-dev libeigen3-dev nlohmann-json3-dev
)
TEST_PACKAGES=(
  libgtest-dev libgmock-dev
  python3 python3-venv python3-pip
  openssl      # the TLS tests make their own certificates
  prometheus   # a real Prometheus scrapes the server in a test; promtool checks the alert rules
  clang        # libFuzzer targets (tests/fuzz)
)
if [ "${1:-}" != "--build-only" ]; then PACKAGES+=("${TEST_PACKAGES[@]}"); fi
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
