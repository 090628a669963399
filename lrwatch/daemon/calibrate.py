"""Calibrating drift thresholds to a false-alarm rate by resampling the reference.

The daemon raises *one* decision per window across all features and tests, and the user sets
how often that decision may be wrong on unshifted traffic: ``target_windows`` (default 1000)
means one false alarm per 1000 windows, all features together. Three steps get there:

1. **Resample.** ``sims`` times, draw a pseudo-reference (as many rows as the reference) and a
   pseudo-window (``window_size`` rows) with replacement from the reference rows and run every
   per-window test between them, exactly as on live traffic. Both sides are resampled so that
   the reference's own sampling noise (the ``1/m`` term) is in the null distribution, as it is
   for live windows.
2. **Standardise.** Each test's asymptotic p-value is mapped to a normal score
   (``Phi^-1(1 - p)``; the mean test keeps its signed z) and standardised with the mean and
   standard deviation measured on the resamples. This corrects tests whose asymptotic p-values
   are off (binned KS on tied data is conservative; chi-square on sparse cells is not).
3. **Extrapolate the maximum.** The window's score is the largest standardised score over
   ``(feature, test)``; its tail at the target rate (1e-3 is too far out for a few thousand
   resamples) is computed from a Gaussian copula with the correlation measured on the
   resamples, by simulating 200,000 correlated draws. Correlated features (radius, perimeter
   and area of a tumour) therefore cost much less than a Bonferroni correction would.

The mean tests, the sequential scan and the joint test work on each numeric feature's reference
normal scores (:mod:`.scale`), in the resamples as on live windows; the binned tests do not
depend on the scale.

Sequential evidence. A 0.1-sigma shift is invisible in one 1000-record window, so the daemon
also accumulates the per-feature mean over the last ``2, 4, 8, 16`` windows and tests it against
the reference with variance ``sigma^2 (1/N + 1/m)``. The threshold of that scan statistic is
calibrated by simulating streams of windows (window means drawn from the reference's feature
correlation, one reference offset per stream), like alibi-detect's online detectors calibrate
to an expected run time. An eighth of the false-alarm budget goes to the sequential scan, the
rest to the per-window tests (:data:`SEQUENTIAL_SHARE` says why).

Joint test (:mod:`.multivariate`). Each numeric input feature's mean absolute residual, regressed
on the others, is one more per-window dim: its signed z (window mean against the reference's
leave-one-out mean) is resampled with the other tests, standardised with its measured mean and
standard deviation, folded (``|z|``) and enters the same maximum and copula, so the target holds
for all tests together; its accumulated sums join the sequential scan as a second block of the
simulated streams. The thresholds without the joint dims (``base_threshold``,
``base_seq_threshold``) come from the same draws, for a detector with the joint test off.
The joint means' reference error is ``kappa / m`` rather than ``1 / m``, with ``kappa`` the
coefficient error measured on the reference (:meth:`.JointModel.reference_inflation`): the
resampled references get the extra ``(kappa - 1) / m`` as Gaussian noise, and the scan's joint
block is simulated with an effective reference of ``m / kappa`` rows.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
from scipy import special

from ..errors import ConfigError
from .multivariate import JointModel
from .reference import FINE_BINS, Reference, cat_key
from .scale import LOCATION_SCALE
from .stats import Profile, categorical_tests, numeric_tests

__all__ = ["Calibration", "calibrate", "normal_scores", "HORIZONS", "row_skew", "window_skew",
           "unskew"]

#: Window counts over which the sequential test accumulates evidence.
HORIZONS = (2, 4, 8, 16)
_COPULA_DRAWS = 200_000
_STREAMS = 4000
_STREAM_WINDOWS = 100
#: The upper share of the resampled scores whose line on the normal scale standardises a
#: p-value dim. The window's threshold lies in that tail (1e-3 and beyond), where the normal
#: score of the binned KS p-value is much lighter than Gaussian (exceedances at 3.5 were 0.07-0.36
#: of the normal tail with the mean and sd; 1.07 on breast cancer with this fit, see
#: docs/drift-joint.md, "Tied data and the spread between references"). 20% of 2000
#: resamples is 400 points.
TAIL_FRACTION = 0.2
#: Fewer distinct values than this in that tail (a feature with a handful of values): no line.
TAIL_MIN_DISTINCT = 20
#: Share of the false-alarm budget that goes to the sequential scan (the rest to the per-window
#: tests). Over the horizons of 8 and 16 windows most of the scan's variance is the reference's
#: own sampling error (``1/m`` against ``1/(n h)``: 62% and 76% at m = 5n), which is the same in
#: every window of a stream: its false alarms come in runs, from the few references that happen
#: to sit far from the population. The average over references is on target, but the rate one
#: reference gives varies widely. In a Gaussian model of 10 independent features (n = 1000,
#: m = 5000, target 1/100) a check over 4 references lands outside 0.5-1.5x the target with
#: probability 0.37 at a half share and 0.16 at a quarter. An eighth since 4 December: on five
#: streams outside the benchmark (Gaussian factor models of 10 and 30 features, Poisson counts,
#: jittered iris, a skewed log-normal/exponential/t(3) mix; 48-72 references each, paired with
#: a quarter on the same references and windows), the share of 4-reference checks outside the
#: band fell or held in all 11 cells of the non-skewed streams (pois8 at 1/1000: 0.42 -> 0.34),
#: the totals rose by 4-8% towards the target (they sat at 0.62-0.93x), 0.25-sigma shifts stay
#: caught in the first window and 0.1-sigma ones within 20 windows in 95-100% (97 -> 95% on the
#: 30-feature stream at 1/1000), at 1-4 points on 0.05-sigma shifts (docs/drift-joint.md,
#: "An eighth of the budget on the scan").
SEQUENTIAL_SHARE = 0.125
#: Bound on the skewness :func:`unskew` corrects. The joint test's z has about 0.1 at windows
#: of 100 rows (a half-normal row's skewness, 1.0, over sqrt(100)); the first-order expansion
#: holds only for small skewness, and at 0.3 the quadratic's turning point lies 5 standard
#: deviations out on the light side, beyond every threshold.
SKEW_MAX = 0.3

#: ``progress(stage, done, total)``: how far calibration has got (see :func:`calibrate`).
ProgressFn = Callable[[str, int, int], None]


@dataclass
class Calibration:
    """Calibrated thresholds for one window size and false-alarm target (JSON-ready)."""

    window_size: int
    target_windows: float
    sims: int
    seed: int
    mu: list[float]
    sd: list[float]
    threshold: float
    seq_threshold: float
    horizons: list[int] = field(default_factory=lambda: list(HORIZONS))
    reference_records: int = 0
    seconds: float = 0.0
    #: the joint test's features (``None``: calibrated by an lrwatch without the joint test;
    #: ``[]``: calibrated without one). ``mu``/``sd`` then hold one more dim per joint feature.
    joint_features: list[str] | None = None
    joint_mean: list[float] = field(default_factory=list)  # reference mean of |e| per feature
    joint_sd: list[float] = field(default_factory=list)  # its row standard deviation
    #: its row skewness (``[]``: calibrated before 4 December; the detector measures it then)
    joint_skew: list[float] = field(default_factory=list)
    #: ``kappa``: the joint means' reference error in units of ``1/m``, the regression's
    #: coefficient error included (:meth:`.JointModel.reference_inflation`; 1 before it existed)
    joint_inflation: float = 1.0
    #: thresholds of the per-feature tests alone (used when the joint test is switched off)
    base_threshold: float | None = None
    base_seq_threshold: float | None = None
    #: the scale of the mean, sequential and joint tests (:data:`.scale.LOCATION_SCALE`;
    #: ``None``: raw values, an lrwatch before 4 December; such a calibration is redone)
    location_scale: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Calibration":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def matches(self, window_size: int, target_windows: float, dims: int) -> bool:
        """For this window size and target, with ``dims`` per-feature test dims, on this
        lrwatch's location scale."""
        return (self.window_size == window_size and self.target_windows == target_windows
                and len(self.mu) == dims + len(self.joint_features or [])
                and self.location_scale == LOCATION_SCALE)


