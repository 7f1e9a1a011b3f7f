#!/usr/bin/env bash
# Call setup rate through a release `parley run` node, driven by SIPp's built-in uac.
#
#   loadtest/bench/sipp_cps.sh ROUTE RATE [SECONDS]
#
# ROUTE=im:   one parley-load device logged in as alice auto-answers every call (no media).
# ROUTE=pstn: alice offline; a SIPp uas on 127.0.0.1:5080 is the trunk.
# Calls have no hold time (BYE right after ACK), so the figure is signalling throughput.
# Everything binds loopback; every process is bounded in time and killed by PID.
set -u
ROUTE=${1:?route im|pstn}; RATE=${2:?rate}; SECS=${3:-20}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-/tmp/parley-bench/$ROUTE-$RATE-$(date +%s)}; mkdir -p "$OUT"; cd "$OUT"
N=$((RATE * SECS))
"$ROOT/target/release/parley" run --data-dir "$OUT/data" > node.log 2>&1 &
NODE=$!
for _ in $(seq 100); do [ -f data/node.json ] && break; sleep 0.1; done
PIDS=()
if [ "$ROUTE" = im ]; then
  "$ROOT/target/release/parley-load" device --cert data/quic-cert.der --user alice --password demo \
      --answer-after 0ms --media none --stats-every 0 --duration $((SECS + 40))s > device.log 2>&1 &
  PIDS+=($!)
  sleep 1
else
  sipp -sn uas -i 127.0.0.1 -p 5080 -nostdin -timeout $((SECS + 60))s -bg > uas.out 2>&1
  PIDS+=($(grep -oE 'PID=\[[0-9]+\]' uas.out | grep -oE '[0-9]+'))
  sleep 0.5
fi
T0=$(awk '{print $14+$15}' /proc/$NODE/stat)
/usr/bin/time -f "uac_cpu user=%U sys=%S wall=%e" \
  timeout $((SECS + 45)) sipp -sn uac 127.0.0.1:5060 -s +15550100001 -i 127.0.0.1 -p 5070 -nostdin \
     -r "$RATE" -l $((RATE * 4 + 100)) -m "$N" -timeout $((SECS + 30))s \
     -trace_stat -stf uac.csv -fd 1 > uac.out 2> uac.err
RC=$?
T1=$(awk '{print $14+$15}' /proc/$NODE/stat)
HZ=$(getconf CLK_TCK)
kill -TERM $NODE; for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
wait $NODE 2>/dev/null
echo "route=$ROUTE rate=$RATE secs=$SECS calls=$N sipp_rc=$RC $(tail -1 uac.err)"
echo "parley_cpu_s=$(echo "scale=2; ($T1 - $T0) / $HZ" | bc) ($(echo "scale=1; 1000000 * ($T1 - $T0) / $HZ / $N" | bc) us per call)"
python3 "$ROOT/loadtest/bench/sipp_stat.py" uac.csv "uac"
