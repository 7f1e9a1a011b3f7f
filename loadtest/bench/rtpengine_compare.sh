#!/usr/bin/env bash
# Parley's relay and rtpengine (userspace, `table = -1`) relaying the same G.711 traffic,
# side by side: CPU per relayed packet, loss, latency; then the floor (a bare forwarder
# with the same sockets, `relay-bench --floor`) for what the kernel alone costs.
#
#   loadtest/bench/rtpengine_compare.sh FLOWS [SECS]
#   RUNS="direct kernel parley rtpengine" loadtest/bench/rtpengine_compare.sh FLOWS [SECS]
#
# RUNS picks the runs, in order (default "rtpengine parley floor"): `rtpengine`
# (userspace), `parley` (Parley's relay in userspace), `kernel` (Parley's relay with its
# eBPF fast path, `relay-bench --kernel`: needs root and a build with clang), `floor`
# (the bare forwarder), `direct` (the generator sending straight to its receivers: the
# baseline the machine's CPU per relayed packet is measured against). Each run prints the
# whole machine's busy CPU per relayed packet (`/proc/stat`: softirq, the senders and the
# receivers included, which is where the kernel fast path's work lands); the summary
# subtracts the nearest earlier `direct` run's (or the first one's) from each other run.
# Run names may repeat (alternate them: `RUNS="direct kernel direct kernel"`); each run's
# output is in $OUT/N-NAME.txt. `SPIN=1` makes the generator's receiver spin on a CPU of
# its own (see below) for the direct-versus-kernel comparison.
#
# Both relays are driven by the same generator (`relay-bench`): FLOWS calls, 172-byte RTP
# at 50 pps each way, caller sockets 127.0.0.1:GEN_BASE.., callee sockets after them.
# rtpengine's calls are created through its ng control protocol (bencode over UDP,
# `offer`/`answer` with SDP naming those sockets); its CPU is read from /proc/PID.
# Loopback only; every process this script starts is stopped by PID.
set -euo pipefail
FLOWS=${1:?usage: $0 FLOWS [SECS]}
SECS=${2:-10}
SOCKETS=${SOCKETS:-16}
GEN_BASE=${GEN_BASE:-60000}
NG_PORT=${NG_PORT:-2223}
OUT=${OUT:-/tmp/lab/rtpengine_compare}
RUNS=${RUNS:-rtpengine parley floor}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BENCH="$ROOT/target/release/relay-bench"
mkdir -p "$OUT"

[ -x "$BENCH" ] || (cd "$ROOT" && cargo build --release -p parley-switch)

run_rtpengine() {
if ! command -v rtpengine >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rtpengine-daemon rtpengine-utils
fi
# rtpengine takes an RTP and an RTCP port per side: 4 ports per call.
cat > "$OUT/rtpengine.conf" <<CONF
[rtpengine]
table = -1
interface = 127.0.0.1
listen-ng = 127.0.0.1:$NG_PORT
port-min = 10000
port-max = 59999
timeout = 3600
silent-timeout = 3600
delete-delay = 0
log-level = 4
foreground = true
log-stderr = true
CONF

rtpengine --config-file="$OUT/rtpengine.conf" > "$OUT/rtpengine.log" 2>&1 &
RTPE=$!
trap 'kill $RTPE 2>/dev/null || true; wait $RTPE 2>/dev/null || true' EXIT
sleep 1
kill -0 $RTPE

# Create the calls: one offer (caller's SDP) and one answer (callee's SDP) per flow; write
# "port the caller sends to, port the callee sends to" per flow.
python3 - "$FLOWS" "$SOCKETS" "$GEN_BASE" "$NG_PORT" > "$OUT/ports.txt" <<'PY'
import re, socket, sys

flows, k, base, ng = map(int, sys.argv[1:5])

def benc(v):
    if isinstance(v, int): return b"i%de" % v
    if isinstance(v, str): v = v.encode()
    if isinstance(v, bytes): return b"%d:%s" % (len(v), v)
    if isinstance(v, list): return b"l" + b"".join(map(benc, v)) + b"e"
    if isinstance(v, dict):
        return b"d" + b"".join(benc(key) + benc(v[key]) for key in sorted(v)) + b"e"
    raise TypeError(v)

def bdec(b, i=0):
    c = b[i:i+1]
    if c == b"i":
        j = b.index(b"e", i); return int(b[i+1:j]), j + 1
    if c in (b"l", b"d"):
        i += 1; out = []
        while b[i:i+1] != b"e":
            x, i = bdec(b, i); out.append(x)
        return (out if c == b"l" else dict(zip(out[::2], out[1::2]))), i + 1
    j = b.index(b":", i); n = int(b[i:j]); return b[j+1:j+1+n], j + 1 + n

s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
seq = 0
def ng_call(msg):
    global seq
    seq += 1
    cookie = b"c%d" % seq
    s.sendto(cookie + b" " + benc(msg), ("127.0.0.1", ng))
    while True:
        data, _ = s.recvfrom(65536)
        c, _, body = data.partition(b" ")
        if c == cookie: break
    r, _ = bdec(body)
    if r.get(b"result") != b"ok":
        sys.exit(f"rtpengine refused {msg['command']}: {r}")
    return int(re.search(rb"m=audio (\d+)", r[b"sdp"]).group(1))

def sdp(port):
    return ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n")

for i in range(flows):
    call = {"call-id": f"bench-{i}", "from-tag": f"a{i}"}
    # The offer's answer SDP goes to the callee: the port the callee sends to.
    to_callee = ng_call(dict(call, command="offer", sdp=sdp(base + i % k)))
    to_caller = ng_call(dict(call, command="answer", **{"to-tag": f"b{i}"},
                             sdp=sdp(base + k + i % k)))
    print(to_caller, to_callee)
PY
echo "rtpengine: $(wc -l < "$OUT/ports.txt") calls created (pid $RTPE)"

echo "=== rtpengine (userspace), $FLOWS flows ==="
"$BENCH" --external "$OUT/ports.txt" --external-pid $RTPE --gen-base "$GEN_BASE" \
  --sockets "$SOCKETS" --secs "$SECS" | tee "$OUT/rtpengine.txt"
kill $RTPE; wait $RTPE 2>/dev/null || true
trap - EXIT

}

