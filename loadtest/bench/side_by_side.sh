#!/usr/bin/env bash
# Issue #13's table, re-measured in one run with one tool: `parley-load capacity` finds the
# highest clean call rate of each target by itself (doubling, then bisecting; clean = under
# 0.1% failed and the last call over within 2 s of the last INVITE), then offers 1.5x, 2x
# and 4x of it for 30 s each and reports the goodput. Targets, in this order:
#
#   kamailio      Kamailio (4 children, stateful, record-routing) + rtpengine (userspace,
#                 offer/answer rewriting every SDP), toward a SIPp uas trunk on :5080
#   parley-trunk  a release `parley run`, alice offline: her PSTN line through the same
#                 SIPp uas trunk
#   parley-im     the same node, alice on a `parley-load device` that answers at once
#
#   loadtest/bench/side_by_side.sh [TARGETS...]     (default: all three)
#
# Env: START (first rate, 250), MAX (highest rate tried, 6000), STEP (10s), OVERLOAD
# (1.5,2,4), OVERLOAD_SECS (30s), KAM_CHILDREN (4), CONTROL_THREADS (Parley's [sip]
# control_threads, 1), OUT. Each target's capacity report is
# in $OUT/TARGET.out and .json, its CPU and peak RSS (of the node; of rtpengine and every
# Kamailio process) in $OUT/TARGET.cpu; the summary table at the end.
# Installs kamailio and rtpengine (Debian) when missing. Loopback only; every process is
# started here, bounded in time and stopped by PID.
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-/tmp/parley-bench/side-by-side-$(date +%s)}; mkdir -p "$OUT"; cd "$OUT"
START=${START:-250}; MAX=${MAX:-6000}; STEP=${STEP:-10s}
OVERLOAD=${OVERLOAD:-1.5,2,4}; OVERLOAD_SECS=${OVERLOAD_SECS:-30s}
CONTROL_THREADS=${CONTROL_THREADS:-1}
TARGETS=("$@"); [ ${#TARGETS[@]} -gt 0 ] || TARGETS=(kamailio parley-trunk parley-im)
HZ=$(getconf CLK_TCK)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; sleep 1
            for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done; PIDS=(); }
trap cleanup EXIT

if [[ " ${TARGETS[*]} " == *" kamailio "* ]] && ! command -v kamailio >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kamailio kamailio-extra-modules \
    rtpengine-daemon rtpengine-utils
fi
for b in parley parley-load; do
  [ -x "$ROOT/target/release/$b" ] || { echo "build first: cargo build --release -p parley-switch -p parley-load"; exit 1; }
done

# CPU (user+sys ticks) of a process and its threads.
ticks() { awk '{print $14+$15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

start_trunk() {
  # -aa: the trunk answers OPTIONS (Parley probes its trunks).
  sipp -sn uas -aa -i 127.0.0.1 -p 5080 -nostdin -timeout 3000s -bg > "$1-uas.out" 2>&1
  PIDS+=("$(grep -oE 'PID=\[[0-9]+\]' "$1-uas.out" | grep -oE '[0-9]+')")
}

start_kamailio() {
  cat > rtpengine.conf <<'CONF'
[rtpengine]
table = -1
interface = 127.0.0.1
listen-ng = 127.0.0.1:2223
port-min = 30000
port-max = 59999
timeout = 60
delete-delay = 0
log-level = 4
foreground = true
log-stderr = true
CONF
  # A stateful proxy: every INVITE's SDP goes through rtpengine (offer, then answer on the
  # 18x/2xx), BYE and failures delete the session; in-dialog requests (SIPp's built-in uac
  # and parley-load send them to the proxy with no Route) are relayed to the trunk.
  cat > kamailio.cfg <<'CFG'
#!KAMAILIO
debug=1
log_stderror=yes
listen=udp:127.0.0.1:5060
disable_tcp=yes
auto_aliases=no
alias="127.0.0.1:5060"
dns=no
rev_dns=no
use_dns_cache=no
loadmodule "kex.so"
loadmodule "corex.so"
loadmodule "tm.so"
loadmodule "tmx.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "rtpengine.so"
modparam("rtpengine", "rtpengine_sock", "udp:127.0.0.1:2223")
modparam("rtpengine", "rtpengine_tout_ms", 2000)
modparam("tm", "fr_timer", 5000)
modparam("tm", "fr_inv_timer", 30000)
request_route {
	if (!mf_process_maxfwd_header("10")) { sl_send_reply("483", "Too Many Hops"); exit; }
	if (is_method("OPTIONS") && uri==myself && $rU==$null) { sl_send_reply("200", "OK"); exit; }
	if (is_method("CANCEL")) {
		if (t_check_trans()) { rtpengine_delete(); route(RELAY); }
		exit;
	}
	if (has_totag()) {
		loose_route();
		if (is_method("BYE")) { rtpengine_delete(); }
		route(RELAY);
	}
	if (is_method("INVITE")) {
		record_route();
		if (has_body("application/sdp")) { rtpengine_offer("replace-origin replace-session-connection"); }
		t_on_reply("REPLY");
		t_on_failure("FAILURE");
	}
	route(RELAY);
}
route[RELAY] {
	if ($du == $null) { $du = "sip:127.0.0.1:5080"; }
	if (!t_relay()) { sl_reply_error(); }
	exit;
}
onreply_route[REPLY] {
	if (status=~"(18[03])|(2[0-9][0-9])" && has_body("application/sdp")) {
		rtpengine_answer("replace-origin replace-session-connection");
	}
}
failure_route[FAILURE] { rtpengine_delete(); }
CFG
  rtpengine --config-file="$OUT/rtpengine.conf" --pidfile="$OUT/rtpe.pid" > rtpengine.log 2>&1 &
  RTPE=$!; PIDS+=("$RTPE"); sleep 1
  kamailio -f "$OUT/kamailio.cfg" -DD -E -m 1024 -M 32 -n "${KAM_CHILDREN:-4}" -P "$OUT/kam.pid" \
    > kamailio.log 2>&1 &
  KAM=$!; PIDS+=("$KAM"); sleep 2
  kill -0 "$KAM" 2>/dev/null || { echo "kamailio failed to start"; tail kamailio.log; exit 1; }
  MEASURED=("$RTPE" "$KAM")
}

start_parley() {
  local route=$1
  sed -e 's/^max_ringing_per_user = .*/max_ringing_per_user = 1000000/' \
      -e "s/^control_threads = .*/control_threads = $CONTROL_THREADS/" "$ROOT/parley.example.toml" > node.toml
  "$ROOT/target/release/parley" run --config node.toml --data-dir "$OUT/data-$route" > "$route-node.log" 2>&1 &
  local node=$!; PIDS+=("$node")
  for _ in $(seq 100); do [ -f "data-$route/node.json" ] && break; sleep 0.1; done
  if [ "$route" = parley-im ]; then
    "$ROOT/target/release/parley-load" device --cert "data-$route/quic-cert.der" --user alice \
      --password demo --answer-after 0ms --media none --stats-every 0 --duration 3000s \
      > "$route-device.log" 2>&1 &
    PIDS+=($!); sleep 1
  fi
  MEASURED=("$node")
}

# The measured processes and their children (Kamailio's workers are processes).
tree() { for p in "${MEASURED[@]}"; do echo "$p"; pgrep -P "$p"; done; }
cpu_of() { local t=0; for p in $(tree); do t=$((t + $(ticks "$p"))); done; echo "$t"; }

for target in "${TARGETS[@]}"; do
  echo "== $target ($(date -u +%H:%M:%S))"
  case $target in
    kamailio) start_trunk "$target"; start_kamailio ;;
    parley-trunk) start_trunk "$target"; start_parley "$target" ;;
    parley-im) start_parley "$target" ;;
    *) echo "unknown target $target"; exit 2 ;;
  esac
  sleep 0.5
  C0=$(cpu_of)
  timeout 3000 "$ROOT/target/release/parley-load" capacity --target 127.0.0.1:5060 \
    --to +15550100001 --local 127.0.0.1:5070 --start "$START" --max "$MAX" --step "$STEP" \
    --overload "$OVERLOAD" --overload-duration "$OVERLOAD_SECS" \
    --json "$target.json" 2> "$target.err" | tee "$target.out"
  C1=$(cpu_of)
  HWM=$(for p in $(tree); do awk '/VmHWM/ {print $2}' "/proc/$p/status" 2>/dev/null; done | paste -sd+ | bc)
  echo "target=$target cpu_s=$(echo "scale=1; ($C1 - $C0) / $HZ" | bc) peak_rss_mib=$(( ${HWM:-0} / 1024 ))" | tee "$target.cpu"
  cleanup
  sleep 2
done
echo "== summary ($OUT)"
for target in "${TARGETS[@]}"; do
  python3 - "$target" "$target.json" <<'PY'
import json, sys
name, path = sys.argv[1], sys.argv[2]
try:
    r = json.load(open(path))
except Exception as e:
    print(f"{name}: no report ({e})"); sys.exit(0)
clean = r.get("clean_cps")
print(f"{name}: clean rate {clean} calls/s" + (" (reached --max)" if r.get("reached_max") else ""))
for o in r.get("overload", []):
    run = o["run"]
    print(f"  {o['factor']}x: offered {o['offered_cps']:.0f}/s, goodput {o['goodput_cps']:.0f}/s "
          f"({100 * o['goodput_of_clean']:.0f}% of clean), {run['failed']} of {run['attempts']} failed, "
          f"tail {run['tail_s']:.1f} s, setup p99 {run['setup_p99_ms']:.0f} ms, "
          f"retransmissions {run['retransmissions']}, failures {run['failures']}")
rec = r.get("recovery")
if rec:
    print(f"  recovery at {rec['rate_cps']:.0f}/s: {rec['completed']} of {rec['attempts']}, "
          + ("clean" if rec["clean"] else rec["why"]))
PY
done
