"""Building a reference: profile the records (:mod:`.reference`), then calibrate the drift
thresholds for it (:mod:`.calibrate`).

It sits above both, so that neither imports the other's users: ``reference`` <- ``stats`` <-
``calibrate`` <- ``baseline``.

Examples
--------
>>> import random
>>> rng = random.Random(0)
>>> rows = [{"features": {"x": rng.gauss(0, 1), "c": rng.choice("ab")}, "prediction": 0.3}
...         for _ in range(500)]
>>> ref = build_reference(rows, calibrate=False)
>>> [(f.name, f.kind) for f in ref.features], ref.calibration is None
([('c', 'binary'), ('x', 'numeric'), ('_prediction', 'numeric')], True)
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..errors import ConfigError
from .calibrate import ProgressFn
from .calibrate import calibrate as _calibrate
from .reference import PREDICTION, Reference, unwrap_prediction, cat_key, profile_records

__all__ = ["build_reference", "fit_estimator", "ESTIMABLE"]

#: Prediction types whose windows can be estimated without labels (class probabilities).
ESTIMABLE = ("probability", "probabilities")


def build_reference(records: Iterable[Mapping[str, Any]], *, kinds: Mapping[str, str] | None = None,
                    calibrate: bool = True, window_size: int = 1000,
                    target_windows: float = 1000.0, seed: int = 0,
                    sims: int | None = None, progress: ProgressFn | None = None,
                    estimate: bool = True) -> Reference:
    """Profile validated records (each with a ``features`` mapping and maybe a ``prediction``)
    and, with ``calibrate``, calibrate the drift thresholds for ``window_size``-record windows
    at one false alarm per ``target_windows`` windows (seconds of CPU; see :mod:`.calibrate`).

    ``kinds`` forces a feature's kind (``numeric``, ``categorical``, ``binary``) instead of
    inferring it. ``progress(stage, done, total)`` hears how calibration goes. Records with a
    ``label`` fit the label-free performance estimator (:func:`fit_estimator`); why one was not
    fitted is in ``ref.notes``; ``estimate=False`` leaves that to the caller (the daemon fits it
    on its calibration thread, off the ingest path).
    """
    rows = list(records)
    ref = profile_records(rows, kinds=kinds)
    if estimate:
        fit_estimator(rows, ref)
    if calibrate:
        ref.calibration = _calibrate(ref, window_size=window_size,
                                     target_windows=target_windows, seed=seed,
                                     sims=sims, progress=progress).to_dict()
    return ref


def _labels_and_proba(rows: Sequence[Mapping[str, Any]], ref: Reference
                      ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The labelled rows' probabilities and integer labels (class index; binary: 0/1). A row
    without a prediction (an empty CSV cell, a record without the key) says nothing about the
    model's confidence and is left out, as an unlabelled one is (it read as NaN and fitted no
    estimator at all)."""
    keys = [cat_key(r.get("label")) for r in rows]
    idx = [i for i, k in enumerate(keys)
           if k is not None and unwrap_prediction(rows[i].get("prediction")) is not None]
    labels = np.empty(len(idx), dtype=np.int64)
    for j, i in enumerate(idx):
        k = keys[i]
        if not (k.isascii() and k.isdigit() and (len(k) == 1 or k[0] != "0")
                and (ref.prediction_type == "probabilities" or k in ("0", "1"))):
            want = "0 or 1" if ref.prediction_type == "probability" else "class indexes 0..k-1"
            raise ConfigError(f"label {rows[i].get('label')!r} is not a class the "
                              f"probabilities name ({want})")
        labels[j] = int(k)
    preds = [unwrap_prediction(rows[i].get("prediction")) for i in idx]
    if ref.prediction_type == "probability":  # [p0, p1] among them: p1, [p]: p
        preds = [p[-1] if type(p) is list and len(p) in (1, 2) else p for p in preds]
    else:
        widths = sorted({len(p) if type(p) is list else 0 for p in preds})
        if len(widths) > 1:   # numpy's own message said "inhomogeneous shape"
            raise ConfigError(f"the labelled rows' predictions are not lists of one width "
                              f"(widths {widths[:4]}; 0: not a list): send one model's class "
                              f"probabilities, one per class, in every record")
    proba = np.array(preds, dtype=np.float64)
    return proba, labels, idx


def _numeric_inputs(rows: Sequence[Mapping[str, Any]], idx: Sequence[int], ref: Reference
                    ) -> tuple[list[str], np.ndarray]:
    """The reference's numeric features (the prediction left out) of rows ``idx``: NaN where
    a row has none or not a number."""
    names = [f.name for f in ref.features if f.kind == "numeric" and f.name != PREDICTION]
    x = np.full((len(idx), len(names)), np.nan)
    for j, i in enumerate(idx):
        feats = rows[i].get("features") or {}
        for c, name in enumerate(names):
            v = feats.get(name)
            if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
                x[j, c] = v
    return names, x


def _fit_disagreement(rows: Sequence[Mapping[str, Any]], idx: Sequence[int], ref: Reference,
                      proba: np.ndarray, labels: np.ndarray, n_classes: int) -> None:
    """The input-disagreement signal (:mod:`.agreement`), kept in the estimator's dict; when
    it cannot be fitted (no numeric feature), the note says so and estimation goes on."""
    from .agreement import InputDisagreement

    names, x = _numeric_inputs(rows, idx, ref)
    try:
        mon = InputDisagreement.fit(names, x, proba, labels, n_classes)
    except ConfigError as exc:
        ref.notes.append(f"no input-disagreement drop signal: {exc}")
        return
    assert ref.estimator is not None
    ref.estimator["agreement"] = mon.to_dict()


def fit_estimator(rows: Sequence[Mapping[str, Any]], ref: Reference) -> None:
    """Fit the label-free performance estimator on the labelled reference rows and keep it in
    ``ref.estimator``; when it cannot be fitted, say why (and how to fix it) in ``ref.notes``.

    It needs class probabilities (a probability in [0, 1], or a list per class) and labels:
    ``label`` in JSONL records, the label column in a CSV.
    """
    if ref.prediction_type not in ESTIMABLE:
        ref.notes.append(f"no performance estimation: the predictions are "
                         f"{ref.prediction_type}, not class probabilities (send a probability "
                         f"or a list of class probabilities to estimate accuracy before labels "
                         f"arrive)")
        return
    if not any(r.get("label") is not None for r in rows):
        ref.notes.append("no performance estimation: the reference has no labels (add "
                         "\"label\" to the JSONL records or a 'label' column to the CSV to "
                         "estimate accuracy before live labels arrive)")
        return
    try:
        from .estimation import PerformanceEstimator

        proba, labels, idx = _labels_and_proba(rows, ref)
        est = PerformanceEstimator.fit(proba, labels)
    except (ConfigError, ValueError, ImportError) as exc:
        ref.notes.append(f"no performance estimation: {exc}")
        return
    ref.estimator = est.to_dict()
    _fit_disagreement(rows, idx, ref, proba, labels, est.n_classes)