# `SPIN=1`: the generator's receiver spins on its own CPU (`relay-bench --spin`), so that
# how often it is woken does not differ between modes (direct and kernel runs only: a
# userspace relay at 1,000 flows saturates the one CPU left to it).
SPIN_ARG=""
[ "${SPIN:-0}" = 1 ] && SPIN_ARG="--spin"
i=0
for run in $RUNS; do
  i=$((i + 1))
  f="$OUT/$i-$run.txt"
  case $run in
    rtpengine) run_rtpengine; mv "$OUT/rtpengine.txt" "$f" ;;
    parley)
      echo "=== parley relay, $FLOWS flows ==="
      "$BENCH" --flows "$FLOWS" --sockets "$SOCKETS" --secs "$SECS" | tee "$f" ;;
    kernel)
      echo "=== parley relay, kernel fast path, $FLOWS flows ==="
      "$BENCH" --flows "$FLOWS" --sockets "$SOCKETS" --secs "$SECS" --kernel $SPIN_ARG | tee "$f" ;;
    floor)
      # The floor: a bare recvfrom/sendto forwarder on the same number of sockets and
      # threads, the least any relay with a UDP socket per port pays the kernel per packet.
      echo "=== floor (bare forwarder), $FLOWS flows ==="
      "$BENCH" --flows "$FLOWS" --sockets "$SOCKETS" --secs "$SECS" --floor | tee "$f" ;;
    direct)
      echo "=== direct (no relay), $FLOWS flows ==="
      "$BENCH" --flows "$FLOWS" --sockets "$SOCKETS" --secs "$SECS" --direct $SPIN_ARG | tee "$f" ;;
    *) echo "unknown run $run" >&2; exit 2 ;;
  esac
done

# Each run beside the nearest `direct` run before it (or the first one after it).
machine() { grep -o 'machine CPU: .* per relayed packet: [0-9.]* µs' "$1" | grep -o '[0-9.]* µs$' | cut -d' ' -f1; }
echo
echo "=== side by side: $FLOWS flows x 50 pps each way, $SECS s${SPIN_ARG:+, receiver spinning} ==="
i=0
base=""
first_direct=""
j=0
for run in $RUNS; do
  j=$((j + 1))
  [ "$run" = direct ] && [ -z "$first_direct" ] && first_direct=$(machine "$OUT/$j-direct.txt")
done
for run in $RUNS; do
  i=$((i + 1))
  f="$OUT/$i-$run.txt"
  m=$(machine "$f")
  extra=""
  if [ "$run" = direct ]; then
    base=$m
  else
    b=${base:-$first_direct}
    [ -n "$b" ] && extra=" | minus direct: $(awk -v a="$m" -v b="$b" 'BEGIN { printf "%.2f", a - b }') µs"
  fi
  printf '%-10s %s | machine %s µs%s | %s | %s\n' "$run" \
    "$(grep -o 'per relayed packet: [0-9.]* µs (stat)' "$f" | head -1)" "$m" "$extra" \
    "$(grep -o 'lost: [0-9]* ([0-9.]*%)' "$f")" \
    "$(grep -o 'p50 [0-9.]* µs  p99 [0-9.]* µs' "$f")"
done
