"""Reference profiles: what "normal" traffic looks like, built from a data file or live records.

A profile keeps per feature what the drift tests need and nothing else: for numeric features
quantile bin edges (a quantile sketch), the reference histogram over those bins, mean, standard
deviation and range; for categorical and binary features the category frequencies; and the
missing-value count. A capped row sample is kept too, so that the thresholds can be
re-calibrated for another window size without the original data (see :mod:`.calibrate`).

``lrwatch baseline build DATA -o reference.json`` writes one; the daemon can also build one from
its first N live records. This module only profiles; calibrating the thresholds of a profile
is :mod:`.calibrate`'s job, and :func:`lrwatch.daemon.baseline.build_reference` does both. The
daemon's modules import in one direction: ``reference`` <- ``stats`` <- ``calibrate`` <-
``baseline``.

Examples
--------
>>> import random
>>> rng = random.Random(0)
>>> rows = [{"features": {"x": rng.gauss(0, 1), "c": rng.choice("ab")}, "prediction": 0.3}
...         for _ in range(500)]
>>> ref = profile_records(rows)
>>> [(f.name, f.kind) for f in ref.features], ref.prediction_type
([('c', 'binary'), ('x', 'numeric'), ('_prediction', 'numeric')], 'probability')
"""

from __future__ import annotations

import csv
import difflib
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..errors import ConfigError
from . import finite_stats
from .records import (DEFAULT_LIMITS, NonFinite, RecordError, _check_features, _check_label,
                      loads_record, validate_prediction)
from .state import atomic_write

__all__ = ["FeatureProfile", "Reference", "profile_records", "read_data", "cat_key",
           "unwrap_prediction", "describe_prediction_type", "class_one_probabilities",
           "PREDICTION", "FINE_BINS", "COARSE_BINS"]

#: Name under which the model output is profiled next to the features.
PREDICTION = "_prediction"
#: Quantile bins per numeric feature (KS and Wasserstein); grouped into COARSE_BINS for
#: chi-square, PSI and Jensen-Shannon so that every cell expects a few records per window.
FINE_BINS = 40
COARSE_BINS = 10
SAMPLE_ROWS = 10_000
#: A feature present (not null) in fewer of the reference records than this share (and at
#: least 2) is left out: a window of 1000 records would hold under 10 of its values, too few
#: for its tests, and keys made per request (a session id as a key) would each become a
#: feature with a dozen Prometheus series.
MIN_PRESENT_SHARE = 0.01
#: At most this many reference features (the most often present are kept): each costs about
#: 20 series on ``/metrics`` and a column in every window.
MAX_FEATURES = 1000
REFERENCE_VERSION = 1


def cat_key(v: Any) -> str | None:
    """The category key of a value: ``True``, ``1``, ``1.0`` and ``"1"`` are the same category.

    >>> cat_key(True), cat_key(1.0), cat_key("1"), cat_key(2.5), cat_key(None)
    ('1', '1', '1', '2.5', None)
    """
    if v is None:
        return None
    if v is True or v is False:
        return "1" if v else "0"
    if type(v) is float:
        if v != v:
            return None
        if v.is_integer():
            return str(int(v))
    return str(v)


def _is_num(v: Any) -> bool:
    return (type(v) is float or type(v) is int)


@dataclass
class FeatureProfile:
    """The profile of one feature (or of the prediction, named :data:`PREDICTION`)."""

    name: str
    kind: str  # numeric | categorical | binary
    count: int  # non-missing reference values
    missing: int
    # numeric
    mean: float = 0.0
    std: float = 1.0
    min: float = 0.0
    max: float = 0.0
    edges: list[float] = field(default_factory=list)  # FINE_BINS - 1 inner quantile edges
    counts: list[int] = field(default_factory=list)  # reference count per fine bin
    # categorical / binary: category key -> count, in a stable order
    categories: dict[str, int] = field(default_factory=dict)

    @property
    def numeric(self) -> bool:
        return self.kind == "numeric"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "kind": self.kind, "count": self.count,
                             "missing": self.missing}
        if self.numeric:
            d.update(mean=self.mean, std=self.std, min=self.min, max=self.max,
                     edges=self.edges, counts=self.counts)
        else:
            d["categories"] = self.categories
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FeatureProfile":
        kind = d.get("kind")
        if kind not in ("numeric", "categorical", "binary"):
            raise ConfigError(f"feature {d.get('name')!r}: kind {kind!r} is invalid; choose "
                              f"numeric, categorical or binary")
        return cls(name=str(d["name"]), kind=kind, count=int(d["count"]),
                   missing=int(d["missing"]), mean=float(d.get("mean", 0.0)),
                   std=float(d.get("std", 1.0)), min=float(d.get("min", 0.0)),
                   max=float(d.get("max", 0.0)), edges=[float(x) for x in d.get("edges", [])],
                   counts=[int(x) for x in d.get("counts", [])],
                   categories={str(k): int(v) for k, v in d.get("categories", {}).items()})


