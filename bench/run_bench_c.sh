#!/usr/bin/env bash
# BENCH-C: starts kvcompact-server (CPU backend) on loopback and runs bench_e2e against it.
# Usage: bench/run_bench_c.sh [extra bench_e2e flags]
set -euo pipefail
cd "$(dirname "$0")/.."
port=${KVCOMPACT_BENCH_PORT:-50077}
build/server/kvcompact-server --listen=127.0.0.1:$port --metrics_listen= > /tmp/kvcompact-bench-server.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do build/client/kvcompact health --server=127.0.0.1:$port >/dev/null 2>&1 && break; sleep 0.1; done
build/bench/bench_e2e --server=127.0.0.1:$port "$@"
