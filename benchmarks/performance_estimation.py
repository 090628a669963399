"""Label-free performance estimation benchmark: lrwatch's estimator against NannyML CBPE.

Streams come from real data that ships with scikit-learn (breast cancer, digits, digits odd/even,
wine, iris) and two ``make_classification`` families (marked ``synth_*``; they are never the
headline). For every dataset, model family and split seed: the model is trained on 40% of the
rows, 30% are the labelled reference, 30% the stream pool (iris and wine: a third each). These
datasets are small, so every row is **jittered** (a smoothed bootstrap as in
``drift_detection.py``: Gaussian noise of ``--jitter`` training standard deviations per
feature); the reference is every reference row jittered once, a window is 500 pool rows drawn
with replacement and jittered. The model scores the jittered rows; the label is the row's.

Variants (selection weights on the pool rows; ``conf`` is the model's top-class probability on the
row, ``f`` the training-set's most informative feature by ANOVA F):

  none         uniform
  selection    rows with ``f`` above its median 3x as likely (covariate shift)
  hard         ``exp(3 (1 - conf) / (1 - 1/k))``: low-confidence rows more likely (covariate
               shift towards hard examples)
  hard_errors  rows the model gets wrong 3x as likely: *label-dependent*, so ``P(correct | x)``
               changes and no label-free method can follow it fully (a stress test, reported
               apart from the headline)
  drop         detection: 3 unshifted windows, then 6 windows of the ``hard`` selection made
               strong enough that the pool's accuracy falls by >= 4 points; delay = windows
               after the onset until the rule fires; only streams whose realised accuracy fell
               >= 3 points count

Estimators: lrwatch (each candidate configuration), the naive mean top-class probability, and
NannyML CBPE (defaults, ``chunk_size=500``) in a separate interpreter (``--nannyml-python``;
NannyML is never a project dependency). **Leave-one-dataset-out**: the configuration reported
for dataset D (calibrator, prior weight) is the one with the lowest MAE on the unshifted and
covariate-shifted windows of all other datasets; the chosen configuration and its tuning
datasets are printed next to D's numbers.

Both arms of the support check's share test (``lrwatch/daemon/support.py``) come from one run:
every window is estimated with the test off and its share statistic recorded, and the summary
is made twice (``modes``: the module's default, ``SHARE_TEST``; ``modes_other_arm``: the
other way; with the test on, the windows it flags are withheld).

Run: ``python benchmarks/performance_estimation.py [--seeds 2] [--windows 8]
[--nannyml-python /tmp/nannyml-venv-est/bin/python]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


WINDOW = 500
DATASETS = ["breast_cancer", "digits", "digits_parity", "wine", "iris",
            "synth_binary", "synth_multi"]
REAL = ["breast_cancer", "digits", "digits_parity", "wine", "iris"]
MODELS = ["logreg", "forest", "gnb", "mlp", "hgb", "svc"]
VARIANTS = ["none", "selection", "hard", "hard_errors", "noise"]
NOISE_LEVELS = (1.0, 2.0, 3.0, 5.0, 8.0, 12.0)  # extra noise, in jitter standard deviations
HEADLINE = ["none", "selection", "hard"]  # covariate shifts: the estimator's assumption holds
CONFIGS: dict[str, dict[str, Any]] = {
    "isotonic": {"method": "isotonic", "prior_weight": 0.0},
    "isotonic_prior": {"method": "isotonic", "prior_weight": 0.1},
    "logistic": {"method": "logistic", "prior_weight": 0.0},
    "blend": {"method": "blend", "prior_weight": 0.0},
    "auto": {"method": "auto", "prior_weight": 0.0},
}
PRE_WINDOWS, DROP_WINDOWS = 3, 6
MODES = ["disjoint", "shared"]
SHARED_REFERENCE = 2000   # reference draws in the shared-population mode
ORACLE_ROWS = 5000        # labelled jittered pool draws the oracle calibrator sees
RULE_Z = 3.0        # suggested rule: drop_z >= RULE_Z and accuracy_drop >= RULE_MIN_DROP
RULE_MIN_DROP = 0.02
CAL_SCALES = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0)  # candidate band scales (LODO-chosen)
PACK_Z, PACK_FOR = 3.09, 2  # the serving pack's estimated_accuracy_drop: above 3.09 for 2 windows
CAL_SCALE_NOW = 1.0  # set from lrwatch.daemon.estimation in run() (the NannyML worker's
#                      interpreter has no lrwatch dependencies)


# --- data and models ----------------------------------------------------------------------------
def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Features and integer labels of a dataset family."""
    from sklearn import datasets as ds

    if name == "synth_binary":
        return ds.make_classification(6000, 20, n_informative=6, class_sep=0.8, flip_y=0.03,
                                      random_state=7)
    if name == "synth_multi":
        return ds.make_classification(6000, 20, n_informative=8, n_classes=5, class_sep=1.0,
                                      flip_y=0.03, random_state=7)
    loader = {"breast_cancer": ds.load_breast_cancer, "digits": ds.load_digits,
              "digits_parity": ds.load_digits, "wine": ds.load_wine, "iris": ds.load_iris}[name]
    d = loader()
    y = d.target % 2 if name == "digits_parity" else d.target
    return d.data.astype(np.float64), y.astype(np.int64)


def make_model(name: str, seed: int) -> Any:
    """A scikit-learn classifier of a family (scaled inputs where the family needs them)."""
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import GaussianNB
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    if name == "forest":
        return RandomForestClassifier(100, min_samples_leaf=3, random_state=seed, n_jobs=1)
    if name == "gnb":  # scaled, so that the variance floor is the same for every feature
        return make_pipeline(StandardScaler(), GaussianNB(var_smoothing=1e-2))
    if name == "hgb":
        return HistGradientBoostingClassifier(max_iter=40, max_leaf_nodes=15,
                                              random_state=seed)
    inner = {"logreg": LogisticRegression(C=0.5, max_iter=2000),
             "mlp": MLPClassifier((64,), alpha=1e-3, max_iter=600, random_state=seed),
             "svc": SVC(probability=True, random_state=seed)}[name]
    return make_pipeline(StandardScaler(), inner)


