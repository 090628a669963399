"""Tailing JSONL: rotation, truncation, and resuming from the persisted offset."""

from __future__ import annotations

import json
import os
import random

from daemon_helpers import make_record
from lrwatch.daemon import Daemon, DaemonConfig
from lrwatch.daemon.sources import FileTailer
from services import wait_until


def _write(path, recs, mode="a"):
    with open(path, mode) as fh:
        for r in recs:
            fh.write(json.dumps(r) + "\n")


def _daemon(reference_path, state, path):
    d = Daemon(DaemonConfig(reference=reference_path, window_size=100, state_dir=str(state),
                            log_alerts=False, tail=[str(path)], tail_poll=0.05))
    d.tailers = [FileTailer(d, str(path), 0.05)]
    d.start()
    return d


def test_tail_follows_rotation_and_truncation_and_resumes(reference_path, tmp_path):
    rng = random.Random(3)
    log = tmp_path / "preds.jsonl"
    state = tmp_path / "state"
    _write(log, [make_record(rng, i) for i in range(150)])
    with open(log, "a") as fh:
        fh.write('{"not": "a record"}\n\n')  # one rejected line, one blank line (not a record)
    d = _daemon(reference_path, state, log)
    try:
        wait_until(lambda: d.counters["predictions"] == 150, timeout=20, message="first file")
        # rotation: the old file gets more lines before the new one appears
        _write(log, [make_record(rng, i) for i in range(150, 170)])
        os.rename(log, str(log) + ".1")
        _write(log, [make_record(rng, i) for i in range(170, 200)], mode="w")
        wait_until(lambda: d.counters["predictions"] == 200, timeout=20, message="rotation")
        # partial line: waits for its newline
        with open(log, "a") as fh:
            fh.write(json.dumps(make_record(rng, 999))[:20])
        # truncation in place
        with open(log, "w") as fh:
            pass
        _write(log, [make_record(rng, i) for i in range(200, 210)])
        wait_until(lambda: d.counters["predictions"] == 210, timeout=20, message="truncation")
    finally:
        d.stop()
    assert d.counters["errors"]["missing_features"] == 1
    saved_offset = d.files[str(log)][2]
    assert saved_offset == os.path.getsize(log)
    # restart: resumes at the saved offset, so only new lines count
    _write(log, [make_record(rng, i) for i in range(210, 215)])
    d2 = _daemon(reference_path, state, log)
    try:
        wait_until(lambda: d2.counters["predictions"] == 215, timeout=20, message="resume")
        d2.drain()
        assert d2.counters["predictions"] == 215
        assert d2.counters["windows"] == 2
    finally:
        d2.stop()


def test_a_last_line_without_newline_is_counted_when_the_file_rotates(reference_path,
                                                                      tmp_path):
    """The writer's last line had no newline when the file was rotated away: it is handed
    to the worker then (a whole record is accepted, a cut one is invalid_json). Before, it
    was dropped without a count: 15 records written, 14 counted."""
    rng = random.Random(5)
    log = tmp_path / "preds.jsonl"
    with open(log, "w") as fh:
        fh.write("\n".join(json.dumps(make_record(rng, i)) for i in range(10)))
    d = _daemon(reference_path, tmp_path / "state", log)
    try:
        wait_until(lambda: d.counters["predictions"] == 9, timeout=20, message="whole lines")
        os.rename(log, str(log) + ".1")
        _write(log, [make_record(rng, i) for i in range(10, 15)], mode="w")
        with open(log, "a") as fh:
            fh.write(json.dumps(make_record(rng, 15))[:25])  # a line cut short, then rotated
        wait_until(lambda: d.counters["predictions"] == 15, timeout=20, message="rotation")
        os.rename(log, str(log) + ".2")
        _write(log, [make_record(rng, i) for i in range(16, 20)], mode="w")
        wait_until(lambda: d.counters["predictions"] == 19, timeout=20, message="rotation")
        assert d.drain()
        assert d.counters["errors"]["invalid_json"] == 1
        assert d.counters["received"] == 20
    finally:
        d.stop()
