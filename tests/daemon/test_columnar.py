"""The chunk decoders (the compiled ``_jsonl`` extension, and ``msgspec``, the ``fast`` extra)
give exactly what the general path gives. Every test runs for each decoder available on its own
and for the daemon's chain of them.

The same mixed streams go through two daemons, one with the chunk decoder and one without
(``Daemon.fast_ingest``), chunk by chunk as the tailer hands them over; every counter, rejection
reason, window statistic, exported metric, pending label and the open window must be equal.
The streams mix clean chunks (decoded into columns) with chunks the decoder must refuse
(malformed lines, label records, unknown features, strings in numeric features, ...), and
records with missing values, unseen categories and out-of-range values, which stay on the fast
path.
"""

from __future__ import annotations

import json
import math
import random
from typing import Any

import numpy as np
import pytest

from daemon_helpers import make_record
from lrwatch.daemon import Daemon, DaemonConfig
from lrwatch.daemon.records import fits_reference_kind, labels_are_classes
from lrwatch.daemon.reference import PREDICTION
from lrwatch.daemon.stats import Profile
from lrwatch.daemon.windows import Window

from lrwatch.daemon import columnar  # noqa: E402
from lrwatch.daemon.columnar import ChunkDecoder  # noqa: E402

_AVAILABLE = [b for b, m in (("c", columnar._cjsonl), ("msgspec", columnar._msgspec))
              if m is not None]
if not _AVAILABLE:
    pytest.skip("neither the compiled decoder nor msgspec is available", allow_module_level=True)
#: each decoder alone, and the chain (C first, then msgspec) the daemon uses by default
BACKENDS = [(b,) for b in _AVAILABLE] + ([tuple(_AVAILABLE)] if len(_AVAILABLE) > 1 else [])

WINDOW = 100


def _clean(rng: random.Random, i: int) -> dict[str, Any]:
    """A valid record, with the variety the fast path must keep: missing values (null or an
    absent key), unseen categories, out-of-range and integer values, optional id/time/label."""
    r = make_record(rng, i)
    f = r["features"]
    u = rng.random()
    if u < 0.05:
        f["x"] = None
    elif u < 0.10:
        del f["y"]
    elif u < 0.15:
        f["c"] = rng.choice(["zz", "unseen", "é"])  # categories the reference never saw
    elif u < 0.20:
        f["x"] = rng.choice([1e6, -1e9, 7, 0])  # out of range, integers
    elif u < 0.23:
        f["c"] = None
    elif u < 0.25:
        f["c"] = rng.choice([1, 2.5, True])  # a categorical given as a number or a boolean
    if rng.random() < 0.3:
        r["time"] = 1_700_000_000 + i * 0.5
    if rng.random() < 0.2:
        r["label"] = rng.choice([0, 1])
    if rng.random() < 0.1:
        del r["id"]
    if rng.random() < 0.05:
        r["model"] = {"version": "v2", "tags": [1, 2]}  # other top-level keys are ignored
    return r


