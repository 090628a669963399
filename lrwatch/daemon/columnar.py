"""Decoding a chunk of NDJSON prediction lines straight into columns (the ``fast`` extra).

The general ingest path (:mod:`.records`) builds one dict per record and then reads the feature
values out of it; for a tailed file that is most of the cost. When ``msgspec`` is installed
(the ``fast`` extra), :class:`ChunkDecoder` decodes a whole chunk of lines in one call into
typed records whose layout comes from the reference profile: every numeric feature is a number
or ``null``, every categorical one any JSON scalar, and no other feature key is allowed; the
prediction, ``id``, ``time`` and ``label`` are typed too (with the general path's bounds: an
``id`` of 1 to 256 characters, integers within int64), so msgspec checks every value while it
decodes and no Python pass over the columns is left to do. The
numeric features then become the window's float block with one ``numpy`` conversion, and the
records never exist as dicts (a snapshot of the open window builds them, see
:attr:`ColumnBatch.feats`).

A chunk is decoded this way only when the result is exactly what the general path would give.
Anything else (a line that is not JSON, a label record, a feature the reference does not know,
a string or boolean in a numeric feature, an integer id, a list of probabilities, an integer
beyond int64 (the general path takes it, see below), ``NaN`` literals, invalid UTF-8, ...) makes :meth:`ChunkDecoder.decode` return
``None``, and the caller handles the whole chunk with the general path, which finds each bad
record's reason. Missing values (``null`` or an absent key), unseen categories and values out
of the reference's range stay on the fast path. orjson reads integers outside
``[-2**63, 2**64)`` as floats and msgspec keeps them exact, so any integer outside int64 in a
categorical value, prediction, time or label sends its chunk to the general path, which then
gives the same values either way. ``tests/daemon/test_columnar.py`` feeds the
same mixed streams through both paths and compares every counter and window statistic.

**The compiled decoder.** When the optional C extension ``lrwatch.daemon._jsonl`` was built
(``pip install`` builds it when a C compiler is there, see ``setup.py``; without one the install
only warns), it is tried first: it reads a chunk of the common layout straight into the float
block and the same lists, with no Python float per value (about 1.0 µs a record against 2.2 µs
for msgspec and the cast). It takes a chunk only when it is certain of every value and refuses
(returns ``None``, and msgspec, then the general path, gets the chunk) on anything else: any
backslash escape in a string (``json.dumps`` writes ``"é"`` as ``"\\u00e9"``), a duplicate key,
``-0`` or any integer beyond int64, subnormal floats, numbers over 80 characters, and everything
msgspec refuses. Other top-level keys are checked and skipped. Floats of at most 15 significant
digits with a small exponent are one exact IEEE operation (correctly rounded), the rest go
through ``PyOS_string_to_double`` (what ``float()`` uses). ``LRWATCH_CJSONL=0`` turns it off.

``LRWATCH_MSGSPEC=0`` turns msgspec's decoder off, ``LRWATCH_CJSONL=0`` the compiled one;
``LRWATCH_JSON=stdlib`` (which stands for "no ``fast`` extra") turns both off.

Examples
--------
>>> import pytest; _ = pytest.importorskip("msgspec")
>>> from lrwatch.daemon import build_reference
>>> from lrwatch.daemon.stats import Profile
>>> ref = build_reference([{"features": {"x": i % 7, "c": "ab"[i % 2]}, "prediction": 0.5}
...                        for i in range(50)], calibrate=False)
>>> dec = ChunkDecoder(Profile(ref))
>>> b = dec.decode(b'{"features": {"x": 1.5, "c": "a"}, "prediction": 0.2},\\n'
...                b'{"features": {"x": null}, "prediction": 0.9}', 2)
>>> b.num.tolist(), b.cats, b.preds
([[1.5], [nan]], [['a', None]], [0.2, 0.9])
>>> dec.decode(b'{"features": {"x": "1.5"}, "prediction": 0.2}', 1) is None
True
"""

from __future__ import annotations

import os
from itertools import chain
from operator import attrgetter
from typing import Annotated, Any, Union

import numpy as np

from .records import RECORD_KEYS, Batch, misnamed_key
from .reference import PREDICTION

try:  # the optional ``fast`` extra
    import msgspec as _msgspec
except ImportError:  # pragma: no cover - exercised when msgspec is not installed
    _msgspec = None

try:  # the optional compiled decoder (built by ``pip install`` when a C compiler is there)
    from . import _jsonl as _cjsonl  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - exercised when the extension was not built
    _cjsonl = None

__all__ = ["BACKENDS", "ENABLED", "ChunkDecoder", "ColumnBatch"]

_OFF = ("0", "no", "off", "false")


def _backends() -> tuple[str, ...]:
    if os.environ.get("LRWATCH_JSON", "").strip().lower() in ("json", "stdlib"):
        return ()
    out: list[str] = []
    if _cjsonl is not None and os.environ.get("LRWATCH_CJSONL", "").strip().lower() not in _OFF:
        out.append("c")
    if _msgspec is not None and os.environ.get("LRWATCH_MSGSPEC", "").strip().lower() not in _OFF:
        out.append("msgspec")
    return tuple(out)


