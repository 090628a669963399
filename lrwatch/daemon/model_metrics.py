"""The daemon's metrics about the model's outputs (as opposed to its inputs and its ingest):
the prediction distribution, label coverage over a horizon, label-free performance estimates
and their error, and the joint (multivariate) drift test.

Families that only make sense for some models (class shares for classifiers, quantiles for
numeric outputs, estimates for classifiers whose reference has labels) are registered when the
reference is bound (:meth:`ModelMetrics.bind`), with their label children cached there, so a
daemon never exports a made-up 0 for something it does not measure. Label values are bounded:
classes come from the reference (the rest are ``other``), quantiles and estimate names are
fixed lists.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge

from .distribution import QUANTILES
from .support import WITHHELD_REASON

__all__ = ["ModelMetrics", "ESTIMATED_METRICS"]

#: ``metric`` values of ``lrwatch_estimated_metric`` (binary adds the last four).
ESTIMATED_METRICS = ("accuracy", "accuracy_low", "accuracy_high", "precision", "recall", "f1",
                     "roc_auc")
NAN = float("nan")


class ModelMetrics:
    """Families of :mod:`.model_metrics` in ``registry``; see the module notes."""

    def __init__(self, registry: CollectorRegistry, pending: Callable[[], float] | None = None
                 ) -> None:
        r = self.registry = registry
        self.pending = Gauge("lrwatch_pending_labels",
                             "Predictions waiting for a label (read when scraped).", registry=r)
        if pending is not None:
            self.pending.set_function(pending)
        self.coverage_horizon = Gauge(
            "lrwatch_label_coverage_horizon_ratio",
            "Of the predictions made between 2H and H ago (H: lrwatch_label_horizon_seconds), "
            "the share that got a label; NaN while there were none.", registry=r)
        self.coverage_horizon.set(NAN)
        self.coverage_value: float | None = None
        self.horizon = Gauge("lrwatch_label_horizon_seconds",
                             "H of lrwatch_label_coverage_horizon_ratio (config).", registry=r)
        self.class_ratio: dict[str, Gauge] = {}
        self.class_reference: dict[str, Gauge] = {}
        self.quantiles: list[Any] = []
        self.mean: Gauge | None = None
        self.estimated: dict[str, Any] = {}
        self.estimated_accuracy: Gauge | None = None
        self.estimation_error: Gauge | None = None
        self.estimation_compared: Counter | None = None
        self.estimation_withheld: Any = None
        self.estimated_drop: Gauge | None = None
        self.estimated_drop_z: Any = None
        self.multivariate: dict[str, Gauge] = {}
        self.disagreement: dict[str, Gauge] = {}
        self._bound = False

    # --- binding (once the reference is known) -------------------------------------------------
    def bind(self, classes: Sequence[str], reference_ratio: Sequence[float], numeric: bool,
             estimated: Sequence[str], multivariate: bool) -> bool:
        """Register the families this reference needs (once; later calls do nothing and
        return ``False``)."""
        if self._bound:
            return False
        self._bound = True
        r = self.registry
        if classes:
            ratio = Gauge("lrwatch_prediction_class_ratio",
                          "Share of the last window's predictions per predicted class "
                          "(classes beyond the reference's are 'other').", ["class"],
                          registry=r)
            ref = Gauge("lrwatch_prediction_class_reference_ratio",
                        "Share of the reference's predictions per predicted class.", ["class"],
                        registry=r)
            for c, share in zip(classes, reference_ratio):
                self.class_ratio[c] = ratio.labels(c)
                self.class_ratio[c].set(NAN)  # until a window closed (as every gauge here)
                self.class_reference[c] = ref.labels(c)
                self.class_reference[c].set(share)
        if numeric:
            self.mean = Gauge("lrwatch_prediction_mean",
                              "Mean prediction of the last window (numeric outputs).",
                              registry=r)
            q = Gauge("lrwatch_prediction_quantile",
                      "Quantiles of the last window's predictions (numeric outputs), by level q.",
                      ["q"], registry=r)
            self.quantiles = [q.labels(f"{p:g}") for p in QUANTILES]
            for g in (self.mean, *self.quantiles):
                g.set(NAN)
        if estimated:
            self._bind_estimation(estimated)
        if multivariate:
            self._bind_multivariate()
        return True

    def _bind_estimation(self, estimated: Sequence[str]) -> None:
        r = self.registry
        self.estimated_accuracy = Gauge(
            "lrwatch_estimated_accuracy",
            "Accuracy of the last window estimated from the predicted probabilities alone "
            "(no labels; see docs/performance-estimation.md).", registry=r)
        fam = Gauge("lrwatch_estimated_metric",
                    "Label-free estimates of the last window: accuracy with its band "
                    "(accuracy_low, accuracy_high) and, binary, precision, recall, f1, roc_auc.",
                    ["metric"], registry=r)
        self.estimated = {m: fam.labels(m) for m in estimated}
        self.estimated_accuracy.set(NAN)
        for g in self.estimated.values():
            g.set(NAN)
        self.estimated_drop = Gauge(
            "lrwatch_estimated_accuracy_drop",
            "The reference's estimated accuracy minus the last window's estimate.", registry=r)
        self.estimated_drop_z = Gauge(
            "lrwatch_estimated_accuracy_drop_zscore",
            "lrwatch_estimated_accuracy_drop in its standard errors (the window's and the "
            "reference's).", registry=r)
        self.estimated_drop.set(NAN)
        self.estimated_drop_z.set(NAN)
        self.estimation_error = Gauge(
            "lrwatch_estimation_error",
            "Estimated minus realised accuracy of the last window whose labels came in "
            "(NaN until one did).", registry=r)
        self.estimation_error.set(NAN)
        self.estimation_compared = Counter(
            "lrwatch_estimation_windows_compared",
            "Windows whose estimate was compared with their realised accuracy.", registry=r)
        self.estimation_withheld = Counter(
            "lrwatch_estimation_withheld",
            "Windows whose accuracy estimate was withheld (exported as NaN), by reason: "
            "confidence_outside_reference (the window's confidences lie beyond the range the "
            "reference calibrated: hard 0/1 or one-hot outputs).", ["reason"],
            registry=r).labels(WITHHELD_REASON)

    def bind_disagreement(self) -> None:
        """The input-disagreement drop signal's gauges (:mod:`.agreement`; once)."""
        if self.disagreement:
            return
        r = self.registry
        self.disagreement = {
            "disagreement": Gauge(
                "lrwatch_estimated_disagreement_ratio",
                "Share of the last window's rows on which classifiers fitted on the labelled "
                "reference's inputs decide otherwise than the model (no labels).", registry=r),
            "disagreement_z": Gauge(
                "lrwatch_estimated_disagreement_rise_zscore",
                "The rise of lrwatch_estimated_disagreement_ratio over its level on held-out "
                "reference rows, in its standard errors: noisier inputs that leave the model "
                "confident show here (docs/performance-estimation.md).", registry=r),
        }
        for g in self.disagreement.values():
            g.set(NAN)  # until a window was scored

    def publish_disagreement(self, values: Mapping[str, float]) -> None:
        for k, g in self.disagreement.items():
            g.set(values.get(k, NAN))

    def _bind_multivariate(self) -> None:
        r = self.registry
        self.multivariate = {
            "stat": Gauge("lrwatch_multivariate_drift_statistic",
                          "Joint drift statistic of the last window: the mean absolute residual "
                          "of the most changed numeric feature (regressed on the others) over "
                          "the reference's (1: unchanged).", registry=r),
            "score": Gauge("lrwatch_multivariate_drift_score",
                           "Joint drift evidence of the last window (per window or accumulated) "
                           "in units of its calibrated threshold (>= 1: over).", registry=r),
            "detected": Gauge("lrwatch_multivariate_drift_detected",
                              "1 when the joint test found drift in the last window.",
                              registry=r),
        }
        self.multivariate["stat"].set(NAN)  # until a window was tested jointly
        self.multivariate["score"].set(NAN)

    # --- per window -----------------------------------------------------------------------------
    def set_coverage(self, ratio: float | None) -> None:
        """The horizon coverage (``None``: no prediction in the interval yet, exported as NaN);
        :attr:`coverage_value` keeps it for the status document."""
        self.coverage_value = ratio
        self.coverage_horizon.set(NAN if ratio is None else ratio)

    def publish_distribution(self, dist: Mapping[str, Any]) -> None:
        ratio = dist.get("class_ratio")
        if ratio is not None and self.class_ratio:
            for ch, v in zip(self.class_ratio.values(), ratio.tolist()):
                ch.set(v)
        if "mean" in dist and self.mean is not None:
            self.mean.set(dist["mean"])
            for ch, v in zip(self.quantiles, dist["quantiles"].tolist()):
                ch.set(v)

    def publish_estimate(self, est: Mapping[str, float]) -> None:
        if self.estimated_accuracy is None:
            return
        self.estimated_accuracy.set(est.get("accuracy", NAN))
        for k, ch in self.estimated.items():
            ch.set(est.get(k, NAN))
        if self.estimated_drop is not None:
            self.estimated_drop.set(est.get("accuracy_drop", NAN))
            self.estimated_drop_z.set(est.get("drop_z", NAN))

    def publish_error(self, error: float) -> bool:
        """A window's estimation error; whether it was counted (estimation is bound)."""
        if self.estimation_error is not None and self.estimation_compared is not None:
            self.estimation_error.set(error)
            self.estimation_compared.inc()
            return True
        return False

    def publish_withheld(self) -> bool:
        """A window's estimate withheld (exported as NaN, its reason counted); whether it was
        counted (estimation is bound)."""
        if self.estimation_withheld is None:
            return False
        self.publish_estimate({})
        self.estimation_withheld.inc()
        return True

    def restore(self, counters: Mapping[str, Any]) -> None:
        """The bound counters from saved totals (:meth:`.metrics.DaemonMetrics.restore`)."""
        for key, counter in (("estimation_compared", self.estimation_compared),
                             ("estimation_withheld", self.estimation_withheld)):
            n = counters.get(key)
            if n and counter is not None:
                counter.inc(n)

    def publish_multivariate(self, values: Mapping[str, float]) -> None:
        for k, g in self.multivariate.items():
            if k in values:
                g.set(values[k])