#: How tools write a missing value (pandas' ``read_csv`` reads these as missing; R's
#: ``write.csv`` writes ``NA``). Read as missing only in a feature whose other values are all
#: numbers: elsewhere ``NA`` may be a category (Namibia's country code).
_MISSING_SPELLINGS = frozenset({"", "NA", "N/A", "n/a", "NULL", "null", "None", "nan", "NaN",
                                "-nan", "-NaN", "#N/A", "#N/A N/A", "#NA", "<NA>", "-1.#IND",
                                "-1.#QNAN", "1.#IND", "1.#QNAN"})


def _infer_kind(values: Sequence[Any]) -> str:
    present = [v for v in values if v is not None and not (type(v) is float and v != v)]
    if present and all(_is_num(v) for v in present):
        distinct = set(present)
        if distinct <= {0, 1}:
            return "binary"
        return "numeric"
    # numbers and "NA"-like strings: a numeric feature with its missing values spelled out
    # (its profile counts them missing, as a window counts a string in a numeric feature).
    # Until 6 December it was categorical, every live value unseen: its drift went unseen.
    nums = [v for v in present if not (type(v) is str and v in _MISSING_SPELLINGS)]
    if nums and len(nums) < len(present) and all(_is_num(v) for v in nums) \
            and not set(nums) <= {0, 1}:
        return "numeric"
    keys = {cat_key(v) for v in present}
    return "binary" if len(keys) <= 2 else "categorical"


def _profile(name: str, values: Sequence[Any], kind: str | None = None) -> FeatureProfile:
    kind = kind or _infer_kind(values)
    if kind == "numeric":
        arr = np.array([float(v) if _is_num(v) else math.nan for v in values], dtype=np.float64)
        ok = arr[np.isfinite(arr)]
        missing = len(arr) - len(ok)
        if len(ok) < 2:
            raise ConfigError(f"feature {name!r} has fewer than 2 numeric reference values")
        probs = np.linspace(0, 1, FINE_BINS + 1)[1:-1]
        edges = np.quantile(ok, probs)
        counts = np.bincount(np.searchsorted(edges, ok, side="right"), minlength=FINE_BINS)
        std = float(finite_stats.std(ok, ddof=1))  # values near 1e308 do not overflow it
        return FeatureProfile(name, kind, len(ok), missing, mean=float(finite_stats.mean(ok)),
                              std=std if std > 0 else 1.0, min=float(ok.min()),
                              max=float(ok.max()), edges=[float(e) for e in edges],
                              counts=[int(c) for c in counts])
    cats: dict[str, int] = {}
    missing = 0
    for v in values:
        k = cat_key(v)
        if k is None:
            missing += 1
        else:
            cats[k] = cats.get(k, 0) + 1
    cats = dict(sorted(cats.items(), key=lambda kv: (-kv[1], kv[0])))
    return FeatureProfile(name, kind, len(values) - missing, missing, categories=cats)


def unwrap_prediction(p: Any) -> Any:
    """``{"proba": [...]}`` as its list (records that did not go through validation)."""
    return p["proba"] if type(p) is dict and "proba" in p else p


