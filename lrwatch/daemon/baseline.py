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

from typing import Any, Iterable, Mapping

from .calibrate import ProgressFn
from .calibrate import calibrate as _calibrate
from .reference import Reference, profile_records

__all__ = ["build_reference"]


def build_reference(records: Iterable[Mapping[str, Any]], *, kinds: Mapping[str, str] | None = None,
                    calibrate: bool = True, window_size: int = 1000,
                    target_windows: float = 1000.0, seed: int = 0,
                    sims: int | None = None, progress: ProgressFn | None = None) -> Reference:
    """Profile validated records (each with a ``features`` mapping and maybe a ``prediction``)
    and, with ``calibrate``, calibrate the drift thresholds for ``window_size``-record windows
    at one false alarm per ``target_windows`` windows (seconds of CPU; see :mod:`.calibrate`).

    ``kinds`` forces a feature's kind (``numeric``, ``categorical``, ``binary``) instead of
    inferring it. ``progress(stage, done, total)`` hears how calibration goes.
    """
    ref = profile_records(records, kinds=kinds)
    if calibrate:
        ref.calibration = _calibrate(ref, window_size=window_size,
                                     target_windows=target_windows, seed=seed,
                                     sims=sims, progress=progress).to_dict()
    return ref
