"""The rules' staleness check (``no_traffic``) runs on the wall clock: it must read the
windows' arrival times, whatever clock the records are stamped with."""

from __future__ import annotations

import json
import random
import time

from daemon_helpers import WINDOW, make_record
from lrwatch.daemon import Daemon, DaemonConfig


def _daemon(reference_path, state):
    return Daemon(DaemonConfig(reference=reference_path, window_size=WINDOW, port=0,
                               state_dir=str(state), log_alerts=False))


def test_no_traffic_reads_arrival_time_not_record_time(reference_path, tmp_path):
    """Records stamped two hours behind this host's clock (a client that wrote local time as
    UTC), arriving without a pause: ``no_traffic`` (30 min without a window) must not fire.
    It reads the windows' arrival times; it read their record times, and fired."""
    rng = random.Random(5)
    d = _daemon(reference_path, tmp_path)
    d.start()
    try:
        now = time.time()
        for k in range(3):
            recs = [make_record(rng, WINDOW * k + i, time=now - 7200 + k) for i in range(WINDOW)]
            lines = [json.dumps(r).encode() for r in recs]
            assert d.enqueue_file("feed", 0, 0, 0, lines, now + k)
        d.tick(now + 3)
        assert d.drain() and d.counters["windows"] == 3
        assert "no_traffic" not in d.engine.active
        d.tick(now + 3 + 1900)  # and half an hour without a window on the wall clock: it fires
        assert d.drain() and "no_traffic" in d.engine.active
    finally:
        d.stop(timeout=5)
