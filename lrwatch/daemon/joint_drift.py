"""The joint (multivariate) drift test of one window, and its evidence accumulated over
windows: a mixin of :class:`lrwatch.daemon.detector.DriftDetector`, whose thresholds,
horizons and reference it uses.

Each joint feature's mean absolute residual ``|e|`` (:class:`.multivariate.JointModel`: the
feature predicted from the other inputs) is compared with the reference's, per window and over
the last 2, 4, 8 or 16 windows; a feature whose relation to the others changed by at least
``joint_min_effect`` past the calibrated threshold fires. Rows where a feature is missing far
more often than in the reference are left out (:func:`.multivariate.gap_rows`). See
docs/drift-joint.md.
"""

from __future__ import annotations

import logging
import math
from collections import deque

import numpy as np

from .calibrate import Calibration, row_skew, unskew, window_skew
from .drift_result import DriftResult
from .multivariate import MIN_WINDOW_ROWS, JointModel, gap_rows
from .reference import PREDICTION, Reference
from .stats import Profile

__all__ = ["JointDrift"]

_log = logging.getLogger("lrwatch.daemon")


def _fit_joint(ref: Reference, prof: Profile) -> JointModel | None:
    """The joint test's model of ``ref`` (``None``, with a log line, when it cannot have one)."""
    inputs = len(prof.num_names) - (PREDICTION in prof.num_names)
    if inputs < 1 or inputs + prof.indicators.width < 2:
        return None  # one input column: nothing to be joint with
    lengths = {len(ref.sample.get(name) or ()) for name in prof.num_names}
    if len(lengths) != 1 or 0 in lengths:
        _log.info("no joint drift test: the reference sample lacks numeric columns or they "
                  "differ in length (rebuild it with `lrwatch baseline build`)")
        return None
    model = JointModel.fit(prof.joint_sample, prof.joint_names)
    if model is None:
        _log.info("no joint drift test: fewer than 2 usable input columns or too few "
                  "reference rows (%d)", prof.joint_sample.shape[0])
    return model


