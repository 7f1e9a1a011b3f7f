#!/usr/bin/env bash
# Gateway-to-device media through a release `parley run` node: the relay's UDP↔RoQ path.
#
#   loadtest/bench/device_media.sh CALLS [HOLD_SECS] [RATE]
#
# CALLS users, each with one parley-load device (echoing media over QUIC datagrams), each
# called once by `parley-load storm --media` (20 ms PCMU, 50 packets/s each way) and held
# HOLD_SECS (default 30). Calls start at RATE per second (default 100). During the middle
# of the hold, when every call is connected, the script reads the node's relay counters
# (/metrics) and the node's per-thread CPU (/proc) twice, 10 s apart, and prints the CPU
# per relayed packet: relay workers (`parley-relay-*`), the QUIC threads (`parley-quic`:
# encryption, decryption, device media to the relay), the control thread (actors) and
# the whole process, and the load generator's CPU. The
# storm's report gives round trip, jitter and loss over the whole run (including packets
# in flight when each call ends). Loopback only; every process started here is killed by
# PID.
set -euo pipefail
CALLS=${1:?usage: $0 CALLS [HOLD_SECS] [RATE]}
HOLD=${2:-30}
RATE=${3:-100}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-/tmp/parley-bench/device-media-$CALLS-$(date +%s)}
mkdir -p "$OUT"
cd "$OUT"
[ -x "$ROOT/target/release/parley" ] && [ -x "$ROOT/target/release/parley-load" ] ||
  (cd "$ROOT" && cargo build --release -p parley-switch -p parley-load)

# A node with CALLS users user1..userN, numbers +15550200001...
{
  cat <<CONF
data_dir = "$OUT/data"
demo = true
[sip]
listen = "127.0.0.1:5160"
[quic]
listen = "127.0.0.1:4533"
[http]
listen = "127.0.0.1:8180"
[relay]
port_min = 30000
port_max = 39999
CONF
  for i in $(seq 1 "$CALLS"); do
    printf '[[users]]\ntenant = "demo"\nuser = "user%d"\nnumber = "+1555020%04d"\npassword = "demo"\n' "$i" "$i"
  done
} > parley.toml

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
"$ROOT/target/release/parley" run --config parley.toml > node.log 2>&1 &
NODE=$!
PIDS+=("$NODE")
for _ in $(seq 300); do [ -f data/node.json ] && break; sleep 0.1; done
[ -f data/node.json ] || { echo "node did not start; see $OUT/node.log"; exit 1; }

LAST=$(printf '+1555020%04d' "$CALLS")
timeout $((HOLD + CALLS / RATE + 120)) "$ROOT/target/release/parley-load" storm -q \
  --target 127.0.0.1:5160 --to "+15550200001-$LAST" --rate "$RATE" --calls "$CALLS" \
  --hold "${HOLD}s" --media --answer-timeout 20s \
  --devices "user%d:1-$CALLS" --quic 127.0.0.1:4533 --cert data/quic-cert.der \
  --password demo --answer-after 0ms --json report.json > storm.out 2> storm.err &
STORM=$!
PIDS+=("$STORM")

