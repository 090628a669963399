"""The drift decision of one window: calibrated per-window tests plus sequential evidence.

:class:`DriftDetector` is river-style: :meth:`~DriftDetector.update` takes one window and
returns a :class:`DriftResult`; the only state it carries between windows is the sequential
accumulator (per-feature sums and counts of the last windows), which :meth:`state_dict` holds.

A feature has drifted in a window when

* its largest standardised test score exceeds the calibrated per-window threshold **and** its
  effect size is at least the minimum (Wasserstein distance in reference standard deviations
  for numeric features, Jensen-Shannon distance for categorical ones, the absolute change of the
  missing-value rate for the missing test), or
* the accumulated mean over the last 2, 4, 8 or 16 windows differs from the reference mean by
  more than the calibrated sequential threshold **and** by at least ``seq_min_effect`` standard
  deviations.

Examples
--------
>>> import random
>>> from lrwatch.daemon import build_reference
>>> rng = random.Random(1)
>>> rows = [{"features": {"x": rng.gauss(0, 1)}} for _ in range(3000)]
>>> ref = build_reference(rows, window_size=500, sims=300)
>>> det = DriftDetector(ref)
>>> import numpy as np
>>> calm = det.update(np.random.default_rng(2).normal(0, 1, (500, 1)), [])
>>> shifted = det.update(np.random.default_rng(3).normal(0.5, 1, (500, 1)), [])
>>> calm.detected, shifted.detected, shifted.drifted_features
(False, True, ['x'])
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ..errors import ConfigError
from .calibrate import Calibration, calibrate, normal_scores, standardise
from .reference import PREDICTION, Reference
from .stats import Profile, WindowTests, window_tests

__all__ = ["DriftDetector", "DriftResult"]


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
    #: the joint (multivariate) test on the numeric input features (:mod:`.multivariate`):
    #: its raw statistic (NaN when there is no joint test, e.g. fewer than 2 numeric features),
    #: its standardised score (same units as ``feature_score``, compared with ``threshold``)
    joint_stat: float = math.nan
    joint_score: float = math.nan
    joint_threshold: float = math.inf
    joint_detected: bool = False
    #: the joint test's accumulated evidence over windows (compared with ``seq_threshold``)
    joint_seq_z: float = math.nan

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


class DriftDetector:
    """Per-window drift decisions against a reference, with calibrated thresholds.

    Parameters
    ----------
    reference:
        The profile. Its cached calibration is used when it matches ``window_size`` and
        ``target_windows``; otherwise the thresholds are calibrated here (seconds).
    window_size, target_windows:
        See :func:`~lrwatch.daemon.calibrate.calibrate`.
    min_effect:
        Minimum Wasserstein distance, in reference standard deviations, of a drifted numeric
        feature.
    min_effect_categorical:
        Minimum Jensen-Shannon distance of a drifted categorical feature.
    min_missing_delta:
        Minimum absolute change of the missing-value rate.
    sequential:
        Accumulate evidence over windows (needed for shifts below ~0.2 sigma).
    seq_min_effect:
        Minimum accumulated mean shift, in reference standard deviations.
    joint:
        Also run the joint (multivariate) test on the numeric input features
        (``DriftResult.joint_*``; see docs/drift-joint.md). ``False`` switches it off.
    """

    def __init__(self, reference: Reference, *, window_size: int | None = None,
                 target_windows: float | None = None, min_effect: float = 0.05,
                 min_effect_categorical: float = 0.02, min_missing_delta: float = 0.01,
                 sequential: bool = True, seq_min_effect: float = 0.03, seed: int = 0,
                 sims: int | None = None, calibration: Calibration | None = None,
                 joint: bool = True) -> None:
        for name, v in (("min_effect", min_effect), ("min_effect_categorical",
                        min_effect_categorical), ("min_missing_delta", min_missing_delta),
                        ("seq_min_effect", seq_min_effect)):
            if not (isinstance(v, (int, float)) and v >= 0):
                raise ConfigError(f"{name} must be a number >= 0, got {v!r}")
        self.reference = reference
        self.profile = Profile(reference)
        cached = calibration
        if cached is None and reference.calibration:
            cached = Calibration.from_dict(reference.calibration)
        ws = window_size or (cached.window_size if cached else 1000)
        tw = target_windows or (cached.target_windows if cached else 1000.0)
        if cached is None or not cached.matches(ws, tw, len(self.profile.dims)):
            cached = calibrate(reference, window_size=ws, target_windows=tw, seed=seed,
                               sims=sims, sequential=sequential)
        self.calibration = cached
        self._mu = np.asarray(cached.mu)
        self._sd = np.asarray(cached.sd)
        self.threshold = float(cached.threshold)
        self.seq_threshold = float(cached.seq_threshold) if sequential else math.inf
        self.min_effect = float(min_effect)
        self.min_effect_categorical = float(min_effect_categorical)
        self.min_missing_delta = float(min_missing_delta)
        self.seq_min_effect = float(seq_min_effect)
        self.sequential = sequential
        self.joint = bool(joint)
        self.horizons = tuple(int(h) for h in cached.horizons)
        self.names = self.profile.num_names + self.profile.cat_names
        fn = len(self.profile.num)
        self._hist: deque[tuple[np.ndarray, np.ndarray]] = deque(maxlen=max(self.horizons))
        self._zero = np.zeros(fn)
        self._seq_shift = np.zeros(fn)  # the best horizon's mean shift, per numeric feature
        self._m = float(cached.reference_records or reference.records)
        ref_missing = np.array([f.missing / max(f.count + f.missing, 1)
                                for f in self.profile.num])
        cat_missing = np.array([f.missing / max(f.count + f.missing, 1)
                                for f in self.profile.cat])
        self._ref_missing_rate = np.concatenate([ref_missing, cat_missing])

    # --- thresholds in each test's own units, for the dashboards ----------------------------
    def raw_thresholds(self, n: int) -> dict[str, np.ndarray]:
        """Per numeric feature, the KS distance, chi-square and |z| that reach the threshold."""
        from scipy import special

        prof = self.profile
        fn = len(prof.num)
        t = self.threshold
        mu = self._mu[: fn * 4].reshape(fn, 4)
        sd = self._sd[: fn * 4].reshape(fn, 4)
        p_ks = special.ndtr(-(t * sd[:, 0] + mu[:, 0]))
        p_chi = special.ndtr(-(t * sd[:, 1] + mu[:, 1]))
        nb = prof.ref_fine.sum(axis=1)
        ne = n * nb / np.maximum(n + nb, 1.0)
        ks = special.kolmogi(np.clip(p_ks, 1e-300, 1.0)) / np.sqrt(np.maximum(ne, 1.0))
        chi = special.chdtri(float(9), np.clip(p_chi, 1e-300, 1.0))
        return {"ks": ks, "chi2": chi, "mean": t * sd[:, 2]}

    # --- the decision --------------------------------------------------------------------------
    def update(self, x: np.ndarray, cats: list[np.ndarray]) -> DriftResult:
        """Test one window: ``x`` ``(n, Fn)`` float64 with NaN for missing, ``cats`` the codes
        of :meth:`Profile.encode` per categorical feature."""
        prof = self.profile
        fn, fc = len(prof.num), len(prof.cat)
        tests = window_tests(prof, x, cats)
        raw = normal_scores(tests.pvalues(), prof.mean_dims)
        scores = standardise(raw, self._mu, self._sd, prof.mean_dims)
        num_s = scores[: fn * 4].reshape(fn, 4)
        cat_s = scores[fn * 4:].reshape(fc, 2)
        t = self.threshold
        # numeric: distribution tests gated by the Wasserstein effect, missing by its delta
        miss_delta = np.abs(np.concatenate([tests.missing_ratio, tests.c_missing_ratio])
                            - self._ref_missing_rate)
        num_dist = num_s[:, :3].max(axis=1, initial=-np.inf) if fn else np.zeros(0)
        num_hit = ((num_dist > t) & (tests.wasserstein >= self.min_effect)) | \
                  ((num_s[:, 3] > t) & (miss_delta[:fn] >= self.min_missing_delta))
        cat_hit = ((cat_s[:, 0] > t) & (tests.c_js >= self.min_effect_categorical)) | \
                  ((cat_s[:, 1] > t) & (miss_delta[fn:] >= self.min_missing_delta))
        feature_score = np.concatenate([num_s.max(axis=1, initial=-np.inf) if fn else [],
                                        cat_s.max(axis=1, initial=-np.inf) if fc else []])
        seq = self._sequential(tests) if self.sequential and fn else self._zero
        seq_hit = np.zeros(fn, dtype=bool)
        if self.sequential and fn:
            seq_hit = seq > self.seq_threshold
            if seq_hit.any():
                seq_hit &= np.abs(self._seq_shift) >= self.seq_min_effect
        drifted = np.concatenate([num_hit | seq_hit, cat_hit])
        seq_all = np.concatenate([seq, np.zeros(fc)])
        return DriftResult(tests=tests, names=self.names, scores=scores,
                           feature_score=np.asarray(feature_score, dtype=np.float64),
                           seq_z=seq_all, drifted=drifted, threshold=t,
                           seq_threshold=self.seq_threshold,
                           drifted_features=[n for n, d in zip(self.names, drifted) if d])

    def _sequential(self, tests: WindowTests) -> np.ndarray:
        self._hist.append((tests.sums.copy(), tests.present.copy()))
        prof = self.profile
        best = np.zeros(len(prof.num))
        shift = np.zeros(len(prof.num))
        hist = list(self._hist)
        s = np.zeros(len(prof.num))
        c = np.zeros(len(prof.num))
        k = 0
        for sums, cnt in reversed(hist):
            s += sums
            c += cnt
            k += 1
            if k in self.horizons:
                with np.errstate(divide="ignore", invalid="ignore"):
                    mean_shift = np.where(c > 0, (s / np.maximum(c, 1.0) - prof.ref_mean)
                                          / prof.ref_std, 0.0)
                    z = np.abs(mean_shift) / np.sqrt(1.0 / np.maximum(c, 1.0) + 1.0 / self._m)
                better = z > best
                best = np.where(better, z, best)
                shift = np.where(better, mean_shift, shift)
        self._seq_shift = shift
        return best

    # --- resume ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"history": [[s.tolist(), c.tolist()] for s, c in self._hist]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._hist.clear()
        fn = len(self.profile.num)
        for s, c in state.get("history", []):
            if len(s) != fn:
                raise ConfigError("saved sequential state does not match the reference")
            self._hist.append((np.asarray(s, dtype=np.float64), np.asarray(c, dtype=np.float64)))

    def reset(self) -> None:
        """Forget the accumulated evidence (after the reference changed, say)."""
        self._hist.clear()