@dataclass
class Case:
    """One dataset x model x split seed: the trained model, the labelled reference and the
    stream pool."""
    dataset: str
    model_name: str
    seed: int
    model: Any
    k: int
    jitter_sd: np.ndarray
    ref_proba: np.ndarray
    ref_y: np.ndarray
    pool_x: np.ndarray
    pool_y: np.ndarray
    pool_conf: np.ndarray
    pool_correct: np.ndarray
    feature: int
    mode: str = "disjoint"
    windows: dict[str, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    ref_x: np.ndarray | None = None  # the jittered reference inputs the model scored


def proba_of(model: Any, x: np.ndarray) -> np.ndarray:
    """``(n,)`` class-1 probabilities (binary) or ``(n, k)``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = model.predict_proba(x)
    return p[:, 1] if p.shape[1] == 2 else p


def top_and_correct(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if p.ndim == 1:
        return np.maximum(p, 1 - p), ((p >= 0.5).astype(int) == y).astype(float)
    return p.max(axis=1), (p.argmax(axis=1) == y).astype(float)


def make_case(dataset: str, model_name: str, seed: int, jitter: float,
              mode: str = "disjoint") -> Case:
    """Split, train and score one case. ``disjoint``: reference and stream pool are different
    rows; ``shared``: both are drawn (jittered) from one population of rows, as in
    ``drift_detection.py``, with a reference of :data:`SHARED_REFERENCE` draws."""
    from sklearn.feature_selection import f_classif
    from sklearn.model_selection import train_test_split

    x, y = load(dataset)
    small = len(y) < 300
    x_tr, x_rest, y_tr, y_rest = train_test_split(
        x, y, train_size=0.34 if small else 0.4, stratify=y, random_state=seed)
    rng = np.random.default_rng(seed + 17)
    if mode == "disjoint":
        x_ref, x_pool, y_ref, y_pool = train_test_split(
            x_rest, y_rest, train_size=0.5, stratify=y_rest, random_state=seed + 1)
    else:
        x_pool, y_pool = x_rest, y_rest
        idx = rng.choice(len(y_rest), SHARED_REFERENCE)
        x_ref, y_ref = x_rest[idx], y_rest[idx]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLP iteration caps, SVC(probability=True) notices
        model = make_model(model_name, seed).fit(x_tr, y_tr)
    sd = x_tr.std(axis=0) * jitter
    ref_x = x_ref + rng.standard_normal(x_ref.shape) * sd
    ref_p = proba_of(model, ref_x)
    pool_p = proba_of(model, x_pool)
    conf, correct = top_and_correct(pool_p, y_pool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = np.nan_to_num(f_classif(x_tr, y_tr)[0])
    return Case(dataset, model_name, seed, model, int(y.max()) + 1, sd, ref_p, y_ref,
                x_pool, y_pool, conf, correct, int(np.argmax(f)), mode, ref_x=ref_x)


def weights(case: Case, variant: str, strength: float = 3.0) -> np.ndarray | None:
    """Selection probabilities on the pool rows for a variant (``None``: uniform)."""
    if variant in ("none", "noise"):
        return None
    if variant == "selection":
        col = case.pool_x[:, case.feature]
        w = np.where(col > np.median(col), 3.0, 1.0)
    elif variant == "hard":
        w = np.exp(strength * (1 - case.pool_conf) / (1 - 1 / case.k))
    elif variant == "hard_errors":
        w = np.where(case.pool_correct < 0.5, 3.0, 1.0)
    else:
        raise ValueError(variant)
    return w / w.sum()


def drop_strength(case: Case, target: float = 0.04) -> float | None:
    """The smallest ``hard`` strength whose selection lowers the pool's accuracy by
    ``target`` (None when no strength up to 40 does)."""
    base = case.pool_correct.mean()
    for s in np.arange(1.0, 40.5, 1.0):
        if base - float(weights(case, "hard", s) @ case.pool_correct) >= target:
            return float(s)
    return None


def window(case: Case, rng: np.random.Generator, p: np.ndarray | None, noise: float = 0.0,
           n: int = WINDOW) -> tuple[np.ndarray, np.ndarray]:
    """One jittered window: the model's probabilities and the labels. ``noise`` adds that many
    more jitter standard deviations of Gaussian noise (a degraded sensor)."""
    return window_x(case, rng, p, noise, n)[1:]


def window_x(case: Case, rng: np.random.Generator, p: np.ndarray | None, noise: float = 0.0,
             n: int = WINDOW) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`window` with the jittered inputs the model scored first."""
    idx = rng.choice(len(case.pool_y), n, p=p)
    sd = case.jitter_sd * math.sqrt(1.0 + noise ** 2)
    xs = case.pool_x[idx] + rng.standard_normal((n, case.pool_x.shape[1])) * sd
    return xs, proba_of(case.model, xs), case.pool_y[idx]


def noise_level(case: Case, rng: np.random.Generator, target: float = 0.04) -> float | None:
    """The smallest extra noise (in jitter units, from :data:`NOISE_LEVELS`) that lowers the
    accuracy of a 2000-row probe by ``target`` (None when none does)."""
    base = realised(*window(case, rng, None, n=2000))
    for lvl in NOISE_LEVELS:
        if base - realised(*window(case, rng, None, lvl, n=2000)) >= target:
            return lvl
    return None


def fitted_cases(mode: str, datasets: list[str], models: list[str]
                 ) -> Iterator[tuple[str, str, int, Case, np.random.Generator, Any]]:
    """For the checks built on these cases (``atc_check.py``, ``disagreement_check.py``): each
    dataset x model x seed (0, 1) case as ``(dataset, model, seed, case, rng, estimator)``,
    the estimator fitted on its reference; says on stderr when a dataset is done."""
    from lrwatch.daemon.estimation import PerformanceEstimator

    for ds in datasets:
        for mn in models:
            for seed in (0, 1):
                case = make_case(ds, mn, seed, 0.1, mode)
                rng = np.random.default_rng(case.seed * 7919 + 3)
                est = PerformanceEstimator.fit(case.ref_proba, case.ref_y, seed=case.seed)
                yield ds, mn, seed, case, rng, est
        print(f"done {ds}", file=sys.stderr, flush=True)


def add_case_arguments(ap: argparse.ArgumentParser, mode: str) -> None:
    """The options of those checks that pick the cases and windows (``--mode``, default
    ``mode``; ``--datasets``, ``--models``, ``--windows``)."""
    ap.add_argument("--mode", choices=MODES, default=mode)
    ap.add_argument("--datasets", default=",".join(REAL))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--windows", type=int, default=6, help="windows per variant and case")


def realised(p: np.ndarray, y: np.ndarray) -> float:
    return float(top_and_correct(p, y)[1].mean())


def naive(p: np.ndarray) -> float:
    return float(top_and_correct(p, np.zeros(len(p), dtype=int))[0].mean())


# --- running the estimators ---------------------------------------------------------------------
def fit_configs(case: Case, rng: np.random.Generator) -> dict[str, Any]:
    """One lrwatch estimator per candidate configuration, fitted on the case's reference, and
    the ``oracle``: the isotonic estimator fitted on :data:`ORACLE_ROWS` labelled draws from
    the stream pool itself (the floor of a confidence-based estimate on this pool)."""
    from lrwatch.daemon.estimation import PerformanceEstimator

    ests = {name: PerformanceEstimator.fit(case.ref_proba, case.ref_y, seed=case.seed, **cfg)
            for name, cfg in CONFIGS.items()}
    big = [window(case, rng, None) for _ in range(ORACLE_ROWS // WINDOW)]
    ests["oracle"] = PerformanceEstimator.fit(np.concatenate([b[0] for b in big]),
                                              np.concatenate([b[1] for b in big]))
    return ests


def binary_truth(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Realised precision, recall, F1 and ROC AUC of a binary window (sklearn)."""
    from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

    pred = (p >= 0.5).astype(int)
    out = {"precision": precision_score(y, pred, zero_division=0.0),
           "recall": recall_score(y, pred, zero_division=0.0), "f1": f1_score(y, pred)}
    if 0 < y.sum() < len(y):
        out["roc_auc"] = roc_auc_score(y, p)
    return {k: float(v) for k, v in out.items()}


def score_window(ests: dict[str, Any], p: np.ndarray, y: np.ndarray,
                 meta: dict[str, Any]) -> dict[str, Any]:
    """Every estimator on one window, next to the realised accuracy."""
    row = dict(meta, realised=realised(p, y), naive=naive(p), lrwatch={})
    # (the oracle is a floor, not the product: never withheld)
    row["oracle"] = ests["oracle"].estimate(p, check_support=False)["accuracy"]
    row["share"] = share_stats(ests["auto"], p)
    for name, est in ests.items():
        if name == "oracle":
            continue
        r = est.estimate(p, share_test=False)   # both arms come from these (with_share_test)
        row["lrwatch"][name] = {k: r[k] for k in ("accuracy", "accuracy_low", "accuracy_high",
                                                  "accuracy_drop", "drop_z",
                                                  "accuracy_se_window")}
        row["lrwatch"][name]["se_cal_raw"] = r["accuracy_se_calibration"] / CAL_SCALE_NOW
        row["lrwatch"][name]["withheld"] = bool(r.get("withheld"))
        row["lrwatch"][name]["drop_z_unpooled"] = unpooled_drop_z(est, p, r)
        row["lrwatch"][name]["support_pvalue"] = r.get("support_pvalue", 1.0)
        if p.ndim == 1:
            row["lrwatch"][name]["binary"] = {k: r[k] for k in ("precision", "recall", "f1",
                                                                "roc_auc") if k in r}
    if p.ndim == 1:
        row["binary_truth"] = binary_truth(p, y)
    return row


def unpooled_drop_z(est: Any, p: np.ndarray, r: dict[str, Any]) -> float:
    """The drop statistic that shipped until the seventeenth round (each mean with its own
    spread; lrwatch/daemon/estimation.py: drop_test), on the same window: NaN where the
    estimate is withheld."""
    from lrwatch.daemon.estimation import drop_test

    if r.get("withheld"):
        return math.nan
    return drop_test(est.correctness(p), est.baseline, est.baseline_sd, est.reference_rows,
                     pooled=False)


def with_unpooled_drop_test(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the rows whose ``drop_z`` is the unpooled statistic: the detection table of
    the drop test before the seventeenth round, on the same windows and estimates."""
    return [dict(r, lrwatch={n: dict(v, drop_z=v.get("drop_z_unpooled", math.nan))
                             for n, v in r["lrwatch"].items()}) for r in rows]


def share_stats(est: Any, p: np.ndarray) -> dict[str, Any]:
    """The share-at-the-top test of lrwatch/daemon/support.py on one window, whatever the
    module's default: whether it flags the window, its p-value and excess share."""
    from lrwatch.daemon.support import confidence, share_outside

    if est.support_top is None:
        return {"outside": False, "p": 1.0, "excess": 0.0}
    conf = confidence(p)
    out, pv, excess = share_outside(len(conf), est.reference_rows,
                                    int((conf >= est.support_top).sum()), est.support_top_rows)
    return {"outside": out, "p": pv, "excess": excess}


def with_share_test(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows as the estimator with the share test on would have scored them: a window the
    test flags (and the other tests kept) is withheld, every configuration's estimate NaN. The
    estimate of a window that is not withheld does not depend on the test, so one run gives
    both arms on the same windows."""
    nan = math.nan
    out = []
    for r in rows:
        if not r.get("share", {}).get("outside"):
            out.append(r)
            continue
        r = dict(r, lrwatch={n: dict(v, withheld=True, accuracy=nan, accuracy_low=nan,
                                     accuracy_high=nan, accuracy_drop=nan, drop_z=nan,
                                     support_pvalue=min(v["support_pvalue"], r["share"]["p"]))
                             for n, v in r["lrwatch"].items()})
        out.append(r)
    return out


def run_case(case: Case, n_windows: int, nml_dir: str | None) -> list[dict[str, Any]]:
    """All variants and the drop stream of one case; saves the windows for NannyML."""
    rng = np.random.default_rng(case.seed * 7919 + 3)
    ests = fit_configs(case, rng)
    meta = {"dataset": case.dataset, "model": case.model_name, "seed": case.seed,
            "mode": case.mode,
            "k": case.k, "reference_accuracy": ests["isotonic"].reference_accuracy,
            "reference_estimate": {n: e.reference_estimate for n, e in ests.items()}}
    rows, probas = [], []
    lvl = noise_level(case, rng)
    for v in VARIANTS:
        if v == "noise" and lvl is None:
            continue
        w = weights(case, v)
        for i in range(n_windows):
            p, y = window(case, rng, w, lvl if v == "noise" else 0.0)
            rows.append(score_window(ests, p, y, dict(meta, variant=v, window=i)))
            probas.append(p)
    s = drop_strength(case)
    for variant, ok in (("drop", s is not None), ("drop_noise", lvl is not None)):
        w = weights(case, "hard", s) if variant == "drop" and ok else None
        for i in range(PRE_WINDOWS + DROP_WINDOWS if ok else 0):
            p, y = window(case, rng, None if i < PRE_WINDOWS else w,
                          lvl if variant == "drop_noise" and i >= PRE_WINDOWS else 0.0)
            rows.append(score_window(ests, p, y, dict(meta, variant=variant, window=i)))
            probas.append(p)
    if nml_dir is not None:
        path = os.path.join(nml_dir, case_file(case))
        np.savez(path, ref_p=case.ref_proba, ref_y=case.ref_y, ana_p=np.concatenate(probas),
                 k=case.k)
        for j, r in enumerate(rows):
            r["nml_file"], r["nml_chunk"] = os.path.basename(path), j
    # last, on a generator of their own: the windows above are those of earlier runs
    return rows + hard_output_rows(case, ests, np.random.default_rng(case.seed + 911), meta)


def hard_outputs(p: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """``p`` with a ``share`` of its rows replaced by the model's hard decision (binary 0/1,
    multiclass one-hot): a deployment that sends ``predict`` instead of ``predict_proba``,
    on every replica (1.0) or some (0.3)."""
    hard = (p >= 0.5).astype(float) if p.ndim == 1 else np.eye(p.shape[1])[p.argmax(axis=1)]
    pick = rng.random(len(p)) < share
    return np.where(pick, hard, p) if p.ndim == 1 else np.where(pick[:, None], hard, p)


def hard_output_rows(case: Case, ests: dict[str, Any], rng: np.random.Generator,
                     meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Unshifted windows whose probabilities became hard outputs (:func:`hard_outputs`), every
    row (``hard_outputs``) or 30% of them (``hard_outputs_30``): whether the estimate is
    withheld, and what the calibration would have exported (``extrapolated``; the realised
    accuracy is unchanged, the decisions are the same)."""
    out = []
    for variant, share in (("hard_outputs", 1.0), ("hard_outputs_30", 0.3)):
        for i in range(2):
            p, y = window(case, rng, None)
            h = hard_outputs(p, share, rng)
            row = score_window(ests, h, y, dict(meta, variant=variant, window=i))
            row["extrapolated"] = ests["auto"].estimate(h, check_support=False)["accuracy"]
            out.append(row)
    return out


def case_file(case: Case) -> str:
    return f"{case.mode}-{case.dataset}-{case.model_name}-{case.seed}.npz"


# --- NannyML CBPE (runs in an interpreter that has nannyml) -------------------------------------
def nannyml_worker(paths: list[str]) -> dict[str, Any]:
    """CBPE (defaults, chunk_size=500) per saved case: the accuracy estimate and alert of every
    analysis chunk, or the error it raised."""
    import warnings as w

    import nannyml as nml
    import pandas as pd

    w.filterwarnings("ignore")
    out: dict[str, Any] = {"version": nml.__version__, "cases": {}}
    for path in paths:
        d = np.load(path)
        k = int(d["k"])
        t0 = time.perf_counter()
        try:
            est, ref, ana = _nml_frames(nml, pd, d["ref_p"], d["ref_y"], d["ana_p"], k)
            est.fit(ref)
            res = est.estimate(ana).to_df()
            res = res[res[("chunk", "period")] == "analysis"]
            out["cases"][os.path.basename(path)] = {
                "accuracy": [float(v) for v in res[("accuracy", "value")]],
                "alert": [bool(v) for v in res[("accuracy", "alert")]],
                "seconds": time.perf_counter() - t0, "chunks": len(res)}
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            out["cases"][os.path.basename(path)] = {"error": f"{type(e).__name__}: {e}"}
    return out


def _nml_frames(nml: Any, pd: Any, ref_p, ref_y, ana_p, k: int):
    """The CBPE estimator and its reference/analysis frames for one case."""
    if k == 2:
        ref = pd.DataFrame({"p": ref_p, "y_pred": (ref_p >= 0.5).astype(int), "y": ref_y})
        ana = pd.DataFrame({"p": ana_p, "y_pred": (ana_p >= 0.5).astype(int)})
        est = nml.CBPE(y_pred_proba="p", y_pred="y_pred", y_true="y", chunk_size=WINDOW,
                       problem_type="classification_binary", metrics=["accuracy"])
        return est, ref, ana
    cols = [f"p{j}" for j in range(k)]
    ref = pd.DataFrame(ref_p, columns=cols).assign(y_pred=ref_p.argmax(axis=1), y=ref_y)
    ana = pd.DataFrame(ana_p, columns=cols).assign(y_pred=ana_p.argmax(axis=1))
    est = nml.CBPE(y_pred_proba={j: c for j, c in enumerate(cols)}, y_pred="y_pred",
                   y_true="y", chunk_size=WINDOW, problem_type="classification_multiclass",
                   metrics=["accuracy"])
    return est, ref, ana


def run_nannyml(python: str, paths: list[str], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs the worker in ``python`` and attaches its estimates to ``rows``."""
    cmd = [python, os.path.abspath(__file__), "--nannyml-worker", *paths]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    res = json.loads(proc.stdout)
    for r in rows:
        case = res["cases"].get(r.get("nml_file", ""), {})
        if "accuracy" in case and r["nml_chunk"] < len(case["accuracy"]):
            r["nannyml"] = case["accuracy"][r["nml_chunk"]]
            r["nannyml_alert"] = case["alert"][r["nml_chunk"]]
    errors = {f: c["error"] for f, c in res["cases"].items() if "error" in c}
    secs = sum(c.get("seconds", 0.0) for c in res["cases"].values())
    chunks = sum(c.get("chunks", 0) for c in res["cases"].values())
    return {"version": res["version"], "errors": errors, "seconds": secs, "chunks": chunks}


# --- analysis -----------------------------------------------------------------------------------
def kind(row: dict[str, Any]) -> str:
    return "binary" if row["k"] == 2 else "multiclass"


def lodo_choice(rows: list[dict[str, Any]], held_out: str | None) -> str:
    """The configuration with the lowest MAE on the headline variants of every dataset except
    ``held_out`` (binary and multiclass weighted equally)."""
    best, best_err = "", math.inf
    for name in CONFIGS:
        errs = []
        for kd in ("binary", "multiclass"):
            e = [abs(r["lrwatch"][name]["accuracy"] - r["realised"]) for r in rows
                 if r["dataset"] != held_out and r["variant"] in HEADLINE and kind(r) == kd
                 and not r["lrwatch"][name].get("withheld")]
            if e:
                errs.append(float(np.mean(e)))
        if errs and np.mean(errs) < best_err:
            best, best_err = name, float(np.mean(errs))
    if not best:  # nothing to tune on (a single dataset): the module's default
        from lrwatch.daemon.estimation import DEFAULT_METHOD

        best = next(n for n, c in CONFIGS.items() if c["method"] == DEFAULT_METHOD)
    return best


def attach_lodo(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Sets ``row["lr"]`` to the estimate of the configuration chosen without its dataset."""
    chosen = {d: lodo_choice(rows, d) for d in sorted({r["dataset"] for r in rows})}
    for r in rows:
        r["config"] = chosen[r["dataset"]]
        r["lr"] = r["lrwatch"][r["config"]]
    return chosen


def estimated(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The windows whose estimate was not withheld (their confidences lie inside the
    reference's; see lrwatch/daemon/support.py): every table's MAE is over these."""
    return [r for r in rows if not r["lr"].get("withheld")]


def mae(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [abs((r["lr"]["accuracy"] if key == "lrwatch" else r[key]) - r["realised"])
            for r in rows if key == "lrwatch" or key in r]
    return round(100 * float(np.mean(vals)), 2) if vals else None


def mae_table(rows: list[dict[str, Any]], group: str) -> dict[str, dict[str, Any]]:
    """MAE in accuracy points per (group value, binary/multiclass) for every method."""
    out: dict[str, dict[str, Any]] = {}
    for g in sorted({r[group] for r in rows}):
        for kd in ("binary", "multiclass"):
            every = [r for r in rows if r[group] == g and kind(r) == kd]
            sub = estimated(every)
            if sub:
                out[f"{g}/{kd}"] = {"windows": len(sub), "withheld": len(every) - len(sub),
                                    "lrwatch": mae(sub, "lrwatch"),
                                    "nannyml": mae(sub, "nannyml"), "naive": mae(sub, "naive"),
                                    "oracle": mae(sub, "oracle")}
    return out


def fires(row: dict[str, Any]) -> bool:
    """The suggested rule on one window."""
    return row["lr"]["drop_z"] >= RULE_Z and row["lr"]["accuracy_drop"] >= RULE_MIN_DROP


def pack_fires(seq: list[dict[str, Any]]) -> list[bool]:
    """The serving pack's rule along a sequence of windows: drop_z above PACK_Z in PACK_FOR
    consecutive windows."""
    out, run_len = [], 0
    for r in seq:
        run_len = run_len + 1 if r["lr"]["drop_z"] > PACK_Z else 0
        out.append(run_len >= PACK_FOR)
    return out


def detection(rows: list[dict[str, Any]], drop_variant: str = "drop") -> dict[str, Any]:
    """Delay (windows after onset) of the rules and of NannyML's alert on the ``drop_variant``
    streams whose realised accuracy fell >= 3 points; false alarms on unshifted windows."""
    streams: dict[tuple, list[dict[str, Any]]] = {}
    base: dict[tuple, list[float]] = {}
    for r in rows:
        key = (r["dataset"], r["model"], r["seed"])
        if r["variant"] == drop_variant:
            streams.setdefault(key, []).append(r)
        if r["variant"] == "none":
            base.setdefault(key, []).append(r)
    out: dict[str, Any] = {"streams": 0, "too_small_drop": 0}
    delays: dict[str, list[float]] = {"lrwatch": [], "pack_rule": [], "nannyml": []}
    for key, st in streams.items():
        post = [r for r in st if r["window"] >= PRE_WINDOWS]
        if np.mean([r["realised"] for r in base[key]]) - np.mean(
                [r["realised"] for r in post]) < 0.03:
            out["too_small_drop"] += 1
            continue
        out["streams"] += 1
        delays["lrwatch"].append(_delay([fires(r) for r in post]))
        delays["pack_rule"].append(_delay(pack_fires(st)[PRE_WINDOWS:]))
        if all("nannyml_alert" in r for r in post):
            delays["nannyml"].append(_delay([r["nannyml_alert"] for r in post]))
    for m, d in delays.items():
        if d:
            arr = np.array(d)
            out[m] = {"streams": len(d), "within_2": round(float(np.mean(arr <= 2)), 3),
                      "median_delay": (float(np.median(arr)) if np.isfinite(np.median(arr))
                                       else None),  # None: most streams never fired
                      "missed": int(np.isinf(arr).sum())}
    out["false_alarms_per_100"] = _false_alarms(base, streams)
    return out


def _false_alarms(base: dict[tuple, list[dict[str, Any]]],
                  streams: dict[tuple, list[dict[str, Any]]]) -> dict[str, Any]:
    """Alarms per 100 unshifted windows (the ``none`` windows and the drop streams' windows
    before the onset); the pack rule counts windows where it fires inside a ``none`` run."""
    null = [r for seq in base.values() for r in seq] + [
        r for st in streams.values() for r in st if r["window"] < PRE_WINDOWS]
    pack = [f for seq in base.values() for f in pack_fires(seq)]
    return {"lrwatch": round(100 * float(np.mean([fires(r) for r in null])), 2),
            "pack_rule": round(100 * float(np.mean(pack)), 2),
            "nannyml": (round(100 * float(np.mean([r["nannyml_alert"] for r in null])), 2)
                        if all("nannyml_alert" in r for r in null) else None),
            "windows": len(null), "pack_windows": len(pack)}


def _delay(flags: list[bool]) -> float:
    """1-based index of the first firing window after the onset (inf: never)."""
    for i, f in enumerate(flags):
        if f:
            return float(i + 1)
    return math.inf


def _covered(rows: list[dict[str, Any]], scale: float) -> float:
    """Share of windows inside the band whose calibration term is multiplied by ``scale``
    (NaN when there are none)."""
    rows = estimated(rows)
    if not rows:
        return math.nan
    hits = []
    for r in rows:
        half = 1.959964 * math.hypot(r["lr"]["accuracy_se_window"], scale * r["lr"]["se_cal_raw"])
        hits.append(abs(r["realised"] - r["lr"]["accuracy"]) <= half)
    return float(np.mean(hits))


def band_coverage(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Band coverage (target 0.95). The calibration scale of the band is chosen leave-one-
    dataset-out: the smallest of :data:`CAL_SCALES` that covers 95% of the other datasets'
    headline windows; coverage is then measured on the held-out dataset."""
    head = [r for r in rows if r["variant"] in HEADLINE]
    out: dict[str, Any] = {"module_scale": CAL_SCALE_NOW, "by_dataset": {}}
    for d in sorted({r["dataset"] for r in rows}):
        others = [r for r in head if r["dataset"] != d]
        scale = next((sc for sc in CAL_SCALES if _covered(others, sc) >= 0.95), CAL_SCALES[-1])
        mine = [r for r in rows if r["dataset"] == d]
        out["by_dataset"][d] = {"scale": scale, **{
            v: round(_covered([r for r in mine if r["variant"] == v], scale), 3)
            for v in VARIANTS}}
    out["all_datasets_scale"] = next((sc for sc in CAL_SCALES if _covered(head, sc) >= 0.95),
                                     CAL_SCALES[-1])
    out["module_scale_coverage"] = {
        v: round(_covered([r for r in rows if r["variant"] == v], CAL_SCALE_NOW), 3)
        for v in VARIANTS}
    return out


def binary_metric_mae(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """MAE (points) of the binary metrics (leave-one-dataset-out configuration, headline
    variants)."""
    out = {}
    for m in ("precision", "recall", "f1", "roc_auc"):
        e = [abs(r["lr"]["binary"][m] - r["binary_truth"][m]) for r in estimated(rows)
             if r["variant"] in HEADLINE and m in r["lr"].get("binary", {})
             and m in r.get("binary_truth", {})]
        if e:
            out[m] = {"mae": round(100 * float(np.mean(e)), 2), "windows": len(e)}
    return out


def timing(cases: list[Case]) -> dict[str, float]:
    """Milliseconds per window of 500 at the most classes among the cases (fit excluded)."""
    from lrwatch.daemon.estimation import PerformanceEstimator

    case = max(cases, key=lambda c: c.k)
    est = PerformanceEstimator.fit(case.ref_proba, case.ref_y)
    rng = np.random.default_rng(5)
    wins = [window(case, rng, None)[0] for _ in range(10)]
    t0 = time.perf_counter()
    reps = 20
    for _ in range(reps):
        for p in wins:
            est.estimate(p)
    ms = 1000 * (time.perf_counter() - t0) / (reps * len(wins))
    t0 = time.perf_counter()
    PerformanceEstimator.fit(case.ref_proba, case.ref_y)
    return {"classes": case.k, "ms_per_window": round(ms, 3),
            "fit_ms": round(1000 * (time.perf_counter() - t0), 1),
            "reference_rows": len(case.ref_y)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=2, help="split seeds per dataset x model")
    ap.add_argument("--windows", type=int, default=8, help="windows per variant and case")
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--jitter", type=float, default=0.1,
                    help="noise added to resampled rows, in training standard deviations")
    ap.add_argument("--nannyml-python", default=None,
                    help="an interpreter with nannyml installed, for the CBPE anchor")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                  "performance_estimation.json"))
    ap.add_argument("--nannyml-worker", nargs="+", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the benchmark; returns (and writes to ``args.out``) the summary."""
    global CAL_SCALE_NOW
    from lrwatch.daemon.estimation import CALIBRATION_SCALE

    CAL_SCALE_NOW = CALIBRATION_SCALE
    t_start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="lrwatch-perf-est-") if args.nannyml_python else None
    rows: list[dict[str, Any]] = []
    cases: list[Case] = []
    for mode in args.modes.split(","):
        for ds in args.datasets.split(","):
            for mdl in args.models.split(","):
                for seed in range(args.seeds):
                    case = make_case(ds, mdl, seed, args.jitter, mode)
                    rows += run_case(case, args.windows, tmp)
                    cases.append(case)
    paths = [os.path.join(tmp, case_file(c)) for c in cases] if tmp else []
    nml = run_nannyml(args.nannyml_python, paths, rows) if paths else {"skipped": True}
    out: dict[str, Any] = {"modes": {}, "nannyml": nml, "timing": timing(cases),
                           "choice_all_modes_and_datasets": lodo_choice(rows, None)}
    from lrwatch.daemon.support import SHARE_TEST

    # ``modes``: the module's default arm; ``modes_other_arm``: the share test the other way,
    # on the same windows (lrwatch/daemon/support.py)
    out["share_test_default"], out["modes_other_arm"] = SHARE_TEST, {}
    for mode in args.modes.split(","):
        sub = [r for r in rows if r["mode"] == mode]
        arms = {False: sub, True: with_share_test(sub)}
        for key, arm in (("modes", arms[SHARE_TEST]), ("modes_other_arm", arms[not SHARE_TEST])):
            chosen = attach_lodo(arm)
            out[key][mode] = summarise(arm, chosen, args)
        # the drop test as it shipped before the seventeenth round, on the default arm's windows
        before = with_unpooled_drop_test(arms[SHARE_TEST])
        attach_lodo(before)
        out.setdefault("drop_test_unpooled", {})[mode] = {
            "detection": detection(before), "detection_noise": detection(before, "drop_noise")}
    out["settings"] = {"window": WINDOW, "seeds": args.seeds, "windows": args.windows,
                       "jitter": args.jitter, "models": args.models.split(","),
                       "datasets": args.datasets.split(","), "configs": CONFIGS,
                       "rule": {"drop_z": RULE_Z, "min_drop": RULE_MIN_DROP},
                       "shared_reference": SHARED_REFERENCE}
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(_finite(out), fh, indent=1, sort_keys=True, allow_nan=False)
    return out


def _finite(o: Any) -> Any:
    """``o`` with NaN and infinities as ``None`` (strict JSON)."""
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def summarise(rows, chosen, args) -> dict[str, Any]:
    """One mode's summary: LODO choices, MAE tables, band, detection."""
    from lrwatch.daemon.estimation import DEFAULT_METHOD, PRIOR_WEIGHT

    special = ("drop", "hard_outputs")
    real = [r for r in rows if r["dataset"] in REAL and not r["variant"].startswith(special)]
    synth = [r for r in rows if r["dataset"] not in REAL and not r["variant"].startswith(special)]
    datasets = sorted(chosen)
    return {
        "lodo_choice": {d: {"config": c, "tuned_on": [o for o in datasets if o != d]}
                        for d, c in chosen.items()},
        "choice_all_datasets": lodo_choice(rows, None),
        "module_default": {"method": DEFAULT_METHOD, "prior_weight": PRIOR_WEIGHT},
        "mae_by_config": config_table(rows),
        "mae_real_by_variant": mae_table(real, "variant"),
        "mae_synthetic_by_variant": mae_table(synth, "variant"),
        "mae_by_dataset": mae_table([r for r in rows if r["variant"] in HEADLINE], "dataset"),
        "mae_by_model_real": mae_table([r for r in real if r["variant"] in HEADLINE], "model"),
        "band_coverage": band_coverage(rows),
        "binary_metrics": binary_metric_mae(rows),
        "detection": detection(rows),
        "detection_noise": detection(rows, "drop_noise"),
        "support": support_table(rows),
    }


def support_table(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per variant and binary/multiclass: windows, how many had their estimate withheld, the
    smallest support p-value (lrwatch/daemon/support.py); for the hard-output variants also
    the MAE (points) of what the calibration would have exported (``extrapolated``)."""
    out: dict[str, dict[str, Any]] = {}
    for v in sorted({r["variant"] for r in rows}):
        for kd in ("binary", "multiclass"):
            sub = [r for r in rows if r["variant"] == v and kind(r) == kd]
            if not sub:
                continue
            t = {"windows": len(sub), "withheld": len(sub) - len(estimated(sub)),
                 "min_pvalue": float(min(r["lr"]["support_pvalue"] for r in sub))}
            if all("extrapolated" in r for r in sub):
                t["extrapolated_mae"] = round(100 * float(np.mean(
                    [abs(r["extrapolated"] - r["realised"]) for r in sub])), 2)
                t["extrapolated_mean_error"] = round(100 * float(np.mean(
                    [r["extrapolated"] - r["realised"] for r in sub])), 2)
            out[f"{v}/{kd}"] = t
    return out


def config_table(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """MAE (points) of every candidate configuration, all datasets, headline variants (for
    reading only: the reported numbers use the leave-one-dataset-out choice)."""
    out = {}
    for name in CONFIGS:
        for kd in ("binary", "multiclass"):
            e = [abs(r["lrwatch"][name]["accuracy"] - r["realised"]) for r in rows
                 if r["variant"] in HEADLINE and kind(r) == kd
                 and not r["lrwatch"][name].get("withheld")]
            if e:
                out.setdefault(name, {})[kd] = round(100 * float(np.mean(e)), 2)
    return out


def _fmt(v: Any) -> str:
    return "  -  " if v is None else f"{v:5.2f}"


def print_tables(out: dict[str, Any]) -> None:
    """The summary as plain-text tables."""
    st = out["settings"]
    print(f"windows of {st['window']}, {st['seeds']} split seeds, {st['windows']} windows per "
          f"variant and case; NannyML: {out['nannyml'].get('version', 'not run')}")
    for mode, s in out["modes"].items():
        print(f"\n===== {mode} reference =====")
        _print_mode(s)
    for mode, s in out.get("drop_test_unpooled", {}).items():
        print(f"\n===== {mode} reference, the unpooled drop test (before the seventeenth "
              f"round; same windows) =====")
        _print_detection(s)
    other = "off" if out.get("share_test_default") else "on"
    for mode, s in out.get("modes_other_arm", {}).items():
        print(f"\n===== {mode} reference, share test {other} (same windows) =====")
        _print_mode(s)
    print(f"\nconfiguration chosen on every dataset of both modes (the module default should "
          f"be this one): {out['choice_all_modes_and_datasets']}")
    t = out["timing"]
    print(f"\ntiming: {t['ms_per_window']} ms per window of {WINDOW} at {t['classes']} classes "
          f"(fit {t['fit_ms']} ms on {t['reference_rows']} rows)")
    nml = out["nannyml"]
    if nml.get("errors"):
        print(f"NannyML failed on: {nml['errors']}")
    if nml.get("chunks"):
        print(f"NannyML: {1000 * nml['seconds'] / nml['chunks']:.1f} ms per window (fit and "
              "estimate together)")


def _print_mode(s: dict[str, Any]) -> None:
    print("leave-one-dataset-out: configuration used for each dataset (tuned on the others)")
    for d, c in s["lodo_choice"].items():
        print(f"  {d:15s} {c['config']:15s} tuned on {', '.join(c['tuned_on'])}")
    print(f"  (chosen on all datasets: {s['choice_all_datasets']}; module default "
          f"{s['module_default']}); every configuration, all datasets: {s['mae_by_config']}")
    for title, key in (("real data, by variant", "mae_real_by_variant"),
                       ("synthetic (make_classification), by variant",
                        "mae_synthetic_by_variant"),
                       ("by dataset (none, selection, hard)", "mae_by_dataset"),
                       ("real data by model (none, selection, hard)", "mae_by_model_real")):
        print(f"MAE of the accuracy estimate, points: {title}")
        print(f"  {'':28s} {'windows':>7s} {'lrwatch':>7s} {'nannyml':>7s} {'naive':>7s} "
              f"{'oracle':>7s}")
        for g, t in s[key].items():
            print(f"  {g:28s} {t['windows']:7d} {_fmt(t['lrwatch']):>7s} "
                  f"{_fmt(t['nannyml']):>7s} {_fmt(t['naive']):>7s} {_fmt(t['oracle']):>7s}")
    bc = s["band_coverage"]
    print(f"band coverage (target 0.95); calibration scale chosen leave-one-dataset-out "
          f"(on all datasets: {bc['all_datasets_scale']}; module: {bc['module_scale']}, "
          f"coverage with it {bc['module_scale_coverage']})")
    for d, c in bc["by_dataset"].items():
        print(f"  {d:15s} " + ", ".join(f"{k} {v}" for k, v in c.items()))
    print(f"binary metrics, MAE in points: {s['binary_metrics']}")
    _print_detection(s)
    print("windows outside the reference's confidences (estimate withheld; min_pvalue: the "
          "smallest support p-value; extrapolated: what the calibration would have exported)")
    for g, t in s["support"].items():
        print(f"  {g:28s} " + ", ".join(f"{k} {v}" for k, v in t.items()))


def _print_detection(s: dict[str, Any]) -> None:
    for key, what in (("detection", "hard-example selection"),
                      ("detection_noise", "noisier inputs")):
        det = s[key]
        print(f"detection of a >= 3-point drop by {what} (lrwatch: drop_z >= {RULE_Z} and "
              f"drop >= {RULE_MIN_DROP}; pack_rule: drop_z > {PACK_Z} for {PACK_FOR} windows):"
              f" {det['streams']} streams ({det['too_small_drop']} with a realised drop < 3 "
              f"points left out)")
        for m in ("lrwatch", "pack_rule", "nannyml"):
            if m in det:
                print(f"  {m:9s} within 2 windows {det[m]['within_2']:.3f}, median delay "
                      f"{det[m]['median_delay']}, missed {det[m]['missed']}/"
                      f"{det[m]['streams']}")
        print(f"  false alarms per 100 unshifted windows: {det['false_alarms_per_100']}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.nannyml_worker:
        print(json.dumps(nannyml_worker(args.nannyml_worker)))
        return
    summary = run(args)
    print_tables(summary)
    print(f"\n{summary['seconds']} s; written to {args.out}")


if __name__ == "__main__":
    main()
