#!/usr/bin/env bash
# `parley-load capacity` against a release `parley run` node, trunk route: alice offline,
# a SIPp uas on 127.0.0.1:5080 is the PSTN trunk. Finds the node's clean rate, then offers
# 1.5x, 2x and 4x of it for 30 s each. The node runs the embedded defaults
# (parley.example.toml) but for `max_ringing_per_user`, raised so that a storm to one
# number measures the switch, not that per-user guard (486 once 200 ring at once).
#
#   loadtest/bench/capacity.sh [START] [MAX]
#
# Everything binds loopback; every process is bounded in time and killed by PID.
set -u
START=${1:-100}; MAX=${2:-4000}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-/tmp/parley-bench/capacity-$(date +%s)}; mkdir -p "$OUT"; cd "$OUT"
sed 's/^max_ringing_per_user = .*/max_ringing_per_user = 1000000/' "$ROOT/parley.example.toml" > node.toml
grep -q '^max_ringing_per_user = 1000000' node.toml || { echo "node.toml: no max_ringing_per_user"; exit 1; }
"$ROOT/target/release/parley" run --config node.toml --data-dir "$OUT/data" > node.log 2>&1 &
NODE=$!
for _ in $(seq 100); do [ -f data/node.json ] && break; sleep 0.1; done
# -aa: the trunk answers OPTIONS, so the node's health probes can bring it back up.
sipp -sn uas -aa -i 127.0.0.1 -p 5080 -nostdin -timeout 1200s -bg > uas.out 2>&1
UAS=$(grep -oE 'PID=\[[0-9]+\]' uas.out | grep -oE '[0-9]+')
sleep 0.5
T0=$(awk '{print $14+$15}' /proc/$NODE/stat)
timeout 1200 "$ROOT/target/release/parley-load" capacity --target 127.0.0.1:5060 \
  --to +15550100001 --local 127.0.0.1:5070 --start "$START" --max "$MAX" \
  --json capacity.json 2> capacity.err | tee capacity.out
RC=${PIPESTATUS[0]}
T1=$(awk '{print $14+$15}' /proc/$NODE/stat)
kill -TERM $NODE; kill "$UAS" 2>/dev/null
wait $NODE 2>/dev/null
echo "capacity_rc=$RC node_cpu_s=$(echo "scale=1; ($T1 - $T0) / $(getconf CLK_TCK)" | bc) out=$OUT"
