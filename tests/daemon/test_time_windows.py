"""Time windows, and a live reference calibrated off the ingest path."""

from __future__ import annotations

import json
import math
import os
import random
import threading
import time

from daemon_helpers import make_record
from lrwatch.daemon import Reference
from lrwatch.daemon.records import dumps
from lrwatch.daemon.state import load_snapshot
from services import http_request, wait_until


def _feed(d, recs, arrival):
    """Records as lines of a tailed file that arrive at wall-clock time ``arrival``."""
    assert d.enqueue_file("feed", 0, 0, 0, [dumps(r).encode() for r in recs], arrival)


#: Arrival times a million seconds after the real clock: the daemon's own 1 s tick reads the
#: real clock, so by the window's clock (its newest record time, moved on by the wall time
#: since that record arrived) no window of these tests is ever due on it; only the explicit
#: ticks below, on the arrivals' clock, close one.
LATER = 1e6


def test_time_windows_close_on_record_time_and_on_the_clock(run_daemon):
    r = run_daemon(window_seconds=10.0)
    base = math.floor(time.time() / 10) * 10 - 10_000
    arrive = time.time() + LATER
    rng = random.Random(4)
    recs = [make_record(rng, k, time=base + 0.1 * k) for k in range(350)]  # 35 s of traffic
    rng.shuffle(recs[100:200])  # out of order inside a window is fine
    d = r.daemon
    for k in range(0, 350, 64):  # batches cut across the window boundaries
        _feed(d, recs[k:k + 64], arrive)
    d.drain()
    assert d.counters["windows"] == 3  # [0,10) [10,20) [20,30) closed by later records
    assert len(d.window) == 50 and d.window.start == base + 30
    assert d.last["records"] == 100 and d.last["window"] == 2
    assert r.metric("lrwatch_window_records") == 100
    # the clock closes the open window a little after its end: its newest record (34.9 s)
    # arrived at `arrive`, so 40.5 s on its clock is 5.6 s later on the wall clock
    d.tick(arrive + 5.6)
    d.drain()
    assert d.counters["windows"] == 3  # not yet: 10% grace after the end
    d.tick(arrive + 6.6)
    d.drain()
    assert d.counters["windows"] == 4 and d.last["records"] == 50
    # a record far later starts a window aligned to its own time
    assert r.post("/v1/predictions", make_record(rng, 999, time=base + 123.4))[0] == 200
    d.drain()
    assert d.window.start == base + 120 and len(d.window) == 1


def test_records_behind_the_clock_still_get_whole_time_windows(run_daemon):
    """Records stamped a minute behind this host's clock, a batch every 0.25 s with a tick
    after each: the windows close on the records' clock, every 10 s of it. (Before, the
    tick compared the window's end with the wall clock, a minute ahead: every tick closed
    the open window, so each window held one batch.)"""
    r = run_daemon(window_seconds=10.0)
    d = r.daemon
    rng = random.Random(5)
    t0 = math.floor(time.time() / 10) * 10 + 1.0  # 1 s into a window of the real clock
    for k in range(100):  # 25 s of traffic
        arrival = t0 + LATER + 0.25 * k
        recs = [make_record(rng, 20 * k + j, time=t0 - 60 + 0.25 * k) for j in range(20)]
        _feed(d, recs, arrival)
        d.tick(arrival + 0.01)
    d.drain()
    # [t0-61, t0-51) holds 9 s of it (36 batches) and [t0-51, t0-41) 10 s (40 batches);
    # [t0-41, t0-31) is open, with the last 24
    assert d.counters["windows"] == 2
    assert d.last["records"] == 40 * 20 and len(d.window) == 24 * 20


