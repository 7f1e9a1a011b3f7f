#!/usr/bin/env bash
# Presence updates per second with fan-out, through a release `parley run` node.
#
#   loadtest/bench/presence_fanout.sh USERS WATCHERS RATE [SECONDS]
#
# Starts a node whose config has USERS users (user1..userN, password "bench"), logs one
# parley-load device in per user, subscribes every user to WATCHERS others (ring), and has
# the devices change presence at RATE updates/s in total. Loopback only; bounded.
set -u
USERS=${1:?users}; WATCHERS=${2:?watchers}; RATE=${3:?rate}; SECS=${4:-10}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-/tmp/parley-bench/presence-$USERS-$WATCHERS-$RATE-$(date +%s)}; mkdir -p "$OUT"; cd "$OUT"
{
  echo "data_dir = \"$OUT/data\""
  echo "demo = true"
  echo "[quic]"
  echo "listen = \"127.0.0.1:4543\""
  echo "[sip]"
  echo "listen = \"127.0.0.1:5160\""
  echo "[http]"
  echo "listen = \"127.0.0.1:8180\""
  for i in $(seq 1 "$USERS"); do
    printf '[[users]]\ntenant = "demo"\nuser = "user%d"\nnumber = "+1555020%04d"\npassword = "bench"\n' "$i" "$i"
  done
} > parley.toml
"$ROOT/target/release/parley" run --config parley.toml > node.log 2>&1 &
NODE=$!
for _ in $(seq 300); do [ -f data/node.json ] && break; sleep 0.1; done
T0=$(awk '{print $14+$15}' /proc/$NODE/stat)
timeout $((SECS + 60)) "$ROOT/target/release/parley-load" presence --target 127.0.0.1:4543 \
    --cert data/quic-cert.der --users "user%d:1-$USERS" --password bench \
    --watchers "$WATCHERS" --rate "$RATE" --duration "${SECS}s" > report.json 2> load.err
RC=$?
T1=$(awk '{print $14+$15}' /proc/$NODE/stat)
kill -TERM $NODE; wait $NODE 2>/dev/null
echo "users=$USERS watchers=$WATCHERS rate=$RATE rc=$RC parley_cpu_s=$(echo "scale=2; ($T1 - $T0) / $(getconf CLK_TCK)" | bc) (includes logins)"
cat report.json