class JointDrift:
    """The joint test's state and decision (a mixin; the detector provides the rest)."""

    # provided by the detector
    profile: Profile
    names: list[str]
    threshold: float
    seq_threshold: float
    sequential: bool
    horizons: tuple[int, ...]
    _joint_model: JointModel | None
    _ref_missing_rate: np.ndarray
    _m: float
    _jm: float

    def _init_joint(self, cached: Calibration, nd: int, joint_min_effect: float) -> None:
        """The joint test's calibration (after the ``nd`` per-feature dims of ``cached``), its
        reference means and their spread, and an empty accumulation."""
        self._jmu = np.asarray(cached.mu[nd:])
        self._jsd = np.asarray(cached.sd[nd:])
        self._jmean = np.asarray(cached.joint_mean)
        self._jrsd = np.maximum(np.asarray(cached.joint_sd), 1e-12)
        self._jskew = self._joint_row_skew(cached)
        self.joint_min_effect = float(joint_min_effect)
        self._jhist: deque[tuple[np.ndarray, float]] = deque(maxlen=max(cached.horizons))

    def _joint_row_skew(self, cached: Calibration) -> np.ndarray:
        """Per joint feature, the skewness of the reference rows' ``|e|`` (measured here when the
        calibration predates it)."""
        model = self._joint_model
        if model is None:
            return np.zeros(0)
        if len(cached.joint_skew) == len(model.names):
            return np.asarray(cached.joint_skew, dtype=np.float64)
        return row_skew(model.loo_residuals(self.profile.joint_sample))

    def _joint_gaps(self, x: np.ndarray, gaps: np.ndarray, res: DriftResult
                    ) -> np.ndarray | None:
        """Window ``x`` without the rows where a feature flagged in ``gaps`` (per feature) is
        missing beyond its reference share (:func:`.multivariate.gap_rows`), or ``None`` when
        none of the joint test's columns is flagged. Names them in ``res``."""
        model = self._joint_model
        assert model is not None
        fn = len(self.profile.num)
        feature = list(range(fn)) + [fn + j for j, keep in
                                     enumerate(self.profile.indicators.levels)
                                     for _ in keep]  # the feature of each input column
        cols = [int(c) for c in model.cols if gaps[feature[c]]]
        if not cols:
            return None
        keep = gap_rows(x, cols, [self._ref_missing_rate[feature[c]] for c in cols])
        res.joint_excluded = sorted({self.names[feature[c]] for c in cols})
        return x[keep]

    def _joint(self, x: np.ndarray, res: DriftResult, gaps: np.ndarray) -> None:
        """The joint test of window ``x`` (on the location scale), per window and accumulated,
        into ``res``; ``gaps``: per feature, whether its missing values are a change of their
        own (see :meth:`_joint_gaps`)."""
        model = self._joint_model
        assert model is not None
        present = res.tests.present
        if x.shape[1] > len(present):  # indicator columns: missing where their feature is
            present = np.concatenate([present, (~np.isnan(x[:, len(present):])).sum(axis=0)])
        kept = self._joint_gaps(x, gaps, res) if gaps.any() else None
        if kept is not None:
            x, present = kept, None
        res.joint_rows = n_rows = x.shape[0]
        if kept is not None and n_rows < MIN_WINDOW_ROWS:
            return  # too few complete rows: no joint test in this window (NaN)
        n = float(n_rows)
        sums = model.window_sums(x, present)
        mean_w = sums / n
        z = (mean_w - self._jmean) / (self._jrsd * math.sqrt(1.0 / n + 1.0 / self._jm))
        # |e| is right-skewed, and so is a small window's mean of it: score it on the normal
        # scale before folding, so that the Gaussian calibration holds in both tails
        skew = window_skew(self._jskew, n, self._m, self._jm)
        scores = np.abs(unskew((z - self._jmu) / self._jsd, skew))
        effect = np.abs(mean_w / self._jmean - 1.0) >= self.joint_min_effect
        hit = (scores > self.threshold) & effect
        top = int(np.argmax(scores))
        res.joint_names = model.names
        res.joint_scores = scores
        res.joint_stat = float(mean_w[top] / self._jmean[top])
        res.joint_score = float(scores[top])
        res.joint_threshold = self.threshold
        if self.sequential:
            seq_z, seq_hit = self._joint_sequential(sums, n)
            res.joint_seq_z = seq_z
            hit |= seq_hit
        res.joint_detected = bool(hit.any())
        res.joint_features = [name for name, h in zip(model.names, hit) if h]

    def _joint_sequential(self, sums: np.ndarray, n: float) -> tuple[float, np.ndarray]:
        """Max ``|z|`` of the joint features' accumulated mean ``|e|`` over the horizons, and
        which features are over ``seq_threshold`` (with at least ``joint_min_effect``)."""
        self._jhist.append((sums.copy(), n))
        best = np.zeros(len(sums))
        hit = np.zeros(len(sums), dtype=bool)
        s = np.zeros(len(sums))
        c = 0.0
        for k, (ws, wn) in enumerate(reversed(self._jhist), start=1):
            s += ws
            c += wn
            if k in self.horizons:
                mean = s / c
                z = np.abs(mean - self._jmean) / (self._jrsd * math.sqrt(1.0 / c + 1.0 / self._jm))
                best = np.maximum(best, z)
                hit |= (z > self.seq_threshold) & \
                    (np.abs(mean / self._jmean - 1.0) >= self.joint_min_effect)
        return float(best.max(initial=0.0)), hit

    @property
    def joint_active(self) -> bool:
        """Whether the joint test runs: a joint model was fitted and calibrated (a numeric
        input and one more input column, a categorical one's indicator included)."""
        return self._joint_model is not None