BAD_LINES = [
    b'{"features": {"x": "1.5", "y": 0.1, "c": "a"}, "prediction": 0.5}',  # numeric string
    b'{"features": {"x": true, "y": 0.1, "c": "a"}, "prediction": 0.5}',  # boolean number
    b'{"features": {"x": 1, "y": 0.1, "c": "a", "new": 3}, "prediction": 0.5}',  # unknown
    b'{"features": {"x": [1], "y": 0.1, "c": "a"}, "prediction": 0.5}',
    b'{"features": {"x": 1, "y": 0.1, "c": {"a": 1}}, "prediction": 0.5}',
    b'{"id": "r1", "label": 1}',  # a label record in a mixed file
    b'{"id": 17, "features": {"x": 1, "y": 0.1, "c": "a"}, "prediction": 0.5}',  # integer id
    b'{"id": "", "features": {"x": 1, "y": 0.1, "c": "a"}, "prediction": 0.5}',
    b'{"features": {"x": 1, "y": 0.1, "c": "a"}, "prediction": [0.2, 0.8]}',
    # class probabilities as an object (valid), and hostile ones (each rejected, counted)
    b'{"features": {"x": 1, "y": 0.1, "c": "a"}, "prediction": {"proba": [0.3, 0.7]}}',
    b'{"features": {"x": 1, "y": 0.1, "c": "a"}, "prediction": {"proba": [0.2, NaN]}}',
    b'{"features": {"x": 1, "y": 0.1, "c": "a"}, "prediction": {"proba": [1.5, -0.5]}}',
    b'{"features": {"x": 1, "y": 0.1, "c": "a"}, "prediction": {"proba": [0.5], "p": 1}}',
    b'{"features": {"x": 1, "y": 0.1, "c": "a"}, "prediction": {"proba": []}}',
    b'{"features": {"x": 1, "y": 0.1, "c": "a"}, "prediction": [true, false]}',
    b'{"features": {"x": 1, "y": 0.1, "c": "a"}, "prediction": null}',
    b'{"features": {"x": 1, "y": 0.1, "c": "a"}}',
    b'{"features": {"x": NaN, "y": 0.1, "c": "a"}, "prediction": 0.5}',
    b'{"features": {"x": 1e999, "y": 0.1, "c": "a"}, "prediction": 0.5}',
    b'{"features": {"x": 1, "y": 0.1, "c": 18446744073709551616}, "prediction": 0.5}',
    b'{"features": {"x": 1, "y": 0.1, "c": "a"}, "prediction": -9223372036854775809}',
    b'{"features": {"x": 1, "y": 0.1, "c": "a"}, "prediction": 0.5, "time": "now"}',
    b'{"features": {"x": 1, "y": 0.1, "c": "a"}, "prediction": 0.5, "label": [1]}',
    b'{"features": {"x": 1, "y": 0.1, "c": "\xff"}, "prediction": 0.5}',  # not UTF-8
    b'{"features": {"x": 1, "y": 0.1, "c": "\\ud800"}, "prediction": 0.5}',  # lone surrogate
    b'{"features": null, "prediction": 0.5}',
    # beyond int64: valid for the general path, which takes the chunk (msgspec's bounds)
    b'{"features": {"x": 1, "y": 0.1, "c": 9223372036854775808}, "prediction": 0.5}',
    b'{"features": {"x": 1, "y": 0.1, "c": "a"}, "prediction": 18446744073709551615}',
    b'{"features": {"x": 1, "y": 0.1, "c": "a"}, "prediction": 0.5, "time": 2e400}',
    b'{"features": {"x": 1, "y": 0.1, "c": "a"}, "prediction": 0.5, "time": true}',
    b'{"features": {"x": 1, "y": 0.1, "c": "a"}, "prediction": 0.5, "label": {"y": 1}}',
    b'{"id": "' + "\u00e9".encode() * 257 + b'", "features": {"x": 1}, "prediction": 0.5}',
    b'[1, 2]',
    b'not json',
    b'{"features": {"x": 1, "y": 0.1, "c": "a"}, "prediction": 0.5} {"features": {}, '
    b'"prediction": 1}',  # two records on one line
    b'{"features": {"x": 1, "y": 0.1, "c": "a"},',  # one record over two lines ...
    b'"prediction": 0.5}',  # ... (the general path rejects both halves)
    b'',  # a blank line
    b'   ',
]
#: unusual lines that both paths accept
ODD_LINES = [
    b'{"features": {"x": 1, "y": 0.1, "c": "a"}, "prediction": 0.5}\r',  # CRLF
    b'  {"prediction": 0.5, "features": {"c": "\\u00e9", "y": -0.0, "x": 1E2}}  ',
    b'{"features": {"x": 1, "x": 2, "y": 0.1}, "prediction": 0.5, "prediction": 1}',  # last
    b'{"features": {}, "prediction": "class-a", "label": "class-b", "time": 17}',
    b'{"features": {"x": 9223372036854775807, "y": 1e-300}, "prediction": false}',
    b'{"features": {"c": -9223372036854775808}, "prediction": -9223372036854775808, '
    b'"time": 1700000000, "label": 9223372036854775807}',  # the int64 bounds
    b'{"id": "' + "\u00e9".encode() * 256 + b'", "features": {"x": 1}, "prediction": 0.5}',
    # a huge integer as a numeric feature: the same float either way
    b'{"features": {"x": 123456789012345678901234567890, "y": 0.1}, "prediction": 0.5}',
]
#: valid lines the compiled decoder refuses (it is not sure of them: escapes, duplicate keys,
#: integers beyond int64, "-0", subnormals, very long numbers, escapes or odd values in ignored
#: keys); msgspec or the general path then takes the chunk
C_REFUSED = [ODD_LINES[1], ODD_LINES[2], ODD_LINES[7]] + [
    b'{"features": {"x": -0, "y": 0.1}, "prediction": 0.5}',
    b'{"features": {"c": -0}, "prediction": 0.5}',
    b'{"features": {"x": 1e-310}, "prediction": 0.5}',
    b'{"features": {"x": 4.9e-324}, "prediction": 0.5}',
    b'{"features": {"x": 0.' + b"1" * 100 + b'}, "prediction": 0.5}',
    b'{"features": {"x": 1}, "prediction": 0.5, "model": "v\\n2"}',
    b'{"features": {"x": 1}, "prediction": 0.5, "model": [18446744073709551616]}',
    b'{"features": {"x": 1}, "prediction": 0.5, "id": "a", "id": "b"}',
]
#: lines the compiled decoder must take (and give the general path's values)
C_TAKEN = [ln for ln in ODD_LINES if ln not in C_REFUSED] + [
    b'{"features": {"x": 1}, "prediction": 0.5, "model": {"v": [1, -2.5e3, "\xc3\xa9", null,'
    b' true, {}, []]}, "time": 1.5}',
    b'{"features": {"x": 0.1234567890123456789, "y": 1.7976931348623157e308}, "prediction": 0}',
    b'{"features": {"x": 2.2250738585072014e-308, "y": -123456789012345.6}, "prediction": 0}',
    b'{"features": {"x": 9007199254740993, "y": 1e22, "c": 1e23}, "prediction": 0E-5}',
    b'{"features": {"x": -0.0, "y": 0.000001, "c": -9.5e-7}, "prediction": -1}',
]
#: valid JSON that every path refuses or treats differently; the compiled decoder refuses
C_BAD = [
    b'{"features": {"x": 01}, "prediction": 0.5}',
    b'{"features": {"x": 1.}, "prediction": 0.5}',
    b'{"features": {"x": .5}, "prediction": 0.5}',
    b'{"features": {"x": +1}, "prediction": 0.5}',
    b'{"features": {"x": 1e}, "prediction": 0.5}',
    b'{"features": {"x": Infinity}, "prediction": 0.5}',
    b'{"features": {"x": -Infinity}, "prediction": 0.5}',
    b'{"features": {"x": 1}, "prediction": 0.5,}',
    b'{"features": {"x": 1,}, "prediction": 0.5}',
    b'{"features": {"x": 1} "prediction": 0.5}',
    b'{"features": {"x": 1}, "prediction": 0.5}}',
    b'{"features": {"x": 1}, "prediction": 0.5, "model": [1,]}',
    b'{"features": {"x": 1}, "prediction": 0.5, "model": "\xff"}',
    b'{"features": {"x": 1}, "prediction": 0.5, "\xff": 1}',
    b'{"features": {"x": 1}, "prediction": tru}',
    b'{"features": {"x": 1}, "prediction": "a\tb"}',  # a raw tab in a string
    b'{"features": {"x": 1}, "prediction": 0.5, "id": null, "time": null, "label": nul}',
    b'{}',
]


