#!/usr/bin/env bash
# Packs the built binaries and the non-system shared libraries they load into ./.devbin, to be run
# on a GPU machine that has the CUDA runtime but not this machine's packages:
#   LD_LIBRARY_PATH=.devbin/lib:/usr/local/cuda/lib64 .devbin/gpu_test
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .devbin && mkdir -p .devbin/lib
for b in tests/gpu_test bench/bench_gpu_layer bench/bench_fused_stats bench/bench_lsq bench/bench_cholesky bench/bench_lsq_caps bench/bench_omp server/kvcompact-server tests/e2e_test bench/bench_e2e client/kvcompact; do
  [ -x "build/$b" ] && cp "build/$b" .devbin/
done
find .devbin -maxdepth 1 -type f -exec ldd {} \; | awk '/=> \//{print $3}' | sort -u |
  grep -v -E 'libc\.so|libm\.so|libdl|libpthread|librt|libgcc_s|libstdc\+\+|ld-linux|/usr/local/cuda' |
  xargs -I{} cp -L {} .devbin/lib/
du -sh .devbin