def normal_scores(p: np.ndarray, mean_dims: np.ndarray) -> np.ndarray:
    """Raw normal scores: ``Phi^-1(1 - p)`` for p-values, the signed z for mean dims."""
    q = np.clip(p, 1e-300, 1.0 - 1e-9)
    z = -special.ndtri(q)
    return np.where(mean_dims, p, z)


def standardise(raw: np.ndarray, mu: np.ndarray, sd: np.ndarray,
                mean_dims: np.ndarray) -> np.ndarray:
    """Standardised scores; mean dims are folded (``|z|``) since that test is two-sided."""
    s = (raw - mu) / sd
    return np.where(mean_dims, np.abs(s), s)


class _Resampler:
    """Reference rows as a sparse one-hot matrix, so that a batch of bootstrap resamples is one
    sparse product: ``counts = onehot.T @ weights`` (weights: how often each row was drawn)."""

    def __init__(self, prof: Profile) -> None:
        from scipy import sparse

        cols = prof.reference.sample
        m = len(next(iter(cols.values()))) if cols else 0
        if m < 10 or (prof.num and prof.sample_x.shape[0] != m):
            raise ConfigError("the reference has no row sample to calibrate from; rebuild it "
                              "with `lrwatch baseline build`")
        self.m = m
        fn = len(prof.num)
        x = prof.sample_x if prof.num else np.empty((m, 0))
        miss = np.isnan(x)
        xt = prof.location.apply(x)  # the location tests' scale (see .scale)
        self.x_std = xt  # for correlations and the joint test
        self.x0 = np.where(miss, 0.0, xt)
        self.x0sq = self.x0 ** 2
        self.present = (~miss).astype(np.float64)
        idx = np.empty((m, fn), dtype=np.int64)
        for j in range(fn):
            idx[:, j] = np.searchsorted(prof.edges[j], x[:, j], side="right")
        idx[miss] = FINE_BINS
        blocks = [idx + np.arange(fn) * (FINE_BINS + 1)]
        offset = fn * (FINE_BINS + 1)
        self.cat_slices = []
        for j, f in enumerate(prof.cat):
            codes = prof.codes[j]
            k = len(codes)
            c = np.array([k + 1 if cat_key(v) is None else codes.get(cat_key(v) or "", k)
                          for v in cols[f.name]], dtype=np.int64)
            blocks.append((c + offset)[:, None])
            self.cat_slices.append(slice(offset, offset + k + 2))
            offset += k + 2
        allcols = np.concatenate(blocks, axis=1)
        rows = np.repeat(np.arange(m), allcols.shape[1])
        self.onehot_t = sparse.csr_matrix(
            (np.ones(rows.size), (allcols.ravel(), rows)), shape=(offset, m))
        self.fn = fn
        self.ju: np.ndarray | None = None  # joint test: |e| per row and joint feature
        self.ju2: np.ndarray | None = None
        self.jkappa = 1.0

    def set_joint(self, u: np.ndarray, kappa: float = 1.0) -> None:
        """Resample the joint test's per-row statistics ``u`` (``(m, p)``) too; ``kappa`` is
        the reference error's inflation by coefficient error (1: sampling error only)."""
        self.ju = u
        self.ju2 = u ** 2
        self.jkappa = float(kappa)

    def joint_z(self, wb: np.ndarray, wa: np.ndarray, m: int, n: int,
                rng: np.random.Generator) -> np.ndarray:
        """``(batch, p)`` joint z of resampled windows (weights ``wa``, ``n`` rows) against
        resampled references (``wb``, ``m`` rows), as :class:`~.detector.DriftDetector` does.
        Resampling the rows gives the reference mean its sampling error; the coefficient
        error (``kappa - 1`` of it) is added as Gaussian noise, since the fit is not redone."""
        assert self.ju is not None and self.ju2 is not None
        rmean = wb.T @ self.ju / m
        rsd = np.sqrt(np.maximum(wb.T @ self.ju2 / m - rmean ** 2, 1e-24))
        if self.jkappa > 1.0:
            rmean = rmean + rsd * math.sqrt((self.jkappa - 1.0) / m) * \
                rng.standard_normal(rmean.shape)
        wmean = wa.T @ self.ju / n
        return (wmean - rmean) / (rsd * math.sqrt(1.0 / n + self.jkappa / m))

    def weights(self, rng: np.random.Generator, size: int, batch: int) -> np.ndarray:
        """``(m, batch)`` draw counts of ``batch`` bootstrap resamples of ``size`` rows."""
        draws = rng.integers(0, self.m, (batch, size)) + (np.arange(batch) * self.m)[:, None]
        return np.bincount(draws.ravel(), minlength=batch * self.m).reshape(
            batch, self.m).T.astype(np.float64)

    def stats(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                            list[np.ndarray]]:
        """Fine counts ``(B, Fn, FINE_BINS+1)``, sums, sums of squares, present counts, and
        categorical counts of the resamples with weights ``w``."""
        counts = np.asarray(self.onehot_t @ w).T
        batch = w.shape[1]
        fine = counts[:, : self.fn * (FINE_BINS + 1)].reshape(batch, self.fn, FINE_BINS + 1)
        cats = [counts[:, sl] for sl in self.cat_slices]
        return fine, w.T @ self.x0, w.T @ self.x0sq, w.T @ self.present, cats


