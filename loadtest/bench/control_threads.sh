#!/usr/bin/env bash
# Call setup on 1 or more SIP control threads (`[sip] control_threads`), with the node's
# CPU per call split by thread, for issue #13's scaling model.
#
#   loadtest/bench/control_threads.sh THREADS RATE [SECONDS] [ROUTE]
#
# A release `parley run` with the embedded defaults (parley.example.toml, max_ringing_per_user
# raised so that a storm to one number measures the switch) and THREADS control threads;
# ROUTE trunk (default: alice offline, her PSTN line through a SIPp uas on :5080) or im
# (alice on a `parley-load device` that answers at once). One `parley-load storm` offers
# RATE calls/s for SECONDS (10), no hold time. Prints the storm's result and the node's
# CPU per call: all of it, and by thread (main = shard 0 with the user actors, HTTP and
# device control; shard N = arbiter N; relay workers; sqlx's SQLite worker; QUIC).
# WARM_PORTS sets `[relay] warm_ports` (default: the example's 4,096; 0 closes every
# released relay port, as before warm ports). Loopback only; every process is started here
# and stopped by PID.
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
THREADS=${1:?threads}; RATE=${2:?rate}; SECS=${3:-10}; ROUTE=${4:-trunk}
OUT=${OUT:-/tmp/parley-bench/control-threads-$THREADS-$RATE-$ROUTE-$(date +%s)}
mkdir -p "$OUT"; cd "$OUT"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; sleep 1
            for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done; }
trap cleanup EXIT
for b in parley parley-load; do
  [ -x "$ROOT/target/release/$b" ] || { echo "build first: cargo build --release -p parley-switch -p parley-load"; exit 1; }
done

sed -e 's/^max_ringing_per_user = .*/max_ringing_per_user = 1000000/' \
    -e "s/^control_threads = .*/control_threads = $THREADS/" \
    -e "s/^warm_ports = .*/warm_ports = ${WARM_PORTS:-4096}/" "$ROOT/parley.example.toml" > node.toml
if [ "$ROUTE" = trunk ]; then
  sipp -sn uas -aa -i 127.0.0.1 -p 5080 -nostdin -timeout 3000s -bg > uas.out 2>&1
  PIDS+=("$(grep -oE 'PID=\[[0-9]+\]' uas.out | grep -oE '[0-9]+')")
fi
"$ROOT/target/release/parley" run --config node.toml --data-dir "$OUT/data" > node.log 2>&1 &
NODE=$!; PIDS+=("$NODE")
for _ in $(seq 100); do [ -f data/node.json ] && break; sleep 0.1; done
[ -f data/node.json ] || { echo "the node did not start"; tail node.log; exit 1; }
if [ "$ROUTE" = im ]; then
  "$ROOT/target/release/parley-load" device --cert data/quic-cert.der --user alice \
    --password demo --answer-after 0ms --media none --stats-every 0 --duration 3000s \
    > device.log 2>&1 &
  PIDS+=($!); sleep 1
fi
sleep 0.5

# user+sys ticks of every thread, by name (the names of one kind summed).
threads() {
  for t in /proc/"$NODE"/task/*; do
    printf '%s\t%s\n' "$(cat "$t/comm")" "$(awk '{print $14+$15}' "$t/stat")"
  done | sort
}
threads > before.tsv
timeout $((SECS + 60)) "$ROOT/target/release/parley-load" storm --target 127.0.0.1:5060 \
  --to +15550100001 --local 127.0.0.1:5070 --rate "$RATE" --duration "${SECS}s" \
  --answer-timeout 10s --json storm.json > storm.out 2> storm.err
sleep 1
threads > after.tsv
python3 - "$THREADS" "$RATE" "$SECS" "$ROUTE" "$(getconf CLK_TCK)" <<'PY'
import json, sys, collections
threads, rate, secs, route, hz = sys.argv[1:]
hz = int(hz)
def load(p):
    d = collections.Counter()
    for line in open(p):
        name, ticks = line.rstrip("\n").split("\t")
        if name.startswith("parley-relay"): name = "relay workers"
        elif name.startswith("actix-rt|system"): name = "shards 1.. (actix-rt|system:0|arbiter:N)"
        elif name.startswith("parley-quic"): name = "quic"
        elif name.startswith("tokio-runtime") or name.startswith("tokio"): name = "tokio blocking pool"
        d[name] += int(ticks)
    return d
b, a = load("before.tsv"), load("after.tsv")
r = json.load(open("storm.json"))
calls = max(r.get("answered", 0), 1)
print(f"threads={threads} route={route} offered={rate} cps for {secs} s: attempts {r.get('attempts')} "
      f"answered {r.get('answered')} failed {r.get('failed')} achieved {r.get('achieved_cps')} cps, "
      f"failures {r.get('failures')}, retransmissions {r.get('retransmissions')}, setup {r.get('setup')}")
total = sum(a.values()) - sum(b.values())
print(f"node CPU {total / hz:.2f} s = {1e6 * total / hz / calls:.0f} us/call")
for name in sorted(a, key=lambda n: -(a[n] - b.get(n, 0))):
    d = a[name] - b.get(name, 0)
    if d > 0:
        print(f"  {name:45s} {d / hz:7.2f} s  {1e6 * d / hz / calls:6.0f} us/call")
PY
