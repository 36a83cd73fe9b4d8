#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, ASan + UBSan) into build-fuzz and runs each one.
#   scripts/fuzz.sh                 CI smoke: the seed corpus plus 20 s of mutation per target
#   scripts/fuzz.sh SECONDS [JOBS]  a longer run per target (new inputs go to build-fuzz/corpus)
#   scripts/fuzz.sh --seeds         regenerate tests/fuzz/corpus from the client code
# A crash leaves its input as build-fuzz/crash-* and fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."
CC=clang CXX=clang++ cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVCOMPACT_FUZZ=ON \
  -DKVCOMPACT_MARCH= > build-fuzz.log 2>&1 || { cat build-fuzz.log; exit 1; }
cmake --build build-fuzz -j"$(nproc)" >> build-fuzz.log 2>&1 || { tail -50 build-fuzz.log; exit 1; }
if [ "${1:-}" = "--seeds" ]; then
  rm -rf tests/fuzz/corpus && build-fuzz/tests/fuzz/make_fuzz_seeds tests/fuzz/corpus
  exit 0
fi
SECONDS_PER_TARGET="${1:-20}"
JOBS="${2:-1}"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
found_failure() { find build-fuzz -maxdepth 1 \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' -o -name 'oom-*' \) | grep -q .; }
for target in fuzz_compact_stream fuzz_stream_decode fuzz_safetensors fuzz_npy; do
  work="build-fuzz/corpus/$target"
  seeds="tests/fuzz/corpus/$target"
  [ "$target" = fuzz_stream_decode ] && seeds="tests/fuzz/corpus/fuzz_compact_stream"
  mkdir -p "$work"
  echo "== $target: ${SECONDS_PER_TARGET} s, $JOBS job(s)"
  parallel=()
  if [ "$JOBS" -gt 1 ]; then parallel=(-fork="$JOBS"); fi
  build-fuzz/tests/fuzz/$target "$work" "$seeds" -max_total_time="$SECONDS_PER_TARGET" \
    -max_len=65536 -rss_limit_mb=4096 -timeout=30 "${parallel[@]}" -print_final_stats=1 \
    -artifact_prefix=build-fuzz/ > "build-fuzz/$target.log" 2>&1 || true
  grep -E "^(stat::number_of_executed_units|stat::peak_rss|SUMMARY|INFO: fuzzed for|#[0-9]+ +(DONE|pulse))" "build-fuzz/$target.log" | tail -4
  if found_failure; then
    echo "fuzzing found a failing input (build-fuzz/$target.log has the report):"
    find build-fuzz -maxdepth 1 \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' -o -name 'oom-*' \)
    exit 1
  fi
done
