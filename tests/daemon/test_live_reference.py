"""A reference built from the first live records: rows that are odd (a key seen once, every
feature empty) must never stop the daemon from getting a reference, nor from starting."""

from __future__ import annotations

import random

from daemon_helpers import make_record
from lrwatch.daemon import Daemon, DaemonConfig, build_reference
from lrwatch.daemon.records import dumps


def _body(recs):
    return "\n".join(dumps(r) for r in recs).encode()


def _live(tmp_path=None, **kw):
    kw.setdefault("live_records", 200)
    return Daemon(DaemonConfig(window_size=100, port=0, log_alerts=False, calibration_sims=200,
                               state_dir=str(tmp_path) if tmp_path else None, **kw))


def _records(n, rare_at=5, seed=1):
    rng = random.Random(seed)
    recs = [make_record(rng, i) for i in range(n)]
    recs[rare_at]["features"]["rare"] = 3.7  # a numeric key in one record only
    return recs


def test_a_numeric_feature_seen_once_is_left_out_with_a_note():
    ref = build_reference(_records(200), calibrate=False)
    assert "rare" not in ref.names and {"x", "y", "c"} <= set(ref.names)
    assert any("'rare'" in n and "fewer than 2" in n for n in ref.notes)


def test_a_rare_feature_among_the_live_records_does_not_stall_the_worker():
    d = _live()
    d.start()
    try:
        recs = _records(1000)
        for k in range(0, 1000, 100):
            d.submit("predictions", _body(recs[k:k + 100]))
        assert d.drain(timeout=120)
        s = d.status()
        assert s["reference"] is not None and "rare" not in s["reference"]["features"]
        assert any("'rare'" in n for n in s["reference"]["notes"])
        assert d.counters["windows"] == 8  # 800 records after the reference's 200
        assert d.registry.get_sample_value("lrwatch_internal_errors_total") == 0
    finally:
        d.stop(timeout=5)


def test_a_restart_with_the_rare_feature_in_the_journal_starts(tmp_path):
    recs = _records(400)
    d = _live(tmp_path)
    d.start()
    try:
        d.submit("predictions", _body(recs[:150]))  # still collecting: replayed at restart
        assert d.drain(timeout=60)
    finally:
        d.stop(timeout=5)
    d = _live(tmp_path)  # before the fix: the replayed build raised here
    d.start()
    try:
        d.submit("predictions", _body(recs[150:]))
        assert d.drain(timeout=120)
        assert d.reference is not None and d.counters["predictions"] == 400
        assert d.counters["windows"] == 2
    finally:
        d.stop(timeout=5)


def test_rows_that_make_no_reference_are_replaced_by_the_next_ones(tmp_path):
    rng = random.Random(2)
    empty = [{"features": {"x": None}, "prediction": 0.5} for _ in range(50)]
    good = [make_record(rng, i) for i in range(250)]
    d = _live(tmp_path, live_records=50)
    d.start()
    try:
        d.submit("predictions", _body(empty))
        assert d.drain(timeout=60)
        s = d.status()
        assert s["reference"] is None and "make no reference" in \
            s["collecting_reference"]["error"]
        assert s["collecting_reference"]["have"] == 0
        d.submit("predictions", _body(good))
        assert d.drain(timeout=120)
        assert d.reference is not None and d.reference.records == 50
        assert d.counters["predictions"] == 300 and d.counters["windows"] == 2
    finally:
        d.stop(timeout=5)
    d = _live(tmp_path, live_records=50)  # the same outcome on replay, and it starts
    try:
        assert d.reference is not None and d.counters["predictions"] == 300
    finally:
        d.stop(timeout=5)


def test_per_record_keys_never_become_reference_features():
    """Each record carries a key of its own (``sess_<i>``): before, each was a reference
    feature with its own Prometheus series (300 records: 304 features, 3000 series)."""
    rng = random.Random(3)
    recs = [make_record(rng, i) for i in range(600)]
    for i, r in enumerate(recs):
        r["features"][f"sess_{i}"] = "v"
    d = _live(live_records=300)
    d.start()
    try:
        for k in range(0, 600, 100):
            d.submit("predictions", _body(recs[k:k + 100]))
        assert d.drain(timeout=120)
        s = d.status()
        assert s["reference"]["features"] == ["c", "x", "y", "_prediction"]
        note = [n for n in s["reference"]["notes"] if "'sess_0'" in n][0]
        assert "and 290 more" in note and "fewer than 1%" in note
        text = "\n".join(f"{m.name} {s.labels}" for m in d.registry.collect()
                         for s in m.samples)
        assert "sess_" not in text and d.counters["windows"] == 3
    finally:
        d.stop(timeout=5)


def test_reference_features_are_capped_keeping_the_most_present():
    from lrwatch.daemon.reference import MAX_FEATURES

    rng = random.Random(4)
    rows = [{"features": {f"f{j:04d}": rng.random() for j in range(MAX_FEATURES + 20)
                          if j < MAX_FEATURES - 5 or i % 2},
             "prediction": 0.5} for i in range(20)]
    ref = build_reference(rows, calibrate=False)
    names = [n for n in ref.names if n != "_prediction"]
    assert len(names) == MAX_FEATURES and names[-1] == "f0999"  # 995 always, then 5 of 25
    assert any("over the cap of 1000" in n and "'f1000'" in n for n in ref.notes)


def test_a_crash_before_the_first_snapshot_with_the_reference_rebuilds_it_from_the_journal(
        tmp_path):
    """kill -9 after the live reference was saved but before a snapshot held it: the journal
    is replayed from before the reference was complete. Replaying it against the saved
    reference windowed the reference's own rows and validated every record against that
    reference's kind, which the records accepted before it was known need not fit (here
    labels "yes"/"no": any class name is a label until the reference is one of class-1
    probabilities), so 1200 acknowledged records became 1200 `invalid_label`."""
    import json
    import math
    import shutil

    rng = random.Random(3)
    recs = []
    for i in range(300):
        x = rng.gauss(0, 1)
        p = 1 / (1 + math.exp(-2 * x))
        recs.append({"id": f"r{i}", "features": {"x": x, "y": rng.gauss(0, 1)},
                     "prediction": round(p, 6), "label": "yes" if rng.random() < p else "no"})
    d = _live(tmp_path / "state", snapshot_interval=3600.0)
    d.start()
    try:
        assert d.submit("predictions", "\n".join(map(json.dumps, recs)).encode())[0] == 200
        assert d.drain(timeout=120) and d.reference is not None
        assert d.counters["windows"] == 1 and d.counters["predictions"] == 300
        # the state directory as a kill -9 leaves it now: the reference, the journal, no
        # snapshot (none is written while the reference is calibrated, the next is an hour on)
        shutil.copytree(tmp_path / "state", tmp_path / "crash")
    finally:
        d.stop(timeout=5)
    d = _live(tmp_path / "crash")
    try:
        assert d.counters["predictions"] == 300, d.counters["errors"]
        assert d.counters["received"] == 300 and d.counters["windows"] == 1
        assert d.reference is not None and d.reference.records == 200
    finally:
        d.stop(timeout=5)
