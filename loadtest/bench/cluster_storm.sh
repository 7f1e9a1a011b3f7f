#!/usr/bin/env bash
# Call setup across a three-node cluster (NATS JetStream), one `parley-load storm` spreading
# the calls over the nodes.
#
#   loadtest/bench/cluster_storm.sh RATE [SECONDS] [MODE]
#
# Three release `parley run` nodes (a, b, c) on loopback share one `nats-server -js`.
# carol's device is on a, alice's on b, bob's on c (one parley-load device each,
# answering at once, no media). One `parley-load storm` spreads 3 x RATE calls/s over the
# three nodes (--also-target: call n to node n % 3) for SECONDS, no hold time:
#   MODE=handoff  every call is for the user on the next node (a→alice@b, b→bob@c,
#                 c→carol@a): rung over NATS, media bridged node to node;
#   MODE=local    every call is for the user on the node itself (the same work without a
#                 hand-off), to compare setup time and CPU.
# Prints the storm's result, the CPU of the three nodes and of nats-server over the run,
# and NATS messages per call (the server's in_msgs/out_msgs, /varz, and the nodes'
# parley_cluster_messages_total). Loopback only; every process is killed by PID.
set -u
RATE=${1:?rate per node}; SECS=${2:-10}; MODE=${3:-handoff}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-/tmp/parley-bench/cluster-$MODE-$RATE-$(date +%s)}; mkdir -p "$OUT"; cd "$OUT"
N=$((RATE * SECS))
NATS_PORT=${NATS_PORT:-14222}; NATS_MON=${NATS_MON:-18222}
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done; sleep 1; for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done; }
trap cleanup EXIT
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }  # user+sys, clock ticks

nats-server -js -a 127.0.0.1 -p "$NATS_PORT" -m "$NATS_MON" -sd "$OUT/js" \
    --user parley --pass bench-secret > nats.log 2>&1 &
NATS=$!; PIDS+=($NATS)
for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$NATS_PORT) 2>/dev/null && break; sleep 0.1; done

IDS=(a b c); USERS=(carol alice bob); NUMBERS=(+15550100003 +15550100001 +15550100002)
NODES=()
for i in 0 1 2; do
  cat > "n$i.toml" <<TOML
data_dir = "$OUT/n$i"
[sip]
listen = "127.0.0.1:$((15060 + i))"
[quic]
listen = "127.0.0.1:$((14433 + i))"
[http]
listen = "127.0.0.1:$((18080 + i))"
admin_token = "bench-token-0123456789"
[web]
enabled = false
[relay]
port_min = $((20000 + i * 4000))
port_max = $((23999 + i * 4000))
[[users]]
tenant = "demo"
user = "alice"
number = "+15550100001"
password = "demo"
[[users]]
tenant = "demo"
user = "bob"
number = "+15550100002"
password = "demo"
[[users]]
tenant = "demo"
user = "carol"
number = "+15550100003"
password = "demo"
[cluster]
nats = ["nats://127.0.0.1:$NATS_PORT"]
node_id = "${IDS[$i]}"
user = "parley"
password = "bench-secret"
TOML
  PARLEY_LOG=warn "$ROOT/target/release/parley" run --config "n$i.toml" > "n$i.log" 2>&1 &
  NODES+=($!); PIDS+=($!)
done
for i in 0 1 2; do
  for _ in $(seq 100); do [ -f "n$i/node.json" ] && break; sleep 0.1; done
  "$ROOT/target/release/parley-load" device --target "127.0.0.1:$((14433 + i))" \
      --cert "n$i/quic-cert.der" --user "${USERS[$i]}" --password demo --device desk \
      --answer-after 0ms --media none --stats-every 0 --duration $((SECS + 60))s > "dev$i.log" 2>&1 &
  PIDS+=($!)