#: The chunk decoders available and wanted, in the order they are tried: ``"c"`` (the compiled
#: ``_jsonl`` extension; ``LRWATCH_CJSONL=0`` turns it off), then ``"msgspec"``.
BACKENDS = _backends()
#: Whether :class:`ChunkDecoder` is available and wanted (the daemon's default).
ENABLED = bool(BACKENDS)

_features = attrgetter("features")
_prediction = attrgetter("prediction")
_id = attrgetter("id")
_time = attrgetter("time")
_label = attrgetter("label")


def _optional(col: list[Any]) -> list[Any] | None:
    # like records._column: None when no record has the key (or all have null)
    return col if col.count(None) != len(col) else None


class ColumnBatch(Batch):
    """Accepted predictions as columns: ``num`` is the ``(n, k)`` float block of the profile's
    numeric features (NaN for missing), ``cats`` the raw values of each categorical feature;
    ``preds``, ``ids``, ``times`` and ``labels`` as in :class:`~.records.Batch`. ``profile`` is
    the profile the columns follow; ``feats`` builds the dicts only when asked."""

    __slots__ = ("num", "cats", "profile", "names", "cat_names", "_feats")

    def __init__(self, profile: Any, names: list[str], cat_names: list[str], num: np.ndarray,
                 cats: list[list[Any]], preds: list[Any], ids: list[Any] | None = None,
                 times: list[Any] | None = None, labels: list[Any] | None = None) -> None:
        self.profile = profile
        self.names = names
        self.cat_names = cat_names
        self.num = num
        self.cats = cats
        self.preds = preds
        self.ids = ids
        self.times = times
        self.labels = labels
        self._feats: list[dict[str, Any]] | None = None

    @property  # type: ignore[override]
    def feats(self) -> list[dict[str, Any]]:
        """One features dict per record (NaN back to ``None``): equivalent input for every
        consumer of dicts (the column extraction gives the same block from them)."""
        if self._feats is None:
            keys = self.names + self.cat_names
            cols: list[list[Any]] = [[None if v != v else v for v in col]
                                     for col in self.num.T.tolist()]
            cols += self.cats
            self._feats = ([dict(zip(keys, row)) for row in zip(*cols)] if keys
                           else [{} for _ in self.preds])
        return self._feats

    def __len__(self) -> int:
        return len(self.preds)

    def __bool__(self) -> bool:
        return bool(self.preds)

    def slice(self, lo: int, hi: int) -> "ColumnBatch":
        def cut(col: list[Any] | None) -> list[Any] | None:
            return None if col is None else col[lo:hi]

        return ColumnBatch(self.profile, self.names, self.cat_names, self.num[lo:hi],
                           [c[lo:hi] for c in self.cats], self.preds[lo:hi], cut(self.ids),
                           cut(self.times), cut(self.labels))


