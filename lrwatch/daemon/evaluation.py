"""Evaluation, on the worker: a closed window's columns are tested against the reference
(:class:`~.detector.DriftDetector`), the window's sample goes to the rules engine, and the
result is published (:mod:`.publishing`). A reference built from live records is calibrated on
a thread of its own meanwhile (closed windows wait as columns, see :mod:`.core`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError
from ..samples import Sample
from .detector import DriftDetector, DriftResult
from .baseline import ESTIMABLE, fit_estimator
from .estimate_tracking import probability_rows
from .labels import is_classification
from .reference import PREDICTION, Reference
from .stats import Profile
from .windows import Window

if TYPE_CHECKING:
    from .config import DaemonConfig
    from .ingest import BoundedQueue
    from .metrics import DaemonMetrics

__all__ = ["EvaluationMixin", "MAX_WAITING_WINDOWS"]

_log = logging.getLogger("lrwatch.daemon")
#: Closed windows kept (as columns) while a live reference is calibrated in the background.
MAX_WAITING_WINDOWS = 128


class EvaluationMixin:
    """Reference set-up, calibration of a live reference, and window tests."""

    config: DaemonConfig
    metrics: DaemonMetrics
    counters: dict[str, Any]
    queue: BoundedQueue
    window: Window
    reference: Reference | None
    detector: DriftDetector | None
    engine: Any
    last: dict[str, Any]
    _executor: Any
    _profile: Profile | None
    _ref_rows: list[dict[str, Any]]
    _cal_rows: list[dict[str, Any]]
    _cal_done: threading.Event
    _cal_result: Any
    _calibrating: bool
    _replaying: bool
    _worker: threading.Thread | None
    _waiting: list[tuple[Window, int, np.ndarray, list[np.ndarray], np.ndarray | None]]

    if TYPE_CHECKING:  # provided by the other parts of Daemon
        def _ref_path(self) -> str | None:  # see Daemon
            ...

        def _new_window(self, index: int) -> Window:  # see WindowsMixin
            ...

        def _reference_failed(self, exc: ConfigError) -> None:  # see WindowsMixin
            ...

        def _export(self, n: int, res: DriftResult, values: Any) -> None:  # see PublishingMixin
            ...

        def _feature_status(self, res: DriftResult) -> dict[str, Any]:  # see PublishingMixin
            ...

        def _act(self, ev: Any) -> None:  # see PublishingMixin
            ...

        def _bind_outputs(self, ref: Reference, det: DriftDetector) -> None:  # OutputsMixin
            ...

        def _output_values(self, w: Window, n: int, x: np.ndarray, cats: list[np.ndarray],
                           res: DriftResult, proba: np.ndarray | None
                           ) -> dict[str, float]:  # see OutputsMixin
            ...

    def _make_detector(self, ref: Reference) -> DriftDetector:
        cfg = self.config
        return DriftDetector(ref, window_size=cfg.window_size if cfg.window_seconds is None
                             else (ref.calibration or {}).get("window_size", cfg.window_size),
                             target_windows=cfg.target_windows, min_effect=cfg.min_effect,
                             min_effect_categorical=cfg.min_effect_categorical,
                             min_missing_delta=cfg.min_missing_delta,
                             sequential=cfg.sequential, seq_min_effect=cfg.seq_min_effect,
                             seed=cfg.seed, sims=cfg.calibration_sims, joint=cfg.joint_drift)

    def _set_reference(self, ref: Reference, save: bool,
                       detector: DriftDetector | None = None) -> None:
        cfg = self.config
        det = detector if detector is not None else self._make_detector(ref)
        if save:
            ref.calibration = det.calibration.to_dict()
            path = self._ref_path()
            if path:
                ref.save(path)
        self.reference = ref
        self.detector = det
        self._profile = det.profile
        self.metrics.bind_features(det.profile.num_names, det.profile.cat_names)
        thr = det.raw_thresholds(cfg.window_size)
        for i, name in enumerate(det.profile.num_names):
            ch = self.metrics.features[name]
            ch["thr_ks"].set(thr["ks"][i])
            ch["thr_chi2"].set(thr["chi2"][i])
            ch["thr_mean_z"].set(thr["mean"][i])
            ch["thr_score"].set(det.threshold)
            ch["thr_sequential_z"].set(det.seq_threshold)
        for name in det.profile.cat_names:
            self.metrics.features[name]["thr_score"].set(det.threshold)
        self._bind_outputs(ref, det)

    def _start_calibration(self, ref: Reference) -> None:
        rows, self._ref_rows = self._ref_rows, []
        if self._replaying or self._worker is None:
            try:
                self._fit_estimator(rows, ref)
                self._set_reference(ref, save=True)
            except ConfigError as exc:  # these rows make no reference: never a failed start
                self._ref_rows = rows
                self._reference_failed(exc)
            except Exception:
                self._ref_rows = rows
                raise
            return
        self.reference = ref
        self._profile = Profile(ref)
        self._calibrating = True
        self._cal_rows = rows

        self._cal_done.clear()

        def work() -> None:
            try:
                self._fit_estimator(rows, ref)
                result: Any = self._make_detector(ref)
            except Exception as exc:  # handed to the worker, which fails open
                result = exc
            self._cal_result = result
            self._cal_done.set()
            with self.queue.cond:
                self.queue.cond.notify_all()

        _log.info("calibrating the live reference in the background")
        if self._executor is not None:
            self._executor.submit(work)
        else:
            threading.Thread(target=work, name="lrwatch-calibrate", daemon=True).start()

    def _fit_estimator(self, rows: list[dict[str, Any]], ref: Reference) -> None:
        """Fit the live reference's performance estimator from its records' inline labels
        (seconds at most; on the calibration thread unless replaying)."""
        if self.config.estimation:
            fit_estimator(rows, ref)
            for note in ref.notes:
                _log.info("%s", note)

    def _finish_calibration(self) -> None:
        result, self._cal_result = self._cal_result, None
        ref = self.reference
        waiting, self._waiting = self._waiting, []
        try:
            if isinstance(result, ConfigError):  # the same rows would fail again
                self.reference = None
                self._profile = None
                self._ref_rows = self._cal_rows
                self._reference_failed(result)
                return
            if isinstance(result, BaseException) or ref is None:
                self.metrics.internal_errors.inc()
                _log.error("calibrating the live reference failed: %s", result)
                self.reference = None
                self._profile = None
                self._ref_rows = self._cal_rows  # retried with the next records
                return
            self._set_reference(ref, save=True, detector=result)
            self._cal_rows = []
            _log.info("live reference calibrated; testing %d waiting windows", len(waiting))
            for w, n, x, cats, proba in waiting:
                self._test_window(w, n, x, cats, 0.0, proba)
        finally:
            self._calibrating = False  # only now: drain() waits for the waiting windows

    def _close_window(self, now: float) -> None:
        w = self.window
        self.window = self._new_window(w.index + 1)
        prof = self._profile
        if self.reference is None or prof is None or not len(w):
            return
        t0 = time.perf_counter()
        n = len(w)
        x, cats = w.matrix(prof)
        proba = self._window_probabilities(w)
        w.feats, w.preds, w.cols = [], [], []  # done with the dicts; the columns hold the data
        if self.detector is None:  # calibrating: tested once the thresholds are ready
            self._waiting.append((w, n, x, cats, proba))
            if len(self._waiting) >= MAX_WAITING_WINDOWS:
                self._cal_done.wait()  # bounded memory: ingest waits (the queue answers 429)
                self._finish_calibration()
            return
        self._test_window(w, n, x, cats, time.perf_counter() - t0, proba)

    def _test_window(self, w: Window, n: int, x: np.ndarray, cats: list[np.ndarray],
                     seconds: float, proba: np.ndarray | None) -> None:
        """Test one closed window, failing open: an error costs that window's verdict (counted,
        logged), never the records after it in the same batch, which go on into windows."""
        try:
            self._evaluate(w, n, x, cats, seconds, proba)
        except Exception:  # noqa: BLE001 - the rest of the batch must still be windowed
            self.metrics.internal_errors.inc()
            _log.exception("testing window %d (%d records) failed; its records stay counted "
                           "and the next windows are tested as usual", w.index, n)

    def _window_probabilities(self, w: Window) -> np.ndarray | None:
        """The closed window's class probabilities, when its reference can estimate
        performance (read before the window drops its predictions)."""
        ref = self.reference
        if ref is None or not self.config.estimation or ref.prediction_type not in ESTIMABLE \
                or not (ref.estimator or self.detector is None):  # (being fitted meanwhile)
            return None
        proba, w.proba_rows = probability_rows(w.preds, ref.prediction_type, ref.proba_width)
        return proba

    def _evaluate(self, w: Window, n: int, x: np.ndarray, cats: list[np.ndarray],
                  seconds: float, proba: np.ndarray | None = None) -> None:
        det = self.detector
        assert det is not None
        t0 = time.perf_counter()
        res = det.update(x, cats)
        self.metrics.stat_seconds.observe(seconds + time.perf_counter() - t0)
        self.counters["windows"] += 1
        self.metrics.windows.inc()
        values = self._window_values(w, n, res)
        values.update(self._output_values(w, n, x, cats, res, proba))
        self._export(n, res, values)
        t = w.last_time if w.last_time is not None else time.time()
        # the rules read the sample's time on the wall clock (no_traffic compares it with
        # the clock tick's): the arrival of the window's last record, not its record time,
        # which a client's clock or time zone can put hours off
        arrived = w.last_arrival if w.last_arrival is not None else t
        sample = Sample(step=w.index, time=arrived, values=values)
        for ev in self.engine.update(sample):
            self._act(ev)
        self.last = {"window": w.index, "time": t, "records": n, "values": values,
                     "drifted_features": res.drifted_features,
                     "joint_features": list(getattr(res, "joint_features", [])),
                     # left out of the joint test: their gap is no change of relation
                     "joint_excluded": list(getattr(res, "joint_excluded", [])),
                     "features": self._feature_status(res)}

    def _window_values(self, w: Window, n: int, res: DriftResult) -> dict[str, float]:
        tests = res.tests
        vals: dict[str, float] = {
            "drift_detected": 1.0 if res.detected else 0.0,
            "drift_score": res.score,
            "drift_features": float(sum(1 for f in res.drifted_features if f != PREDICTION)),
            "window_records": float(n),
            "ingest_error_ratio": w.rejected / max(w.rejected + n, 1),
            "label_coverage": min(1.0, w.joined / max(n, 1)),
        }
        if self.reference is not None and self.reference.prediction_type != "none":
            vals["prediction_drift"] = 1.0 if res.prediction_drift else 0.0
        miss = np.concatenate([tests.missing_ratio, tests.c_missing_ratio])
        vals["missing_ratio"] = float(miss.max(initial=0.0))
        if tests.out_of_range is not None and len(tests.out_of_range):
            vals["out_of_range_ratio"] = float(tests.out_of_range.max())
        if len(tests.c_unseen_ratio):
            vals["unseen_category_ratio"] = float(tests.c_unseen_ratio.max())
        if w.joined:
            ptype = self.reference.prediction_type if self.reference else "class"
            if is_classification(ptype):
                vals["model_accuracy"] = w.score_sum / w.joined
            else:
                vals["model_error"] = w.mean_error()
            vals["label_delay_seconds"] = w.delay_sum / w.joined
        return vals
