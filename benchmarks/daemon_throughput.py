"""Daemon throughput: records/s over HTTP batches and from a tailed file, scrape time, RSS.

Each measurement runs ``lrwatch daemon`` as a subprocess pinned to one core (``taskset -c 0``
when available) with 30 numeric features + a categorical, windows of 1000, a reference of
5000 rows; the client runs in this process. Records/s counts records *ingested and evaluated*:
the clock stops when ``/v1/status`` reports every record applied and every window tested.

Run: ``python benchmarks/daemon_throughput.py [--records N] [--rss-records N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from lrwatch.daemon.reference import build_reference

F = 30


def record(rng: random.Random, i: int, nf: int = F) -> dict:
    return {"id": f"r{i}", "features": {**{f"f{j:02d}": round(rng.gauss(0, 1), 6)
                                           for j in range(nf)}, "c": rng.choice("abcd")},
            "prediction": round(rng.random(), 6)}


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], port: int) -> subprocess.Popen:
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    proc = subprocess.Popen(pin + [sys.executable, "-m", "lrwatch", "daemon", "--port",
                                   str(port), "--window-size", "1000"] + args,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
            return proc
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("daemon did not start")


def status(port: int) -> dict:
    return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status").read())


def wait_applied(port: int, n: int) -> None:
    while True:
        s = status(port)
        if s["counters"]["predictions"] >= n and s["queue_records"] == 0:
            return
        time.sleep(0.02)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--rss-records", type=int, default=1_000_000)
    args = ap.parse_args()
    rng = random.Random(0)
    tmp = tempfile.mkdtemp(prefix="lrwatch-bench-")
    ref = build_reference([record(rng, i) for i in range(5000)], window_size=1000)
    ref.save(os.path.join(tmp, "ref.json"))
    print(f"records of {F} numeric features + 1 categorical; windows of 1000; daemon pinned "
          f"to one core: {bool(shutil.which('taskset'))}")
    lines = [json.dumps(record(rng, i)) for i in range(args.records)]
    bodies = ["\n".join(lines[k:k + args.batch]).encode()
              for k in range(0, len(lines), args.batch)]
    print(f"mean record size {sum(map(len, lines)) / len(lines):.0f} bytes")

    # 1. HTTP batches (two client threads keep the daemon busy)
    port = free_port()
    proc = start(["--reference", os.path.join(tmp, "ref.json")], port)
    try:
        url = f"http://127.0.0.1:{port}/v1/predictions"

        def client(part: list[bytes]) -> None:
            for b in part:
                while True:
                    req = urllib.request.Request(url, data=b, method="POST")
                    try:
                        urllib.request.urlopen(req).read()
                        break
                    except urllib.error.HTTPError as e:
                        if e.code != 429:
                            raise
                        time.sleep(0.01)

        t0 = time.perf_counter()
        ths = [threading.Thread(target=client, args=(bodies[i::2],)) for i in range(2)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        wait_applied(port, args.records)
        dt = time.perf_counter() - t0
        print(f"HTTP batches of {args.batch}: {args.records / dt:,.0f} records/s "
              f"(target 50,000)")
    finally:
        proc.terminate()
        proc.wait(30)

    # 2. tailed file
    path = os.path.join(tmp, "preds.jsonl")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    port = free_port()
    t0 = time.perf_counter()
    proc = start(["--reference", os.path.join(tmp, "ref.json"), "--tail", path], port)
    try:
        wait_applied(port, args.records)
        dt = time.perf_counter() - t0
        print(f"tailed file: {args.records / dt:,.0f} records/s including start-up "
              f"(target 200,000)")
    finally:
        proc.terminate()
        proc.wait(30)

    # 3. /metrics scrape with 100 features
    rng100 = random.Random(1)
    ref100 = build_reference([record(rng100, i, 99) for i in range(3000)], window_size=1000,
                             sims=300)
    ref100.save(os.path.join(tmp, "ref100.json"))
    port = free_port()
    proc = start(["--reference", os.path.join(tmp, "ref100.json")], port)
    try:
        body = "\n".join(json.dumps(record(rng100, i, 99)) for i in range(2000)).encode()
        urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/predictions", data=body, method="POST")).read()
        wait_applied(port, 2000)
        times = []
        size = 0
        for _ in range(50):
            t = time.perf_counter()
            size = len(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read())
            times.append(time.perf_counter() - t)
        times.sort()
        print(f"/metrics with 100 features: median {times[25] * 1e3:.1f} ms, max "
              f"{times[-1] * 1e3:.1f} ms, {size / 1024:.0f} KiB (target <= 50 ms)")
    finally:
        proc.terminate()
        proc.wait(30)

    # 4. RSS after many records from a file
    if args.rss_records:
        path = os.path.join(tmp, "many.jsonl")
        with open(path, "w") as fh:
            for k in range(args.rss_records // len(lines) + 1):
                fh.write("\n".join(lines) + "\n")
        total = (args.rss_records // len(lines) + 1) * len(lines)
        port = free_port()
        proc = start(["--reference", os.path.join(tmp, "ref.json"), "--tail", path], port)
        try:
            marks = []
            while True:
                s = status(port)
                marks.append((s["counters"]["predictions"], rss_kib(proc.pid)))
                if s["counters"]["predictions"] >= total and s["queue_records"] == 0:
                    break
                time.sleep(1.0)
            half = [r for n, r in marks if n >= total // 2]
            print(f"RSS after {total:,} records: {rss_kib(proc.pid) / 1024:.0f} MiB "
                  f"(at half way: {half[0] / 1024:.0f} MiB; pending labels bounded at 100,000)")
        finally:
            proc.terminate()
            proc.wait(30)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
