#!/usr/bin/env python3
"""Gateway-to-browser media through a release `parley run` node: the WebRTC path.

    loadtest/bench/browser_media.py CALLS [HOLD_SECS]

CALLS users, each signed in to the web client in one page of one headless Chromium
(Playwright, fake microphone), each called once by `parley-load storm --media` (20 ms
PCMU, 50 packets/s from the gateway) and answered by its page, which sends its
microphone back (G.711, 50 packets/s). During the hold, with every call connected, the
script reads the node's counters (/metrics) and its per-thread CPU (/proc) twice, 10 s
apart, and prints the CPU per packet on the browser path: the WebRTC thread
(`parley-webrtc`: ICE, DTLS, SRTP both ways, RTP to and from the relay), the relay
workers, the rest, and the whole process. Compare with `device_media.sh CALLS` (the same
calls to QUIC devices, RoQ) run in the same session. Loopback only; every process started
here is stopped.
"""
import json
import os
import subprocess
import sys
import time
import urllib.request

from playwright.sync_api import sync_playwright

CALLS = int(sys.argv[1]) if len(sys.argv) > 1 else 4
HOLD = int(sys.argv[2]) if len(sys.argv) > 2 else 30
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.environ.get("OUT", f"/tmp/parley-bench/browser-media-{CALLS}-{int(time.time())}")
os.makedirs(OUT, exist_ok=True)
PARLEY = os.path.join(ROOT, "target/release/parley")
LOAD = os.path.join(ROOT, "target/release/parley-load")
for b in (PARLEY, LOAD):
    if not os.access(b, os.X_OK):
        sys.exit(f"{b} missing: cargo build --release -p parley-switch -p parley-load")
HZ = os.sysconf("SC_CLK_TCK")

conf = [
    f'data_dir = "{OUT}/data"',
    "demo = true",
    '[sip]\nlisten = "127.0.0.1:5163"',
    '[quic]\nlisten = "127.0.0.1:4536"',
    '[http]\nlisten = "127.0.0.1:8183"',
    '[web]\nlisten = "127.0.0.1:8189"',
    "[relay]\nport_min = 41000\nport_max = 41999",
]
for i in range(1, CALLS + 1):
    conf.append(
        f'[[users]]\ntenant = "demo"\nuser = "user{i}"\nnumber = "+1555020{i:04d}"\npassword = "demo"'
    )
open(f"{OUT}/parley.toml", "w").write("\n".join(conf) + "\n")


def metrics():
    text = urllib.request.urlopen("http://127.0.0.1:8183/metrics").read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("parley_") and " " in line:
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def total(m, prefix):
    return sum(v for k, v in m.items() if k.startswith(prefix))


def thread_ticks(pid):
    by = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = open(f"/proc/{pid}/task/{t}/comm").read().strip()
            f = open(f"/proc/{pid}/task/{t}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        group = "webrtc" if comm.startswith("parley-webrtc") else "relay" if comm.startswith("parley-relay") else "rest"
        by[group] = by.get(group, 0) + int(f[11]) + int(f[12])
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    by["process"] = int(f[11]) + int(f[12])
    return by


node = subprocess.Popen([PARLEY, "run", "--config", f"{OUT}/parley.toml"],
                        stdout=open(f"{OUT}/node.log", "w"), stderr=subprocess.STDOUT)
storm = None
try:
    for _ in range(1200):
        if os.path.exists(f"{OUT}/data/node.json"):
            break
        time.sleep(0.1)
    else:
        sys.exit(f"node did not start; see {OUT}/node.log")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--use-fake-device-for-media-stream",
            "--use-fake-ui-for-media-stream", "--allow-loopback-in-peer-connection",
            "--autoplay-policy=no-user-gesture-required"])
        pages = []
        for i in range(1, CALLS + 1):
            page = browser.new_context().new_page()
            page.goto("http://127.0.0.1:8189/")
            page.fill("#tenant", "demo")
            page.fill("#user", f"user{i}")
            page.fill("#password", "demo")
            page.click("#signin-button")
            pages.append(page)
        for page in pages:
            page.wait_for_function(
                "async () => (await window.parleyMediaStats()).state === 'connected'", timeout=30_000)
        print(f"{CALLS} pages signed in, media connected")
        storm = subprocess.Popen(
            [LOAD, "storm", "-q", "--target", "127.0.0.1:5163",
             "--to", f"+15550200001-+1555020{CALLS:04d}", "--rate", "10", "--calls", str(CALLS),
             "--hold", f"{HOLD}s", "--media", "--answer-timeout", "20s", "--json", f"{OUT}/report.json"],
            stdout=open(f"{OUT}/storm.out", "w"), stderr=open(f"{OUT}/storm.err", "w"))
        answered = set()
        deadline = time.time() + 30
        while len(answered) < CALLS and time.time() < deadline:
            for i, page in enumerate(pages):
                if i not in answered and page.is_visible("#answer"):
                    page.click("#answer")
                    answered.add(i)
            time.sleep(0.05)
        if len(answered) < CALLS:
            sys.exit(f"only {len(answered)} of {CALLS} pages rang; see {OUT}")
        time.sleep(3)
        m0, c0, t0 = metrics(), thread_ticks(node.pid), time.time()
        time.sleep(10)
        m1, c1, t1 = metrics(), thread_ticks(node.pid), time.time()
        stats = [page.evaluate("() => window.parleyMediaStats()") for page in pages]
        storm.wait(timeout=HOLD + 60)
        browser.close()
    secs = t1 - t0
    to_b = total(m1, 'parley_webrtc_packets_total{direction="to_browser"') - total(m0, 'parley_webrtc_packets_total{direction="to_browser"')
    from_b = total(m1, 'parley_webrtc_packets_total{direction="from_browser"') - total(m0, 'parley_webrtc_packets_total{direction="from_browser"')
    relayed = total(m1, "parley_relay_packets_total") - total(m0, "parley_relay_packets_total")
    cpu = {k: (c1.get(k, 0) - c0.get(k, 0)) / HZ for k in ("webrtc", "relay", "process")}
    # Threads that ended in the window count in the process's total only.
    cpu["rest"] = cpu["process"] - cpu["webrtc"] - cpu["relay"]
    pk = to_b + from_b
    print(f"window {secs:.1f} s: {int(to_b)} packets to browsers, {int(from_b)} from browsers "
          f"({pk / secs:.0f} pps on the WebRTC path); relay counted {int(relayed)}")
    print("node CPU: " + ", ".join(f"{k} {v:.2f} s ({100 * v / secs:.0f}% of a core)" for k, v in cpu.items()))
    if pk:
        print("per packet on the browser path: " + ", ".join(
            f"{k} {1e6 * v / pk:.2f} us" for k, v in cpu.items()))
    drops = {k: v for k, v in m1.items() if k.startswith("parley_webrtc_drops_total") and v}
    print(f"WebRTC drops so far: {drops or 'none'}")
    print(f"pages (packets in/out): {[(s['inbound'], s['outbound']) for s in stats]}")
    r = json.load(open(f"{OUT}/report.json"))
    print(f"storm: attempts {r['attempts']} answered {r['answered']} failed {r['failed']}")
finally:
    if storm and storm.poll() is None:
        storm.terminate()
    node.terminate()
    node.wait(timeout=30)