def _pvalues(prof: Profile, rs: _Resampler, rng: np.random.Generator, m: int, n: int,
             batch: int) -> np.ndarray:
    """``(batch, dims)`` p-values (signed z for mean dims) of resampled reference/window pairs,
    then the joint test's signed z per joint feature when the resampler has one."""
    wb = rs.weights(rng, m, batch)
    bf, bsum, bsq, bcnt, bcat = rs.stats(wb)
    wa = rs.weights(rng, n, batch)
    af, asum, _, _, acat = rs.stats(wa)
    cnt = np.maximum(bcnt, 2.0)
    bmean = bsum / cnt
    var = (bsq - cnt * bmean ** 2) / (cnt - 1)
    bstd = np.sqrt(np.maximum(var, 0.0))
    bstd = np.where(bstd > 0, bstd, 1.0)
    nt = numeric_tests(prof, af, asum, float(n), bf, bmean, bstd)
    ct = categorical_tests(acat, bcat, float(n))
    num = np.stack([nt["p_ks"], nt["p_chi2"], nt["z_mean"], nt["p_missing"]], axis=-1)
    parts = [num.reshape(batch, -1)]
    if prof.cat:
        parts.append(np.stack([ct["p_chi2"], ct["p_missing"]], axis=-1).reshape(batch, -1))
    if rs.ju is not None:
        parts.append(rs.joint_z(wb, wa, m, n, rng))
    return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]


