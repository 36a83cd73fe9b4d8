#!/usr/bin/env bash
# On a machine with a GPU and a build (or a folder of carried binaries, first argument): the GPU
# tests, then BENCH-A small and full. Ends with a short table.
set -uo pipefail
bin=${1:-build}
out=${OUT:-/tmp}
find_bin() { find "$bin" -name "$1" -type f -perm -u+x | head -1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$(find_bin gpu_test)" 2>&1 | tee "$out/gpu_test.log" | grep -E "^\[ +(OK|FAILED|SKIPPED|PASSED) |Failure|error" | head -60
"$(find_bin bench_gpu_layer)" --layers=4 --tokens=8192 --queries=2048 2>&1 | tee "$out/bench_small.log" | tail -3
"$(find_bin bench_gpu_layer)" 2>&1 | tee "$out/bench_a_fp32.log"
"$(find_bin bench_gpu_layer)" --allow_tf32 2>&1 | tee "$out/bench_a_tf32.log" | tail -12
echo "== summary"
grep -E "PASSED|FAILED" "$out/gpu_test.log" | tail -3
grep -h '^{' "$out"/bench_*.log
