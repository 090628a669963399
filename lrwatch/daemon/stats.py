"""Per-window drift tests and effect sizes, vectorised across features.

Every test works on histograms, which is what makes a 31-feature window cost about a
millisecond: a numeric feature is binned once on the reference's quantile edges
(:data:`~.reference.FINE_BINS` bins) and every statistic comes from the two histograms.

Tests, chosen by feature type (and, for the chi-square, by size: bins are grouped so that each
cell expects records):

* numeric: two-sample Kolmogorov-Smirnov on the binned CDFs (asymptotic p-value with the
  effective size ``n*m/(n+m)``), a two-sample chi-square on :data:`~.reference.COARSE_BINS`
  grouped bins (catches scale and shape changes), and a z-test of the mean with the reference
  standard deviation and variance ``sigma^2 (1/n + 1/m)`` (the most powerful test for location
  shifts), on the reference's normal scores (:mod:`.scale`: calibrated on heavy tails too);
* categorical / binary: a two-sample chi-square over the reference categories plus one cell for
  unseen categories;
* every feature: a two-proportion z-test of its missing-value rate.

Effect sizes: PSI and Jensen-Shannon distance (base 2) on the grouped bins, and the Wasserstein
distance in reference standard deviations (numeric). Rates: missing, out of the reference range,
unseen category.

All p-values are *asymptotic*; :mod:`.calibrate` measures how far each is from uniform on
resampled reference windows and turns them into one calibrated score per window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from itertools import repeat
from typing import Any, Sequence

import numpy as np
from scipy import special

from .indicators import IndicatorColumns
from .multivariate import MIN_ROWS_PER_FEATURE
from .reference import COARSE_BINS, FINE_BINS, PREDICTION, FeatureProfile, Reference, cat_key
from .scale import NormalScores

__all__ = ["Profile", "WindowTests", "numeric_tests", "categorical_tests", "TESTS_NUMERIC",
           "TESTS_CATEGORICAL"]

TESTS_NUMERIC = ("ks", "chi2", "mean", "missing")
TESTS_CATEGORICAL = ("chi2", "missing")
_EPS = 1e-4
_GROUP = FINE_BINS // COARSE_BINS


class Profile:
    """A :class:`Reference` compiled into arrays for the tests.

    ``num`` and ``cat`` list the feature profiles by kind (numeric first); ``dims`` names the
    per-window test dimensions ``(feature, test)`` in the order :meth:`WindowTests.pvalues` uses.
    """

    def __init__(self, ref: Reference) -> None:
        self.reference = ref
        self.num: list[FeatureProfile] = [f for f in ref.features if f.numeric]
        self.cat: list[FeatureProfile] = [f for f in ref.features if not f.numeric]
        self.num_names = [f.name for f in self.num]
        self.cat_names = [f.name for f in self.cat]
        fn = len(self.num)
        self.edges = [np.asarray(f.edges, dtype=np.float64) for f in self.num]
        self.ref_fine = np.array([f.counts for f in self.num], dtype=np.float64).reshape(
            fn, FINE_BINS)
        self.ref_missing = np.array([f.missing for f in self.num], dtype=np.float64)
        self.ref_mean = np.array([f.mean for f in self.num], dtype=np.float64)
        self.ref_std = np.array([f.std for f in self.num], dtype=np.float64)
        self.lo = np.array([f.min for f in self.num], dtype=np.float64)
        self.hi = np.array([f.max for f in self.num], dtype=np.float64)
        # widths between consecutive inner edges, for the Wasserstein distance
        self.widths = np.array([np.diff(e) for e in self.edges]).reshape(fn, FINE_BINS - 2)
        # features whose inner edges coincide (one value in >= 95% of the reference: a
        # constant, a sparse count): no width for the binned Wasserstein distance to span
        self.point = np.array([j for j, e in enumerate(self.edges) if len(e) and e[0] == e[-1]],
                              dtype=np.int64)
        self.codes: list[dict[str, int]] = [
            {k: i for i, k in enumerate(f.categories)} for f in self.cat]
        # categorical counts: known categories..., unseen, then missing last
        self.ref_cat = [np.array(list(f.categories.values()) + [0, f.missing], dtype=np.float64)
                        for f in self.cat]
        self.dims: list[tuple[str, str]] = (
            [(n, t) for n in self.num_names for t in TESTS_NUMERIC]
            + [(n, t) for n in self.cat_names for t in TESTS_CATEGORICAL])
        self.mean_dims = np.array([t == "mean" for _, t in self.dims])

    # --- the location scale (:mod:`.scale`), fitted on first use --------------------------------
    @cached_property
    def sample_x(self) -> np.ndarray:
        """The reference's row sample of the numeric features, ``(m, Fn)`` with NaN missing
        (``(0, Fn)`` when the reference keeps no sample)."""
        cols = self.reference.sample
        m = min((len(cols[n]) for n in self.num_names if n in cols), default=0)
        if any(n not in cols for n in self.num_names):
            m = 0
        x = np.empty((m, len(self.num)), dtype=np.float64)
        for j, name in enumerate(self.num_names):
            x[:, j] = [float(v) if type(v) in (int, float) else math.nan
                       for v in cols[name][:m]]
        return x

    @cached_property
    def location(self) -> NormalScores:
        """Each numeric feature's map to reference normal scores (:mod:`.scale`)."""
        return NormalScores.fit(self.sample_x, self.ref_mean, self.ref_std)

    @cached_property
    def point_tails(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For the :attr:`point` features: the value ``c`` that fills their inner bins, and
        the reference's mean ``(c - x)+`` and ``(x - c)+`` (from the row sample; 0 without
        one), for :func:`_point_wasserstein`."""
        c = np.array([self.edges[j][0] for j in self.point], dtype=np.float64)
        below, above = _tail_means(self.sample_x[:, self.point], c)
        return c, below, above

    # --- the joint test's input: numeric features on the location scale, then indicators -----
    @cached_property
    def indicators(self) -> IndicatorColumns:
        """The categorical input features' indicator columns (:mod:`.indicators`); none when
        the reference sample lacks their columns."""
        cols = self.reference.sample
        m = self.sample_x.shape[0]
        usable = m > 0 and all(len(cols.get(n) or ()) >= m for n in self.cat_names)
        numeric = len(self.num_names) - (PREDICTION in self.num_names)
        return IndicatorColumns.choose(
            self.cat_names, [list(f.categories) for f in self.cat],
            [c[:-2] for c in self.ref_cat],
            skip=self.cat_names if not usable else [PREDICTION],
            budget=(m - 20) // MIN_ROWS_PER_FEATURE - numeric)

    @cached_property
    def joint_names(self) -> list[str]:
        """Column names of :meth:`joint_input`: numeric features, then indicators."""
        return self.num_names + self.indicators.names

    @cached_property
    def joint_sample(self) -> np.ndarray:
        """The reference sample as the joint test sees it (:meth:`joint_input` of its rows)."""
        m = self.sample_x.shape[0]
        codes = [self.encode(j, self.reference.sample[n][:m])
                 for j, n in enumerate(self.cat_names)] if self.indicators.width else []
        return self.joint_input(self.location.apply(self.sample_x), codes)

    def joint_input(self, xt: np.ndarray, codes: Sequence[np.ndarray]) -> np.ndarray:
        """``(n, len(joint_names))``: the numeric window on the location scale ``xt`` with the
        indicator columns of the categorical code arrays ``codes`` appended."""
        if not self.indicators.width:
            return xt
        return np.hstack([xt, self.indicators.matrix(codes, xt.shape[0])])

    @cached_property
    def loc_moments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mean, standard deviation and count of the reference sample on the location scale.

        The count is the reference size the location tests' ``1/m`` term must use: the map is
        fitted on the sample (at most :data:`~.reference.SAMPLE_ROWS` rows), so the reference
        mean on that scale carries the sample's error, not the error of all the records the
        histograms were built from. Without a sample: the fallback map standardises the raw
        values with the profile's mean and standard deviation, of all its records."""
        xt = self.location.apply(self.sample_x)
        fn = len(self.num)
        if xt.shape[0] < 2:
            return np.zeros(fn), np.ones(fn), self.ref_fine.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.nanmean(xt, axis=0)
            sd = np.nanstd(xt, axis=0, ddof=1)
        ok = np.isfinite(mean) & np.isfinite(sd) & (sd > 0)
        count = (~np.isnan(xt)).sum(axis=0).astype(np.float64)
        return np.where(ok, mean, 0.0), np.where(ok, sd, 1.0), count

    # --- binning -----------------------------------------------------------------------------
    def bin_numeric(self, x: np.ndarray, xs: np.ndarray | None = None) -> np.ndarray:
        """Fine-bin counts with the missing count appended: shape ``(Fn, FINE_BINS + 1)``.

        ``x`` is ``(n, Fn)`` float64 with NaN for missing; ``xs``, when given, is ``x.T``
        already sorted per row (:meth:`.NormalScores.sort_and_apply`). One vectorised sort of
        the window (NaN sorts last) and then a tiny search of each feature's edges among its
        sorted values is about 2.5x faster than searching every value among the edges. The
        rows are copied out contiguous first: sorting the rows of the transposed view directly
        is ~25% slower.
        """
        n, fn = x.shape
        if xs is None:
            xs = x.T.copy(order="C")
            xs.sort(axis=1)
        present = n - np.isnan(xs).sum(axis=1)
        # cum[j, k]: values in bins 0..k, i.e. below edge k (a value equal to an edge belongs
        # to the bin above it, as with searchsorted(edges, v, side="right"))
        cum = np.empty((fn, FINE_BINS), dtype=np.int64)
        for j in range(fn):
            cum[j, :FINE_BINS - 1] = np.searchsorted(xs[j, :present[j]], self.edges[j],
                                                     side="left")
        cum[:, FINE_BINS - 1] = present
        out = np.empty((fn, FINE_BINS + 1), dtype=np.float64)
        out[:, 0] = cum[:, 0]
        out[:, 1:FINE_BINS] = np.diff(cum[:, :FINE_BINS], axis=1)
        out[:, FINE_BINS] = n - present
        return out

    def encode(self, j: int, values: Sequence[Any]) -> np.ndarray:
        """Category codes of feature ``cat[j]``: known codes, ``K`` unseen, ``K+1`` missing."""
        codes = self.codes[j]
        k = len(codes)
        if set(map(type, values)) == {str}:  # the common case: one C-level pass
            return np.fromiter(map(codes.get, values, repeat(k)), dtype=np.int64,
                               count=len(values))
        get = codes.get
        out = np.empty(len(values), dtype=np.int64)
        for i, v in enumerate(values):
            key = cat_key(v)
            out[i] = k + 1 if key is None else get(key, k)
        return out


