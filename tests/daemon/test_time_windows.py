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
from lrwatch.daemon.state import load_snapshot
from services import http_request, wait_until


def test_time_windows_close_on_record_time_and_on_the_clock(run_daemon):
    r = run_daemon(window_seconds=10.0)
    # record times well in the future, so that the daemon's own 1 s clock cannot close a
    # window during the test; only the records' times and the explicit tick below do
    base = math.floor(time.time() / 10) * 10 + 10_000
    rng = random.Random(4)
    recs = [make_record(rng, k, time=base + 0.1 * k) for k in range(350)]  # 35 s of traffic
    rng.shuffle(recs[100:200])  # out of order inside a window is fine
    for k in range(0, 350, 64):  # batches cut across the window boundaries
        assert r.post("/v1/predictions", recs[k:k + 64])[0] == 200
    d = r.daemon
    d.drain()
    assert d.counters["windows"] == 3  # [0,10) [10,20) [20,30) closed by later records
    assert len(d.window) == 50 and d.window.start == base + 30
    assert d.last["records"] == 100 and d.last["window"] == 2
    assert r.metric("lrwatch_window_records") == 100
    # the clock closes the open window a little after its end
    d.tick(base + 40.5)
    d.drain()
    assert d.counters["windows"] == 3  # not yet: 10% grace after the end
    d.tick(base + 41.5)
    d.drain()
    assert d.counters["windows"] == 4 and d.last["records"] == 50
    # a record far later starts a window aligned to its own time
    assert r.post("/v1/predictions", make_record(rng, 999, time=base + 123.4))[0] == 200
    d.drain()
    assert d.window.start == base + 120 and len(d.window) == 1


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
