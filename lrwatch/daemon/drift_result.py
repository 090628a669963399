"""What one window showed: :class:`DriftResult`, the per-feature tests' and the joint test's
scores and decisions (made by :class:`lrwatch.daemon.detector.DriftDetector`, and importable
from there)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .reference import PREDICTION
from .stats import WindowTests

__all__ = ["DriftResult"]


@dataclass
class DriftResult:
    """What one window showed. Arrays follow ``Profile.num_names + Profile.cat_names``."""

    tests: WindowTests
    names: list[str]
    scores: np.ndarray  # standardised score per (feature, test) dim
    feature_score: np.ndarray  # per feature: max standardised per-window score
    seq_z: np.ndarray  # per feature: max |z| of the accumulated means (0 for categorical)
    drifted: np.ndarray  # per feature bool
    threshold: float
    seq_threshold: float
    drifted_features: list[str] = field(default_factory=list)
    #: the joint (multivariate) test on the input features (:mod:`.multivariate`):
    #: its raw statistic (NaN when there is no joint test, e.g. fewer than 2 input columns),
    #: its standardised score (same units as ``feature_score``, compared with ``threshold``)
    joint_stat: float = math.nan
    joint_score: float = math.nan
    joint_threshold: float = math.inf
    joint_detected: bool = False
    #: the joint test's accumulated evidence over windows (compared with ``seq_threshold``)
    joint_seq_z: float = math.nan
    #: per joint feature: its standardised per-window score, and those whose relation to the
    #: other features changed (per window or accumulated)
    joint_names: list[str] = field(default_factory=list)
    joint_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    joint_features: list[str] = field(default_factory=list)
    #: input features missing in the window far more often than in the reference (their
    #: missing test fired): the rows where they are missing are left out of the joint test
    #: (:func:`.multivariate.gap_rows`), and ``joint_rows`` rows were tested; with fewer than
    #: :data:`.multivariate.MIN_WINDOW_ROWS` left, the window has no joint test (NaN)
    joint_excluded: list[str] = field(default_factory=list)
    joint_rows: int = 0

    @property
    def detected(self) -> bool:
        """Any input feature drifted, or the joint test fired (the prediction is apart)."""
        return self.joint_detected or any(n != PREDICTION for n in self.drifted_features)

    @property
    def prediction_drift(self) -> bool:
        return PREDICTION in self.drifted_features

    @property
    def score(self) -> float:
        """The largest evidence in units of its threshold (>= 1 means over a threshold)."""
        a = float(self.feature_score.max(initial=0.0)) / self.threshold
        b = float(self.seq_z.max(initial=0.0)) / self.seq_threshold \
            if math.isfinite(self.seq_threshold) else 0.0
        c = self.joint_score / self.joint_threshold \
            if math.isfinite(self.joint_score) and math.isfinite(self.joint_threshold) else 0.0
        d = self.joint_seq_z / self.seq_threshold \
            if math.isfinite(self.joint_seq_z) and math.isfinite(self.seq_threshold) else 0.0
        return max(a, b, c, d)