def _two_sample_chi2(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-sample chi-square over the last axis of count arrays ``a`` (window), ``b`` (ref)."""
    na = a.sum(axis=-1, keepdims=True)
    nb = b.sum(axis=-1, keepdims=True)
    tot = a + b
    n = np.maximum(na + nb, 1.0)
    ea = tot * (na / n)
    eb = tot * (nb / n)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(tot > 0, (a - ea) ** 2 / np.where(ea > 0, ea, 1.0)
                         + (b - eb) ** 2 / np.where(eb > 0, eb, 1.0), 0.0)
    stat = terms.sum(axis=-1)
    df = (tot > 0).sum(axis=-1) - 1.0
    ok = (df >= 1) & (na[..., 0] > 0) & (nb[..., 0] > 0)
    p = np.where(ok, special.chdtrc(np.maximum(df, 1.0), stat), 1.0)
    return np.where(ok, stat, 0.0), p


def _psi_js(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pa = a / np.maximum(a.sum(axis=-1, keepdims=True), 1.0)
    pb = b / np.maximum(b.sum(axis=-1, keepdims=True), 1.0)
    qa = np.maximum(pa, _EPS)
    qb = np.maximum(pb, _EPS)
    psi = ((qa - qb) * np.log(qa / qb)).sum(axis=-1)
    m = 0.5 * (pa + pb)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_a = np.where(pa > 0, pa * np.log2(pa / np.where(m > 0, m, 1.0)), 0.0).sum(axis=-1)
        kl_b = np.where(pb > 0, pb * np.log2(pb / np.where(m > 0, m, 1.0)), 0.0).sum(axis=-1)
    js = np.sqrt(np.clip(0.5 * (kl_a + kl_b), 0.0, 1.0))
    return psi, js


def _missing_test(xa: np.ndarray, na: float | np.ndarray, xb: np.ndarray,
                  nb: float | np.ndarray) -> np.ndarray:
    pooled = (xa + xb) / (na + nb)
    var = pooled * (1 - pooled) * (1 / na + 1 / nb)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(var > 0, (xa / na - xb / nb) / np.sqrt(np.where(var > 0, var, 1.0)), 0.0)
    return special.erfc(np.abs(z) / math.sqrt(2))


@dataclass
class WindowTests:
    """Every per-window test and effect of one window (arrays by feature, numeric then cat)."""

    n: int
    # numeric, shape (Fn,)
    ks: np.ndarray
    p_ks: np.ndarray
    chi2: np.ndarray
    p_chi2: np.ndarray
    z_mean: np.ndarray
    p_mean: np.ndarray
    p_missing: np.ndarray
    psi: np.ndarray
    js: np.ndarray
    wasserstein: np.ndarray  # in reference standard deviations
    missing_ratio: np.ndarray
    mean_shift: np.ndarray  # (window mean - reference mean) / reference std, location scale
    sums: np.ndarray  # sum of present values on the location scale, for the sequential tests
    present: np.ndarray  # count of present values
    # categorical, shape (Fc,)
    c_chi2: np.ndarray
    c_p_chi2: np.ndarray
    c_p_missing: np.ndarray
    c_psi: np.ndarray
    c_js: np.ndarray
    c_missing_ratio: np.ndarray
    c_unseen_ratio: np.ndarray
    out_of_range: np.ndarray | None = None

    def pvalues(self) -> np.ndarray:
        """P-values in :attr:`Profile.dims` order (the mean test as its signed z instead)."""
        num = np.stack([self.p_ks, self.p_chi2, self.z_mean, self.p_missing], axis=1).ravel()
        cat = np.stack([self.c_p_chi2, self.c_p_missing], axis=1).ravel()
        return np.concatenate([num, cat])


def numeric_tests(prof: Profile, a: np.ndarray, asum: np.ndarray, n_total: float,
                  b: np.ndarray | None = None, bmean: np.ndarray | None = None,
                  bstd: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Numeric tests from window fine counts ``a`` (``(..., Fn, FINE_BINS+1)``, missing last)
    and the sums of present values on the location scale ``(..., Fn)`` (:mod:`.scale`).
    ``b``/``bmean``/``bstd`` default to the reference's; calibration passes resampled ones,
    with a leading batch axis."""
    if b is None:
        bfine, bmiss = prof.ref_fine, prof.ref_missing
        bmean, bstd, bcount = prof.loc_moments
    else:
        bfine, bmiss = b[..., :FINE_BINS], b[..., FINE_BINS]
        assert bmean is not None and bstd is not None
        bcount = bfine.sum(axis=-1)  # resampled from the sample: its size
    afine, amiss = a[..., :FINE_BINS], a[..., FINE_BINS]
    na = afine.sum(axis=-1)
    nb = bfine.sum(axis=-1)
    sa = np.maximum(na, 1.0)
    sb = np.maximum(nb, 1.0)
    cdf = np.cumsum(afine, axis=-1) / sa[..., None] - np.cumsum(bfine, axis=-1) / sb[..., None]
    acdf = np.abs(cdf)
    d = acdf.max(axis=-1)
    ne = na * nb / np.maximum(na + nb, 1.0)
    p_ks = np.where(na > 0, special.kolmogorov(d * np.sqrt(ne)), 1.0)
    ac = afine.reshape(*afine.shape[:-1], COARSE_BINS, _GROUP).sum(axis=-1)
    bc = bfine.reshape(*bfine.shape[:-1], COARSE_BINS, _GROUP).sum(axis=-1)
    chi, p_chi = _two_sample_chi2(ac, bc)
    mean_w = asum / sa
    shift = (mean_w - bmean) / bstd
    z = np.where(na > 0, shift / np.sqrt(1.0 / sa + 1.0 / np.maximum(bcount, 1.0)), 0.0)
    p_mean = special.erfc(np.abs(z) / math.sqrt(2))
    p_miss = _missing_test(amiss, n_total, bmiss, nb + bmiss)
    psi, js = _psi_js(ac, bc)
    wass = (acdf[..., :-2] * prof.widths).sum(axis=-1) / prof.ref_std
    return {"ks": d, "p_ks": p_ks, "chi2": chi, "p_chi2": p_chi, "z_mean": z, "p_mean": p_mean,
            "p_missing": p_miss, "psi": psi, "js": js, "wasserstein": wass,
            "missing_ratio": amiss / max(n_total, 1.0), "mean_shift": np.where(na > 0, shift, 0.0),
            "present": na}


def categorical_tests(a: list[np.ndarray], b: list[np.ndarray],
                      n_total: float) -> dict[str, np.ndarray]:
    """Categorical tests from per-feature counts ``[known..., unseen, missing]`` (each may have
    a leading batch axis); results are ``(..., Fc)``."""
    cols: dict[str, list[np.ndarray]] = {k: [] for k in (
        "chi2", "p_chi2", "p_missing", "psi", "js", "missing_ratio", "unseen_ratio")}
    for aj, bj in zip(a, b):
        chi, p = _two_sample_chi2(aj[..., :-1], bj[..., :-1])
        psi, js = _psi_js(aj[..., :-1], bj[..., :-1])
        cols["chi2"].append(chi)
        cols["p_chi2"].append(p)
        cols["psi"].append(psi)
        cols["js"].append(js)
        cols["p_missing"].append(_missing_test(aj[..., -1], n_total, bj[..., -1],
                                               bj.sum(axis=-1)))
        cols["missing_ratio"].append(aj[..., -1] / max(n_total, 1.0))
        cols["unseen_ratio"].append(aj[..., -2] / max(n_total, 1.0))
    if not a:
        return {k: np.zeros(0) for k in cols}
    return {k: np.stack(v, axis=-1) for k, v in cols.items()}


def _tail_means(x: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column of ``x`` (NaN missing), the mean of ``(c - x)+`` and of ``(x - c)+`` over
    its present values (0 when none is)."""
    present = np.maximum((~np.isnan(x)).sum(axis=0), 1)
    d = x - c
    return (np.nansum(np.maximum(-d, 0.0), axis=0) / present,
            np.nansum(np.maximum(d, 0.0), axis=0) / present)


def _point_wasserstein(prof: Profile, x: np.ndarray, wass: np.ndarray) -> np.ndarray:
    """``wass`` with the distance of each :attr:`Profile.point` feature measured beyond its
    value ``c`` too. Its inner bins have no width, so the binned distance reads 0 whatever the
    window (``x``) holds, and the effect gate kept every alarm of such a feature off. Below
    ``c`` the distance is at least ``|E_w (c - X)+ - E_ref (c - X)+|``, above it likewise
    (``|integral of F_w - F_ref|``): exact for a constant reference."""
    j = prof.point
    c, ref_below, ref_above = prof.point_tails
    below, above = _tail_means(x[:, j], c)
    out = wass.copy()
    out[j] = np.maximum(wass[j], (np.abs(below - ref_below) + np.abs(above - ref_above))
                        / prof.ref_std[j])
    return out


def window_tests(prof: Profile, x: np.ndarray, cats: list[np.ndarray],
                 located: tuple[np.ndarray, np.ndarray] | None = None) -> WindowTests:
    """All tests of one live window: ``x`` is ``(n, Fn)`` float64 (NaN missing), ``cats`` the
    code arrays of :meth:`Profile.encode`; ``located`` is
    ``prof.location.sort_and_apply(x)`` (computed here when not given): ``x`` sorted per
    feature, and ``x`` on the location scale."""
    n = x.shape[0] if prof.num else (len(cats[0]) if cats else 0)
    if not prof.num:
        a, asum = np.zeros((0, FINE_BINS + 1)), np.zeros(0)
    else:
        xs, xt = located if located is not None else prof.location.sort_and_apply(x)
        a = prof.bin_numeric(x, xs)
        asum = np.nansum(xt, axis=0)
    nt = numeric_tests(prof, a, asum, float(n))
    if len(prof.point):
        nt["wasserstein"] = _point_wasserstein(prof, x, nt["wasserstein"])
    with np.errstate(invalid="ignore"):
        oor = ((x < prof.lo) | (x > prof.hi)).sum(axis=0) / max(n, 1) if prof.num else np.zeros(0)
    ca = [np.bincount(c, minlength=len(prof.codes[j]) + 2).astype(np.float64)
          for j, c in enumerate(cats)]
    ct = categorical_tests(ca, prof.ref_cat, float(n))
    return WindowTests(
        n=n, ks=nt["ks"], p_ks=nt["p_ks"], chi2=nt["chi2"], p_chi2=nt["p_chi2"],
        z_mean=nt["z_mean"], p_mean=nt["p_mean"], p_missing=nt["p_missing"], psi=nt["psi"],
        js=nt["js"], wasserstein=nt["wasserstein"], missing_ratio=nt["missing_ratio"],
        mean_shift=nt["mean_shift"], sums=asum, present=nt["present"],
        c_chi2=ct["chi2"], c_p_chi2=ct["p_chi2"], c_p_missing=ct["p_missing"], c_psi=ct["psi"],
        c_js=ct["js"], c_missing_ratio=ct["missing_ratio"], c_unseen_ratio=ct["unseen_ratio"],
        out_of_range=oor)
