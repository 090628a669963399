"""Defects the seventeenth round's audit of ``lrwatch daemon`` found (6 December): each
reproduced with a real daemon serving HTTP on a loopback port, fed by a real client
(docs/daemon.md, "Defects found by the seventeenth round's audit")."""

from __future__ import annotations

import json
import random
from typing import Any, Callable

import pytest

from daemon_helpers import make_record

pytest.importorskip("msgspec")

#: optional keys misnamed in a case msgspec's list of usual spellings did not hold
_RARE = [({"lAbel": 1}, "invalid_label", "label"), ({"labeL": 0}, "invalid_label", "label"),
         ({"tImE": 1.7e9}, "invalid_time", "time"),
         ({"timeStamp": 1.7e9}, "invalid_time", "time"), ({"LaBeL": 1}, "invalid_label", "label")]


def _misnamed(rec: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    key = next(iter(extra)).lower()
    meant = "time" if key == "timestamp" else key
    return {**{k: v for k, v in rec.items() if k != meant}, **extra}


def test_a_rarer_case_of_an_optional_key_is_refused_on_the_msgspec_only_path(
        run_daemon: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the compiled decoder (``LRWATCH_CJSONL=0``, or not built), msgspec's decoder
    knew a list of usual misspellings only: ``"lAbel"``, ``"labeL"``, ``"tImE"``,
    ``"timeStamp"`` in an NDJSON body got a 200, the key dropped (the label never joined,
    the arrival time stood in). Every case is refused now, naming the key, as on the other
    paths; the sender's own keys are accepted."""
    from lrwatch.daemon import columnar

    monkeypatch.setattr(columnar, "BACKENDS", ("msgspec",))   # what LRWATCH_CJSONL=0 sets
    d = run_daemon()
    rng = random.Random(171)
    for j, (extra, _, meant) in enumerate(_RARE):   # (a body each: one record of a usual
        good = [make_record(rng, 10 * j + i) for i in range(10)]   # spelling sent a whole
        good[4]["model_version"] = "v3"                               # body to the general path)
        recs = good[:5] + [_misnamed(make_record(rng, 100 + j), extra)] + good[5:]
        status, out = d.post("/v1/predictions", "\n".join(map(json.dumps, recs)))
        assert status == 200 and (out["accepted"], out["rejected"]) == (10, 1), (extra, out)
        key = next(iter(extra))
        assert f"{key!r}" in out["errors"][0] and f"write {meant!r}" in out["errors"][0], out
    d.daemon.drain()
    errors = d.daemon.counters["errors"]
    assert (errors["invalid_label"], errors["invalid_time"]) == (3, 2)


def test_the_msgspec_decoder_takes_a_senders_own_key_and_leaves_every_misnamed_case(
        reference_path: str) -> None:
    """The decoder itself: a chunk with a key of the sender's own, or a ``"timestamp"``
    beside a ``"time"`` (before: sent to the general path), decodes; a chunk with an
    optional key in any other case goes to the general path."""
    from lrwatch.daemon.columnar import ChunkDecoder
    from lrwatch.daemon.reference import Reference
    from lrwatch.daemon.stats import Profile

    dec = ChunkDecoder(Profile(Reference.load(reference_path)), backends=("msgspec",))
    rng = random.Random(172)

    def chunk(extra: dict[str, Any]) -> bytes:
        recs = [make_record(rng, i) for i in range(3)]
        recs[1] = _misnamed(recs[1], extra) if extra else recs[1]
        return b",\n".join(json.dumps(r).encode() for r in recs)

    assert dec.decode(chunk({}), 3) is not None
    assert dec.decode(chunk({"model_version": "v2"}), 3) is not None
    assert dec.decode(chunk({"timestamp": 1.0, "time": 1.7e9}), 3) is not None
    for extra in [e for e, _, _ in _RARE] + [{"Label": 1}, {"TIMESTAMP": 1.0}, {"ID": "x"}, {"iD": "y"}]:
        assert dec.decode(chunk(extra), 3) is None, extra
