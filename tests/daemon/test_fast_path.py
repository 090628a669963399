"""The lean ingest path gives the same answers as the plain one.

* both JSON back ends (orjson when installed, the standard library always) parse every payload
  to the same items;
* the batch validation accepts exactly what record-by-record validation accepts;
* the columnar window extraction and the sort-based binning match their plain definitions.
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from daemon_helpers import make_record
from lrwatch.daemon import Reference
from lrwatch.daemon.labels import PendingLabels
from lrwatch.daemon.records import (Batch, Invalid, NonFinite, _prediction, _validate, parse_payload,
                                    validate_predictions)
from lrwatch.daemon.reference import FINE_BINS
from lrwatch.daemon.stats import Profile
from lrwatch.daemon.windows import Window, columns

PAYLOADS = [
    b'{"features": {"x": 1.5}, "prediction": 0.2}',
    b'[{"features": {"x": 1}, "prediction": 1}, {"features": {"x": 2}, "prediction": 0}]',
    b'{"features": {"x": 1}, "prediction": 1}\n\n{"features": {"x": 2}, "prediction": 0}\r\n',
    b'{"features": {"x": NaN}, "prediction": 1}\n{"features": {"x": Infinity}, "prediction": 0}',
    b'{"features": {"x": 123456789012345678901234567890}, "prediction": 1}',
    b'{"features": {"x": 1}, "prediction": 1}\nnot json\n{"features": {}, "prediction": 2}',
    b'{"features": {"x": 1}, "prediction": 1}\n1,2\n',
    b'{"features": {"x": "\xc3\xa9"}, "prediction": "caf\xc3\xa9"}',
    b'\xff\xfe not utf-8',
    b'',
    b'[1, "a", null]',
    b'{"features": {"x": 1}, "prediction": 1}\n[1\n2]\n',
]


def _norm(items):
    out = []
    for it in items:
        if isinstance(it, Invalid):
            out.append(("invalid", it.message.split(":")[0]))
        else:
            out.append(json.dumps(it, sort_keys=True, allow_nan=True, default=repr))
    return out


@pytest.mark.parametrize("body", PAYLOADS)
def test_both_json_backends_parse_the_same_items(body):
    pytest.importorskip("orjson")
    fast, plain = parse_payload(body, backend="orjson"), parse_payload(body, backend="stdlib")
    if b"123456789012345678901234567890" in body:  # orjson: integers beyond 64 bits -> float
        assert fast[0]["features"]["x"] == float(plain[0]["features"]["x"])
        return
    assert _norm(fast) == _norm(plain)


def test_stdlib_backend_alone_handles_every_payload():
    got = [parse_payload(b, backend="stdlib") for b in PAYLOADS]
    assert [len(g) for g in got] == [1, 2, 2, 2, 1, 3, 2, 1, 1, 1, 3, 3]
    assert isinstance(got[8][0], Invalid) and got[8][0].message == "line 1 is not UTF-8"
    # non-finite numbers never come back as floats (NaN is a missing value once validated)
    assert isinstance(got[3][0]["features"]["x"], NonFinite)
    assert str(got[3][1]["features"]["x"]) == "Infinity"


def _slow(items):
    ok, rej, errors = _validate(items, _prediction)
    return Batch.from_records(ok), rej, errors


def _same(a: Batch, b: Batch) -> bool:
    return (a.feats, a.preds, a.ids, a.times, a.labels) == \
        (b.feats, b.preds, b.ids, b.times, b.labels)


def test_batch_validation_accepts_exactly_what_per_record_validation_accepts():
    rng = random.Random(7)
    good = [make_record(rng, i, time=1000.0 + i, label=i % 2) for i in range(50)]
    mixes = [
        good,
        [dict(r, id=None) for r in good],  # ids missing on some records
        good[:10] + [{k: v for k, v in r.items() if k != "time"} for r in good[10:20]],
        good[:5] + [{"features": {"x": [1]}, "prediction": 1}],
        good[:5] + [{"features": {"x": 1}, "prediction": float("nan")}],
        good[:5] + [{"features": {"x": 1}, "prediction": [0.2, 0.8]}],
        good[:5] + [{"id": 7, "features": {"x": 1}, "prediction": 1}],
        good[:5] + [{"id": "", "features": {"x": 1}, "prediction": 1}],
        good[:5] + [{"id": "x" * 257, "features": {"x": 1}, "prediction": 1}],
        good[:5] + [{"time": "now", "features": {"x": 1}, "prediction": 1}],
        good[:5] + [{"time": float("inf"), "features": {"x": 1}, "prediction": 1}],
        good[:5] + [{"label": [1], "features": {"x": 1}, "prediction": 1}],
        good[:5] + [{"features": None, "prediction": 1}, {"prediction": 1}, [1], "s"],
        good[:5] + [{"features": {"x": 1}}],
        [{"features": {"x": None, "c": True}, "prediction": "cat", "label": None}],
    ]
    for items in mixes:
        items = json.loads(json.dumps(items))  # what a parser hands over
        fast, rej, errors = validate_predictions(items)
        slow, srej, serrors = _slow(json.loads(json.dumps(items)))
        assert _same(fast, slow) and rej == srej and errors == serrors
        assert len(fast) + sum(rej.values()) == len(items)


def test_integer_ids_become_strings():
    ok, rej, _ = validate_predictions([{"id": 7, "features": {"x": 1}, "prediction": 1}])
    assert ok.ids == ["7"] and not rej


def _reference(tmp_path):
    rng = random.Random(0)
    from lrwatch.daemon import build_reference

    return build_reference([make_record(rng, i) for i in range(500)], calibrate=False)


def test_window_columns_treat_strings_in_numeric_features_as_missing(tmp_path):
    prof = Profile(_reference(tmp_path))
    rng = random.Random(1)
    recs = [make_record(rng, i) for i in range(300)]
    recs[200]["features"]["x"] = "1.5"  # a numeric string far from row 0: still missing
    recs[10]["features"]["y"] = None
    recs[11]["features"]["y"] = True
    del recs[12]["features"]["x"]
    x, cats = columns(prof, [r["features"] for r in recs], [r["prediction"] for r in recs])
    ix, iy = prof.num_names.index("x"), prof.num_names.index("y")
    assert math.isnan(x[200, ix]) and math.isnan(x[10, iy]) and x[11, iy] == 1.0
    assert math.isnan(x[12, ix])
    assert x[0, ix] == recs[0]["features"]["x"]
    # appending in slices gives the same matrix as extracting the whole window at once
    w = Window(0)
    for lo in range(0, 300, 70):
        part = recs[lo:lo + 70]
        w.extend(prof, [r["features"] for r in part], [r["prediction"] for r in part])
    xw, cw = w.matrix(prof)
    np.testing.assert_array_equal(xw, x)
    for a, b in zip(cw, cats):
        np.testing.assert_array_equal(a, b)


def test_sort_based_binning_matches_searchsorted(reference_path):
    prof = Profile(Reference.load(reference_path))
    rng = np.random.default_rng(3)
    fn = len(prof.num)
    for n in (1, 7, 1000):
        x = rng.normal(size=(n, fn))
        for j in range(fn):  # values exactly on the edges go to the bin above
            k = rng.integers(0, n, 3)
            x[k, j] = rng.choice(prof.edges[j], 3)
        x[rng.random(x.shape) < 0.1] = np.nan
        x[0, 0] = np.inf
        want = np.zeros((fn, FINE_BINS + 1))
        for j in range(fn):
            col = x[:, j]
            idx = np.searchsorted(prof.edges[j], col[~np.isnan(col)], side="right")
            want[j, :FINE_BINS] = np.bincount(idx, minlength=FINE_BINS)
            want[j, FINE_BINS] = np.isnan(col).sum()
        np.testing.assert_array_equal(prof.bin_numeric(x), want)


def test_pending_add_many_matches_one_at_a_time():
    ids = ["a", "b", "c", "b", "d", "e", "a"]
    one, many = PendingLabels(4), PendingLabels(4)
    evicted = sum(one.add(i, k, float(k)) for k, i in enumerate(ids))
    assert many.add_many(ids[:2], [0, 1], [0.0, 1.0]) == 0
    assert many.add_many(ids[2:], [2, 3, 4, 5, 6], [2.0, 3.0, 4.0, 5.0, 6.0]) == evicted
    assert one.state_dict() == many.state_dict()
    fresh = PendingLabels(3)
    assert fresh.add_many(["x", "y", "z", "w"], [1, 2, 3, 4], [1.0, 2.0, 3.0, 4.0]) == 1
    assert fresh.join("x") is None and fresh.join("w") == (4, 4.0, None)


@pytest.mark.parametrize("backend", ["stdlib", "orjson"])
def test_end_to_end_with_each_backend_survives_a_restart(run_daemon, tmp_path, monkeypatch,
                                                         backend):
    """Ingest, snapshot and restore with one back end (the process default is the other's
    code path when orjson is installed)."""
    from lrwatch.daemon import Daemon, DaemonConfig, records

    if backend == "orjson":
        pytest.importorskip("orjson")
    monkeypatch.setattr(records, "JSON_BACKEND", backend)
    state = tmp_path / "state"
    r = run_daemon(state_dir=str(state))
    rng = random.Random(6)
    nd = "\n".join(json.dumps(make_record(rng, i)) for i in range(150)) + "\nNaN\n"
    status, body = r.post("/v1/predictions", nd)
    assert status == 200 and body == {"accepted": 150, "rejected": 1,
                                      "reasons": {"not_an_object": 1},
                                      "errors": ["record 151: a record must be a JSON object"]}
    r.daemon.drain()
    r.server.stop()
    r.daemon.stop()
    d2 = Daemon(DaemonConfig(reference=r.daemon.config.reference, window_size=100,
                             state_dir=str(state), log_alerts=False))
    assert d2.counters["predictions"] == 150 and d2.counters["windows"] == 1
    assert len(d2.window) == 50 and len(d2.pending) == 150
    d2.stop()


@pytest.mark.parametrize("damage", [b"", b'{"version": 1, "coun', b"[]"])
def test_an_unreadable_state_file_is_rebuilt_from_the_whole_journal(run_daemon, tmp_path,
                                                                  damage) -> None:
    """An empty, truncated or wrong state.json stopped the daemon at every start with a
    traceback. While the journal still holds every record, the state is rebuilt from it (the
    same counts as before); once older segments are pruned, the error says what to do."""
    from lrwatch.daemon import Daemon, DaemonConfig
    from lrwatch.errors import ConfigError

    state = tmp_path / "state"
    r = run_daemon(state_dir=str(state))
    rng = random.Random(7)
    r.post("/v1/predictions", "\n".join(json.dumps(make_record(rng, i)) for i in range(150)))
    r.daemon.drain()
    r.server.stop()
    r.daemon.stop()
    (state / "state.json").write_bytes(damage)
    cfg = dict(reference=r.daemon.config.reference, window_size=100, state_dir=str(state),
               log_alerts=False)
    d2 = Daemon(DaemonConfig(**cfg))
    assert d2.counters["predictions"] == 150 and d2.counters["windows"] == 1
    assert len(d2.window) == 50
    d2.stop()
    (state / "state.json").write_bytes(damage)
    first = state / "journal-000001.log"
    first.rename(state / "journal-000002.log")   # as if the first segment had been pruned
    with pytest.raises(ConfigError, match="restore the file from a backup"):
        Daemon(DaemonConfig(**cfg))
