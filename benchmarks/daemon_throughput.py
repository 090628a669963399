"""Daemon throughput: records/s over HTTP batches and from a tailed file, scrape time, RSS.

Each measurement runs ``lrwatch daemon`` as a subprocess pinned to one core (``taskset -c 0``
when available) with 30 numeric features + a categorical, windows of 1000, a reference of
5000 rows; the client runs in this process, pinned to the other cores. Records/s counts records
*ingested and evaluated*: the clock stops when ``/v1/status`` reports every record applied and
every window tested.

Two numbers per measurement:

* **wall**: records / elapsed seconds. On a shared machine this depends on what else runs.
* **per daemon CPU-second**: records / (user + system CPU seconds the daemon process used in
  the same interval, from ``/proc/PID/stat``). The daemon is pinned to one core, so this is
  what one core sustains, and it moves much less with other load on the machine.

The file measurement is **steady state**: the daemon starts first (its start-up time is
reported separately), then the prepared file is renamed into the tailed path and the clock
starts. The ingest back ends measured: ``orjson`` (the ``fast`` extra: orjson, and for tailed
files the compiled chunk decoder ``lrwatch.daemon._jsonl`` when it was built, then msgspec's),
``orjson-msgspec`` (the same without the compiled decoder, ``LRWATCH_CJSONL=0``),
``orjson-only`` (orjson with both chunk decoders turned off) and the standard library
(``LRWATCH_JSON=stdlib``: no extra and no chunk decoder at all).

HTTP server (``--http uvicorn``; the stdlib server it replaced was measured side by side before
it was removed: docs/daemon.md): the closed-loop throughput above (four keep-alive clients, with the p50/p99
of their request latency), then an **open-loop** run at ``--rate`` records/s (default 50,000:
half the 100,000/s target) for ``--rate-seconds``: 1000-record batches are sent on a fixed
schedule from 8 connections and each latency is measured from the moment the batch was *due*
(so a stalled server cannot hide its queue: no coordinated omission), and a **slow-client**
run: ``--slow-clients`` connections (default 1000) each send half a request and stall, then a
normal client opens a fresh connection and posts one small request, 20 times; the latency of
those is reported (target: within 100 ms).

Run: ``python benchmarks/daemon_throughput.py [--records N] [--rss-records N]
[--backends orjson,orjson-msgspec,orjson-only,stdlib] [--http uvicorn] [--no-file]``.
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

from lrwatch.daemon import build_reference

F = 30
TICK = os.sysconf("SC_CLK_TCK")


def record(rng: random.Random, i: int, nf: int = F) -> dict:
    return {"id": f"r{i}", "features": {**{f"f{j:02d}": round(rng.gauss(0, 1), 6)
                                           for j in range(nf)}, "c": rng.choice("abcd")},
            "prediction": round(rng.random(), 6)}


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], port: int, backend: str = "orjson",
          http: str = "uvicorn") -> tuple[subprocess.Popen, float]:
    """Start a daemon; returns the process and its start-up time (spawn to /healthz)."""
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    env = dict(os.environ, LRWATCH_JSON=backend, LRWATCH_HTTP=http)
    if backend == "orjson-only":  # the fast extra without any chunk decoder
        env.update(LRWATCH_JSON="orjson", LRWATCH_MSGSPEC="0", LRWATCH_CJSONL="0")
    elif backend == "orjson-msgspec":  # msgspec's chunk decoder, not the compiled one
        env.update(LRWATCH_JSON="orjson", LRWATCH_CJSONL="0")
    t0 = time.perf_counter()
    proc = subprocess.Popen(pin + [sys.executable, "-m", "lrwatch", "daemon", "--port",
                                   str(port), "--window-size", "1000"] + args,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    for _ in range(1200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
            return proc, time.perf_counter() - t0
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("daemon did not start")


def status(port: int) -> dict:
    return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status").read())


def wait_applied(port: int, n: int) -> None:
    while True:
        s = status(port)
        if s["counters"]["predictions"] >= n and s["queue_records"] == 0 \
                and s["counters"]["windows"] >= n // 1000:
            return
        time.sleep(0.02)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


RETRIED = [0]  # 429 answers retried by post_all


class Client:
    """A keep-alive HTTP/1.1 client on a raw socket: the request line, headers and body go out
    in one ``sendall`` and the answer is read by its ``Content-Length``. ``http.client`` sends
    the headers and the body in separate writes and waited ~40 ms per 600 KB request here
    (48 ms against 6 ms on a raw socket, for both servers), so it measured itself, not the
    daemon."""

    def __init__(self, port: int) -> None:
        import socket

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def post(self, body: bytes, path: str = "/v1/predictions") -> tuple[int, bytes]:
        self.sock.sendall(b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: "
                          b"application/x-ndjson\r\nContent-Length: %d\r\n\r\n"
                          % (path.encode(), len(body)) + body)
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        n = next(int(ln.split(b":", 1)[1]) for ln in lines[1:]
                 if ln.lower().startswith(b"content-length:"))
        while len(self.buf) < n:
            self._more()
        out, self.buf = self.buf[:n], self.buf[n:]
        return status, out

    def _more(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("the daemon closed the connection")
        self.buf += data

    def close(self) -> None:
        self.sock.close()


def post_all(port: int, bodies: list[bytes], threads: int = 4) -> list[float]:
    """Keep-alive clients; a 429 is retried after a short pause. Returns the latencies."""
    lat: list[float] = []

    def client(part: list[bytes]) -> None:
        conn = Client(port)
        for b in part:
            while True:
                t = time.perf_counter()
                status, _ = conn.post(b)
                lat.append(time.perf_counter() - t)
                if status == 200:
                    break
                if status != 429:
                    raise RuntimeError(f"HTTP {status}")
                RETRIED[0] += 1
                time.sleep(0.005)
        conn.close()

    ths = [threading.Thread(target=client, args=(bodies[i::threads],)) for i in range(threads)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    return lat


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def open_loop(port: int, bodies: list[bytes], rate: float, batch: int, seconds: float,
              conns: int = 8) -> tuple[list[float], int, int]:
    """Batches due every ``batch / rate`` seconds, round-robin over ``conns`` keep-alive
    connections; latency from the due time. Returns (latencies, sent, non-200 answers)."""
    interval = batch / rate
    n = int(seconds / interval)
    t0 = time.perf_counter() + 0.2
    lat: list[float] = []
    bad = [0]

    def client(k: int) -> None:
        conn = Client(port)
        for i in range(k, n, conns):
            due = t0 + i * interval
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            status, _ = conn.post(bodies[i % len(bodies)])
            if status != 200:
                bad[0] += 1
            lat.append(time.perf_counter() - due)
        conn.close()

    ths = [threading.Thread(target=client, args=(k,)) for k in range(conns)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    return lat, n, bad[0]


def slow_clients(port: int, count: int, probes: int = 20) -> tuple[list[float], int]:
    """``count`` connections that send half a request and stall; then ``probes`` normal
    requests, each on a fresh connection. Returns their latencies and the slow ones opened."""
    import socket

    held = []
    give_up = time.monotonic() + 60  # the stdlib server's backlog of 5 makes connecting slow
    for i in range(count):
        if time.monotonic() > give_up:
            break
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"POST /v1/predictions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
                      b"\r\n{" if i % 2 else b"POST /v1/predictions HTTP/1.1\r\nHos")
            held.append(s)
        except OSError:
            break
    time.sleep(0.5)
    body = json.dumps(record(random.Random(7), 0)).encode()
    lat = []
    for _ in range(probes):
        t = time.perf_counter()
        try:
            conn = Client(port)  # a fresh connection each time
            conn.post(body)
            conn.close()
            lat.append(time.perf_counter() - t)
        except OSError:
            lat.append(float("inf"))
        time.sleep(0.05)
    opened = len(held)
    for s in held:
        s.close()
    return lat, opened


def http_side_by_side(args: argparse.Namespace, refarg: list[str], bodies: list[bytes]) -> None:
    """Throughput, latency at half the target rate, and slow clients, per HTTP server."""
    rows = []
    for server in [h.strip() for h in args.http.split(",") if h.strip()]:
        port = free_port()
        proc, _ = start(refarg, port, "orjson", server)
        try:
            post_all(port, bodies[:20])
            wait_applied(port, 20 * args.batch)
            done = 20 * args.batch
            c0, t0 = cpu_seconds(proc.pid), time.perf_counter()
            RETRIED[0] = 0
            lat = post_all(port, bodies)
            done += args.records
            wait_applied(port, done)
            dt, dc = time.perf_counter() - t0, cpu_seconds(proc.pid) - c0
            print(f"[{server}] HTTP closed loop, 4 clients: {fmt(args.records, dt, dc)}; "
                  f"latency p50 {pct(lat, .5) * 1e3:.1f} ms, p99 {pct(lat, .99) * 1e3:.1f} ms; "
                  f"{RETRIED[0]} answers 429 (retried)")
            c0 = cpu_seconds(proc.pid)
            ol, n, bad = open_loop(port, bodies, args.rate, args.batch, args.rate_seconds)
            done += (n - bad) * args.batch
            wait_applied(port, done)
            busy = (cpu_seconds(proc.pid) - c0) / args.rate_seconds
            print(f"[{server}] open loop at {args.rate:,.0f} records/s for {args.rate_seconds:g}"
                  f" s ({n} batches, {bad} not 200): latency p50 {pct(ol, .5) * 1e3:.1f} ms, "
                  f"p99 {pct(ol, .99) * 1e3:.1f} ms, max {max(ol) * 1e3:.1f} ms (target p99 "
                  f"<= 50 ms); daemon CPU {busy:.0%} of a core")
            sl, opened = slow_clients(port, args.slow_clients)
            print(f"[{server}] {opened} slow clients held open (of {args.slow_clients} tried "
                  f"for up to 60 s): a normal request on a fresh "
                  f"connection took median {pct(sl, .5) * 1e3:.1f} ms, max "
                  f"{max(sl) * 1e3:.1f} ms over {len(sl)} tries (target <= 100 ms)")
            rows.append((server, args.records / dt, args.records / max(dc, 1e-9),
                         pct(ol, .99), pct(sl, .5), max(sl)))
        finally:
            proc.terminate()
            proc.wait(30)
    print("\n| server | records/s wall | per daemon CPU-s | p99 at rate | slow clients: "
          "median / max |\n|---|---|---|---|---|")
    for server, wall, cpu, p99, sm, sx in rows:
        print(f"| {server} | {wall:,.0f} | {cpu:,.0f} | {p99 * 1e3:.1f} ms | "
              f"{sm * 1e3:.1f} / {sx * 1e3:.1f} ms |")


def fmt(n: int, wall: float, cpu: float) -> str:
    return f"{n / wall:>9,.0f} rec/s wall, {n / max(cpu, 1e-9):>9,.0f} rec per daemon CPU-s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--rss-records", type=int, default=1_000_000)
    # orjson: the fast extra plus the compiled chunk decoder (lrwatch.daemon._jsonl) when built
    ap.add_argument("--backends", default="orjson,orjson-msgspec,orjson-only,stdlib")
    ap.add_argument("--no-scrape", action="store_true")
    ap.add_argument("--no-file", action="store_true", help="skip the tailed-file runs")
    ap.add_argument("--http", default="uvicorn",
                    help="HTTP server runs (uvicorn; '' to skip)")
    ap.add_argument("--rate", type=float, default=50_000.0,
                    help="records/s of the open-loop latency run (half the 100,000 target)")
    ap.add_argument("--rate-seconds", type=float, default=20.0)
    ap.add_argument("--slow-clients", type=int, default=1000)
    ap.add_argument("--file-http", default="uvicorn",
                    help="the HTTP server of the daemons in the per-back-end runs")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, os.sched_getaffinity(0) - {0})  # the client off the daemon's core
    rng = random.Random(0)
    tmp = tempfile.mkdtemp(prefix="lrwatch-bench-")
    ref = build_reference([record(rng, i) for i in range(5000)], window_size=1000)
    ref.save(os.path.join(tmp, "ref.json"))
    refarg = ["--reference", os.path.join(tmp, "ref.json")]
    print(f"records of {F} numeric features + 1 categorical; windows of 1000; daemon pinned "
          f"to core 0: {bool(shutil.which('taskset'))}; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at start")
    lines = [json.dumps(record(rng, i)) for i in range(args.records)]
    bodies = ["\n".join(lines[k:k + args.batch]).encode()
              for k in range(0, len(lines), args.batch)]
    print(f"mean record size {sum(map(len, lines)) / len(lines):.0f} bytes")
    prepared = os.path.join(tmp, "prepared.jsonl")
    with open(prepared, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    results: dict[str, dict[str, str]] = {}
    if args.http:
        http_side_by_side(args, refarg, bodies)

    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        # 1. HTTP batches (four keep-alive client connections keep the daemon busy)
        port = free_port()
        proc, _ = start(refarg, port, backend, args.file_http)
        try:
            post_all(port, bodies[:20])  # warm up (imports, first windows)
            wait_applied(port, 20 * args.batch)
            c0, t0 = cpu_seconds(proc.pid), time.perf_counter()
            post_all(port, bodies)
            wait_applied(port, args.records + 20 * args.batch)
            dt, dc = time.perf_counter() - t0, cpu_seconds(proc.pid) - c0
            line = fmt(args.records, dt, dc)
            print(f"[{backend}] HTTP batches of {args.batch}: {line} (target 50,000/s)")
            results.setdefault(backend, {})["http"] = line
        finally:
            proc.terminate()
            proc.wait(30)

        # 2. tailed file, steady state: the daemon is up before the file appears
        if args.no_file:
            continue
        path = os.path.join(tmp, f"preds-{backend}.jsonl")
        port = free_port()
        proc, startup = start(refarg + ["--tail", path], port, backend, args.file_http)
        try:
            # Warm up as the HTTP run does: the first windows pay one-time costs (lazy imports,
            # first allocations) that are not steady state. Then the prepared file replaces the
            # warm-up file (a rotation, which the tailer follows from the new file's start).
            warm = 20 * args.batch
            with open(path + ".tmp", "w") as fh:
                fh.write("\n".join(lines[:warm]) + "\n")
            os.rename(path + ".tmp", path)
            wait_applied(port, warm)
            shutil.copyfile(prepared, path + ".tmp")
            t0 = time.perf_counter()  # the copy is the client's work, not the daemon's
            c0 = cpu_seconds(proc.pid)
            os.rename(path + ".tmp", path)
            wait_applied(port, warm + args.records)
            dt, dc = time.perf_counter() - t0, cpu_seconds(proc.pid) - c0
            line = fmt(args.records, dt, dc)
            print(f"[{backend}] tailed file, steady state: {line} (target 200,000/s); "
                  f"start-up before it {startup:.1f} s")
            results[backend]["file"] = line
        finally:
            proc.terminate()
            proc.wait(30)

    # 3. /metrics scrape with 100 features
    if not args.no_scrape:
        rng100 = random.Random(1)
        ref100 = build_reference([record(rng100, i, 99) for i in range(3000)],
                                 window_size=1000, sims=300)
        ref100.save(os.path.join(tmp, "ref100.json"))
        port = free_port()
        proc, _ = start(["--reference", os.path.join(tmp, "ref100.json")], port)
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

    # 4. RSS over many records from a file, with the default queue bound
    if args.rss_records:
        path = os.path.join(tmp, "many.jsonl")
        copies = args.rss_records // len(lines) + 1
        with open(path + ".tmp", "w") as fh:
            for _ in range(copies):
                fh.write("\n".join(lines) + "\n")
        total = copies * len(lines)
        port = free_port()
        proc, _ = start(refarg + ["--tail", path], port)
        try:
            rss0 = rss_kib(proc.pid)
            c0, t0 = cpu_seconds(proc.pid), time.perf_counter()
            os.rename(path + ".tmp", path)
            marks = []
            while True:
                s = status(port)
                marks.append((s["counters"]["predictions"], rss_kib(proc.pid)))
                if s["counters"]["predictions"] >= total and s["queue_records"] == 0:
                    break
                time.sleep(0.25)
            dt, dc = time.perf_counter() - t0, cpu_seconds(proc.pid) - c0
            half = [r for n, r in marks if n >= total // 2]
            peak = max(r for _, r in marks)
            print(f"RSS over {total:,} records (default max_queue_records 20,000, pending "
                  f"labels bounded at 100,000): idle {rss0 / 1024:.0f} MiB, at half way "
                  f"{half[0] / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB, at the end "
                  f"{rss_kib(proc.pid) / 1024:.0f} MiB; {fmt(total, dt, dc)}")
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