done
# Every node sees the two other users' devices.
for i in 0 1 2; do
  for _ in $(seq 100); do
    v=$(curl -s "http://127.0.0.1:$((18080 + i))/metrics" | awk '$1=="parley_cluster_remote_devices"{print $2}')
    [ "${v:-0}" = 2 ] && break; sleep 0.1
  done
  echo "node ${IDS[$i]}: remote devices ${v:-?}"
done
varz() { curl -s "http://127.0.0.1:$NATS_MON/varz" | python3 -c 'import json,sys; v=json.load(sys.stdin); print(v["in_msgs"], v["out_msgs"])'; }
msgs() { curl -s "http://127.0.0.1:$((18080 + $1))/metrics" | awk '/^parley_cluster_messages_total\{direction="out"\}/{print $2}'; }
read -r IN0 OUT0 < <(varz)
C0=0; for p in "${NODES[@]}"; do C0=$((C0 + $(cpu "$p"))); done; CN0=$(cpu "$NATS")
M0=0; for i in 0 1 2; do M0=$((M0 + $(msgs $i))); done
T0=$(date +%s.%N)
# One generator spreads the calls over the three nodes (call n to node n % 3), to the
# numbers in order: handoff, the user on the next node; local, the user on that node.
if [ "$MODE" = handoff ]; then
  printf '%s\n' "${NUMBERS[1]}" "${NUMBERS[2]}" "${NUMBERS[0]}" > numbers.txt
else
  printf '%s\n' "${NUMBERS[0]}" "${NUMBERS[1]}" "${NUMBERS[2]}" > numbers.txt
fi
timeout $((SECS + 60)) "$ROOT/target/release/parley-load" storm --target 127.0.0.1:15060 \
    --also-target 127.0.0.1:15061,127.0.0.1:15062 --to @numbers.txt \
    --rate $((3 * RATE)) --calls $((3 * N)) --answer-timeout 10s --json storm.json \
    > storm.out 2> storm.err
T1=$(date +%s.%N)
sleep 1
read -r IN1 OUT1 < <(varz)
C1=0; for p in "${NODES[@]}"; do C1=$((C1 + $(cpu "$p"))); done; CN1=$(cpu "$NATS")
M1=0; for i in 0 1 2; do M1=$((M1 + $(msgs $i))); done
HZ=$(getconf CLK_TCK)
python3 - "$MODE" "$RATE" "$SECS" "$T0" "$T1" "$C0" "$C1" "$CN0" "$CN1" "$HZ" "$IN0" "$IN1" "$OUT0" "$OUT1" "$M0" "$M1" <<'PY'
import json, sys
mode, rate, secs, t0, t1, c0, c1, cn0, cn1, hz, in0, in1, out0, out1, m0, m1 = sys.argv[1:]
wall = float(t1) - float(t0)
r = json.load(open("storm.json"))
tot = {k: r.get(k, 0) for k in ("attempts", "answered", "failed")}
print(f"storm: target={r.get('target')} achieved_cps={r.get('achieved_cps')} setup={r.get('setup')} "
      f"failures={r.get('failures')} retransmissions={r.get('retransmissions')}")
calls = max(tot["answered"], 1)
node_cpu = (int(c1) - int(c0)) / int(hz)
nats_cpu = (int(cn1) - int(cn0)) / int(hz)
print(f"mode={mode} offered={3*int(rate)} cps for {secs} s; {tot}; wall {wall:.1f} s")
print(f"node CPU {node_cpu:.2f} s for 3 nodes = {1e6*node_cpu/calls:.0f} us/call; nats-server CPU {nats_cpu:.2f} s = {1e6*nats_cpu/calls:.0f} us/call")
print(f"NATS messages per call: in {(int(in1)-int(in0))/calls:.2f}, out {(int(out1)-int(out0))/calls:.2f} (server, all traffic incl. heartbeats); "
      f"cluster signalling published by the nodes {(float(m1)-float(m0))/calls:.2f}")
PY
