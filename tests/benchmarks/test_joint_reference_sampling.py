"""The joint drift test's reference sampling error is what its z assumes.

The joint test compares a window's mean ``|e|`` per feature with the reference's leave-one-out
mean, with variance ``var(|e|) (1/n + 1/m)``. The ``1/m`` term claims that the reference's own
error is ordinary sampling error of ``m`` rows: the mean ``|e|`` of the population under the
reference's fitted regression minus the reference's leave-one-out mean, in units of
``sd(|e|) / sqrt(m)``, should have mean 0 and standard deviation 1 across references. These tests
measure that across references drawn from a population of 200,000 rows (docs/drift-joint.md,
"Wine at 1/1000, rerun with more references").

* At ``m`` = 5000 (the benchmark's references, wine resampled with jitter) it holds. An
  earlier guess that a 178-row data set resampled to 5000 rows adds coefficient error was
  measured wrong here: the wine reference that alarmed on 47% of its unshifted windows sits
  4.9 standard errors off through ordinary sampling error.
* At ``m`` = 300 the leave-one-out correction matters: in-sample residuals would put the mean
  at about +1.2.
* With many features for few rows (60 features, 300 rows) the regression's coefficient error
  adds to the sampling error: the spread is about 1.2 in units of the ``1/m`` term and about 1
  in units of the ``kappa / m`` term that :meth:`JointModel.reference_inflation` measures.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

np = pytest.importorskip("numpy")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.drift_detection import N_REF, dataset, make_window  # noqa: E402
from lrwatch.daemon.multivariate import JointModel  # noqa: E402


def _offsets(draw, names, m: int, refs: int, inflated: bool = False) -> np.ndarray:
    """``(refs, p)``: population mean ``|e|`` under each reference's fit minus its
    leave-one-out mean, in standard errors of an ``m``-row mean; with ``inflated``, also the
    same in standard errors of an ``m / kappa``-row mean (the reference's measured ``kappa``)."""
    pop = draw(np.random.default_rng(123), 100_000)
    out, scaled = [], []
    for r in range(refs):
        xr = draw(np.random.default_rng(9000 + r), m)
        model = JointModel.fit(xr, names)
        assert model is not None
        loo = model.loo_residuals(xr)
        out.append((model.residuals(pop).mean(axis=0) - loo.mean(axis=0))
                   / (loo.std(axis=0) / math.sqrt(m)))
        if inflated:
            scaled.append(out[-1] / math.sqrt(model.reference_inflation(
                xr, np.random.default_rng(r))))
    return (np.asarray(out), np.asarray(scaled)) if inflated else np.asarray(out)


def _wine():
    x, cat, names = dataset("wine")
    return (lambda rng, k: make_window(x, cat, rng, k, "none", 0.1)[0]), names


@pytest.mark.parametrize("m", [N_REF, 300])
def test_reference_error_of_the_joint_test_is_sampling_error(m: int) -> None:
    draw, names = _wine()
    d = _offsets(draw, names, m, refs=40)
    # 520 offsets (13 correlated features x 40 references): mean within 0.4 of 0, sd 0.8-1.25
    assert abs(d.mean()) < 0.4, d.mean()
    assert 0.8 < d.std() < 1.25, d.std()


def test_the_unlucky_wine_reference_is_far_off_by_sampling_alone() -> None:
    x, cat, names = dataset("wine")
    xr = make_window(x, cat, np.random.default_rng(1090), N_REF, "none", 0.1)[0]
    pop = make_window(x, cat, np.random.default_rng(5), 100_000, "none", 0.1)[0]
    fit = JointModel.fit(pop, names)  # the population's own regression: no reference fit at all
    u = fit.residuals(pop)[:, names.index("f07")]
    z = (fit.residuals(xr)[:, names.index("f07")].mean() - u.mean()) / (u.std() / math.sqrt(N_REF))
    assert z < -4.0, z


def _factor_model(p: int):
    a = np.random.default_rng(7).standard_normal((p, 3))
    return lambda rng, k: rng.standard_normal((k, 3)) @ a.T + rng.standard_normal((k, p)) * 0.7


def test_many_features_per_row_need_the_coefficient_error() -> None:
    draw, names = _factor_model(60), [f"f{j}" for j in range(60)]
    plain, inflated = _offsets(draw, names, 300, refs=40, inflated=True)
    # 1/m alone: about 1.2 (coefficient error left out); kappa/m: about 1.04
    assert plain.std() > 1.12, plain.std()
    assert 0.85 < inflated.std() < 1.1, inflated.std()


def test_the_inflation_is_negligible_for_a_large_reference() -> None:
    draw, names = _wine()
    xr = draw(np.random.default_rng(3), N_REF)
    model = JointModel.fit(xr, names)
    assert model is not None
    # bounded by 1 + 4 p m / (m - p)^2 = 1.0104 at 13 features and 5000 rows
    assert 1.0 <= model.reference_inflation(xr, np.random.default_rng(0)) <= 1.0105
