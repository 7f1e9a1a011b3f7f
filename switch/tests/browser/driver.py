#!/usr/bin/env python3
"""Drives Debian's Chromium, headless, through Playwright for the Rust browser tests.

One JSON command per line on stdin, one JSON answer per line on stdout:

    {"cmd": "open", "url": "http://127.0.0.1:PORT/"}          -> {"ok": true}
    {"cmd": "fill", "selector": "#user", "value": "alice"}     -> {"ok": true}
    {"cmd": "click", "selector": "#answer"}                    -> {"ok": true}
    {"cmd": "wait", "selector": "#ring", "text": "+1555"}      -> {"ok": true, "text": "..."}
    {"cmd": "eval", "js": "() => 1 + 1"}                       -> {"ok": true, "value": 2}
    {"cmd": "screenshot", "path": "/tmp/x.png"}                -> {"ok": true}
    {"cmd": "quit"}

`wait` waits (10 s at most) until the element is visible and, with "text", contains it.
A failure answers {"ok": false, "error": "..."}; the browser's console goes to stderr.
Fake media devices stand in for a microphone. Chromium is /usr/bin/chromium, or
$PARLEY_CHROMIUM.
"""
import json
import os
import sys

from playwright.sync_api import sync_playwright

CHROMIUM = os.environ.get("PARLEY_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--autoplay-policy=no-user-gesture-required",
]


def answer(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        # Tests serve HTTPS with certificates of their own making.
        context = browser.new_context(
            viewport={"width": 1280, "height": 760}, ignore_https_errors=True
        )
        page = context.new_page()
        page.on("console", lambda m: print(f"console.{m.type}: {m.text}", file=sys.stderr))
        page.on("pageerror", lambda e: print(f"page error: {e}", file=sys.stderr))
        answer({"ok": True, "ready": True})
        for line in sys.stdin:
            try:
                c = json.loads(line)
                cmd = c["cmd"]
                if cmd == "quit":
                    answer({"ok": True})
                    break
                if cmd == "open":
                    page.goto(c["url"])
                    answer({"ok": True})
                elif cmd == "fill":
                    page.fill(c["selector"], c["value"])
                    answer({"ok": True})
                elif cmd == "click":
                    page.click(c["selector"], timeout=10_000)
                    answer({"ok": True})
                elif cmd == "wait":
                    loc = page.locator(c["selector"]).first
                    if "text" in c:
                        page.wait_for_function(
                            "([s, t]) => { const e = document.querySelector(s);"
                            " return e && e.offsetParent !== null && e.textContent.includes(t); }",
                            arg=[c["selector"], c["text"]],
                            timeout=c.get("timeout_ms", 10_000),
                        )
                    else:
                        loc.wait_for(state="visible", timeout=c.get("timeout_ms", 10_000))
                    answer({"ok": True, "text": loc.text_content()})
                elif cmd == "eval":
                    answer({"ok": True, "value": page.evaluate(c["js"])})
                elif cmd == "screenshot":
                    page.screenshot(path=c["path"])
                    answer({"ok": True})
                else:
                    answer({"ok": False, "error": f"unknown command {cmd}"})
            except Exception as e:  # one failed step is reported, the session goes on
                answer({"ok": False, "error": f"{type(e).__name__}: {e}"})
        browser.close()


if __name__ == "__main__":
    main()
