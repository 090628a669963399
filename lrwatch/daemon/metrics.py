"""The daemon's Prometheus metrics, in its own :class:`CollectorRegistry`.

Names follow docs/design.md (``lrwatch_predictions_total``, ``lrwatch_drift_statistic{feature,
method}``, ...). Counters are restored from the snapshot at start so that a restart neither
resets nor double-counts them (Prometheus's ``rate()`` handles the process restart either way).
Label children are cached per feature when the reference is known, outside the hot path.
"""

from __future__ import annotations

import bisect
import itertools
import math
import threading
from functools import partial
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ..exporters.prometheus import EngineMetrics
from .model_metrics import ModelMetrics
from .records import REASONS

__all__ = ["DaemonMetrics", "SavedHistogram", "STAT_METHODS", "P_METHODS", "PROBLEMS"]

#: ``reason`` values of ``lrwatch_daemon_problems_total``: problems with the daemon's own
#: files that it works around (each counted once per episode, logged once with what to do).
PROBLEMS = (
    "snapshot_set_aside",   # state.json was not a state: renamed, rebuilt from the journal
    "tail_not_a_file",      # a tailed path is a directory (or a path through a file)
    "tail_unreadable",      # a tailed path cannot be opened (permissions, ...)
    "detector_state_refused",  # a detector's saved state in state.json was damaged (wrong
                               # types, widths, missing sums): refused, started afresh
)

#: ``method`` values of ``lrwatch_drift_statistic``.
STAT_METHODS = ("ks", "chi2", "mean_z", "psi", "wasserstein", "jensen_shannon", "score",
                "sequential_z")
#: ``method`` values of ``lrwatch_drift_p_value``.
P_METHODS = ("ks", "chi2", "mean", "missing")
#: Per-window children of a numeric / categorical feature (see :meth:`DaemonMetrics.publish`).
WINDOW_NUMERIC = tuple(f"stat_{m}" for m in STAT_METHODS) + tuple(
    f"p_{m}" for m in P_METHODS) + ("detected", "missing", "oor")
WINDOW_CATEGORICAL = ("stat_chi2", "stat_psi", "stat_jensen_shannon", "stat_score", "p_chi2",
                      "p_missing", "detected", "missing", "unseen")