def class_one_probabilities(raw: Sequence[Any]) -> Sequence[Any]:
    """A binary model's predictions sent as ``[p0, p1]`` in some records and as ``p1`` in
    others (two client versions, say): the lists as their ``p1``, which is how the daemon reads
    them against a reference of class-1 probabilities (``records.Limits.binary_probability``).
    A list of one, ``[p]`` (a sigmoid output: Keras' ``predict(x)[i].tolist()``), is ``p``
    wherever it is. Anything else comes back as it is: lists of another width, numbers outside
    [0, 1], class names, or lists only (a reference of probability lists, see
    docs/daemon.md)."""
    if any(type(p) is list and len(p) == 1 for p in raw):
        raw = [p[0] if type(p) is list and len(p) == 1 else p for p in raw]
    lists = [p for p in raw if type(p) is list]
    numbers = [p for p in raw if p is not None and type(p) is not list]
    if not lists or not numbers or any(len(p) != 2 for p in lists) \
            or not all(_is_num(p) and 0.0 <= p <= 1.0 for p in numbers):
        return raw
    return [p[1] if type(p) is list else p for p in raw]


def _prediction_value(p: Any) -> Any:
    if isinstance(p, list):  # class probabilities: the predicted class index
        return int(np.argmax(p)) if p else None
    return p


def _prediction_type(values: Sequence[Any], labels: Sequence[Any] = ()
                     ) -> tuple[str, str | None]:
    """The kind of the reference's predictions, and ``"labels"`` when its labels decided it.

    Numbers in [0, 1], not all integers, are a binary classifier's class-1 probabilities or
    the outputs of a regression (a click-through rate, a share): the predictions alone cannot
    tell, the labels can. Labels that are all 0/1 make a classifier; numbers that are not
    all 0/1 make a regression, whose live labels are then values, not classes. Without
    labels (or with class names) the predictions are read as probabilities, as before.
    """
    present = [v for v in values if v is not None]
    if not present:
        return "none", None
    if any(isinstance(v, list) for v in present):
        return "probabilities", None
    if all(_is_num(v) for v in present):
        if all(float(v).is_integer() for v in present):
            return "class", None
        if all(0.0 <= v <= 1.0 for v in present):
            said = _label_kind(labels)
            if said is None:
                return "probability", None
            return ("probability" if said == "classes" else "regression"), "labels"
        return "regression", None
    return "class", None


def _label_kind(labels: Sequence[Any]) -> str | None:
    """``"classes"`` when every label present is class 0 or 1 (``True``, ``1.0`` and ``"1"``
    are class 1), ``"values"`` when all are numbers and not all 0/1, else ``None`` (no
    labels, class names, a mix: nothing to tell a regression by)."""
    present = [v for v in labels if v is not None]
    if not present:
        return None
    if all(cat_key(v) in ("0", "1") for v in present):
        return "classes"
    return "values" if all(_is_num(v) for v in present) else None


def describe_prediction_type(ref: "Reference") -> str:
    """The reference's prediction type, with why, where predictions in [0, 1] made it a
    choice between a probability and a regression (what ``lrwatch baseline build`` and the
    live reference's log say): a regression read as probabilities would have its labels
    refused."""
    ptype = ref.prediction_type
    if ref.prediction_basis == "labels":
        why = ("the labels are 0/1: a binary classifier's class-1 probabilities"
               if ptype == "probability" else
               "outputs in [0, 1], but the labels are values, not classes 0/1")
        return f"{ptype} ({why})"
    if ptype == "probability":
        return (f"{ptype} (outputs in [0, 1] and no labels to tell: read as a binary "
                f"classifier's class-1 probabilities, whose live labels must be 0 or 1; a "
                f"regression with outputs in [0, 1] needs its labels in the reference)")
    return ptype