def _stream(seed: int, n_chunks: int) -> list[bytes]:
    """Chunks as the tailer hands them over (whole lines, no last newline)."""
    rng = random.Random(seed)
    chunks, i = [], 0
    for k in range(n_chunks):
        lines = []
        for _ in range(rng.randint(1, 90)):
            lines.append(json.dumps(_clean(rng, i)).encode())
            i += 1
        if k % 3 == 2:  # every third chunk has something the decoder must refuse
            bad = rng.choice(BAD_LINES + ODD_LINES)
            lines.insert(rng.randrange(len(lines) + 1), bad)
            if bad.endswith(b","):  # keep the two halves together
                lines.insert(lines.index(bad) + 1, BAD_LINES[BAD_LINES.index(bad) + 1])
        chunks.append(b"\n".join(lines))
    return chunks


def _daemon(reference_path: str, fast: bool) -> Daemon:
    d = Daemon(DaemonConfig(reference=reference_path, window_size=WINDOW, log_alerts=False))
    d.fast_ingest = fast
    return d


def _feed(d: Daemon, chunks: list[bytes]) -> None:
    # the tailer's hand-over and the worker's apply, in this thread (no clock ticks between)
    offset = 0
    for c in chunks:
        offset += len(c) + 1
        assert d.enqueue_file("/data/preds.jsonl", 1, 2, offset, c, 1_700_000_000.0)
        entry = d.queue.get(0)
        assert entry is not None
        d._apply(entry)


