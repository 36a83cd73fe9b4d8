#!/usr/bin/env bash
# BENCH-A geometry (8 KV heads, d = 128) over a grid of T, t and n on one GPU: time per layer,
# NNLS iterations and held-out error per point, to find cost cliffs between neighbouring sizes.
#   bench/gpu_sweep.sh BIN_DIR [LAYERS]      (BIN_DIR from scripts/devbin.sh)
# Grids from the environment: SWEEP_T="60000 120000" SWEEP_t="1200 1500" SWEEP_N="8192" SWEEP_FLAGS=...
set -uo pipefail
bin=$(cd "${1:-build}" && pwd)
layers=${2:-4}
export LD_LIBRARY_PATH="$bin/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
out=${OUT:-/tmp}
printf "%8s %6s %6s %10s %10s %10s %8s %8s %6s %10s\n" T t n layer_s nnls_s score_s it_mean it_max nconv out_err
for n in ${SWEEP_N:-8192}; do
  for T in ${SWEEP_T:-60000 120000}; do
    for t in ${SWEEP_t:-1200 1500 1800 2400 3000}; do
      ratio=$(python3 -c "print($T/$t)")
      log="$out/sweep_T${T}_t${t}_n${n}.log"
      "$bin/bench_gpu_layer" --layers="$layers" --tokens="$T" --queries="$n" --ratio="$ratio" ${SWEEP_FLAGS:-} > "$log" 2>&1
      json=$(grep '^{' "$log" | tail -1)
      if [ -z "$json" ]; then echo "T=$T t=$t n=$n: failed ($(tail -1 "$log"))"; continue; fi
      python3 - "$json" "$layers" "$n" <<'PY'
import json, sys
j = json.loads(sys.argv[1]); L = int(sys.argv[2]); n = int(sys.argv[3])
print("%8d %6d %6d %10.4f %10.4f %10.4f %8.1f %8d %6d %10.4f" % (j["tokens"], j["t"], n, j["without_h2d_s"] / L,
      j["nnls_s"] / L, j["score_s"] / L, j["nnls_iter_mean"], j["nnls_iter_max"], j["not_converged"], j["mean_output_rel_error"]))
PY
    done
  done
done
