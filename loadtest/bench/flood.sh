#!/usr/bin/env bash
# An INVITE flood against a release `parley run` node while legitimate calls go on.
#
#   [ROUNDS=N] loadtest/bench/flood.sh RATE [SECONDS]
#
# From 127.0.0.2, SIPp sends RATE INVITEs a second for SECONDS to alice (+15550100001),
# each never acknowledged nor cancelled (switch/tests/sipp/uac_flood.xml); alice's
# parley-load device never answers (no --answer-after), so the calls the node accepts ring. From 127.0.0.1,
# SIPp's built-in uac places 10 calls a second to bob (+15550100002, a parley-load device
# that answers at once) through the whole flood. Prints the node's RSS before, at the end
# of the flood and after its transactions expired (64*T1 = 32 s), the flood's refusals
# (503 per source, stateless 503 over the transaction cap, 486 over the ringing cap) and
# the legitimate calls' result. Everything binds loopback; every process is killed by PID.
set -u
RATE=${1:?rate}; SECS=${2:-20}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-/tmp/parley-bench/flood-$RATE-$(date +%s)}; mkdir -p "$OUT"; cd "$OUT"
rss() { awk '/VmRSS/ {print $2}' /proc/$NODE/status; }
metric() { curl -s "http://$HTTP/metrics" | awk -v m="$1" 'index($0, m) == 1 {s += $NF} END {print s + 0}'; }
"$ROOT/target/release/parley" run --data-dir "$OUT/data" > node.log 2>&1 &
NODE=$!
for _ in $(seq 100); do [ -f data/node.json ] && break; sleep 0.1; done
HTTP=$(python3 -c 'import json,sys; print(json.load(open("data/node.json"))["http"])')
"$ROOT/target/release/parley-load" device --cert data/quic-cert.der --user alice --password demo \
    --media none --stats-every 0 --duration $(( (SECS + 80) * ${ROUNDS:-1} ))s > alice.log 2>&1 &
ALICE=$!
"$ROOT/target/release/parley-load" device --cert data/quic-cert.der --user bob --password demo \
    --answer-after 0ms --media none --stats-every 0 --duration $(( (SECS + 80) * ${ROUNDS:-1} ))s > bob.log 2>&1 &
BOB=$!
sleep 1
RSS0=$(rss)
echo "flood rate=$RATE/s secs=$SECS invites=$((RATE * SECS)) from 127.0.0.2, rounds=${ROUNDS:-1}"
echo "rss_kib before=$RSS0"
for ROUND in $(seq "${ROUNDS:-1}"); do
  timeout $((SECS + 30)) sipp -sf "$ROOT/switch/tests/sipp/uac_flood.xml" 127.0.0.1:5060 -s +15550100001 \
      -i 127.0.0.2 -p 5072 -nostdin -r "$RATE" -m $((RATE * SECS)) -timeout $((SECS + 20))s \
      -trace_stat -stf flood$ROUND.csv -fd 1 > flood$ROUND.out 2>&1 &
  FLOOD=$!
  timeout $((SECS + 40)) sipp -sn uac 127.0.0.1:5060 -s +15550100002 -i 127.0.0.1 -p 5070 -nostdin \
      -r 10 -m $((10 * SECS)) -timeout $((SECS + 30))s -trace_stat -stf legit$ROUND.csv -fd 1 > legit$ROUND.out 2>&1
  LEGIT_RC=$?
  wait $FLOOD
  RSS1=$(rss)
  TX1=$(metric 'parley_sip_transactions{kind="server"}')
  sleep 35
  RSS2=$(rss)
  TX2=$(metric 'parley_sip_transactions{kind="server"}')
  echo "round $ROUND: rss_kib end_of_flood=$RSS1 after_35s=$RSS2; server_transactions end=$TX1 after=$TX2; legit sipp_rc=$LEGIT_RC"
  python3 "$ROOT/loadtest/bench/sipp_stat.py" legit$ROUND.csv "legit"
done
echo "refused in all: 503_per_source=$(metric 'parley_sip_overload_rejections_total{reason="calls_per_source"}')" \
     "503_stateless=$(metric 'parley_sip_overload_rejections_total{reason="transactions"}')" \
     "503_source_share=$(metric 'parley_sip_overload_rejections_total{reason="transactions_per_source"}')" \
     "486_ringing_cap=$(metric parley_calls_refused_ringing_cap_total)"
kill -TERM $NODE; kill $ALICE $BOB 2>/dev/null; wait $NODE 2>/dev/null