def _metrics(d: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in d.registry.collect():
        if fam.name == "lrwatch_window_statistics_seconds":
            continue  # a timing
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue  # when the metric was made
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _window_columns(d: Daemon, w: Window) -> tuple[np.ndarray, list[np.ndarray]]:
    # through a snapshot: what a restart would test
    restored = Window.from_state(json.loads(json.dumps(w.state_dict())))
    return restored.matrix(d._profile)  # type: ignore[arg-type]


@pytest.mark.parametrize("backends", BACKENDS, ids="+".join)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fast_and_general_paths_give_the_same_state(reference_path, seed, backends):
    chunks = _stream(seed, 40)
    fast, slow = _daemon(reference_path, True), _daemon(reference_path, False)
    try:
        # the stream really mixes both paths
        dec = fast.ingest._decoder = ChunkDecoder(fast._profile, backends)
        taken = [dec.decode(c.replace(b"\n", b",\n"), c.count(b"\n") + 1) is not None
                 for c in chunks]
        # (the compiled decoder alone also refuses the chunks where json.dumps escaped "é")
        assert sum(taken) >= (10 if backends == ("c",) else 25) and not all(taken)
        _feed(fast, chunks)
        _feed(slow, chunks)
        assert fast.counters == slow.counters
        assert fast.counters["windows"] >= 10
        assert sum(fast.counters["errors"].values()) > 0
        assert fast.counters["received"] == fast.counters["predictions"] + \
            fast.counters["labels"] + sum(fast.counters["errors"].values())
        assert fast.files == slow.files
        last_f = {k: v for k, v in fast.last.items() if k != "time"}
        last_s = {k: v for k, v in slow.last.items() if k != "time"}
        assert _same(last_f, last_s)
        assert _same(_metrics(fast), _metrics(slow))
        assert fast.pending.state_dict() == slow.pending.state_dict()
        assert fast.detector.state_dict() == slow.detector.state_dict()  # type: ignore
        wf, ws = fast.window, slow.window
        assert len(wf) == len(ws) and wf.preds == ws.preds
        assert (wf.rejected, wf.joined, wf.score_sum, wf.first_time, wf.last_time) == \
            (ws.rejected, ws.joined, ws.score_sum, ws.first_time, ws.last_time)
        xf, cf = _window_columns(fast, wf)
        xs, cs = _window_columns(slow, ws)
        np.testing.assert_array_equal(xf, xs)
        for a, b in zip(cf, cs):
            np.testing.assert_array_equal(a, b)
    finally:
        fast.stop()
        slow.stop()


@pytest.mark.parametrize("backends", BACKENDS, ids="+".join)
def test_decoder_refuses_every_unusual_line(reference_path, backends):
    d = _daemon(reference_path, True)
    try:
        dec = ChunkDecoder(d._profile, backends)
        rng = random.Random(0)
        good = json.dumps(make_record(rng, 0)).encode()
        assert dec.decode(good, 1) is not None
        c_only = backends == ("c",)
        for bad in BAD_LINES + (C_BAD + C_REFUSED if c_only else []):
            for chunk in (bad, good + b"\n" + bad, bad + b"\n" + good):
                body = chunk.replace(b"\n", b",\n")
                assert dec.decode(body, chunk.count(b"\n") + 1) is None, chunk
        # accepted, and the same columns as the general path
        for odd in (C_TAKEN if c_only else ODD_LINES + C_TAKEN + C_REFUSED):
            for chunk in (odd, good + b"\n" + odd):
                b = dec.decode(chunk.replace(b"\n", b",\n"), chunk.count(b"\n") + 1)
                assert b is not None, chunk
                ok, labels, rej = d.ingest.validate_lines(chunk.split(b"\n"))
                if not fits_reference_kind(b.preds, d.ingest.limits):
                    # a class name against a reference of probabilities: ingest hands the
                    # chunk to the general path, which refuses that prediction by name
                    assert rej == {"invalid_prediction": 1} and len(ok) == len(b) - 1
                    continue
                if b.labels is not None and not labels_are_classes(b.labels, d.ingest.limits):
                    # a label that is no class of the reference's binary model: the same
                    assert rej == {"invalid_label": 1} and len(ok) == len(b) - 1
                    continue
                assert not rej and not labels and len(ok) == len(b)
                w1, w2 = Window(0), Window(0)
                w1.extend_batch(d._profile, b, 0, len(b))
                w2.extend_batch(d._profile, ok, 0, len(ok))
                (x1, c1), (x2, c2) = w1.matrix(d._profile), w2.matrix(d._profile)
                np.testing.assert_array_equal(x1, x2)
                for u, v in zip(c1, c2):
                    np.testing.assert_array_equal(u, v)
                assert _same((b.preds, b.ids, b.times, b.labels, b.cats),
                             (ok.preds, ok.ids, ok.times, ok.labels, c1_raw(d, ok)))
                assert [list(map(type, v)) for v in (b.preds, b.ids or [], b.times or [],
                                                     b.labels or [])] == \
                    [list(map(type, v)) for v in (ok.preds, ok.ids or [], ok.times or [],
                                                  ok.labels or [])]
    finally:
        d.stop()


def c1_raw(d: Daemon, ok: Any) -> list[list[Any]]:
    """The raw categorical values of the general path's batch, per categorical feature."""
    names = [nm for nm in d._profile.cat_names if nm != PREDICTION]  # type: ignore
    return [[f.get(nm) for f in ok.feats] for nm in names]


@pytest.mark.skipif(len(_AVAILABLE) < 2, reason="needs both decoders")
@pytest.mark.parametrize("seed", range(4))
def test_compiled_decoder_numbers_match_msgspec(reference_path, seed):
    """Numbers written every way a JSON writer does (repr, fixed, exponents, integers, extremes)
    parse to the same floats and ints in the compiled decoder as in msgspec."""
    d = _daemon(reference_path, True)
    try:
        c, m = ChunkDecoder(d._profile, ("c",)), ChunkDecoder(d._profile, ("msgspec",))
        rng = random.Random(seed)

        def num() -> str:
            x = rng.choice([rng.gauss(0, 1), rng.uniform(-1e6, 1e6), 10 ** rng.uniform(-300, 300),
                            rng.random() * 2 ** 53, float(rng.randrange(-10 ** 6, 10 ** 6))])
            x = -x if rng.random() < 0.5 else x
            fmt = rng.choice(["{!r}", "{:.17g}", "{:.6f}", "{:.15e}", "{:.3E}", "{:.1f}", "{:.0f}",
                              "{:.20f}", "{:.25g}"])
            s = fmt.format(x)
            if rng.random() < 0.2:
                s = str(rng.randrange(-2 ** 63, 2 ** 63))
            return s

        lines = [('{"features": {"x": %s, "y": %s, "c": %s}, "prediction": %s, "time": %s}'
                  % (num(), num(), num(), num(), num())).encode() for _ in range(300)]
        body = b",\n".join(lines)
        a, b = c.decode(body, len(lines)), m.decode(body, len(lines))
        if a is None:  # a number it is not sure of: find which line, and check it is odd
            taken = [c.decode(ln, 1) is not None for ln in lines]
            assert sum(taken) >= 200  # refused: "-0", tokens over 80 characters, big ints
            lines = [ln for ln, t in zip(lines, taken) if t]
            body = b",\n".join(lines)
            a, b = c.decode(body, len(lines)), m.decode(body, len(lines))
        assert a is not None and b is not None
        np.testing.assert_array_equal(a.num, b.num)
        assert np.array_equal(np.signbit(a.num), np.signbit(b.num))
        assert (a.preds, a.times, a.cats) == (b.preds, b.times, b.cats)
        assert [list(map(type, v)) for v in (a.preds, a.times, a.cats[0])] == \
            [list(map(type, v)) for v in (b.preds, b.times, b.cats[0])]
    finally:
        d.stop()


@pytest.mark.parametrize("backends", BACKENDS, ids="+".join)
def test_column_batch_slices_and_dicts(reference_path, backends):
    d = _daemon(reference_path, True)
    try:
        prof: Profile = d._profile  # type: ignore[assignment]
        dec = ChunkDecoder(prof, backends)
        recs = [{"id": "a", "features": {"x": 1, "c": "b"}, "prediction": 0.5, "time": 5},
                {"features": {"x": None, "y": 2.5}, "prediction": 1, "label": 0}]
        chunk = b"\n".join(json.dumps(r).encode() for r in recs)
        b = dec.decode(chunk.replace(b"\n", b",\n"), 2)
        assert b is not None and len(b) == 2
        assert b.ids == ["a", None] and b.times == [5, None] and b.labels == [None, 0]
        ix, iy = prof.num_names.index("x"), prof.num_names.index("y")
        assert b.num[0, ix] == 1.0 and math.isnan(b.num[0, iy]) and math.isnan(b.num[1, ix])
        assert b.feats == [{"x": 1.0, "y": None, "c": "b"}, {"x": None, "y": 2.5, "c": None}]
        s = b.slice(1, 2)
        assert len(s) == 1 and s.preds == [1] and s.feats == b.feats[1:]
        # a window filled from columns and from dicts holds the same records
        w1, w2 = Window(0), Window(0)
        w1.extend_batch(prof, b, 0, 2)
        w2.extend(prof, [r["features"] for r in recs], [r["prediction"] for r in recs])
        for (a, ca), (c, cc) in [(w1.matrix(prof), w2.matrix(prof))]:
            np.testing.assert_array_equal(a, c)
            for u, v in zip(ca, cc):
                np.testing.assert_array_equal(u, v)
        assert len(w1) == 2 and len(w1.feats) == 2
    finally:
        d.stop()


@pytest.mark.parametrize("seed", [4, 5])
def test_http_bodies_take_the_columnar_path_with_the_same_results(reference_path, seed):
    """NDJSON bodies POSTed to /v1/predictions go through the chunk decoder when it takes
    them (``Ingest._decode_http``); the answers, counters and windows are the general path's."""
    bodies = _stream(seed, 40)
    fast, slow = _daemon(reference_path, True), _daemon(reference_path, False)
    try:
        taken = [fast.ingest._decode_http(b) is not None for b in bodies]
        assert sum(taken) >= 10 and not all(taken)
        for b in bodies:
            assert fast.submit("predictions", b) == slow.submit("predictions", b)
            for d in (fast, slow):
                d._apply(d.queue.get(0))
        assert fast.counters == slow.counters and fast.counters["windows"] >= 10
        assert _same({k: v for k, v in fast.last.items() if k != "time"},
                     {k: v for k, v in slow.last.items() if k != "time"})
        assert _same(_metrics(fast), _metrics(slow))
        # (arrival times differ: each submit reads the clock)
        assert [i[:2] for i in fast.pending.state_dict()["items"]] == \
            [i[:2] for i in slow.pending.state_dict()["items"]]
        np.testing.assert_array_equal(_window_columns(fast, fast.window)[0],
                                      _window_columns(slow, slow.window)[0])
    finally:
        fast.stop()
        slow.stop()


def test_a_chunk_decoder_failure_falls_back_to_the_general_path(reference_path, monkeypatch):
    """An unexpected exception inside the chunk decoder (a bug, not bad input) must not turn
    a body of valid records into an uncounted 500: the general path parses the body, the
    records are accepted and the failure is counted as an internal error."""
    bodies = [b for b in _stream(7, 12) if b.count(b"\n") >= 3]
    d, ref = _daemon(reference_path, True), _daemon(reference_path, False)

    def broken(self, chunk, n):
        raise IndexError("a decoder bug")

    try:
        assert any(d.ingest._decode_http(b) is not None for b in bodies)
        monkeypatch.setattr(ChunkDecoder, "decode", broken)
        before = d.metrics.internal_error_total()
        for b in bodies:
            assert d.submit("predictions", b) == ref.submit("predictions", b)
            for x in (d, ref):
                x._apply(x.queue.get(0))
        assert d.metrics.internal_error_total() == before + len(bodies)
        assert d.counters["predictions"] == ref.counters["predictions"] > 0
        assert d.counters["received"] == ref.counters["received"]
    finally:
        d.stop()
        ref.stop()
