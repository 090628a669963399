"""Publishing, on the worker (and ``status`` on the front end): a window's statistics go to
the Prometheus metrics (:mod:`.metrics`), rule firings to the alert sender and the hook, and
``/v1/status`` reads the state.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from .detector import DriftResult

if TYPE_CHECKING:
    from .config import DaemonConfig
    from .detector import DriftDetector
    from .ingest import BoundedQueue
    from .labels import PendingLabels
    from .metrics import DaemonMetrics
    from .reference import Reference
    from .windows import Window

__all__ = ["PublishingMixin"]

_log = logging.getLogger("lrwatch.daemon")


def _copied(d: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the worker's live ``counters`` (nested dicts) for the front end to serialise.

    ``dict.copy`` is one C call under the GIL, so the worker cannot add a key during it; the
    live dict serialised instead could gain one mid-way (a new rejection reason, a rule's first
    firing), and ``strict_json``'s walk of a status holding a non-finite value raised
    "dictionary changed size during iteration": a 500."""
    out = d.copy()
    for k, v in out.items():
        if type(v) is dict:
            out[k] = _copied(v)
    return out


class PublishingMixin:
    """Metrics of a window, actions of a firing, and the status document."""

    config: DaemonConfig
    metrics: DaemonMetrics
    counters: dict[str, Any]
    queue: BoundedQueue
    pending: PendingLabels
    window: Window
    reference: Reference | None
    detector: DriftDetector | None
    engine: Any
    alerts: Any
    hook: Any
    notifier: Any
    last: dict[str, Any]
    _ref_rows: list[dict[str, Any]]
    _calibrating: bool

    def _export(self, n: int, res: DriftResult, values: Mapping[str, float]) -> None:
        m = self.metrics
        tests = res.tests
        prof = self.detector.profile  # type: ignore[union-attr]
        fn = len(prof.num)
        drifted = res.drifted.astype(np.float64)
        num = {"stat_ks": tests.ks, "stat_chi2": tests.chi2, "stat_mean_z": tests.z_mean,
               "stat_psi": tests.psi, "stat_wasserstein": tests.wasserstein,
               "stat_jensen_shannon": tests.js, "stat_score": res.feature_score[:fn],
               "stat_sequential_z": res.seq_z[:fn], "p_ks": tests.p_ks,
               "p_chi2": tests.p_chi2, "p_mean": tests.p_mean, "p_missing": tests.p_missing,
               "detected": drifted[:fn], "missing": tests.missing_ratio}
        if tests.out_of_range is not None:
            num["oor"] = tests.out_of_range
        cat = {"stat_chi2": tests.c_chi2, "stat_psi": tests.c_psi,
               "stat_jensen_shannon": tests.c_js, "stat_score": res.feature_score[fn:],
               "p_chi2": tests.c_p_chi2, "p_missing": tests.c_p_missing,
               "detected": drifted[fn:], "missing": tests.c_missing_ratio,
               "unseen": tests.c_unseen_ratio}
        m.publish(num, cat)
        m.score.set(values["drift_score"])
        m.drift_any.set(values["drift_detected"])
        m.window_records.set(n)
        m.label_coverage.set(values["label_coverage"])
        if "model_accuracy" in values:
            m.accuracy.set(values["model_accuracy"])
        if "model_error" in values:
            m.error.set(values["model_error"])

    def _republish(self) -> None:
        """After a restart, what the restored state says: the last window's gauges, and the
        rules still firing, as gauges and as alerts sent again (Alertmanager resolves an
        alert by itself once its ``endsAt`` passes without a re-send). Their hooks ran
        before the restart and are not run again."""
        self.metrics.restore_last((self.last or {}).get("values") or {})
        for ev in self.engine.active.values():
            # the gauge only: lrwatch_firings_total is restored, and this is no new edge
            self.metrics.rule_firing.labels(ev.rule, ev.severity).set(1.0)
            if "alert" in ev.actions:
                self.notifier.fire(ev)

    def _feature_status(self, res: DriftResult) -> dict[str, Any]:
        out = {}
        for i, name in enumerate(res.names):
            out[name] = {"drifted": bool(res.drifted[i]),
                         "score": round(float(res.feature_score[i]), 4),
                         "sequential_z": round(float(res.seq_z[i]), 4)}
        return out

    def _act(self, ev: Any) -> None:
        m = self.metrics
        firing = ev.kind == "firing"
        m.engine.set_rule_state(ev.rule, ev.severity, firing)
        if firing:  # kept in the snapshot's counters (lrwatch_firings_total survives)
            by = self.counters.setdefault("firings", {}).setdefault(ev.rule, {})
            by[ev.severity] = by.get(ev.severity, 0) + 1
        _log.warning("%s %s: %s", ev.kind, ev.rule, ev.message)
        # which events go out is the daemon's decision; carrying them is the shared notifier's
        if "alert" in ev.actions:
            if firing:
                self.notifier.fire(ev)
            else:
                self.notifier.resolve(ev, at=ev.time)
        if firing and (("hook" in ev.actions) if self.config.hook_rules is None
                       else ev.rule in self.config.hook_rules):
            self.notifier.run_hook(ev)

    def status(self) -> dict[str, Any]:
        det = self.detector
        return {
            "reference": None if self.reference is None else {
                "records": self.reference.records, "features": self.reference.names,
                "prediction_type": self.reference.prediction_type,
                "notes": list(self.reference.notes)},
            "collecting_reference": None if self.reference is not None else {
                "have": len(self._ref_rows), "need": self.config.live_records,
                "error": getattr(self, "reference_error", None)},
            "calibrating": self._calibrating,
            "counters": _copied(self.counters),
            "window": {"index": self.window.index, "records": len(self.window)},
            "thresholds": None if det is None else {"score": det.threshold,
                                                    "sequential_z": det.seq_threshold},
            "pending_labels": len(self.pending),
            "early_labels": len(self.pending.early),  # labels waiting for their prediction
            "queue_records": self.queue.records,
            "last_window": self.last,
            "firing": sorted(self.engine.active),
            **self._outputs_status(),
        }

    def _outputs_status(self) -> dict[str, Any]:
        """What ``/v1/status`` says about estimation, the joint test and label coverage (read
        from what the worker published: this runs on the front end)."""
        vals = (self.last or {}).get("values") or {}
        est = getattr(self, "estimates", None)
        ref = self.reference
        det = self.detector
        return {
            "label_coverage_horizon": {
                "horizon_seconds": self.config.label_horizon_seconds,
                "ratio": self.metrics.model.coverage_value},
            "estimation": None if est is None or ref is None or not ref.estimator else {
                "classes": ref.estimator.get("n_classes"),
                "reference_accuracy": ref.estimator.get("reference_accuracy"),
                "reference_estimate": ref.estimator.get("reference_estimate"),
                "withheld_windows": self.counters.get("estimation_withheld", 0),
                "last_window": {k: v for k, v in vals.items()
                                if k.startswith("estimat")}},
            "multivariate_drift": None if det is None else {
                "enabled": bool(getattr(det, "joint", False))
                and bool(self.metrics.model.multivariate),
                "detected": vals.get("multivariate_drift"),
                "score": vals.get("multivariate_drift_score")},
        }
