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

The joint (multivariate) test on the input features is the mixin
:class:`~lrwatch.daemon.joint_drift.JointDrift`; :class:`DriftResult` is defined in
:mod:`lrwatch.daemon.drift_result` and importable from here.

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

import logging
import math
from collections import deque
from typing import Any, Mapping

import numpy as np

from ..errors import ConfigError, DamagedStateError
from .calibrate import Calibration, calibrate, normal_scores, standardise
from .drift_result import DriftResult
from .joint_drift import JointDrift, _fit_joint
from .reference import Reference
from .scale import LOCATION_SCALE
from .state_check import evidence_problem
from .stats import Profile, WindowTests, window_tests

__all__ = ["DriftDetector", "DriftResult"]

_log = logging.getLogger("lrwatch.daemon")


class DriftDetector(JointDrift):
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
        Also run the joint (multivariate) test on the input features
        (``DriftResult.joint_*``; see docs/drift-joint.md). ``False`` switches it off (a
        calibration that includes it is then used with its per-feature thresholds).
    joint_min_effect:
        Minimum relative change of a joint feature's mean absolute residual (0.02: 2%).
    """

    def __init__(self, reference: Reference, *, window_size: int | None = None,
                 target_windows: float | None = None, min_effect: float = 0.05,
                 min_effect_categorical: float = 0.02, min_missing_delta: float = 0.01,
                 sequential: bool = True, seq_min_effect: float = 0.03, seed: int = 0,
                 sims: int | None = None, calibration: Calibration | None = None,
                 joint: bool = True, joint_min_effect: float = 0.02) -> None:
        for name, v in (("min_effect", min_effect), ("min_effect_categorical",
                        min_effect_categorical), ("min_missing_delta", min_missing_delta),
                        ("seq_min_effect", seq_min_effect)):
            if not (isinstance(v, (int, float)) and v >= 0):
                raise ConfigError(f"{name} must be a number >= 0, got {v!r}")
        if not (isinstance(joint_min_effect, (int, float)) and joint_min_effect >= 0):
            raise ConfigError(f"joint_min_effect must be a number >= 0, got {joint_min_effect!r}")
        self.reference = reference
        self.profile = Profile(reference)
        self._joint_model = _fit_joint(reference, self.profile) if joint else None
        cached = self._resolve_calibration(calibration, window_size, target_windows, seed,
                                           sims, sequential)
        self.calibration = cached
        nd = len(self.profile.dims)
        self._mu = np.asarray(cached.mu[:nd])
        self._sd = np.asarray(cached.sd[:nd])
        with_joint = cached.joint_features or []
        if self._joint_model is None or with_joint != self._joint_model.names:
            self._joint_model = None
        self.threshold = float(cached.threshold)
        self.seq_threshold = float(cached.seq_threshold) if sequential else math.inf
        if with_joint and self._joint_model is None:  # calibrated with it, run without it
            self.threshold = float(cached.base_threshold or cached.threshold)
            self.seq_threshold = float(cached.base_seq_threshold or cached.seq_threshold) \
                if sequential else math.inf
        self._init_joint(cached, nd, joint_min_effect)
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
        # the joint means' effective reference size: coefficient error inflates the 1/m term
        self._jm = self._m / max(float(cached.joint_inflation), 1.0)
        ref_missing = np.array([f.missing / max(f.count + f.missing, 1)
                                for f in self.profile.num])
        cat_missing = np.array([f.missing / max(f.count + f.missing, 1)
                                for f in self.profile.cat])
        self._ref_missing_rate = np.concatenate([ref_missing, cat_missing])

    def _resolve_calibration(self, given: Calibration | None, window_size: int | None,
                             target_windows: float | None, seed: int, sims: int | None,
                             sequential: bool) -> Calibration:
        """The given or cached calibration when it fits, else a fresh one (seconds).

        A cached calibration from an lrwatch without the joint test (no ``joint_features``) is
        recalibrated when the joint test is on, with a log line; with it off, it is used."""
        ref = self.reference
        cached = given
        if cached is None and ref.calibration:
            cached = Calibration.from_dict(ref.calibration)
        ws = window_size or (cached.window_size if cached else 1000)
        tw = target_windows or (cached.target_windows if cached else 1000.0)
        want = self._joint_model.names if self._joint_model is not None else []
        ok = cached is not None and cached.matches(ws, tw, len(self.profile.dims))
        if cached is not None and cached.location_scale != LOCATION_SCALE:
            _log.info("the reference's cached calibration was made on raw values, before the "
                      "location tests moved to normal scores; recalibrating (seconds; `lrwatch "
                      "baseline recalibrate REFERENCE` stores it in the file once)")
        if ok and want and cached is not None and cached.joint_features != want:
            _log.info("the reference's cached calibration %s; recalibrating (seconds) so that "
                      "the joint drift test shares the false-alarm target (`lrwatch baseline "
                      "recalibrate REFERENCE` stores it in the file once)",
                      "predates the joint drift test" if cached.joint_features is None
                      else "was made without this joint drift test")
            ok = False
        if cached is None or not ok:
            cached = calibrate(ref, window_size=ws, target_windows=tw, seed=seed, sims=sims,
                               sequential=sequential, joint=bool(want))
        return cached

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
        located = prof.location.sort_and_apply(x) if fn else None
        tests = window_tests(prof, x, cats, located)
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
        res = DriftResult(tests=tests, names=self.names, scores=scores,
                          feature_score=np.asarray(feature_score, dtype=np.float64),
                          seq_z=seq_all, drifted=drifted, threshold=t,
                          seq_threshold=self.seq_threshold,
                          drifted_features=[n for n, d in zip(self.names, drifted) if d])
        if self._joint_model is not None and located is not None and x.shape[0] > 0:
            # a feature whose missing test fired: its gap is no change of relation
            gaps = (np.concatenate([num_s[:, 3] > t, cat_s[:, 1] > t])
                    & (miss_delta >= self.min_missing_delta)
                    & (np.concatenate([tests.missing_ratio, tests.c_missing_ratio])
                       > self._ref_missing_rate))
            self._joint(prof.joint_input(located[1], cats), res, gaps)
        return res

    def _sequential(self, tests: WindowTests) -> np.ndarray:
        self._hist.append((tests.sums.copy(), tests.present.copy()))
        prof = self.profile
        loc_mean, loc_std, _ = prof.loc_moments
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
                    mean_shift = np.where(c > 0, (s / np.maximum(c, 1.0) - loc_mean)
                                          / loc_std, 0.0)
                    z = np.abs(mean_shift) / np.sqrt(1.0 / np.maximum(c, 1.0) + 1.0 / self._m)
                better = z > best
                best = np.where(better, z, best)
                shift = np.where(better, mean_shift, shift)
        self._seq_shift = shift
        return best

    # --- resume ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The accumulated evidence (JSON-ready): per-feature sums, and the joint test's, with
        the reference they were measured against (when it was built, its features)."""
        state: dict[str, Any] = {"history": [[s.tolist(), c.tolist()] for s, c in self._hist],
                                 "reference": {"created": self.reference.created,
                                               "features": self.names}}
        if self._joint_model is not None:
            state["joint_history"] = [[s.tolist(), n] for s, n in self._jhist]
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`. A state saved without the joint test's part (older
        lrwatch, or the test was off) starts the joint accumulation afresh. A state measured
        against another reference raises :class:`~lrwatch.errors.ConfigError`."""
        self._hist.clear()
        self._jhist.clear()
        saved = state.get("reference")
        if saved is not None and (saved.get("created") != self.reference.created
                                  or list(saved.get("features") or []) != self.names):
            raise ConfigError(f"saved sequential state was measured against another reference "
                              f"(built at {saved.get('created')}, this one at "
                              f"{self.reference.created})")
        fn = len(self.profile.num)
        joint = self._joint_model.dims if self._joint_model is not None else None
        problem = evidence_problem(state, fn, joint)
        if problem is not None:
            if saved is None:  # saved before states named their reference: maybe another's
                raise ConfigError(f"saved drift evidence does not match the reference "
                                  f"({problem})")
            raise DamagedStateError(f"saved drift evidence: {problem}")
        for s, c in state.get("history", []):
            self._hist.append((np.asarray(s, dtype=np.float64), np.asarray(c, dtype=np.float64)))
        if joint is not None:
            for s, n in state.get("joint_history", []):
                self._jhist.append((np.asarray(s, dtype=np.float64), float(n)))

    def resume(self, state: Mapping[str, Any]) -> bool:
        """:meth:`load_state_dict`, or, for a state of another reference (one rebuilt between
        two runs of the daemon), a warning and the evidence accumulated afresh: windows tested
        against that reference are no evidence against this one. Whether it was restored.
        A damaged state (:class:`~lrwatch.errors.DamagedStateError`) is raised, after the
        evidence was reset: the caller counts it."""
        try:
            self.load_state_dict(state)
            return True
        except DamagedStateError:
            self.reset()
            raise
        except ConfigError as exc:
            self.reset()
            _log.warning("the drift evidence of the last windows starts afresh: %s", exc)
            return False

    def reset(self) -> None:
        """Forget the accumulated evidence (after the reference changed, say)."""
        self._hist.clear()
        self._jhist.clear()