class SavedHistogram(Collector):
    """A histogram whose totals are saved with the daemon's state and restored at start
    (``lrwatch_label_delay_seconds``): prometheus_client's ``Histogram`` cannot be set, so it
    started from 0 after every restart while the other cumulative counters carried on."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float],
                 registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = tuple(float(b) for b in buckets) + (math.inf,)
        self._counts = [0] * len(self.bounds)   # per bucket, not cumulative
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)   # (bound before, bound]: le= includes it
        with self._lock:
            self._counts[min(i, len(self._counts) - 1)] += 1
            self._sum += value

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {"le": list(self.bounds[:-1]), "counts": list(self._counts), "sum": self._sum}

    def restore(self, saved: Mapping[str, Any]) -> None:
        """Add saved totals; totals of other buckets (the bounds changed) are left out."""
        counts, total = saved.get("counts"), saved.get("sum")
        if saved.get("le") != list(self.bounds[:-1]) or not isinstance(counts, list) \
                or len(counts) != len(self._counts) or not isinstance(total, (int, float)) \
                or not all(isinstance(c, int) and c >= 0 for c in counts):
            return
        with self._lock:
            self._counts = [a + b for a, b in zip(self._counts, counts)]
            self._sum += float(total)

    def _family(self, counts: Sequence[int] | None, total: float = 0.0) -> Any:
        if counts is None:
            return HistogramMetricFamily(self.name, self.documentation)
        cumulative = itertools.accumulate(counts)
        return HistogramMetricFamily(
            self.name, self.documentation, sum_value=total,
            buckets=[(floatToGoString(b), float(c)) for b, c in zip(self.bounds, cumulative)])

    def collect(self) -> Iterator[Any]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        yield self._family(counts, total)

    def describe(self) -> Iterator[Any]:
        yield self._family(None)


class DaemonMetrics:
    """Every metric family of the daemon, registered in ``registry`` (a fresh one by default).

    ``pending`` returns how many predictions wait for a label: ``lrwatch_pending_labels``
    calls it when scraped (a ``len`` of the store, safe from any thread), so the gauge follows
    every prediction and label, not only closed windows. The model's families (prediction
    distribution, horizon coverage, estimates, joint drift) are in :attr:`model`.
    """

    def __init__(self, registry: CollectorRegistry | None = None,
                 pending: Callable[[], float] | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        # build info, internal errors and rule state: the same families as the training
        # exporter's (one definition, lrwatch.exporters.prometheus.EngineMetrics)
        self.engine = EngineMetrics("daemon", r)
        self.internal_errors = self.engine.internal_errors
        self.rule_firing = self.engine.rule_firing
        self.firings = self.engine.firings
        self._register_ingest(r)
        problems = Counter("lrwatch_daemon_problems",
                           "Problems with the daemon's own files that it worked around, by "
                           "reason (once per episode; the log says what to do).", ["reason"],
                           registry=r)
        self.problems = {reason: problems.labels(reason) for reason in PROBLEMS}
        self.model = ModelMetrics(r, pending)
        self.pending = self.model.pending
        self._register_window(r)
        self._register_drift(r)
        self.features: dict[str, dict[str, Gauge]] = {}
        # the last window's per-feature arrays, read when /metrics is scraped
        self._window: dict[str, Any] = {}

    def _register_ingest(self, r: CollectorRegistry) -> None:
        """What came in: records accepted and rejected, labels joined or not."""
        self.predictions = Counter("lrwatch_predictions", "Prediction records accepted.",
                                   registry=r)
        self.labels = Counter("lrwatch_labels", "Label records accepted.", registry=r)
        self.received = Counter("lrwatch_ingest_received",
                                "Records received (accepted + rejected); a request rejected "
                                "before parsing counts as one.", registry=r)
        errors = Counter("lrwatch_ingest_errors", "Records rejected, by reason.", ["reason"],
                         registry=r)
        self.errors = {reason: errors.labels(reason) for reason in REASONS}
        self.labels_joined = Counter("lrwatch_labels_joined",
                                     "Labels joined with their prediction.", registry=r)
        self.labels_unmatched = Counter("lrwatch_labels_unmatched",
                                        "Labels whose prediction id was not pending.",
                                        registry=r)
        self.labels_expired = Counter("lrwatch_labels_expired",
                                      "Pending predictions evicted before their label came "
                                      "(the store is bounded).", registry=r)

    def _register_window(self, r: CollectorRegistry) -> None:
        """The queue, the windows and what the labels joined in the last one measured."""
        self.queue = Gauge("lrwatch_queue_records", "Records queued for the worker.",
                           registry=r)
        self.windows = Counter("lrwatch_windows", "Windows closed and evaluated.", registry=r)
        self.fill = Gauge("lrwatch_window_fill_ratio", "How full the open window is.",
                          registry=r)
        self.window_records = Gauge("lrwatch_window_records", "Records in the last window.",
                                    registry=r)
        self.label_delay = SavedHistogram(
            "lrwatch_label_delay_seconds", "Time from a prediction to its label.",
            (1, 10, 60, 300, 900, 3600, 4 * 3600, 86400, 7 * 86400), r)
        self.label_coverage = Gauge("lrwatch_label_coverage_ratio",
                                    "Labels joined while the last window was open, per record "
                                    "of that window (delayed labels count in later windows; "
                                    "see lrwatch_label_coverage_horizon_ratio).", registry=r)
        self.accuracy = Gauge("lrwatch_model_accuracy",
                              "Realised accuracy of the labels joined in the last window.",
                              registry=r)
        self.error = Gauge("lrwatch_model_error",
                           "Mean absolute error of the labels joined in the last window "
                           "(regression).", registry=r)
        # NaN until a window had labels: a made-up 0 after a start without state fired
        # LrwatchModelAccuracyRegression (its average against the best of the day)
        self.accuracy.set(math.nan)
        self.error.set(math.nan)

    def _register_drift(self, r: CollectorRegistry) -> None:
        """The last window's drift: overall, and the per-feature families whose children
        :meth:`bind_features` caches."""
        self.score = Gauge("lrwatch_drift_score",
                           "Largest drift evidence of the last window in units of its "
                           "calibrated threshold (>= 1: over).", registry=r)
        self.drift_any = Gauge("lrwatch_drift_window_detected",
                               "1 when any input feature drifted in the last window.",
                               registry=r)
        self.stat_seconds = Histogram(
            "lrwatch_window_statistics_seconds", "Time to test one window.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5), registry=r)
        self._stat = Gauge("lrwatch_drift_statistic", "Drift statistic of the last window.",
                           ["feature", "method"], registry=r)
        self._thr = Gauge("lrwatch_drift_threshold",
                          "Calibrated threshold of a drift statistic.", ["feature", "method"],
                          registry=r)
        self._p = Gauge("lrwatch_drift_p_value", "Asymptotic p-value of a drift test.",
                        ["feature", "method"], registry=r)
        self._detected = Gauge("lrwatch_drift_detected", "1 when the feature drifted.",
                               ["feature"], registry=r)
        self._missing = Gauge("lrwatch_missing_ratio", "Missing values per record.",
                              ["feature"], registry=r)
        self._oor = Gauge("lrwatch_out_of_range_ratio",
                          "Numeric values outside the reference range.", ["feature"],
                          registry=r)
        self._unseen = Gauge("lrwatch_unseen_category_ratio",
                             "Categorical values not in the reference.", ["feature"],
                             registry=r)

    def bind_features(self, numeric: Iterable[str], categorical: Iterable[str]) -> None:
        """Cache the label children of every feature (called once the reference is known).

        The per-window children (:data:`WINDOW_NUMERIC`, :data:`WINDOW_CATEGORICAL`) read
        their value from the arrays of :meth:`publish` when scraped, so that a window costs one
        assignment instead of a ``set`` per feature and statistic (0 until the first window).
        """
        numeric, categorical = list(numeric), list(categorical)
        for name in numeric:
            ch = {f"stat_{m}": self._stat.labels(name, m) for m in STAT_METHODS}
            ch.update({f"p_{m}": self._p.labels(name, m) for m in P_METHODS})
            ch.update({f"thr_{m}": self._thr.labels(name, m)
                       for m in ("ks", "chi2", "mean_z", "score", "sequential_z")})
            ch.update(detected=self._detected.labels(name), missing=self._missing.labels(name),
                      oor=self._oor.labels(name))
            self.features[name] = ch
        for name in categorical:
            ch = {f"stat_{m}": self._stat.labels(name, m)
                  for m in ("chi2", "psi", "jensen_shannon", "score")}
            ch.update({f"p_{m}": self._p.labels(name, m) for m in ("chi2", "missing")})
            ch.update(thr_score=self._thr.labels(name, "score"),
                      detected=self._detected.labels(name), missing=self._missing.labels(name),
                      unseen=self._unseen.labels(name))
            self.features[name] = ch
        for kind, names, keys in (("num", numeric, WINDOW_NUMERIC),
                                  ("cat", categorical, WINDOW_CATEGORICAL)):
            for i, name in enumerate(names):
                for key in keys:
                    self.features[name][key].set_function(
                        partial(self._window_value, f"{kind}:{key}", i))

    def _window_value(self, key: str, i: int) -> float:
        a = self._window.get(key)
        return 0.0 if a is None else float(a[i])

    def publish(self, numeric: Mapping[str, Any], categorical: Mapping[str, Any]) -> None:
        """The last window's per-feature values: ``numeric`` maps keys of
        :data:`WINDOW_NUMERIC` to arrays over the numeric features, ``categorical`` keys of
        :data:`WINDOW_CATEGORICAL` to arrays over the categorical ones. A key left out keeps
        its previous values."""
        new = dict(self._window)
        new.update((f"num:{k}", v) for k, v in numeric.items())
        new.update((f"cat:{k}", v) for k, v in categorical.items())
        self._window = new  # one reference swap: a scrape sees the old or the new dict

    def restore_last(self, values: Mapping[str, float]) -> None:
        """The last window's gauges from its saved sample values (at start): without this a
        restart exported 0 for them (an accuracy of 0 can fire an accuracy alert) while
        ``/v1/status`` showed the window. A value the window did not have stays as it is."""
        for key, gauge in (("drift_score", self.score), ("drift_detected", self.drift_any),
                           ("window_records", self.window_records),
                           ("label_coverage", self.label_coverage),
                           ("model_accuracy", self.accuracy), ("model_error", self.error)):
            if key in values:
                gauge.set(values[key])
        m = self.model
        if "prediction_mean" in values and m.mean is not None:
            m.mean.set(values["prediction_mean"])
        est = {k[len("estimated_"):]: v for k, v in values.items()
               if k.startswith("estimated_")}
        if "accuracy" in est:
            est["drop_z"] = est.pop("accuracy_drop_z", math.nan)
            m.publish_estimate(est)
        if "multivariate_drift" in values:
            m.publish_multivariate({"detected": values["multivariate_drift"],
                                    "score": values.get("multivariate_drift_score", math.nan)})

    def restore(self, counters: Mapping[str, float]) -> None:
        """Set the counters to saved totals (at start, before anything is counted)."""
        simple = {"predictions": self.predictions, "labels": self.labels,
                  "received": self.received, "labels_joined": self.labels_joined,
                  "labels_unmatched": self.labels_unmatched,
                  "labels_expired": self.labels_expired, "windows": self.windows}
        for k, c in simple.items():
            if counters.get(k):
                c.inc(counters[k])
        for reason, v in (counters.get("errors") or {}).items():
            if v and reason in self.errors:
                self.errors[reason].inc(v)
        # the rest started from 0 after every restart (docs/daemon.md, thirteenth audit)
        if counters.get("internal_errors"):
            self.internal_errors.inc(counters["internal_errors"])
        for reason, v in (counters.get("problems") or {}).items():
            if v and reason in self.problems:
                self.problems[reason].inc(v)
        for rule, by_severity in (counters.get("firings") or {}).items():
            for severity, v in by_severity.items():
                self.firings.labels(rule, severity).inc(v)
        self.model.restore(counters)

    def totals(self, actions: Mapping[str, Any]) -> dict[str, Any]:
        """What the worker's counters do not hold but a restart must not reset: the label
        delay histogram and the counters of the ``actions`` (an alert sender, a hook: what
        their ``counts()`` say), saved with the state."""
        return {"label_delay": self.label_delay.state(),
                "actions": {k: a.counts() for k, a in actions.items() if a is not None}}

    def restore_totals(self, saved: Mapping[str, Any], actions: Mapping[str, Any]) -> None:
        """Add what :meth:`totals` saved (at start, before anything is counted); an action
        no longer configured is left out."""
        self.label_delay.restore(saved.get("label_delay") or {})
        for k, counts in (saved.get("actions") or {}).items():
            if actions.get(k) is not None and isinstance(counts, Mapping):
                actions[k].restore_counts(counts)

    def problem_totals(self) -> dict[str, float]:
        """``lrwatch_daemon_problems_total`` by reason now (saved with the counters: the
        tailers count on their own threads)."""
        get = self.registry.get_sample_value
        return {r: get("lrwatch_daemon_problems_total", {"reason": r}) or 0.0
                for r in PROBLEMS}

    def internal_error_total(self) -> float:
        """``lrwatch_internal_errors_total`` now (saved in the snapshot's counters: it is
        counted on every thread, so the worker's counters cannot keep it)."""
        return self.registry.get_sample_value("lrwatch_internal_errors_total") or 0.0
