"""The model's outputs, on the worker: the prediction distribution of each window, label
coverage over a horizon, label-free performance estimates (and their error once labels come),
and the joint drift test's result; what they add to a window's sample and to the metrics.

:class:`OutputsMixin` is one of the parts :class:`~.core.Daemon` is made of. It is bound to a
reference by :meth:`~OutputsMixin._bind_outputs` (from the evaluation's ``_set_reference``),
which registers only the metric families this reference can fill
(:class:`~.model_metrics.ModelMetrics`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError
from .agreement import InputDisagreement
from .baseline import ESTIMABLE
from .coverage import LabelCoverage
from .distribution import PredictionDistribution
from .estimate_tracking import EstimateTracker
from .model_metrics import ESTIMATED_METRICS

if TYPE_CHECKING:
    from .config import DaemonConfig
    from .detector import DriftDetector, DriftResult
    from .metrics import DaemonMetrics
    from .reference import Reference
    from .windows import Window

__all__ = ["OutputsMixin"]

_log = logging.getLogger("lrwatch.daemon")


class OutputsMixin:
    """Prediction distribution, horizon coverage, estimates and the joint test (see above)."""

    config: DaemonConfig
    metrics: DaemonMetrics
    reference: Reference | None
    coverage: LabelCoverage
    estimates: EstimateTracker | None
    _distribution: PredictionDistribution | None
    _errors: list[float]
    counters: dict[str, Any]
    _waiting: list[tuple[Any, ...]]  # closed windows waiting for a calibration (first: Window)
    ingest: Any
    limits: Any
    #: the input-disagreement signal and its inputs' columns in the window matrix
    _agreement: tuple[InputDisagreement, list[int]] | None = None

    def _bind_outputs(self, ref: Reference, det: DriftDetector) -> None:
        """Set up what this reference allows: the distribution, the estimator (when the
        reference has one and estimation is on), the probability width, the joint test."""
        dist = self._distribution = PredictionDistribution(det.profile)
        if ref.proba_width:  # a live list of another width is rejected, with its reason
            self.limits = dataclasses.replace(self.limits, proba_width=ref.proba_width)
            self.ingest.limits = self.limits
        elif ref.prediction_type == "probability":   # so is what is not a class-1 probability
            # (a regression in [0, 1] whose reference labels said so is "regression": its
            # labels are values, kept and scored as errors)
            # (an estimator was fitted on 0/1 labels too: a reference saved before
            # prediction_basis was kept has one without it)
            self.limits = dataclasses.replace(
                self.limits, binary_probability=True,
                binary_from_labels=ref.prediction_basis == "labels" or bool(ref.estimator))
            self.ingest.limits = self.limits
        self.estimates = self._make_tracker(ref)
        if self.estimates is not None:
            # the reference's rows summed to 1 (the estimator's fit checks): live lists must
            # too, or they are left out of the estimate (per-class scores made one up)
            self.limits = dataclasses.replace(self.limits, proba_sum=True)
            self.ingest.limits = self.limits
        names: tuple[str, ...] = ()
        if self.estimates is not None:
            names = ESTIMATED_METRICS if self.estimates.estimator.n_classes == 2 \
                else ESTIMATED_METRICS[:3]
        # the joint test's own families whenever it runs: one numeric input with a category
        # runs it too (until 6 December its decision counted in drift_detected unreported)
        model = self.metrics.model
        if model.bind(dist.classes, dist.reference_ratio, dist.numeric, names,
                      bool(getattr(det, "joint_active", False))):
            # a live reference bound after a restart: its counter from the saved total
            model.restore(self.counters)
        self._agreement = self._make_agreement(ref, det)
        if self._agreement is not None:
            model.bind_disagreement()

    def _make_tracker(self, ref: Reference) -> EstimateTracker | None:
        if not self.config.estimation or not ref.estimator or \
                ref.prediction_type not in ESTIMABLE:
            return None
        try:
            from .estimation import PerformanceEstimator

            est = PerformanceEstimator.from_dict(ref.estimator)
        except Exception as exc:  # an old or damaged estimator: drift still works
            self.metrics.internal_errors.inc()
            _log.error("the reference's performance estimator cannot be used (%s); rebuild "
                       "the reference with `lrwatch baseline build` to estimate accuracy", exc)
            return None
        return EstimateTracker(est, ref.prediction_type, horizon=self.config.label_horizon_seconds,
                               width=ref.proba_width,
                               min_labels=self.config.estimation_min_window_labels,
                               reference=ref.created)

    def _make_agreement(self, ref: Reference, det: DriftDetector
                        ) -> tuple[InputDisagreement, list[int]] | None:
        """The reference's input-disagreement signal, with estimation on and every input it
        was fitted on among the profile's numeric features (None otherwise)."""
        saved = (ref.estimator or {}).get("agreement")
        if self.estimates is None or not saved:
            return None
        try:
            mon = InputDisagreement.from_dict(saved)
        except ConfigError as exc:  # damaged: the rest of the estimation still works
            self.metrics.internal_errors.inc()
            _log.error("the reference's input-disagreement signal cannot be used (%s); "
                       "rebuild the reference with `lrwatch baseline build`", exc)
            return None
        cols = {name: i for i, name in enumerate(det.profile.num_names)}
        if not all(name in cols for name in mon.names):
            return None
        return mon, [cols[name] for name in mon.names]

    def _disagreement(self, w: Window, n: int, x: np.ndarray, proba: np.ndarray | None
                      ) -> dict[str, float]:
        """The window's input disagreement (its sample values), on the records whose
        probabilities were read (``w.proba_rows``; the rows must line up with the inputs').
        Records left out (predictions that fit no probability, accepted before a live
        reference said what they are) are counted in ``disagreement_rows_left_out``."""
        if self._agreement is None or proba is None:
            return {}
        rows = w.proba_rows
        if rows is not None:
            x = x[rows]
            self.counters["disagreement_rows_left_out"] = \
                self.counters.get("disagreement_rows_left_out", 0) + n - len(proba)
        mon, cols = self._agreement
        d = mon.window(x[:, cols], proba)
        self.metrics.model.publish_disagreement(d)
        return {"estimated_disagreement": d["disagreement"],
                "estimated_disagreement_z": d["disagreement_z"]}

    def _output_values(self, w: Window, n: int, x: np.ndarray, cats: list[np.ndarray],
                       res: DriftResult, proba: np.ndarray | None) -> dict[str, float]:
        """The window's values about the model's outputs (and publishes their metrics)."""
        vals: dict[str, float] = {}
        model = self.metrics.model
        if self._distribution is not None:
            dist = self._distribution.window(x, cats)
            model.publish_distribution(dist)
            if "mean" in dist:
                vals["prediction_mean"] = dist["mean"]
        ratio = self.coverage.ratio()
        model.set_coverage(ratio)
        if ratio is not None:
            vals["label_coverage_horizon"] = ratio
        vals.update(self._estimate(w, n, proba))
        vals.update(self._disagreement(w, n, x, proba))
        vals.update(self._joint_values(res))
        return vals

    def _estimate(self, w: Window, n: int, proba: np.ndarray | None) -> dict[str, float]:
        t = self.estimates
        if t is None or proba is None:
            return {}
        try:
            est = t.window(w.index, w.last_time if w.last_time is not None else 0.0, proba, n,
                           w.own_joined, w.own_correct)
        except ValueError as exc:  # the estimator refused the window: drift still works
            self.metrics.internal_errors.inc()
            _log.error("estimating window %d failed: %s", w.index, exc)
            return {}
        if est is None:
            return {}
        vals = self._estimate_values(est)
        errors = self._errors + t.take_completed()
        self._errors = []
        for err in errors:
            self._publish_error(err)
        if errors:
            vals["estimation_error"] = errors[-1]
        return vals

    def _estimate_values(self, est: dict[str, float]) -> dict[str, float]:
        """A window's estimate published, and its sample values: the estimates, or, when the
        estimator withheld them (the window's confidences lie outside the reference's: hard
        0/1 or one-hot outputs read ~100%), NaN gauges, the reason counted (saved in the
        snapshot's counters) and ``estimation_withheld`` 1 (the serving pack's
        ``estimate_withheld``)."""
        vals = {f"estimation_{k}": float(est[k]) for k in ("support_pvalue",
                                                           "confidence_above_reference")
                if k in est}
        if est.get("withheld"):
            if self.metrics.model.publish_withheld():
                self.counters["estimation_withheld"] = \
                    self.counters.get("estimation_withheld", 0) + 1
            return {**vals, "estimation_withheld": 1.0}
        self.metrics.model.publish_estimate(est)
        vals.update({f"estimated_{k}": float(v) for k, v in est.items()
                     if k in ESTIMATED_METRICS or k == "accuracy_drop"})
        if "drop_z" in est:
            vals["estimated_accuracy_drop_z"] = float(est["drop_z"])
        if "support_pvalue" in est:
            vals["estimation_withheld"] = 0.0
        return vals

    def _estimation_join(self, window: int | None, correct: float) -> None:
        """A label scored against its window's estimate (from the label join). A window that
        waits for a live reference's calibration keeps it as its own label, as the open
        window does: it is estimated, and its labels counted in, once the thresholds are
        ready (until 6 December such labels were lost to its estimate)."""
        t = self.estimates
        if t is None and window is not None:
            for w, *_ in self._waiting:
                if w.index == window:
                    w.own_joined += 1
                    w.own_correct += correct
                    return
        if t is None or window is None:
            return
        t.join(window, correct)
        self._take_errors(t)

    def _estimation_sweep(self, now: float) -> None:
        """Windows whose labels had the horizon to come are compared (from the clock tick)."""
        t = self.estimates
        if t is not None:
            t.sweep(now)
            self._take_errors(t)

    def _take_errors(self, t: EstimateTracker) -> None:
        for err in t.take_completed():
            self._publish_error(err)
            self._errors.append(err)  # the next window's sample carries the newest
        del self._errors[:-1]

    def _publish_error(self, err: float) -> None:
        """One window's estimate compared: the gauge, and the counter (saved in the
        snapshot's counters: it started from 0 after every restart)."""
        if self.metrics.model.publish_error(err):
            self.counters["estimation_compared"] = \
                self.counters.get("estimation_compared", 0) + 1

    def _joint_values(self, res: DriftResult) -> dict[str, float]:
        """The joint test's statistic, evidence (in units of its calibrated thresholds) and
        decision; ``multivariate_drift`` only when the test ran (a joint model exists)."""
        if not self.metrics.model.multivariate:
            return {}
        stat = float(getattr(res, "joint_stat", math.nan))
        if not math.isfinite(stat):
            return {}
        evidence = 0.0
        for v, thr in ((getattr(res, "joint_score", math.nan),
                        getattr(res, "joint_threshold", math.inf)),
                       (getattr(res, "joint_seq_z", math.nan), res.seq_threshold)):
            if math.isfinite(v) and math.isfinite(thr) and thr > 0:
                evidence = max(evidence, float(v) / float(thr))
        detected = 1.0 if getattr(res, "joint_detected", False) else 0.0
        self.metrics.model.publish_multivariate({"stat": stat, "score": evidence,
                                                 "detected": detected})
        return {"multivariate_drift": detected, "multivariate_drift_score": evidence}
