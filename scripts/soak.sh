#!/usr/bin/env bash
# Soak and fault run of docs/RELIABILITY.md: a server on loopback, N concurrent compactions for a
# duration with a share of fault calls (cancel, stalled deadline, truncated block, oversize
# message), a client process SIGKILLed mid-stream every minute, health checked after each, then
# SIGTERM while streams are in flight. Exit 0 when every check passed.
#   scripts/soak.sh [SECONDS] [CONCURRENCY] [extra load flags...]      (defaults: 600 64)
# SERVER_BIN / CLI_BIN pick other binaries (e.g. on a GPU machine); SERVER_FLAGS adds server flags.
set -uo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-600}"; CONCURRENCY="${2:-64}"; shift $(( $# > 2 ? 2 : $# ))
SERVER_BIN="${SERVER_BIN:-build/server/kvcompact-server}"; CLI_BIN="${CLI_BIN:-build/client/kvcompact}"
OUT="${SOAK_OUT:-build/soak}"; mkdir -p "$OUT"
PORT=50171; METRICS=50172; HEALTH=50173
GEOMETRY=(--layers=4 --kv_heads=2 --context=1024 --queries=256 --head_dim=64 --ratio=10)
failures=0
check() { if "$@"; then echo "  ok: ${CHECK_NAME}"; else echo "  FAILED: ${CHECK_NAME}"; failures=$((failures + 1)); fi; }
serving() { "$CLI_BIN" health --server=127.0.0.1:$HEALTH --timeout=5 2>/dev/null | grep -qx SERVING; }

# Headroom over CONCURRENCY: a cancelled or expired stream holds its slot until the server has
# processed the cancellation, and the client's next call may arrive first.
"$SERVER_BIN" --listen=127.0.0.1:$PORT --metrics_listen=127.0.0.1:$METRICS --health_listen=127.0.0.1:$HEALTH \
  --max_concurrent_streams=$((CONCURRENCY + 16)) --drain_delay_seconds=2 --shutdown_timeout_seconds=10 \
  ${SERVER_FLAGS:-} > "$OUT/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 100); do serving && break; sleep 0.2; done
echo "soak: $CONCURRENCY concurrent calls for $DURATION s, faults 2%; server pid $SERVER ($(date -u +%FT%TZ))"
"$CLI_BIN" load --server=127.0.0.1:$PORT --metrics=127.0.0.1:$METRICS --concurrency="$CONCURRENCY" \
  --duration="$DURATION" --report_every=60 --faults=0.02 "${GEOMETRY[@]}" "$@" > "$OUT/load.txt" 2>&1 &
LOAD=$!
kills=0; kill_checks_ok=0
while kill -0 $LOAD 2>/dev/null; do
  sleep 57
  kill -0 $LOAD 2>/dev/null || break
  # A client killed mid-stream: a separate process with streams open, SIGKILLed.
  "$CLI_BIN" load --server=127.0.0.1:$PORT --concurrency=4 --duration=60 "${GEOMETRY[@]}" > /dev/null 2>&1 &
  VICTIM=$!; sleep 3; kill -9 $VICTIM; wait $VICTIM 2>/dev/null; kills=$((kills + 1))
  sleep 1
  if serving; then kill_checks_ok=$((kill_checks_ok + 1)); fi
done
wait $LOAD; LOAD_RC=$?
cat "$OUT/load.txt"
echo "checks:"
CHECK_NAME="the load run: every normal call succeeded, every fault ended in its status, health SERVING (exit $LOAD_RC)"; check test $LOAD_RC -eq 0
CHECK_NAME="server SERVING after each of $kills clients killed mid-stream ($kill_checks_ok)"; check test "$kill_checks_ok" -eq "$kills"
CHECK_NAME="server RSS growth after warm-up below 10%"
growth=$(grep -oE 'growth after warm-up [+-][0-9.]+%' "$OUT/load.txt" | grep -oE '[+-][0-9.]+')
check awk -v g="${growth:-100}" 'BEGIN { exit !(g < 10) }'

# SIGTERM with streams in flight: they finish or end cleanly, the server exits 0.
"$CLI_BIN" load --server=127.0.0.1:$PORT --concurrency=16 --duration=30 --report_every=30 "${GEOMETRY[@]}" > "$OUT/sigterm_load.txt" 2>&1 &
VICTIM=$!; sleep 5
kill -TERM $SERVER; wait $SERVER; SERVER_RC=$?
wait $VICTIM
CHECK_NAME="SIGTERM during 16 streams: server exit code 0 ($SERVER_RC)"; check test $SERVER_RC -eq 0
echo "  clients of the SIGTERM: $(grep -E '^summary|failed calls' "$OUT/sigterm_load.txt" | tr '\n' ' ')"
CHECK_NAME="every failed call of the SIGTERM phase is UNAVAILABLE or CANCELLED"
check bash -c "! grep 'failed calls' '$OUT/sigterm_load.txt' | grep -vE 'failed calls (UNAVAILABLE|CANCELLED)'"
grep -E "draining|stopped cleanly" "$OUT/server.log" | sed 's/^/  server: /'
echo "soak: $failures failed checks ($(date -u +%FT%TZ))"
exit $((failures > 0))
