#!/usr/bin/env python3
"""Print the key figures from the last row of a SIPp -trace_stat CSV (-stf FILE)."""
import csv
import sys


def last_row(path):
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f, delimiter=";") if r]
    return dict(zip(rows[0], rows[-1]))


def secs(t):  # "HH:MM:SS:uuuuuu" or "HH:MM:SS"
    p = t.split(":")
    s = int(p[0]) * 3600 + int(p[1]) * 60 + int(p[2])
    return s + (int(p[3]) / 1e6 if len(p) > 3 else 0)


if __name__ == "__main__":
    d = last_row(sys.argv[1])
    try:
        el = float(d["CurrentTime"].split("\t")[-1]) - float(d["StartTime"].split("\t")[-1])
    except (KeyError, ValueError):
        el = secs(d["ElapsedTime(C)"])
    succ, fail = int(d["SuccessfulCall(C)"]), int(d["FailedCall(C)"])
    out = {
        "label": sys.argv[2] if len(sys.argv) > 2 else "",
        "elapsed_s": round(el, 3),
        "created": int(d["TotalCallCreated"]),
        "successful": succ,
        "failed": fail,
        "retrans": int(d.get("Retransmissions(C)", 0)),
        "achieved_cps": round(succ / el, 1) if el else 0,
        "rtd_avg_ms": round(secs(d["ResponseTime1(C)"]) * 1000, 3) if d.get("ResponseTime1(C)") else "",
    }
    print(" ".join(f"{k}={v}" for k, v in out.items()))