@dataclass
class Reference:
    """A reference profile: features, prediction, a row sample, and cached calibration."""

    features: list[FeatureProfile]
    prediction_type: str
    records: int
    created: float = 0.0
    sample: dict[str, list[Any]] = field(default_factory=dict)  # column name -> values
    calibration: dict[str, Any] | None = None
    #: class probabilities per prediction, when every reference prediction is a list of one
    #: width (the live lists must have it too; see records.Limits.proba_width)
    proba_width: int | None = None
    #: the fitted label-free performance estimator (``PerformanceEstimator.to_dict()``), when
    #: the reference had labels and probabilities (see :mod:`.baseline`)
    estimator: dict[str, Any] | None = None
    #: ``"labels"`` when the reference's labels decided between a probability and a
    #: regression (predictions in [0, 1]); ``None`` when the predictions alone did, or the
    #: reference predates this (saved only when set: older readers see the old format)
    prediction_basis: str | None = None
    #: what building this reference could not do, and why (not saved)
    notes: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    def to_dict(self) -> dict[str, Any]:
        return {"version": REFERENCE_VERSION, "created": self.created, "records": self.records,
                "prediction_type": self.prediction_type,
                "features": [f.to_dict() for f in self.features],
                "sample": self.sample, "calibration": self.calibration,
                **({"proba_width": self.proba_width} if self.proba_width else {}),
                **({"estimator": self.estimator} if self.estimator else {}),
                **({"prediction_basis": self.prediction_basis} if self.prediction_basis
                   else {})}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Reference":
        _check_shape(d)
        if d.get("version") != REFERENCE_VERSION:
            raise ConfigError(f"unsupported reference version {d.get('version')!r} "
                              f"(this lrwatch reads {REFERENCE_VERSION})")
        return cls(features=[FeatureProfile.from_dict(f) for f in d["features"]],
                   prediction_type=str(d.get("prediction_type", "none")),
                   records=int(d["records"]), created=float(d.get("created", 0.0)),
                   sample={str(k): list(v) for k, v in (d.get("sample") or {}).items()},
                   calibration=d.get("calibration"),
                   proba_width=int(d["proba_width"]) if d.get("proba_width") else None,
                   estimator=d.get("estimator"),
                   prediction_basis=str(d["prediction_basis"]) if d.get("prediction_basis")
                   else None)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (temporary file, fsync, rename)."""
        atomic_write(path, json.dumps(self.to_dict(), separators=(",", ":")).encode())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Reference":
        where = os.fspath(path)
        try:
            with open(path, "rb") as fh:
                text = fh.read()
        except OSError as exc:
            raise ConfigError(f"cannot read reference {where!r}: {exc}") from exc
        try:
            d = json.loads(text)
        except ValueError as exc:
            hint = (" (one JSON object per line: reference *data*? build the reference from "
                    "it with `lrwatch baseline build`)" if "Extra data" in str(exc) else "")
            raise ConfigError(f"cannot read reference {where!r}: not JSON: {exc}{hint}") from exc
        try:
            return cls.from_dict(d)
        except ConfigError as exc:
            raise ConfigError(f"cannot read reference {where!r}: {exc}") from exc
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            what = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ConfigError(f"cannot read reference {where!r}: {what} (a reference is "
                              f"what `lrwatch baseline build` writes)") from exc


def _check_shape(d: Any) -> None:
    """The structure of a saved reference, checked before any field is read, so that a file
    of the wrong shape gets an error naming the part, not a traceback."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"a reference is a JSON object, got a {type(d).__name__}")
    feats = d.get("features")
    if not isinstance(feats, list) or not all(isinstance(f, Mapping) for f in feats):
        raise ConfigError("'features' must be a list of objects")
    for f in feats:
        if f.get("kind") == "numeric":
            edges, counts = f.get("edges"), f.get("counts")
            if (not isinstance(edges, list) or not isinstance(counts, list)
                    or len(counts) != len(edges) + 1 or not edges):
                raise ConfigError(f"numeric feature {f.get('name')!r} needs 'edges' and "
                                  f"'counts' (one more count than edges)")
        if not isinstance(f.get("categories", {}), Mapping):
            raise ConfigError(f"feature {f.get('name')!r}: 'categories' must be an object")
    for key in ("sample", "calibration", "estimator"):
        if d.get(key) is not None and not isinstance(d[key], Mapping):
            raise ConfigError(f"'{key}' must be an object, got a {type(d[key]).__name__}")
    if not all(isinstance(v, list) for v in (d.get("sample") or {}).values()):
        raise ConfigError("'sample' must map each feature to a list of values")