class ChunkDecoder:
    """Decodes NDJSON chunks of prediction records laid out for one profile (see the module
    notes). Needs the compiled ``_jsonl`` extension or ``msgspec``; ``backends`` (default
    :data:`BACKENDS`) names the decoders to try, in order."""

    def __init__(self, profile: Any, backends: tuple[str, ...] | None = None) -> None:
        if backends is None:
            backends = BACKENDS or tuple(b for b, m in (("c", _cjsonl), ("msgspec", _msgspec))
                                         if m is not None)
        if not backends:
            raise RuntimeError("the chunk decoder needs msgspec (pip install 'lrwatch[fast]') "
                               "or the compiled lrwatch.daemon._jsonl extension")
        self.profile = profile
        self.names = [nm for nm in profile.num_names if nm != PREDICTION]
        self.cat_names = [nm for nm in profile.cat_names if nm != PREDICTION]
        self.backends = tuple(backends)
        self._ckeys: tuple[tuple[bytes, ...], tuple[bytes, ...]] | None = None
        if "c" in backends:
            if _cjsonl is None:
                raise RuntimeError("the compiled lrwatch.daemon._jsonl extension is not built")
            try:  # keys are matched as raw UTF-8 bytes (a key with an escape is refused)
                self._ckeys = (tuple(nm.encode() for nm in self.names),
                               tuple(nm.encode() for nm in self.cat_names))
            except UnicodeEncodeError:  # a lone surrogate in a name: only msgspec can match it
                self._ckeys = None
        self._decoder: Any = None
        if "msgspec" in backends:
            if _msgspec is None:
                raise RuntimeError("msgspec is not installed (pip install 'lrwatch[fast]')")
            self._init_msgspec()

    def _init_msgspec(self) -> None:
        k = len(self.names)
        # The types and bounds below accept exactly the values the general path's batch
        # checks accept (see the module notes); anything else is a decoding error, and the
        # chunk goes to the general path. Integers are bounded to int64 (the general path takes
        # up to 2**64; such a rare chunk just takes the general path).
        i64 = Annotated[int, _msgspec.Meta(ge=-2 ** 63, le=2 ** 63 - 1)]
        value = Union[i64, float, str, bool, None]  # a categorical feature or a label
        fields: list[Any] = [(f"n{i}", Union[float, None], None) for i in range(k)]
        fields += [(f"c{j}", value, None) for j in range(len(self.cat_names))]
        # field names are placeholders, renamed to the features' real names (any string)
        rename = {f"n{i}": nm for i, nm in enumerate(self.names)}
        rename.update({f"c{j}": nm for j, nm in enumerate(self.cat_names)})
        try:
            feats = _msgspec.defstruct("Features", fields, rename=rename,
                                       forbid_unknown_fields=True, gc=False)
        except ValueError:
            # a name with '"', a backslash or a control character (legal JSON keys) cannot
            # be a renamed field: the compiled decoder, or the general path, takes the chunks
            # (until the thirteenth audit this raised: every NDJSON body got a 500)
            return
        # other top-level keys are ignored, as on the general path, except an optional key
        # misnamed ("Label", "lAbel", "ID", "timestamp": records.misnamed_key), which the
        # general path refuses naming it. A chunk of records with no other key decodes with
        # the strict struct, at no cost; one with a key of the sender's own fails there and
        # has its keys read (values left raw) before the lenient struct decodes it
        fields = [("features", feats), ("prediction", Union[i64, float, str, bool]),
                  ("id", Union[Annotated[str, _msgspec.Meta(min_length=1, max_length=256)],
                               None], None),
                  ("time", Union[i64, float, None], None), ("label", value, None)]
        strict = _msgspec.defstruct("Prediction", fields, forbid_unknown_fields=True, gc=False)
        rec = _msgspec.defstruct("Prediction", fields, gc=False)
        self._strict = _msgspec.json.Decoder(list[strict])  # type: ignore[valid-type]
        self._decoder = _msgspec.json.Decoder(list[rec])  # type: ignore[valid-type]
        self._keys = _msgspec.json.Decoder(list[dict[str, _msgspec.Raw]])
        self._own_keys = False
        self._cat_get = [attrgetter(f"c{j}") for j in range(len(self.cat_names))]
        self._astuple = _msgspec.structs.astuple

    def _msgspec_records(self, body: bytes) -> list[Any] | None:
        """The chunk's typed records, or ``None`` (the general path's): decoded strictly
        (only the record's own keys), else, where a record holds another key, leniently
        when no key is an optional one misnamed (any case: before the seventeenth round a
        list of usual spellings was checked, and ``"lAbel"`` was dropped here)."""
        errors = (_msgspec.MsgspecError, ValueError)   # UnicodeDecodeError is a ValueError
        if not self._own_keys:   # (the last chunk had no key of the sender's own)
            try:
                return self._strict.decode(body)
            except errors:
                pass
        try:
            keys = self._keys.decode(body)   # (the values left raw: about 0.6x a decode)
            if any(map(misnamed_key, keys)):
                return None
            # a stream whose records carry keys of their own skips the strict try
            self._own_keys = not all(map(RECORD_KEYS.issuperset, keys))
            return self._decoder.decode(body)
        except errors:
            return None

    def decode(self, body: bytes, n: int) -> ColumnBatch | None:
        """``body``: ``n`` NDJSON lines joined by ``,\\n`` (every newline of the chunk with a
        comma in front). The accepted records as a :class:`ColumnBatch`, or ``None`` when the
        general path must handle the chunk."""
        if self._ckeys is not None:
            num = np.empty((n, len(self.names)), dtype=np.float64)
            r = _cjsonl.decode(body, n, self._ckeys[0], self._ckeys[1], num)
            if r is False:  # a misnamed key ("Label"): msgspec would ignore it too
                return None
            if r is not None:
                preds, ids, times, labels, cats = r
                return ColumnBatch(self.profile, self.names, self.cat_names, num, cats, preds,
                                   ids, times, labels)
        if self._decoder is None:
            return None
        # a blank line makes ",,": an error. A line holding two values, or one value
        # spread over lines, changes the count: every line must be exactly one record.
        recs = self._msgspec_records(b"[" + body + b"]")
        if recs is None:
            return None
        if len(recs) != n:
            return None
        # msgspec refuses NaN/Infinity literals and numbers out of the float range, so every
        # float here is finite (the general path's finiteness check has nothing to find), and
        # the types of every column were checked while decoding
        feats = list(map(_features, recs))
        cats = [list(map(g, feats)) for g in self._cat_get]
        k = len(self.names)
        width = k + len(cats)
        if not k:
            num = np.empty((n, 0), dtype=np.float64)
        else:
            # one object array of every feature value, then one cast: each numeric value is
            # a float or None (typed), and None becomes NaN
            flat = np.fromiter(chain.from_iterable(map(self._astuple, feats)), dtype=object,
                               count=n * width).reshape(n, width)
            num = (flat[:, :k] if cats else flat).astype(np.float64)
        return ColumnBatch(self.profile, self.names, self.cat_names, num, cats,
                           list(map(_prediction, recs)), _optional(list(map(_id, recs))),
                           _optional(list(map(_time, recs))), _optional(list(map(_label, recs))))
