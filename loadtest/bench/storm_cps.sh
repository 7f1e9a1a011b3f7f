#!/usr/bin/env bash
# Call setup rate with parley-load storm as the gateway, side by side with sipp_cps.sh.
#
#   loadtest/bench/storm_cps.sh TARGET RATE [SECONDS]
#
# TARGET=im:   through a release `parley run` node; one parley-load device logged in as
#              alice auto-answers (no media).
# TARGET=uas:  straight to SIPp's built-in uas on 127.0.0.1:5090 (the generator's ceiling).
# Calls have no hold time. Loopback only; every process is bounded and killed by PID.
set -u
TARGET=${1:?target im|uas}; RATE=${2:?rate}; SECS=${3:-10}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-/tmp/parley-bench/storm-$TARGET-$RATE-$(date +%s)}; mkdir -p "$OUT"; cd "$OUT"
N=$((RATE * SECS))
PIDS=()
if [ "$TARGET" = im ]; then
  "$ROOT/target/release/parley" run --data-dir "$OUT/data" > node.log 2>&1 &
  NODE=$!; PIDS+=($NODE)
  for _ in $(seq 100); do [ -f data/node.json ] && break; sleep 0.1; done
  "$ROOT/target/release/parley-load" device --cert data/quic-cert.der --user alice --password demo \
      --answer-after 0ms --media none --stats-every 0 --duration $((SECS + 40))s > device.log 2>&1 &
  PIDS+=($!)
  sleep 1
  DEST=127.0.0.1:5060
else
  sipp -sn uas -i 127.0.0.1 -p 5090 -nostdin -timeout $((SECS + 60))s -bg > uas.out 2>&1
  PIDS+=($(grep -oE 'PID=\[[0-9]+\]' uas.out | grep -oE '[0-9]+'))
  sleep 0.5
  DEST=127.0.0.1:5090
fi
timeout $((SECS + 60)) "$ROOT/target/release/parley-load" storm --target "$DEST" --to +15550100001 \
    --rate "$RATE" --calls "$N" --answer-timeout 10s --json report.json > storm.out 2> storm.err
RC=$?
for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
wait 2>/dev/null
echo "target=$TARGET rate=$RATE calls=$N storm_rc=$RC"
python3 - report.json <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
keys = ["attempts", "answered", "failed", "asr", "achieved_cps", "retransmissions", "cpu_s"]
print(" ".join(f"{k}={r.get(k)}" for k in keys if k in r))
for k in ("setup", "post_dial_delay"):
    if k in r:
        print(k, r[k])
print("failures", r.get("failures"))
PY