def _psd_factor(c: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(c)
    return v * np.sqrt(np.clip(w, 0.0, None))


def _max_quantile(c: np.ndarray, fold: np.ndarray, rate: float, rng: np.random.Generator,
                  base: np.ndarray | None = None) -> tuple[float, float]:
    """The (1 - rate) quantile of max(|Z_fold dims|, Z_other dims) with Z ~ N(0, c), and the
    same over the ``base`` dims only (all dims when ``base`` is None), from the same draws."""
    if len(c) == 0:
        return math.inf, math.inf
    base = np.ones(len(c), dtype=bool) if base is None else base
    a = _psd_factor(c)
    out, out_base = [], []
    remaining = _COPULA_DRAWS
    while remaining > 0:
        k = min(remaining, 20_000)
        g = rng.standard_normal((k, len(c))) @ a.T
        g = np.where(fold, np.abs(g), g)
        out.append(g.max(axis=1))
        out_base.append(g[:, base].max(axis=1, initial=-np.inf))
        remaining -= k
    return (float(np.quantile(np.concatenate(out), 1.0 - rate)),
            float(np.quantile(np.concatenate(out_base), 1.0 - rate)))


def _scan_maxima(a: np.ndarray, batch: int, n: int, m: float, rng: np.random.Generator,
                 horizons: tuple[int, ...]) -> np.ndarray:
    """``(batch, windows)`` scan statistic max_{f,L} |z_{f,L}| of ``batch`` simulated null
    streams whose dims have the correlation factor ``a``."""
    fn = a.shape[0]
    u = (rng.standard_normal((batch, _STREAM_WINDOWS, fn)) @ a.T) / math.sqrt(n)
    e = (rng.standard_normal((batch, 1, fn)) @ a.T) / math.sqrt(m)
    cs = np.cumsum(u, axis=1)
    best = np.zeros((batch, _STREAM_WINDOWS))
    for h in horizons:
        if h > _STREAM_WINDOWS:
            continue
        s = cs[:, h - 1:, :].copy()
        s[:, 1:, :] -= cs[:, :-h, :]
        z = (s / h - e) / math.sqrt(1.0 / (n * h) + 1.0 / m)
        zmax = np.abs(z).max(axis=2)
        best[:, h - 1:] = np.maximum(best[:, h - 1:], zmax)
    return best


def _sequential_threshold(blocks: list[np.ndarray], n: int, m: int | list[float], rate: float,
                          rng: np.random.Generator, horizons: tuple[int, ...],
                          progress: ProgressFn | None = None) -> tuple[float, float]:
    """Per-window (1 - rate) quantile of the scan statistic max_{f,L} |z_{f,L}| on simulated
    null streams (window means ~ N(0, C/n), one reference offset ~ N(0, C/m) per stream),
    over all dims and over the first block's only.

    ``blocks`` are correlation matrices simulated independently of each other: the feature
    means, then the joint test's mean |e| (nearly uncorrelated with the means; by Sidak's
    inequality, ignoring a correlation between blocks can only raise the quantile of the
    maximum of absolute values, so the threshold errs on the conservative side). ``m`` is the
    reference size, or one effective size per block (the joint block's is ``m / kappa``)."""
    if not blocks or len(blocks[0]) == 0:
        return math.inf, math.inf
    sizes = list(m) if isinstance(m, (list, tuple)) else [m] * len(blocks)
    factors = [(_psd_factor(c), mb) for c, mb in zip(blocks, sizes) if len(c)]
    maxima, maxima_first = [], []
    batch = 250
    for b in range(_STREAMS // batch):
        if progress is not None:
            progress("null streams", b * batch, _STREAMS)
        best = [_scan_maxima(a, batch, n, mb, rng, horizons) for a, mb in factors]
        maxima_first.append(best[0].ravel())
        maxima.append(np.maximum.reduce(best).ravel())
    if progress is not None:
        progress("null streams", _STREAMS, _STREAMS)
    return (float(np.quantile(np.concatenate(maxima), 1.0 - rate)),
            float(np.quantile(np.concatenate(maxima_first), 1.0 - rate)))


def _resample_scores(prof: Profile, rs: _Resampler, rng: np.random.Generator, m: int,
                     n: int, sims: int, signed: np.ndarray,
                     progress: ProgressFn | None) -> np.ndarray:
    """``(sims, dims)`` raw normal scores of resampled reference/window pairs."""
    raw = np.empty((sims, len(signed)))
    for i in range(0, sims, 100):
        if progress is not None:
            progress("resamples", i, sims)
        k = min(100, sims - i)
        raw[i:i + k] = normal_scores(_pvalues(prof, rs, rng, m, n, k), signed)
    if progress is not None:
        progress("resamples", sims, sims)
    return raw


def _tail_fit(raw: np.ndarray, dims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column of ``raw`` marked in ``dims``, the intercept and slope of its upper tail on
    the normal scale: a least-squares line through the top :data:`TAIL_FRACTION` of the sorted
    resampled scores against the normal quantiles of their plotting positions. ``(nan, nan)``
    for other columns and for tails with fewer than :data:`TAIL_MIN_DISTINCT` distinct values
    (too discrete to fit a line to; such a column keeps its mean and standard deviation)."""
    n = raw.shape[0]
    k = int(n * TAIL_FRACTION)
    a = np.full(raw.shape[1], np.nan)
    b = np.full(raw.shape[1], np.nan)
    if k < TAIL_MIN_DISTINCT:
        return a, b
    q = special.ndtri((np.arange(n - k, n) + 0.5) / n)
    qc = q - q.mean()
    cols = np.flatnonzero(dims)
    rows = np.ascontiguousarray(raw[:, cols].T)  # one row per column: fast partitions
    top = np.sort(np.partition(rows, n - k, axis=1)[:, n - k:], axis=1).T  # (k, cols)
    distinct = 1 + (np.diff(top, axis=0) > 0).sum(axis=0)
    slope = qc @ (top - top.mean(axis=0)) / (qc @ qc)
    ok = (distinct >= TAIL_MIN_DISTINCT) & (slope > 0)
    b[cols[ok]] = slope[ok]
    a[cols[ok]] = top.mean(axis=0)[ok] - slope[ok] * q.mean()
    return a, b


def _standardisation(raw: np.ndarray, mean_dims: np.ndarray, signed: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``mu``, ``sd``, the correlation of the live dims, and the live mask.

    Mean dims keep ``mu = 0`` (their z is centred by construction); joint dims keep their
    measured ``mu``. P-value dims get the line through their upper tail (:func:`_tail_fit`)
    instead of their mean and standard deviation, since the copula extrapolates that tail.
    Tests that cannot vary under the null (no missing values in the reference, say) keep their
    asymptotic scale: they only speak when something new happens."""
    mu = raw.mean(axis=0)
    sd = raw.std(axis=0, ddof=1)
    floor = float(-special.ndtri(1.0 - 1e-9)) + 1e-6  # the score of p = 1
    clipped = np.where(signed, 0.0, (raw <= floor).mean(axis=0))
    degenerate = (sd < 0.05) | (clipped > 0.5)
    ta, tb = _tail_fit(raw, ~signed & ~degenerate)
    fitted = np.isfinite(tb)
    mu = np.where(fitted, ta, mu)
    sd = np.where(fitted, tb, sd)
    mu = np.where(degenerate, 0.0, np.where(mean_dims, 0.0, mu))
    sd = np.where(degenerate, 1.0, sd)
    z = (raw - mu) / sd
    live = ~degenerate
    if live.sum() >= 2:
        corr = np.corrcoef(z[:, live], rowvar=False)
        corr = np.nan_to_num(corr, nan=0.0)
        np.fill_diagonal(corr, 1.0)
    else:
        corr = np.eye(int(live.sum()))
    return mu, sd, corr, live


def row_skew(x: np.ndarray) -> np.ndarray:
    """Sample skewness of each column of ``x`` (NaN ignored; 0 for a constant column)."""
    if x.shape[0] == 0:
        return np.zeros(x.shape[1])
    d = x - np.nanmean(x, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.nanmean(d ** 3, axis=0) / np.nanmean(d ** 2, axis=0) ** 1.5
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def window_skew(row_skew: np.ndarray, n: float, m: float, m_eff: float) -> np.ndarray:
    """Skewness of the joint test's z for a window of ``n`` rows against a reference of ``m``.

    ``z = (mean_n - mean_m) / (sd sqrt(1/n + 1/m_eff))``: the window mean's third cumulant is
    ``g sd^3 / n^2``, the reference mean's ``g sd^3 / m^2`` (subtracted), and the coefficient
    error that makes ``m_eff < m`` adds variance but no skew."""
    n, m, m_eff = max(float(n), 1.0), max(float(m), 1.0), max(float(m_eff), 1.0)
    return np.asarray(row_skew) * (n ** -2 - m ** -2) / (1.0 / n + 1.0 / m_eff) ** 1.5


def unskew(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """The standard normal score of ``x``, a standardised statistic with skewness ``g``.

    A statistic with a small skewness ``g`` is close to ``Z + (g / 6) (Z^2 - 1)`` with ``Z``
    standard normal (Cornish-Fisher, first order); this solves that for ``Z``, so that the
    calibration's Gaussian tails hold on both sides (a right-skewed statistic's upper tail is
    heavier, its lower lighter). Monotone in ``x``; beyond the quadratic's turning point (more
    than ``3 / |g|`` standard deviations on the light side) it continues linearly."""
    x = np.asarray(x, dtype=np.float64)
    g = np.clip(np.broadcast_to(np.asarray(g, dtype=np.float64), x.shape), -SKEW_MAX, SKEW_MAX)
    sign = np.where(g < 0, -1.0, 1.0)
    a = np.abs(g) / 6.0
    xs = sign * x
    safe = np.where(a > 1e-12, a, 1.0)
    disc = 1.0 + 4.0 * safe * (safe + xs)
    root = (np.sqrt(np.maximum(disc, 0.0)) - 1.0) / (2.0 * safe)
    vertex_x = -safe - 1.0 / (4.0 * safe)
    z = np.where(disc > 0, root, -1.0 / (2.0 * safe) + (xs - vertex_x))
    return np.where(a > 1e-12, sign * z, x)


def _row_corr(x: np.ndarray) -> np.ndarray:
    """Correlation of the columns of ``x`` (NaN filled with the column mean; 0 if constant)."""
    filled = np.where(np.isnan(x), np.nanmean(x, axis=0), x)
    p = x.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.corrcoef(filled, rowvar=False).reshape(p, p)
    c = np.nan_to_num(c, nan=0.0)
    np.fill_diagonal(c, 1.0)
    return c


def _check_targets(window_size: int, target_windows: float) -> None:
    """Refuse a window too small to test or a false-alarm target of one window or fewer."""
    if window_size < 10:
        raise ConfigError(f"window_size must be at least 10 records, got {window_size}")
    if not target_windows > 1:
        raise ConfigError(f"target_windows must be > 1 (one false alarm per N windows), "
                          f"got {target_windows}")


def _fit_joint(prof: Profile, rs: _Resampler, joint: bool, seed: int) -> JointModel | None:
    """The joint test's model (``None``: not asked for, or too few usable numeric features);
    ``rs`` then resamples its leave-one-out residuals too, with the measured inflation of the
    reference error (its own generator: the other draws stay as they were)."""
    if not (joint and prof.num):
        return None
    x = prof.joint_sample
    model = JointModel.fit(x, prof.joint_names) if x.shape[0] == rs.m else None
    if model is not None:
        kappa = model.reference_inflation(x, np.random.default_rng([seed, 1]))
        rs.set_joint(model.loo_residuals(x), kappa)
    return model


def _window_threshold(corr: np.ndarray, signed: np.ndarray, live: np.ndarray,
                      joint_dims: np.ndarray, window_rate: float, rng: np.random.Generator
                      ) -> tuple[float, float]:
    """The per-window threshold over all dims and over the per-feature dims alone (see
    :func:`_max_quantile`), Bonferroni's bound where the simulation gives none."""
    threshold, base = _max_quantile(corr, signed[live], window_rate, rng, ~joint_dims[live])
    bonferroni = float(-special.ndtri(window_rate / max(len(signed), 1)))
    threshold = threshold if math.isfinite(threshold) else bonferroni
    base = base if math.isfinite(base) else bonferroni
    return threshold, base


def _sequential_thresholds(rs: _Resampler, window_size: int, m: int, rate: float,
                           rng: np.random.Generator, progress: ProgressFn | None
                           ) -> tuple[float, float]:
    """The sequential scan's threshold over the feature means and the joint test's mean |e|
    (when there is one), and over the feature means alone (see :func:`_sequential_threshold`)."""
    blocks = [_row_corr(rs.x_std)] + ([_row_corr(rs.ju)] if rs.ju is not None else [])
    sizes = [float(m), m / rs.jkappa][:len(blocks)]
    return _sequential_threshold(blocks, window_size, sizes, rate, rng, HORIZONS, progress)


def _check_seed(seed: object) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        # numpy's own error ("expected non-negative integer") named no argument
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")


def calibrate(ref: Reference, *, window_size: int = 1000, target_windows: float = 1000.0,
              sims: int | None = None, seed: int = 0, sequential: bool = True,
              joint: bool = True, progress: ProgressFn | None = None) -> Calibration:
    """Calibrate the per-window and sequential thresholds of ``ref`` (see the module notes).

    Parameters
    ----------
    window_size:
        Records per window the thresholds are for (time windows: their typical size).
    target_windows:
        One false alarm per this many unshifted windows, all features and tests together
        (the joint test included).
    sims:
        Resamples for the standardisation and correlations (default 2000).
    joint:
        Calibrate the joint test (:mod:`.multivariate`) too, when the reference has a
        numeric input feature and at least one more usable input column (numeric, or a
        categorical level's indicator: :mod:`.indicators`).
    progress:
        Called as ``progress(stage, done, total)`` as the work goes on (``"resamples"`` of
        ``sims``, then ``"null streams"`` for the sequential threshold); it does not change the
        result.
    """
    _check_targets(window_size, target_windows)
    _check_seed(seed)
    t0 = time.perf_counter()
    sims = 2000 if sims is None else int(sims)
    prof = Profile(ref)
    rs = _Resampler(prof)
    rng = np.random.default_rng(seed)
    m = min(ref.records, rs.m) if ref.records > 0 else rs.m
    model = _fit_joint(prof, rs, joint, seed)
    pj = model.dims if model is not None else 0
    joint_dims = np.concatenate([np.zeros(len(prof.dims), bool), np.ones(pj, bool)])
    mean_dims = np.concatenate([prof.mean_dims, np.zeros(pj, bool)])
    signed = mean_dims | joint_dims
    raw = _resample_scores(prof, rs, rng, m, window_size, sims, signed, progress)
    mu, sd, corr, live = _standardisation(raw, mean_dims, signed)
    rate = 1.0 / target_windows
    seq_share = SEQUENTIAL_SHARE if sequential and prof.num else 0.0
    threshold, base = _window_threshold(corr, signed, live, joint_dims,
                                        rate * (1.0 - seq_share), rng)
    seq_threshold = base_seq = math.inf
    if sequential and prof.num:
        seq_threshold, base_seq = _sequential_thresholds(rs, window_size, m, rate * seq_share,
                                                         rng, progress)
    ju = rs.ju if rs.ju is not None else np.zeros((1, 0))
    return Calibration(window_size=window_size, target_windows=float(target_windows),
                       sims=sims, seed=seed, mu=[float(v) for v in mu],
                       sd=[float(v) for v in sd], threshold=threshold,
                       seq_threshold=seq_threshold, horizons=list(HORIZONS),
                       reference_records=m, seconds=time.perf_counter() - t0,
                       joint_features=list(model.names) if model is not None else [],
                       joint_mean=[float(v) for v in ju.mean(axis=0)],
                       joint_sd=[float(v) for v in ju.std(axis=0)],
                       joint_skew=[float(v) for v in row_skew(ju)],
                       joint_inflation=rs.jkappa,
                       base_threshold=base, base_seq_threshold=base_seq,
                       location_scale=LOCATION_SCALE)