# Relay packets so far (all paths), and CPU ticks of the node's threads by group.
packets() {
  curl -s http://127.0.0.1:8180/metrics |
    awk '/^parley_relay_packets_total/ { s += $NF } END { printf "%d\n", s }'
}
ticks() { # $1: thread name prefix, or "" for the whole process (exited threads included)
  if [ -z "$1" ]; then
    sed 's/.*) //' /proc/"$NODE"/stat | awk '{ print $12 + $13 }'
    return
  fi
  local total=0
  for t in /proc/"$NODE"/task/*; do
    local comm
    comm=$(cat "$t/comm" 2>/dev/null || true)
    if [[ "$comm" == "$1"* ]]; then
      local f
      f=$(sed 's/.*) //' "$t/stat" 2>/dev/null || true)
      [ -n "$f" ] && total=$((total + $(echo "$f" | awk '{ print $12 + $13 }')))
    fi
  done
  echo "$total"
}
# Wait until every call is bridged (devices log in first, then calls start), then 2 s
# more for the media to settle, then measure 10 s.
bridges() {
  curl -s http://127.0.0.1:8180/metrics | awk '/^parley_relay_flows_active/ { print int($NF) }'
}
for _ in $(seq $((HOLD * 10))); do
  [ "$(bridges)" = "$CALLS" ] && break
  sleep 0.1
done
[ "$(bridges)" = "$CALLS" ] || { echo "only $(bridges) of $CALLS calls bridged; see $OUT"; exit 1; }
sleep 2
WINDOW=10
proc_ticks() { sed 's/.*) //' /proc/"$1"/stat | awk '{ print $12 + $13 }'; }
GEN=$(pgrep -P "$STORM" | head -1)
P0=$(packets); R0=$(ticks parley-relay); Q0=$(ticks parley-quic); A0=$(ticks ""); G0=$(proc_ticks "$GEN"); T0=$(date +%s.%N)
sleep "$WINDOW"
P1=$(packets); R1=$(ticks parley-relay); Q1=$(ticks parley-quic); A1=$(ticks ""); G1=$(proc_ticks "$GEN"); T1=$(date +%s.%N)
FLOWS=$(curl -s http://127.0.0.1:8180/metrics | awk '/^parley_relay_flows_active/ { print $NF }')
curl -s http://127.0.0.1:8180/metrics | grep -E '^parley_relay_drops_total' > drops.txt || true
wait "$STORM" || true

HZ=$(getconf CLK_TCK)
python3 - "$P0" "$P1" "$R0" "$R1" "$A0" "$A1" "$T0" "$T1" "$HZ" "$FLOWS" report.json "$G0" "$G1" "$Q0" "$Q1" <<'PY'
import json, sys
p0, p1, r0, r1, a0, a1 = map(int, sys.argv[1:7])
t0, t1, hz = float(sys.argv[7]), float(sys.argv[8]), int(sys.argv[9])
flows = sys.argv[10]
gen = (int(sys.argv[13]) - int(sys.argv[12])) / hz
quic = (int(sys.argv[15]) - int(sys.argv[14])) / hz
secs = t1 - t0
pk = p1 - p0
relay, total = (r1 - r0) / hz, (a1 - a0) / hz
print(f"window {secs:.1f} s, bridges active {flows}, relayed {pk} packets = {pk / secs:.0f} pps")
rest = total - relay - quic
print(f"node CPU: relay workers {relay:.2f} s ({100 * relay / secs:.0f}% of a core), "
      f"QUIC threads {quic:.2f} s ({100 * quic / secs:.0f}%), "
      f"control thread + rest {rest:.2f} s ({100 * rest / secs:.0f}%), whole process {total:.2f} s")
if pk:
    print(f"per relayed packet: relay workers {1e6 * relay / pk:.2f} µs, QUIC {1e6 * quic / pk:.2f} µs, "
          f"control + rest {1e6 * rest / pk:.2f} µs, whole node {1e6 * total / pk:.2f} µs")
print(f"parley-load (gateway + devices) CPU in the window: {gen:.2f} s ({100 * gen / secs:.0f}% of a core)")
drops = [l.split() for l in open("drops.txt") if not l.startswith("#")]
def reason(series):
    return series.split("reason=")[1].strip('"}')
print("relay drops so far: " + (", ".join(reason(l[0]) + " " + l[1] for l in drops) or "none"))
r = json.load(open(sys.argv[11]))
m = r.get("media") or {}
print(f"storm: attempts {r['attempts']} answered {r['answered']} failed {r['failed']}")
if m:
    print("media: " + ", ".join(f"{k} {m[k]}" for k in ("streams", "sent", "received", "lost", "foreign") if k in m))
    for k in ("round_trip", "jitter"):
        if k in m and isinstance(m[k], dict):
            print(f"{k}: " + ", ".join(f"{q} {m[k][q]}" for q in ("p50_ms", "p99_ms", "max_ms") if q in m[k]))
PY
