"""Defects found by the fourteenth round's audit of the daemon (docs/daemon.md, "Defects found
by the fourteenth round's audit"): each test failed before its fix."""

from __future__ import annotations

import json
import random
import sys

from daemon_helpers import WINDOW, make_record
from lrwatch.daemon import Daemon, DaemonConfig


def _submit(d, kind, recs):
    status, body = d.submit(kind, "\n".join(json.dumps(r) for r in recs).encode())
    assert status == 200, body
    return body


# --- the label delay histogram and the action counters across a restart ---------------------
def _acting_daemon(reference_path, state):
    """A daemon whose ingest_errors alert goes to the log sink and runs a real hook."""
    return Daemon(DaemonConfig(reference=reference_path, window_size=WINDOW, port=0,
                               state_dir=str(state), log_alerts=True,
                               hook_argv=[sys.executable, "-c", "pass"],
                               hook_rules=["ingest_errors"], hook_cooldown=0))


TOTALS = (("lrwatch_label_delay_seconds_count", {}), ("lrwatch_label_delay_seconds_sum", {}),
          ("lrwatch_label_delay_seconds_bucket", {"le": "60.0"}),
          ("lrwatch_label_delay_seconds_bucket", {"le": "10.0"}),
          ("lrwatch_alerts_sent_total", {"sink": "log"}),
          ("lrwatch_hooks_run_total", {"result": "ok"}))


def _totals(d):
    return {(n, tuple(lab.items())): d.registry.get_sample_value(n, lab) for n, lab in TOTALS}


def test_label_delay_and_action_counters_survive_a_restart(reference_path, tmp_path):
    """lrwatch_label_delay_seconds and the action counters (lrwatch_alerts_sent_total,
    lrwatch_hooks_run_total) started from 0 after a restart, while the daemon's other
    cumulative counters carried on from its saved state."""
    rng = random.Random(141)
    d = _acting_daemon(reference_path, tmp_path)
    d.start()
    try:
        recs = [make_record(rng, k, time=1000.0 + k) for k in range(WINDOW)]
        _submit(d, "predictions", recs)
        _submit(d, "labels", [{"id": r["id"], "time": 1060.0 + k, "label": 1}
                              for k, r in enumerate(recs)])
        for w in range(1, 4):   # windows with 20% of their records rejected: ingest_errors
            bad = [{"id": "bad", "features": "none", "prediction": 0.5}] * 25
            _submit(d, "predictions", [make_record(rng, w * WINDOW + k)
                                       for k in range(WINDOW)] + bad)
        assert d.drain() and "ingest_errors" in d.engine.active
        _submit(d, "predictions", [make_record(rng, 4 * WINDOW + k) for k in range(WINDOW)])
        assert d.drain() and "ingest_errors" not in d.engine.active   # resolved: nothing to
        assert d.alerts.flush(10) and d.hook.flush(10)                # send again at a restart
        before = _totals(d)
    finally:
        d.stop(timeout=5)
    m = dict(before)
    assert m[("lrwatch_label_delay_seconds_count", ())] == WINDOW
    assert m[("lrwatch_label_delay_seconds_bucket", (("le", "60.0"),))] == WINDOW
    assert m[("lrwatch_label_delay_seconds_bucket", (("le", "10.0"),))] == 0
    assert m[("lrwatch_alerts_sent_total", (("sink", "log"),))] >= 2   # fired and resolved
    assert m[("lrwatch_hooks_run_total", (("result", "ok"),))] >= 1

    d = _acting_daemon(reference_path, tmp_path)
    d.start()
    try:
        assert _totals(d) == before
        recs = [make_record(rng, 10_000 + k, time=2000.0 + k) for k in range(3)]
        _submit(d, "predictions", recs)
        _submit(d, "labels", [{"id": r["id"], "time": 2005.0, "label": 0} for r in recs])
        assert d.drain()
        assert d.registry.get_sample_value("lrwatch_label_delay_seconds_count") == WINDOW + 3
    finally:
        d.stop(timeout=5)
    d = _acting_daemon(reference_path, tmp_path)   # and again: nothing counted twice
    try:
        after = _totals(d)
        assert after[("lrwatch_label_delay_seconds_count", ())] == WINDOW + 3
        assert after[("lrwatch_label_delay_seconds_bucket", (("le", "10.0"),))] == 3
        assert after[("lrwatch_alerts_sent_total", (("sink", "log"),))] == \
            before[("lrwatch_alerts_sent_total", (("sink", "log"),))]
    finally:
        d.stop(timeout=5)


# --- a label re-sent for a prediction already joined ------------------------------------------
def test_a_label_resent_for_a_joined_prediction_is_a_duplicate(reference_path, tmp_path):
    """At-least-once label delivery re-sends a label after its prediction was joined: it was
    held as an early label and joined the next prediction that reused the id (with the
    label of another record). It is counted unmatched at once, as a duplicate
    (``labels_duplicate``), also after a restart; a new prediction with the id waits for a
    label of its own."""
    rng = random.Random(142)

    def start():
        d = Daemon(DaemonConfig(reference=reference_path, window_size=WINDOW, port=0,
                                state_dir=str(tmp_path), log_alerts=False))
        d.start()
        return d

    d = start()
    try:
        recs = [make_record(rng, k, time=1000.0 + k) for k in range(WINDOW // 2)]
        labels = [{"id": r["id"], "label": 1} for r in recs]
        _submit(d, "predictions", recs)
        _submit(d, "labels", labels)
        assert d.drain() and d.counters["labels_joined"] == WINDOW // 2
    finally:
        d.stop(timeout=5)
    d = start()   # the joined ids are saved with the state
    try:
        _submit(d, "labels", labels)   # re-sent
        assert d.drain()
        c = d.counters
        assert len(d.pending.early) == 0   # before the fix: all held as early labels
        assert c["labels_duplicate"] == WINDOW // 2
        assert c["labels_unmatched"] == WINDOW // 2
        # a new batch of predictions reuses the ids: they wait for labels of their own
        _submit(d, "predictions", [make_record(rng, k, time=2000.0 + k)
                                   for k in range(WINDOW // 2)])
        assert d.drain()
        assert c["labels_joined"] == WINDOW // 2 and len(d.pending) == WINDOW // 2
        _submit(d, "labels", [{"id": recs[0]["id"], "label": 0}])   # its own label joins
        assert d.drain() and c["labels_joined"] == WINDOW // 2 + 1
        assert c["labels"] == c["labels_joined"] + c["labels_unmatched"] + len(d.pending.early)
        assert d.registry.get_sample_value("lrwatch_labels_unmatched_total") == WINDOW // 2
    finally:
        d.stop(timeout=5)
