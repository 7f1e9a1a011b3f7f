#!/usr/bin/env bash
# Carrier CDR import through a release `parley run` node: rows per second with address
# book updates, and the node's memory while a large file streams through it.
#
#   loadtest/bench/cdr_import.sh ROWS [USERS]
#   STORE_URL=postgres://USER@127.0.0.1:PORT/DB loadtest/bench/cdr_import.sh ROWS
#
# STORE_URL (optional) is the node's `[store] url`: unset, SQLite in the output directory.
# Writes an Asterisk Master.csv of ROWS rows (about 230 bytes each: 4.7 M rows ≈ 1 GB)
# whose calls involve USERS users of tenant demo (default 1000): 80% from one of 200,000
# outside numbers to a user, 10% from a user to an outside number, 5% between two users,
# 5% between outsiders (unmatched). Then `parley cdr import` streams it to the node over
# HTTP, and the script reports the import's wall time, rows per second, the node's CPU
# and its peak resident memory (VmHWM) before and after, the CLI's peak memory, and the
# import report. A second import of the same file measures the duplicate path.
# Loopback only; every process started here is killed by PID.
set -euo pipefail
ROWS=${1:?usage: $0 ROWS [USERS]}
USERS=${2:-1000}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-/tmp/parley-bench/cdr-import-$ROWS-$(date +%s)}
mkdir -p "$OUT"
cd "$OUT"
[ -x "$ROOT/target/release/parley" ] || (cd "$ROOT" && cargo build --release -p parley-switch)

{
  cat <<CONF
data_dir = "$OUT/data"
demo = true
[sip]
listen = "127.0.0.1:5162"
[quic]
listen = "127.0.0.1:4535"
[http]
listen = "127.0.0.1:8182"
[relay]
port_min = 40000
port_max = 40099
CONF
  if [ -n "${STORE_URL:-}" ]; then printf '[store]\nurl = "%s"\n' "$STORE_URL"; fi
  for i in $(seq 1 "$USERS"); do
    printf '[[users]]\ntenant = "demo"\nuser = "user%d"\nnumber = "+1555020%04d"\npassword = "demo"\n' "$i" "$i"
  done
} > parley.toml

echo "writing $ROWS rows"
python3 - "$ROWS" "$USERS" > Master.csv <<'PY'
import random, sys
rows, users = int(sys.argv[1]), int(sys.argv[2])
rnd = random.Random(7)
out = sys.stdout
user = lambda: "+1555020%04d" % rnd.randint(1, users)
outside = lambda: "+1212%07d" % rnd.randint(0, 199_999)
t0 = 1_764_000_000
buf = []
for i in range(rows):
    r = rnd.random()
    if r < 0.80: src, dst = outside(), user()
    elif r < 0.90: src, dst = user(), outside()
    elif r < 0.95: src, dst = user(), user()
    else: src, dst = outside(), outside()
    t = t0 + i
    answered = rnd.random() < 0.7
    bill = rnd.randint(5, 600) if answered else 0
    start = "2026-11-%02d %02d:%02d:%02d" % (1 + (t // 86400) % 28, (t // 3600) % 24, (t // 60) % 60, t % 60)
    ans = start if answered else ""
    disp = "ANSWERED" if answered else "NO ANSWER"
    buf.append(f'"","{src}","{dst}","from-pstn","""Caller {src[-4:]}"" <{src}>","SIP/gw-{i:08x}","PJSIP/u-{i:08x}","Dial","PJSIP/u,30,tT","{start}","{ans}","{start}",{bill + 5},{bill},"{disp}","DOCUMENTATION","{t}.{i}","","","{t}.{i}",{i}\n')
    if len(buf) == 10000:
        out.write("".join(buf)); buf.clear()
out.write("".join(buf))
PY
SIZE=$(stat -c %s Master.csv)
echo "file: $SIZE bytes"

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
"$ROOT/target/release/parley" run --config parley.toml > node.log 2>&1 &
NODE=$!
PIDS+=("$NODE")
# 1,000 users are hashed (Argon2id) on a first start: up to a minute.
for _ in $(seq 1200); do [ -f data/node.json ] && break; sleep 0.1; done
[ -f data/node.json ] || { echo "node did not start; see $OUT/node.log"; exit 1; }

hwm() { awk '/^VmHWM/ { print $2 }' /proc/"$NODE"/status; }
rss() { awk '/^VmRSS/ { print $2 }' /proc/"$NODE"/status; }
ticks() { sed 's/.*) //' /proc/"$NODE"/stat | awk '{ print $12 + $13 }'; }
# The whole machine's busy CPU (PostgreSQL's server and the CLI included).
machine() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }
HZ=$(getconf CLK_TCK)
run() { # $1: label
  local h0 r0 c0 t0 t1 c1 m0 m1
  h0=$(hwm); r0=$(rss); c0=$(ticks); m0=$(machine); t0=$(date +%s.%N)
  /usr/bin/time -f "%M" -o "cli-$1.kib" "$ROOT/target/release/parley" cdr --data-dir data \
    import --format asterisk Master.csv > "report-$1.json"
  t1=$(date +%s.%N); c1=$(ticks); m1=$(machine)
  python3 - "$1" "$ROWS" "$t0" "$t1" "$c0" "$c1" "$HZ" "$h0" "$(hwm)" "$r0" "$(rss)" "$(cat "cli-$1.kib")" "report-$1.json" "$m0" "$m1" <<'PY'
import json, sys
label, rows = sys.argv[1], int(sys.argv[2])
t0, t1 = float(sys.argv[3]), float(sys.argv[4])
cpu = (int(sys.argv[6]) - int(sys.argv[5])) / int(sys.argv[7])
h0, h1, r0, r1, cli = map(int, sys.argv[8:13])
rep = json.load(open(sys.argv[13]))
machine = (int(sys.argv[15]) - int(sys.argv[14])) / int(sys.argv[7])
secs = t1 - t0
print(f"{label}: {rows} rows in {secs:.1f} s = {rows / secs:,.0f} rows/s; node CPU {cpu:.1f} s "
      f"({100 * cpu / secs:.0f}% of a core); machine CPU {machine:.1f} s ({1e6 * machine / rows:.1f} us/row)")
print(f"  node memory: VmRSS {r0 // 1024} -> {r1 // 1024} MiB, peak (VmHWM) {h0 // 1024} -> {h1 // 1024} MiB; "
      f"CLI peak {cli // 1024} MiB")
print("  report: " + ", ".join(f"{k} {rep[k]}" for k in ("rows", "imported", "duplicates", "unmatched", "rejected", "users_touched")))
PY
}
run first
run again
if [ -n "${STORE_URL:-}" ]; then
  echo "store: ${STORE_URL%%\?*} (PostgreSQL)"
else
  echo "store: $(du -sh data | cut -f1) in $OUT/data"
fi
