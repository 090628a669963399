"""The prediction distribution of a window: class shares for classifiers, mean and quantiles
for numeric outputs.

:class:`PredictionDistribution` is built once from the reference profile and reads the
window's columns (the ``_prediction`` pseudo-feature the drift tests use anyway), so a window
costs one ``bincount`` (classes) or one sort of ``n`` values (quantiles).

* ``class``, ``probabilities``: the share of each predicted class. The classes are the
  reference's (the ``MAX_CLASSES`` most frequent), every other class is folded into
  ``"other"``: the label stays bounded whatever the model sends. A class of the model that is
  itself named ``"other"`` is folded there too (one label, one value).
* ``probability`` (a binary classifier's class-1 probability): the shares of class ``"0"``
  and ``"1"`` (at 0.5), and the mean and quantiles of the probability.
* ``regression``: the mean and quantiles.

Examples
--------
>>> from lrwatch.daemon import build_reference
>>> from lrwatch.daemon.stats import Profile
>>> ref = build_reference([{"features": {"x": i}, "prediction": "ab"[i % 4 == 0]}
...                        for i in range(40)], calibrate=False)
>>> dist = PredictionDistribution(Profile(ref))
>>> dist.classes, [round(r, 2) for r in dist.reference_ratio]
(['a', 'b', 'other'], [0.75, 0.25, 0.0])
>>> dist.window(None, [np.array([0, 0, 1, 2, 3])])["class_ratio"].round(2).tolist()
[0.5, 0.25, 0.25]
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .reference import PREDICTION

__all__ = ["PredictionDistribution", "MAX_CLASSES", "QUANTILES", "OTHER"]

#: Classes with a series of their own; the rest are ``"other"``.
MAX_CLASSES = 50
#: Quantiles of a numeric prediction (``lrwatch_prediction_quantile{q}``; promtool keeps the
#: label name ``quantile`` for summaries).
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
#: The ``class`` label value of every class beyond the reference's.
OTHER = "other"


class PredictionDistribution:
    """What the prediction-distribution metrics read (see the module notes)."""

    def __init__(self, profile: Any) -> None:
        ref = profile.reference
        self.prediction_type: str = ref.prediction_type
        self.classes: list[str] = []
        self.reference_ratio: list[float] = []
        self.numeric = PREDICTION in profile.num_names
        self._num_j = profile.num_names.index(PREDICTION) if self.numeric else -1
        self._cat_j = profile.cat_names.index(PREDICTION) if PREDICTION in profile.cat_names \
            else -1
        if self._cat_j >= 0:
            fp = profile.cat[self._cat_j]
            counts = list(fp.categories.values())  # most frequent first
            # a class of the model named "other" goes to that series: one label, one value
            own = [i for i, k in enumerate(fp.categories) if k != OTHER][:MAX_CLASSES]
            total = max(sum(counts), 1)
            self.classes = [list(fp.categories)[i] for i in own] + [OTHER]
            kept = [counts[i] / total for i in own]
            self.reference_ratio = kept + [max(0.0, 1.0 - sum(kept)) if counts else 0.0]
            self._own = np.array(own, dtype=np.int64)
            self._k = len(counts)
        elif self.prediction_type == "probability":
            vals = np.array([v for v in ref.sample.get(PREDICTION, []) if v is not None],
                            dtype=np.float64)
            one = float((vals >= 0.5).mean()) if vals.size else 0.0
            self.classes = ["0", "1"]
            self.reference_ratio = [1.0 - one, one]

    @property
    def has_classes(self) -> bool:
        return bool(self.classes)

    def window(self, x: np.ndarray | None, cats: list[np.ndarray]) -> dict[str, Any]:
        """The window's ``class_ratio`` (array over :attr:`classes`), ``mean`` and
        ``quantiles`` (array over :data:`QUANTILES`), whichever apply. Missing predictions
        (never sent: a prediction is required) and NaN are left out."""
        out: dict[str, Any] = {}
        if self._cat_j >= 0:
            codes = cats[self._cat_j]
            k = self._k
            counts = np.bincount(codes, minlength=k + 2).astype(np.float64)
            seen = counts[:k + 1]  # known classes, then unseen; missing left out
            ratio = np.empty(len(self.classes))
            ratio[:-1] = seen[self._own]
            # "other": rarer reference classes, unseen ones, and a class named so
            ratio[-1] = seen.sum() - ratio[:-1].sum()
            out["class_ratio"] = ratio / max(seen.sum(), 1.0)
        if self.numeric and x is not None:
            v = x[:, self._num_j]
            v = v[np.isfinite(v)]
            if v.size:
                with np.errstate(over="ignore"):
                    mean = float(v.mean())
                if not math.isfinite(mean):  # the sum overflowed (outputs near 1e308)
                    top = float(np.abs(v).max())
                    mean = float((v / top).mean() * top)
                out["mean"] = mean
                out["quantiles"] = np.quantile(v, QUANTILES)
                if self.prediction_type == "probability":
                    one = float((v >= 0.5).mean())
                    out["class_ratio"] = np.array([1.0 - one, one])
        return out
