#!/usr/bin/env bash
# On a machine with a GPU and a folder of binaries (first argument; scripts/devbin.sh makes one):
# the GPU tests, the e2e suite against the server (backend auto: CUDA there), the NNLS solver bench, BENCH-A (fp32 and
# TF32) and BENCH-B. Logs go to $OUT; a short table comes last.
set -uo pipefail
bin=$(cd "${1:-build}" && pwd)
out=${OUT:-/tmp}
export LD_LIBRARY_PATH="$bin/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
here=$(cd "$(dirname "$0")" && pwd)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$bin/gpu_test" > "$out/gpu_test.log" 2>&1
grep -E "^\[ +(FAILED) |Failure" "$out/gpu_test.log" | head -20
KVCOMPACT_TEST_SERVER_BINARY="$bin/kvcompact-server" \
  KVCOMPACT_TEST_CLI_BINARY="$bin/kvcompact" "$bin/e2e_test" > "$out/e2e_test.log" 2>&1
grep -E "^\[ +(FAILED) |Failure" "$out/e2e_test.log" | head -20
"$bin/bench_lsq" > "$out/bench_lsq.log" 2>&1
"$bin/bench_gpu_layer" > "$out/bench_a_fp32.log" 2>&1
"$bin/bench_gpu_layer" --allow_tf32 > "$out/bench_a_tf32.log" 2>&1
"$bin/bench_gpu_layer" --prefetch=false > "$out/bench_a_fp32_noprefetch.log" 2>&1
"$here/run_bench_b.sh" "$bin" --layers=8 --streams=4 > "$out/bench_b_4_8layers.log" 2>&1
"$here/run_bench_b.sh" "$bin" --layers=32 --streams=4 > "$out/bench_b_4.log" 2>&1
KVCOMPACT_BENCH_SERVER_FLAGS=--allow_tf32 "$here/run_bench_b.sh" "$bin" --layers=32 --streams=4 > "$out/bench_b_4_tf32.log" 2>&1
echo "== summary"
grep -hE "^\[  (PASSED|FAILED)  \]" "$out/gpu_test.log" "$out/e2e_test.log"
head -8 "$out/bench_lsq.log"
grep -A14 "^quantity" "$out/bench_a_fp32.log"
grep -A3 "without H2D" "$out/bench_a_tf32.log" "$out/bench_a_fp32_noprefetch.log"
grep -h "GPU memory held" "$out"/bench_b_*.log
grep -h '^{' "$out"/bench_*.log