def test_implausible_record_times_are_invalid_time(run_daemon):
    """A time more than a day ahead of this host's clock (milliseconds, a wrong clock, 1e300)
    or before 1970 is refused, with a message that says what to send; the same on every
    path (JSON array, NDJSON through the chunk decoder, a tailed file's lines)."""
    r = run_daemon(window_seconds=10.0)
    d = r.daemon
    now = time.time()
    rng = random.Random(6)
    bad = [now * 1000, now + 2 * 86400, 1e300, -5.0, 2 ** 62]
    good = [now - 3600, now, now + 3600]
    recs = [make_record(rng, k, time=t) for k, t in enumerate(bad + good)]
    status, out = r.post("/v1/predictions", recs)
    assert status == 200 and out["accepted"] == 3 and out["reasons"] == {"invalid_time": 5}
    assert "not milliseconds" in out["errors"][0] and "before 1970" in out["errors"][3]
    ndjson = "\n".join(dumps(make_record(rng, 100 + k, time=t)) for k, t in enumerate(good))
    assert r.post("/v1/predictions", ndjson)[1]["accepted"] == 3  # all good: one batch
    for t in bad:
        body = "\n".join([dumps(make_record(rng, 200, time=now))] +
                         [dumps(make_record(rng, 201, time=t))])
        status, out = r.post("/v1/predictions", body)
        assert out["accepted"] == 1 and out["reasons"] == {"invalid_time": 1}, (t, out)
    _feed(d, [make_record(rng, 300, time=t) for t in bad + good], now)
    for t in bad:  # a raw chunk of a tailed file: the chunk decoder's path
        chunk = "\n".join(dumps(make_record(rng, 400, time=u)) for u in (now, t)).encode()
        assert d.enqueue_file("feed", 0, 0, 0, chunk, now)
    status, out = r.post("/v1/labels", [{"id": "r0", "label": 1, "time": now * 1000}])
    assert status == 400 and out["reasons"] == {"invalid_time": 1}
    d.drain()
    assert d.counters["errors"]["invalid_time"] == 5 + 5 + 5 + 5 + 1
    assert d.counters["predictions"] == 3 + 3 + 5 + 3 + 5
    assert d.window.end < now + 86400 + 20


def test_a_time_window_closes_early_at_max_records(run_daemon):
    """A time window holds at most ``window.max_records``: at that many it is tested, and
    the next records go to a new window over the same interval (none is dropped)."""
    r = run_daemon(window_seconds=3600.0, window_max_records=150)
    d = r.daemon
    rng = random.Random(7)
    t = time.time()
    assert r.post("/v1/predictions", [make_record(rng, k, time=t) for k in range(400)])[0] \
        == 200
    d.drain()
    assert d.counters["windows"] == 2 and d.last["records"] == 150
    assert len(d.window) == 100 and d.window.start == math.floor(t / 3600) * 3600
    assert d.window.end == d.window.start + 3600


def test_live_reference_is_calibrated_while_ingest_goes_on(reference_path, tmp_path):
    """The calibration runs on an executor whose one thread is first kept busy by the test, so
    it cannot finish before the later records arrive: those must still be accepted, counted
    and windowed, and tested in order once the thresholds are ready."""
    from concurrent.futures import ThreadPoolExecutor

    from lrwatch.daemon import Daemon, DaemonConfig, DaemonServer

    state = tmp_path / "state"
    pool = ThreadPoolExecutor(max_workers=1)
    gate = threading.Event()
    pool.submit(gate.wait, 120)  # the calibration queues behind this
    d = Daemon(DaemonConfig(live_records=600, window_size=100, state_dir=str(state), port=0,
                            calibration_sims=300, max_queue_records=1000, log_alerts=False),
               executor=pool)
    server = DaemonServer(d).start()
    d.start()
    try:
        rng = random.Random(8)
        ref_recs = [make_record(rng, k) for k in range(600)]
        live = [make_record(rng, 1000 + k) for k in range(750)]
        def post(recs):
            return http_request(server.url + "/v1/predictions", method="POST",
                                data=json.dumps(recs).encode())

        assert post(ref_recs)[0] == 200
        wait_until(lambda: d.reference is not None, timeout=30, message="reference built")
        for k in range(0, 750, 50):  # more than the queue holds: the worker keeps draining it
            assert post(live[k:k + 50])[0] == 200
        wait_until(lambda: d.counters["predictions"] == 1350, timeout=30, message="applied")
        seen = d.status()
        assert seen["calibrating"] and seen["counters"]["windows"] == 0
        assert len(d._waiting) == 7 and len(d.window) == 50  # 7 closed windows wait
        snap = load_snapshot(str(state))  # no snapshot of untested windows
        assert snap is None or snap["counters"]["predictions"] <= 600
        gate.set()
        assert d.drain(timeout=120)
        assert not d.status()["calibrating"]
        assert d.counters["windows"] == 7 and d.last["window"] == 6
        assert d.registry.get_sample_value("lrwatch_windows_total") == 7
        saved = Reference.load(os.path.join(str(state), "reference.json"))
        assert saved.records == 600 and saved.calibration["sims"] == 300
    finally:
        gate.set()
        server.stop()
        d.stop()
        pool.shutdown()
