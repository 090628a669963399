"""The input-disagreement signal (``lrwatch.daemon.agreement``) on streams outside
``benchmarks/performance_estimation.py``: generated data sets (scikit-learn's Hastie, Gaussian
quantiles, blobs, moons and circles with extra uninformative inputs), under model families the
benchmark does not have (k-NN, AdaBoost, extra trees, a depth-6 tree, QDA, SGD logistic), with
references of 3000 fresh labelled rows and windows of 500 fresh rows (no jitter, no reuse of
rows: the null is exact here).

Per case: 10 unshifted windows (alarms of ``z > 4``, the serving pack's threshold, and of the
confidence rule ``drop_z >= 3 and drop >= 0.02``), then 6 windows of noisier inputs (Gaussian
noise added to every input, the smallest of 0.25, 0.5, 1, 1.5, 2 input standard deviations
that costs >= 4 points on a probe): flagged within 2 windows by either rule, when the realised
accuracy fell >= 3 points. Nothing is tuned here.

    python benchmarks/disagreement_outside.py      # ~5 min on two busy cores
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

if __package__ in (None, ""):            # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

REFERENCE, WINDOW, NULL_WINDOWS, DROP_WINDOWS = 3000, 500, 10, 6
LEVELS = (0.25, 0.5, 1.0, 1.5, 2.0)
Z = 4.0


def generator(name: str):
    """``draw(n, rng) -> (x, y)`` of a generated family (extra inputs are pure noise)."""
    from sklearn import datasets as ds

    def pad(x: np.ndarray, rng: np.random.Generator, extra: int) -> np.ndarray:
        return np.hstack([x, rng.standard_normal((len(x), extra))])

    def draw(n: int, rng: np.random.Generator):
        seed = int(rng.integers(2 ** 31))
        if name == "hastie":
            x, y = ds.make_hastie_10_2(n, random_state=seed)
            return x, (y > 0).astype(int)
        if name == "quantiles":
            return ds.make_gaussian_quantiles(n_samples=n, n_features=6, n_classes=3,
                                              random_state=seed)
        if name == "blobs":
            x, y = ds.make_blobs(n, n_features=8, centers=np.random.default_rng(0).normal(
                0, 2.5, (5, 8)), cluster_std=2.0, random_state=seed)
            return x, y
        if name == "moons":
            x, y = ds.make_moons(n, noise=0.3, random_state=seed)
            return pad(x, rng, 4), y
        x, y = ds.make_circles(n, noise=0.15, factor=0.5, random_state=seed)
        return pad(x, rng, 4), y
    return draw


def model(name: str) -> Any:
    from sklearn.discriminant_analysis import QuadraticDiscriminantAnalysis
    from sklearn.ensemble import AdaBoostClassifier, ExtraTreesClassifier
    from sklearn.linear_model import SGDClassifier
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.tree import DecisionTreeClassifier

    return {"knn": make_pipeline(StandardScaler(), KNeighborsClassifier(25)),
            "adaboost": AdaBoostClassifier(n_estimators=100, random_state=0),
            "extratrees": ExtraTreesClassifier(200, min_samples_leaf=3, random_state=0),
            "tree": DecisionTreeClassifier(max_depth=6, random_state=0),
            "qda": QuadraticDiscriminantAnalysis(reg_param=0.05),
            "sgd": make_pipeline(StandardScaler(), SGDClassifier(loss="log_loss",
                                                                 random_state=0))}[name]


def proba(m: Any, x: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = m.predict_proba(x)
    return p[:, 1] if p.shape[1] == 2 else p


def accuracy(p: np.ndarray, y: np.ndarray) -> float:
    return float((((p >= 0.5).astype(int) if p.ndim == 1 else p.argmax(1)) == y).mean())


def run_case(gen: str, mname: str, seed: int) -> dict[str, Any]:
    from lrwatch.daemon.agreement import InputDisagreement
    from lrwatch.daemon.estimation import PerformanceEstimator

    rng = np.random.default_rng(seed)
    draw = generator(gen)
    xt, yt = draw(4000, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = model(mname).fit(xt, yt)
    xr, yr = draw(REFERENCE, rng)
    pr = proba(m, xr)
    est = PerformanceEstimator.fit(pr, yr)
    mon = InputDisagreement.fit([str(i) for i in range(xr.shape[1])], xr, pr, yr, est.n_classes)
    sd = xt.std(axis=0)

    def window(level: float, n: int = WINDOW):
        x, y = draw(n, rng)
        x = x + rng.standard_normal(x.shape) * sd * level
        p = proba(m, x)
        e = est.estimate(p)
        conf = bool(e["drop_z"] >= 3 and e["accuracy_drop"] >= 0.02)
        return accuracy(p, y), conf, mon.window(x, p)["disagreement_z"] > Z

    null = [window(0.0) for _ in range(NULL_WINDOWS)]
    base = float(np.mean([a for a, _, _ in null]))
    level = next((lv for lv in LEVELS
                  if base - accuracy(*(lambda x, y: (proba(m, x + rng.standard_normal(
                      x.shape) * sd * lv), y))(*draw(2000, rng))) >= 0.04), None)
    post = [window(level) for _ in range(DROP_WINDOWS)] if level is not None else []
    dropped = bool(post) and base - float(np.mean([a for a, _, _ in post])) >= 0.03
    return {"gen": gen, "model": mname, "seed": seed,
            "null_conf": sum(c for _, c, _ in null), "null_dis": sum(d for _, _, d in null),
            "dropped": dropped,
            "conf_2": dropped and any(c for _, c, _ in post[:2]),
            "either_2": dropped and any(c or d for _, c, d in post[:2])}


def main() -> None:
    gens = ("hastie", "quantiles", "blobs", "moons", "circles")
    models = ("knn", "adaboost", "extratrees", "tree", "qda", "sgd")
    rows = [run_case(g, mn, s) for g in gens for mn in models for s in (0,)]
    windows = NULL_WINDOWS * len(rows)
    drops = [r for r in rows if r["dropped"]]
    print(f"cases {len(rows)}; unshifted windows {windows}: alarms, confidence rule "
          f"{sum(r['null_conf'] for r in rows)}, input disagreement z > {Z:g} "
          f"{sum(r['null_dis'] for r in rows)}")
    print(f"noise drops >= 3 points: {len(drops)} streams; within 2 windows: confidence rule "
          f"{sum(r['conf_2'] for r in drops)}, with the input disagreement "
          f"{sum(r['either_2'] for r in drops)}")
    for g in gens:
        d = [r for r in drops if r["gen"] == g]
        print(f"  {g:10s} {len(d)} streams: {sum(r['conf_2'] for r in d)} -> "
              f"{sum(r['either_2'] for r in d)}; unshifted alarms (disagreement) "
              f"{sum(r['null_dis'] for r in rows if r['gen'] == g)}")


if __name__ == "__main__":
    main()