def profile_records(records: Iterable[Mapping[str, Any]], *,
                    kinds: Mapping[str, str] | None = None) -> Reference:
    """Profile validated records (each with a ``features`` mapping and maybe a ``prediction``).

    Parameters
    ----------
    kinds:
        Force a feature's kind (``numeric``, ``categorical``, ``binary``) instead of inferring.
    calibrate:
        Also calibrate the drift thresholds for ``window_size``-record windows at one false
        alarm per ``target_windows`` windows (seconds of CPU; see :mod:`.calibrate`).
    """
    rows = list(records)
    if len(rows) < 10:
        raise ConfigError(f"a reference needs at least 10 records, got {len(rows)}")
    kinds = dict(kinds or {})
    for k, v in kinds.items():
        if v not in ("numeric", "categorical", "binary"):
            raise ConfigError(f"kind {v!r} for {k!r} is invalid; choose numeric, categorical "
                              f"or binary")
    _check_forced_names(rows, kinds)
    cols, notes = _feature_columns(rows, kinds)
    feats = [_profile(n, vals, kinds.get(n)) for n, vals in cols.items()]
    raw = class_one_probabilities([unwrap_prediction(r.get("prediction")) for r in rows])
    preds = [_prediction_value(p) for p in raw]
    # from the raw values (a probability list is not a class) and the labels (numbers in
    # [0, 1] are a regression's outputs when the labels are values, not classes)
    ptype, basis = _prediction_type(raw, [r.get("label") for r in rows])
    if ptype != "none":
        pkind = "numeric" if ptype in ("probability", "regression") else "categorical"
        feats.append(_profile(PREDICTION, preds, pkind))
        cols[PREDICTION] = preds
    # a capped, evenly spaced row sample (JSON-ready) for re-calibration
    step = max(1, len(rows) // SAMPLE_ROWS)
    sample = {n: [_jsonable(v) for v in vals[::step][:SAMPLE_ROWS]] for n, vals in cols.items()}
    widths = {len(p) for p in raw if isinstance(p, list)}
    ref = Reference(features=feats, prediction_type=ptype, records=len(rows),
                    created=time.time(), sample=sample,
                    proba_width=widths.pop() if ptype == "probabilities" and len(widths) == 1
                    else None, prediction_basis=basis)
    ref.notes.extend(notes)
    return ref


def _check_forced_names(rows: list[Mapping[str, Any]], kinds: Mapping[str, str]) -> None:
    """A kind forced for a feature that no record has is a typo, not a choice: said, with the
    names nearest to it, instead of building a reference without it."""
    if not kinds:
        return
    names = {k for r in rows for k in r["features"]}
    unknown = sorted(set(kinds) - names)
    if unknown:
        near = {u: difflib.get_close_matches(u, names, n=1) for u in unknown}
        hint = "; ".join(f"did you mean {near[u][0]!r} for {u!r}?" for u in unknown if near[u])
        listed = sorted(names)[:20]
        raise ConfigError(f"a kind is forced for {unknown}, which no reference record has as a "
                          f"feature{'; ' + hint if hint else ''} (features: "
                          f"{', '.join(listed)}{', ...' if len(names) > 20 else ''})")


def _feature_columns(rows: list[Mapping[str, Any]], kinds: Mapping[str, str]
                     ) -> tuple[dict[str, list[Any]], list[str]]:
    """Each feature's reference values, less those left out, and notes saying which were
    left out and why: a feature with no value has nothing to compare a window with, and
    feature names are the senders' keys, so per-request keys (a session id as a key) would
    make a feature, and a set of Prometheus series, per record (see :func:`_rare_features`).
    A numeric feature kept so always has the 2 values its quantiles and spread need."""
    names: dict[str, None] = {}
    for r in rows:
        for k in r["features"]:
            names.setdefault(k, None)
    # the prediction's own name: profiled under it too, the reference held it twice
    reserved = names.pop(PREDICTION, 0) is None
    cols = {n: [r["features"].get(n) for r in rows] for n in sorted(names)}
    empty = [n for n, vals in cols.items() if all(_jsonable(v) is None for v in vals)]
    for n in empty:
        del cols[n]
    if not cols:
        raise ConfigError(f"no feature has a value in any of the {len(rows)} reference records")
    rare, capped = _rare_features(cols, len(rows), kinds)
    for n in rare + capped:
        del cols[n]
    if not cols:
        raise ConfigError(f"no feature has a value in {MIN_PRESENT_SHARE:.0%} of the "
                          f"{len(rows)} reference records (and in at least 2)")
    notes = []
    if reserved:
        notes.append(f"left out: the input feature {PREDICTION!r} (the name lrwatch gives the "
                     f"model's prediction; rename the feature to have it watched)")
    if empty:
        notes.append(f"left out: {_names(empty)} (null or NaN in all {len(rows)} reference "
                     f"records; nothing to compare a window with)")
    if rare:
        notes.append(f"left out: {_names(rare)} (a value in fewer than "
                     f"{MIN_PRESENT_SHARE:.0%} of the {len(rows)} reference records, or in "
                     f"fewer than 2: too few for a window's tests)")
    if capped:
        notes.append(f"left out: {_names(capped)} (over the cap of {MAX_FEATURES} reference "
                     f"features; the most often present were kept)")
    return cols, notes


def _rare_features(cols: Mapping[str, list[Any]], rows: int, kinds: Mapping[str, str]
                   ) -> tuple[list[str], list[str]]:
    """The features to leave out for their names' sake: those present (not null) in fewer
    than :data:`MIN_PRESENT_SHARE` of the rows (at least 2), then the least present beyond
    :data:`MAX_FEATURES`. A kind forced by name keeps its feature."""
    need = max(2, math.ceil(MIN_PRESENT_SHARE * rows))
    present = {n: sum(1 for v in vals if _jsonable(v) is not None) for n, vals in cols.items()}
    rare = [n for n, k in present.items() if k < need and n not in kinds]
    kept = sorted((n for n in cols if n not in rare),
                  key=lambda n: (n not in kinds, -present[n], n))
    return rare, sorted(kept[MAX_FEATURES:])


def _names(names: Sequence[str], shown: int = 10) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(map(repr, names[:shown])) + more


def _jsonable(v: Any) -> Any:
    if type(v) is float and not math.isfinite(v):
        return None
    if v is None or type(v) in (int, float, str, bool):
        return v
    return str(v)


#: CSV cells that are a boolean (pandas' ``to_csv`` and Python's ``csv`` write ``True`` and
#: ``False``; other tools ``true``/``false``): live JSON sends the column as ``true``/``false``.
_CSV_BOOLEANS = {"true": True, "false": False}


def _csv_value(s: str) -> Any:
    """A CSV cell as the JSON reader would give it: empty -> None, numbers as numbers (an
    integer no float can hold, or a non-finite number: refused by the record checks),
    ``True``/``False`` (any case) as booleans, else the text. (Until 6 December a boolean
    stayed text, so its categories were never the ``0``/``1`` of live JSON booleans.)"""
    if s == "":
        return None
    b = _CSV_BOOLEANS.get(s.lower()) if len(s) <= 5 else None
    if b is not None:
        return b
    try:
        v: Any = int(s)
        float(v)
        return v
    except OverflowError:
        return NonFinite(s[:24])
    except ValueError:
        pass
    try:
        f = float(s)
    except ValueError:
        return s
    if math.isnan(f):   # "nan", as Python's csv writes float("nan"): a missing value, as the
        return None     # JSON literal NaN is (until 6 December only "NaN" was; "nan" refused)
    return f if math.isfinite(f) else NonFinite(s)


def _numeric_missing(rows: list[dict[str, Any]]) -> None:
    """In a column whose cells are numbers or :data:`_MISSING_SPELLINGS`, those cells are
    missing values (in place). Until 6 December R's ``NA`` made such a column a categorical
    feature of ~1000 float "categories", every live value unseen: no drift of it was ever
    detected."""
    numbers: set[str] = set()
    other: set[str] = set()
    spelled: set[str] = set()
    for r in rows:
        for k, v in r["features"].items():
            t = type(v)
            if t is int or t is float:
                numbers.add(k)
            elif t is str and v in _MISSING_SPELLINGS:
                spelled.add(k)
            elif v is not None:
                other.add(k)
    cols = (spelled & numbers) - other
    if cols:
        for r in rows:
            f = r["features"]
            for k in cols:
                if type(f.get(k)) is str:
                    f[k] = None


def _checked(rec: dict[str, Any], where: str) -> dict[str, Any]:
    """``rec`` through the live records' checks (features, prediction, label), or a
    :class:`~lrwatch.errors.ConfigError` naming ``where``: the reference holds what the
    daemon would accept."""
    try:
        feats = rec.get("features")
        if type(feats) is not dict:
            raise RecordError("missing_features", "a record needs a 'features' object")
        _check_features(rec, feats, DEFAULT_LIMITS)
        if "prediction" in rec:
            rec["prediction"] = validate_prediction(rec["prediction"])
        if rec.get("label") is not None:
            _check_label(rec["label"], DEFAULT_LIMITS)
    except RecordError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return rec


def _check_header(names: list[str] | None, p: str, delimiter: str) -> None:
    """Refuse a CSV header that would silently make features no live record has: an unnamed
    column (pandas' ``to_csv`` writes its index so, as a feature that counts rows), a name
    written twice (``csv.DictReader`` keeps the last column), a name with spaces around it
    (``x, y``: the live key is ``y``), and one column holding another delimiter."""
    if not names:
        return
    where = f"{p}:1"
    seen: dict[str, int] = {}
    for i, name in enumerate(names, 1):
        if not name.strip():
            raise ConfigError(f"{where}: column {i} has no name (pandas' to_csv writes its "
                              f"index so: save with index=False, or name the column)")
        if name != name.strip():
            raise ConfigError(f"{where}: column {i} is named {name!r}, with spaces around "
                              f"it; live records name their features without them: write "
                              f"{name.strip()!r}")
        if name in seen:
            raise ConfigError(f"{where}: columns {seen[name]} and {i} are both named "
                              f"{name!r}; give each column its own name")
        seen[name] = i
    other = ";" if delimiter != ";" else ","
    if len(names) == 1 and (other in names[0] or "\t" in names[0]):
        raise ConfigError(f"{where}: the header is one column, {names[0]!r}: the file looks "
                          f"separated by another character than {delimiter!r}; save it with "
                          f"{delimiter!r} between the columns")


def _csv_records(fh: Any, p: str, prediction_column: str,
                 label_column: str) -> list[dict[str, Any]]:
    delimiter = "\t" if p.endswith(".tsv") else ","
    reader = csv.DictReader(fh, delimiter=delimiter)
    _check_header(reader.fieldnames, p, delimiter)
    out: list[dict[str, Any]] = []
    for row in reader:
        where = f"{p}:{reader.line_num}"
        width = len(reader.fieldnames or ())
        if None in row or None in row.values():   # a row longer or shorter than the header
            n = width + len(row.get(None) or ()) if None in row else \
                sum(v is not None for v in row.values())
            raise ConfigError(f"{where}: {n} columns, expected {width} (the header's)")
        feats = {k: _csv_value(v) for k, v in row.items()
                 if k not in (prediction_column, label_column)}
        rec: dict[str, Any] = {"features": feats}
        if row.get(prediction_column) not in (None, ""):
            rec["prediction"] = _csv_value(row[prediction_column])
        if row.get(label_column) not in (None, ""):
            rec["label"] = _csv_value(row[label_column])
        out.append(_checked(rec, where))
    _numeric_missing(out)
    return out


def read_data(path: str | os.PathLike[str], *, prediction_column: str = "prediction",
              label_column: str = "label") -> list[dict[str, Any]]:
    """Read reference data: JSONL in the daemon's record schema, or CSV with a header row.

    In a CSV every column is a feature except ``prediction_column`` and ``label_column``
    (kept as the record's ``label``: the reference's labels fit the performance estimator).
    Lines that do not validate raise :class:`~lrwatch.errors.ConfigError` naming the line.
    """
    p = os.fspath(path)
    out: list[dict[str, Any]] = []
    # utf-8-sig: Excel's "CSV UTF-8" and pandas' to_csv(encoding="utf-8-sig") start the file
    # with a byte order mark, which utf-8 kept as part of the first column's name ("\ufeffx":
    # a feature no live record has, so it drifted as all missing in the first window)
    with open(p, "r", encoding="utf-8-sig", newline="") as fh:
        if p.endswith((".csv", ".tsv")):
            return _csv_records(fh, p, prediction_column, label_column)
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = loads_record(line)
            except ValueError as exc:
                raise ConfigError(f"{p}:{lineno}: not JSON ({exc})") from exc
            if not isinstance(rec, dict):
                raise ConfigError(f"{p}:{lineno}: a record must be a JSON object")
            out.append(_checked(rec, f"{p}:{lineno}"))
    return out


def __getattr__(name: str) -> Any:
    # ``lrwatch.daemon.reference.build_reference`` moved to :mod:`.baseline` (it calibrates,
    # and calibration sits above this module); kept for old imports, with a warning
    if name == "build_reference":
        import warnings

        from .baseline import build_reference

        warnings.warn("lrwatch.daemon.reference.build_reference moved: import it from "
                      "lrwatch.daemon", DeprecationWarning, stacklevel=2)
        return build_reference
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
