#!/usr/bin/env bash
# BENCH-B on a GPU machine: starts kvcompact-server (CUDA backend) on loopback and streams the
# BENCH-A context to it as bf16 with bench_e2e, then the same bytes to the Sink RPC.
# Usage: bench/run_bench_b.sh BIN_DIR [extra bench_e2e flags]   (BIN_DIR holds the binaries)
set -euo pipefail
bin=$1; shift
port=${KVCOMPACT_BENCH_PORT:-50078}
log=${OUT:-/tmp}/bench-b-server.log
"$bin/kvcompact-server" --listen=127.0.0.1:$port --metrics_listen= --backend=cuda --max_message_bytes=67108864 \
  ${KVCOMPACT_BENCH_SERVER_FLAGS:-} > "$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 300); do "$bin/kvcompact" health --server=127.0.0.1:$port >/dev/null 2>&1 && break; sleep 0.1; done
"$bin/bench_e2e" --server=127.0.0.1:$port --name=BENCH-B --kv_heads=8 --head_dim=128 --tokens=60000 --queries=8192 \
  --ratio=50 --dtype=bf16 --distinct=2 --repeats=1 --sink "$@"
