"""Windows whose confidences lie outside the range the estimator's reference calibrated
(docs/performance-estimation.md, "Windows outside the reference's confidences"): a model that
switched to hard outputs (binary 0/1, multiclass one-hot) read ~100% estimated accuracy.
The models are scikit-learn's on its bundled datasets, scored on jittered rows (as
``benchmarks/performance_estimation.py`` builds its streams)."""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import numpy as np
import pytest

from daemon_helpers import WINDOW, assert_balanced
from lrwatch.daemon import Daemon, DaemonConfig, build_reference
from lrwatch.daemon.estimation import PerformanceEstimator
from lrwatch.daemon.support import (SUPPORT_ALPHA, WITHHELD_REASON, above_pvalue,
                                    support_check, whole_window_pvalue)
from lrwatch.errors import ConfigError

pytest.importorskip("sklearn")

WITHHELD = ("lrwatch_estimation_withheld_total", {"reason": WITHHELD_REASON})


class Stream:
    """A scikit-learn model on one of the bundled datasets: jittered rows of the 60% it was
    not trained on, with its probabilities (or, ``hard``, its decisions as 0/1 / one-hot)."""

    def __init__(self, dataset: str, model: str) -> None:
        from sklearn import datasets
        from sklearn.ensemble import RandomForestClassifier
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import train_test_split
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        x, y = {"breast_cancer": datasets.load_breast_cancer,
                "digits": datasets.load_digits}[dataset](return_X_y=True)
        x_tr, self.x, y_tr, self.y = train_test_split(x, y, train_size=0.4, stratify=y,
                                                      random_state=0)
        self.model = (RandomForestClassifier(100, min_samples_leaf=3, random_state=0)
                      if model == "forest" else
                      make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=3000)))
        self.model.fit(x_tr, y_tr)
        self.sd = x_tr.std(axis=0) * 0.1
        self.rng = np.random.default_rng(1)
        self.n = 0

    def rows(self, count: int, *, hard: bool | float = False, labelled: bool = True
             ) -> tuple[list[dict[str, Any]], float]:
        """``count`` records and their realised accuracy (``hard``: every row's outputs
        hard, or that share of the rows')."""
        idx = self.rng.choice(len(self.y), count)
        xs = self.x[idx] + self.rng.standard_normal((count, self.x.shape[1])) * self.sd
        p = self.model.predict_proba(xs)
        if hard:
            pick = self.rng.random(count) < (1.0 if hard is True else float(hard))
            p = np.where(pick[:, None], np.eye(p.shape[1])[p.argmax(axis=1)], p)
        out = []
        for j, i in enumerate(idx):
            r = {"id": f"s{self.n}", "features": {f"f{c}": float(xs[j, c]) for c in range(4)},
                 "prediction": float(p[j, 1]) if p.shape[1] == 2 else p[j].tolist()}
            if labelled:
                r["label"] = int(self.y[i])
            out.append(r)
            self.n += 1
        return out, float((p.argmax(axis=1) == self.y[idx]).mean())


CASES = {"binary": ("breast_cancer", "logreg"), "multiclass": ("digits", "logreg"),
         # the forest's largest confidence on its reference is exactly 1.0, on many rows: no
         # row can be above it, and the whole window at it is what tells hard outputs apart
         "saturated": ("breast_cancer", "forest")}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory) -> tuple[Stream, str]:
    stream = Stream(*CASES[request.param])
    rows, _ = stream.rows(1500)
    ref = build_reference(rows, window_size=WINDOW, sims=100)
    assert ref.estimator is not None, ref.notes
    path = str(tmp_path_factory.mktemp(f"support-{request.param}") / "reference.json")
    ref.save(path)
    return stream, path


def _ndjson(recs: list[dict[str, Any]]) -> str:
    return "\n".join(json.dumps(r) for r in recs)


def test_hard_outputs_have_their_estimate_withheld_with_a_counted_reason(run_daemon, case):
    """A model that sends its decisions (``predict``) instead of its probabilities read about
    100% estimated accuracy (1.0 for breast cancer's and digits' logistic regressions whose
    realised accuracy was 95-97%): the calibration maps confidence 1.0 to ~1.0 correct. The
    window is now withheld: NaN gauges, the reason counted, ``/v1/status`` says so, the
    serving pack's ``estimate_withheld`` fires, and its labels are not compared with an
    estimate it does not have. Windows of probabilities before and after keep theirs."""
    from services import promtool_check_metrics

    stream, path = case
    r = run_daemon(reference=path)
    m = r.metric
    assert m(*WITHHELD) == 0   # exported from the start (a dashboard's query has data)
    soft, acc = stream.rows(WINDOW)
    assert r.post("/v1/predictions", _ndjson(soft))[1]["accepted"] == WINDOW
    assert abs(m("lrwatch_estimated_accuracy") - acc) < 0.1
    assert r.daemon.last["values"]["estimation_withheld"] == 0.0
    hard, _ = stream.rows(WINDOW, hard=True)
    assert r.post("/v1/predictions", _ndjson(hard))[1]["accepted"] == WINDOW
    assert math.isnan(m("lrwatch_estimated_accuracy")), m("lrwatch_estimated_accuracy")
    for metric in ("accuracy", "accuracy_low", "accuracy_high"):
        assert math.isnan(m("lrwatch_estimated_metric", {"metric": metric}))
    assert math.isnan(m("lrwatch_estimated_accuracy_drop_zscore"))
    assert m(*WITHHELD) == 1
    assert "estimate_withheld" in r.daemon.engine.active
    status = json.loads(r.get("/v1/status")[1])["estimation"]
    assert status["withheld_windows"] == 1
    last = status["last_window"]
    assert last["estimation_withheld"] == 1.0 and "estimated_accuracy" not in last
    assert last["estimation_support_pvalue"] < SUPPORT_ALPHA
    rc, out = promtool_check_metrics(r.get("/metrics")[1])
    assert rc == 0, out
    soft, acc = stream.rows(WINDOW)
    r.post("/v1/predictions", _ndjson(soft))
    assert abs(m("lrwatch_estimated_accuracy") - acc) < 0.1
    assert "estimate_withheld" not in r.daemon.engine.active
    # inline labels: the two windows with an estimate were compared, the withheld one not
    assert m("lrwatch_estimation_windows_compared_total") == 2
    assert m(*WITHHELD) == 1 and m("lrwatch_internal_errors_total") == 0
    assert_balanced(r.daemon)


def test_ordinary_windows_keep_their_estimates(case):
    """The check changes nothing on windows of probabilities, unshifted or shifted towards
    hard examples (what ``benchmarks/performance_estimation.py`` measures at scale)."""
    stream, path = case
    from lrwatch.daemon import Reference

    est = PerformanceEstimator.from_dict(Reference.load(path).estimator)
    conf = np.abs(stream.model.predict_proba(stream.x).max(axis=1))
    for weights in (None, np.exp(6.0 * (1.0 - conf)) / np.exp(6.0 * (1.0 - conf)).sum()):
        idx = stream.rng.choice(len(stream.y), 500, p=weights)
        p = stream.model.predict_proba(stream.x[idx])
        p = p[:, 1] if p.shape[1] == 2 else p
        checked, unchecked = est.estimate(p), est.estimate(p, check_support=False)
        assert "withheld" not in checked and checked["support_pvalue"] > SUPPORT_ALPHA
        assert {k: checked[k] for k in unchecked} == unchecked


def test_the_support_pvalues_are_exact_permutation_tails() -> None:
    """Under the null (window and reference rows exchangeable), every split of a pooled set
    into a window of n and a reference of m is equally likely: the p-values are the exact
    share of splits at least as extreme (distinct confidences), and never below it with ties
    (so a window is withheld at most ``SUPPORT_ALPHA`` of the time when nothing moved)."""
    n, m = 4, 6
    for pooled in (np.arange(n + m) / 10.0,                      # distinct
                   np.array([0.5, 0.6, 0.6, 0.7, 0.9, 0.9, 0.9, 1.0, 1.0, 1.0])):   # ties
        splits = list(itertools.combinations(range(n + m), n))
        ks, wholes = [], []
        for w in splits:
            win = pooled[list(w)]
            ref = np.delete(pooled, list(w))
            ks.append(int((win > ref.max()).sum()))
            wholes.append(bool((win >= ref.max()).all()))
        distinct = len(set(pooled.tolist())) == len(pooled)
        for k in range(1, n + 1):
            exact = np.mean([x >= k for x in ks])
            p = above_pvalue(n, m, k)
            assert (p == pytest.approx(exact)) if distinct else p >= exact - 1e-12, (k, p)
        for w, whole in zip(splits, wholes):
            if whole:   # the p-value of this very split's window never undercuts the exact
                ref = np.delete(pooled, list(w))
                t = int((ref >= ref.max()).sum())
                assert whole_window_pvalue(n, m, t) >= np.mean(wholes) - 1e-12


def test_a_few_rows_above_a_large_reference_do_not_withhold_the_window() -> None:
    """Rows more confident than every reference row move the estimate by at most their
    share. Noisier inputs put up to 8% of a benchmark window there (a model surer than on any
    reference row): against a 2000-row reference that is significant, and with a floor of 2%
    52 such windows were withheld. Under 20% of the window they are kept, however
    significant; from there on, only when their p-value is below ``SUPPORT_ALPHA``."""
    conf = np.concatenate([np.full(80, 0.9999), np.linspace(0.6, 0.99, 920)])
    c = support_check(conf, top=0.999, top_rows=1, reference_rows=2000)
    assert c["pvalue"] < 1e-30 and c["above_share"] == 0.08 and not c["outside"]
    conf[:250] = 0.9999   # 25%
    assert support_check(conf, top=0.999, top_rows=1, reference_rows=2000)["outside"]
    # a 49-row reference is itself too small to tell: 25% above has a p-value of 1.1e-6
    c = support_check(conf, top=0.999, top_rows=1, reference_rows=49)
    assert 1e-6 < c["pvalue"] < 2e-6 and not c["outside"]
    conf[:400] = 0.9999
    assert support_check(conf, top=0.999, top_rows=1, reference_rows=49)["outside"]
    # a window of 5 rows, 2 above: no evidence
    assert not support_check(np.array([0.9999, 0.9999, 0.7, 0.8, 0.9]), top=0.999,
                             top_rows=1, reference_rows=2000)["outside"]


def test_an_estimator_saved_before_the_check_still_estimates() -> None:
    """A reference written before its top confidence was kept loads and estimates as before
    (no check: rebuild it to get one); a damaged top is refused with the reason."""
    rng = np.random.default_rng(3)
    p = rng.random(600)
    y = (rng.random(600) < p).astype(int)
    d = PerformanceEstimator.fit(p, y).to_dict()
    assert d["support_top"] == pytest.approx(max(p.max(), 1 - p.min()))
    hard = (rng.random(200) < 0.5).astype(float)
    assert PerformanceEstimator.from_dict(d).estimate(hard).get("withheld") == 1.0
    old = {k: v for k, v in d.items() if not k.startswith("support_")}
    r = PerformanceEstimator.from_dict(old).estimate(hard)
    assert "withheld" not in r and r["accuracy"] > 0.9
    with pytest.raises(ConfigError, match="support_top"):
        PerformanceEstimator.from_dict(dict(d, support_top=1.5))


def test_withheld_windows_are_counted_across_a_restart(tmp_path) -> None:
    """``lrwatch_estimation_withheld_total`` is kept in the snapshot's counters (as the
    windows compared are): a restart does not reset it."""
    stream = Stream("breast_cancer", "logreg")
    ref = build_reference(stream.rows(1000)[0], window_size=WINDOW, sims=100)
    path = str(tmp_path / "reference.json")
    ref.save(path)

    def daemon() -> Daemon:
        d = Daemon(DaemonConfig(reference=path, window_size=WINDOW, port=0, log_alerts=False,
                                state_dir=str(tmp_path / "state")))
        d.start()
        return d

    d = daemon()
    try:
        status, body = d.submit("predictions",
                                _ndjson(stream.rows(WINDOW, hard=True)[0]).encode())
        assert status == 200, body
        assert d.drain() and d.registry.get_sample_value(*WITHHELD) == 1
    finally:
        d.stop(timeout=5)
    d = daemon()
    try:
        assert d.registry.get_sample_value(*WITHHELD) == 1
        status, body = d.submit("predictions",
                                _ndjson(stream.rows(WINDOW, hard=True)[0]).encode())
        assert d.drain() and d.registry.get_sample_value(*WITHHELD) == 2
    finally:
        d.stop(timeout=5)


def test_the_share_pvalue_is_the_hypergeometric_upper_tail() -> None:
    """The share test's p-value (numpy only, summed from the pmf's ratio recursion) is the
    upper tail of ``k`` window rows at the top among ``k + t`` top rows of ``n + m``."""
    from scipy.stats import hypergeom

    from lrwatch.daemon.support import share_pvalue

    for n, m, k, t in ((500, 2000, 150, 30), (500, 171, 50, 10), (500, 49, 300, 3),
                       (500, 2000, 10, 40), (3, 50, 3, 1), (40, 60, 1, 59), (500, 171, 1, 0)):
        want = float(hypergeom.sf(k - 1, n + m, k + t, n))
        assert share_pvalue(n, m, k, t) == pytest.approx(want, rel=1e-9, abs=1e-300), (n, m, k)
    assert share_pvalue(500, 2000, 0, 30) == 1.0


def test_hard_outputs_on_part_of_the_traffic_against_a_saturated_reference() -> None:
    """A forest's largest confidence on its reference is exactly 1.0 on many rows, so no row
    can be above it and hard outputs on 30% of a window (some replicas sending ``predict``)
    passed both support tests, reading 1-3 points too high. The share test (the window's
    share of rows at 1.0 against the reference's) withholds that window; unshifted windows of
    probabilities keep their estimates."""
    from lrwatch.daemon.support import SHARE_TEST, share_outside

    stream = Stream("breast_cancer", "forest")

    def window(count: int, share_hard: float) -> np.ndarray:
        idx = stream.rng.choice(len(stream.y), count)
        xs = stream.x[idx] + stream.rng.standard_normal((count, stream.x.shape[1])) * stream.sd
        p = stream.model.predict_proba(xs)[:, 1]
        pick = stream.rng.random(count) < share_hard
        return np.where(pick, (p >= 0.5).astype(float), p), stream.y[idx]

    ref_p, ref_y = window(1500, 0.0)
    est = PerformanceEstimator.fit(ref_p, ref_y)
    assert est.support_top == 1.0 and est.support_top_rows > 1
    hard, _ = window(500, 0.3)
    assert "withheld" not in est.estimate(hard, share_test=False)
    r = est.estimate(hard, share_test=True)
    assert r.get("withheld") == 1.0 and r["support_pvalue"] < SUPPORT_ALPHA
    assert SHARE_TEST and est.estimate(hard).get("withheld") == 1.0   # on by default
    for _ in range(5):
        soft, _ = window(500, 0.0)
        assert "withheld" not in est.estimate(soft, share_test=True)
    outside, p, excess = share_outside(500, 1500, 300, 30)
    assert outside and p < 1e-100 and excess == pytest.approx(0.58)
    assert not share_outside(500, 1500, 110, 300)[0]   # 2 points above the reference's share


def test_hard_outputs_on_part_of_the_traffic_are_withheld_by_the_daemon(run_daemon, tmp_path):
    """Through the daemon: a forest on breast cancer (its reference at confidence exactly 1.0
    on many rows) whose replicas send hard 0/1 outputs on 30% of the rows read 0.955-0.962
    for a realised 0.936-0.956, with no flag (the fifteenth round's tests cannot see it). The
    share test withholds that window, counts it under the same reason and fires the pack's
    ``estimate_withheld``; windows of probabilities before and after keep their estimates.
    (Windows of 500 rows: against this reference, 23% of whose rows are at 1.0, a window of
    100 with 30% hard outputs is not significant at 1e-6.)"""
    window = 500
    stream = Stream("breast_cancer", "forest")
    rows, _ = stream.rows(1500)
    ref = build_reference(rows, window_size=window, sims=100)
    assert ref.estimator is not None and ref.estimator["support_top"] == 1.0
    path = str(tmp_path / "reference.json")
    ref.save(path)
    r = run_daemon(reference=path, window_size=window)
    m = r.metric
    soft, acc = stream.rows(window)
    r.post("/v1/predictions", _ndjson(soft))
    assert abs(m("lrwatch_estimated_accuracy") - acc) < 0.1 and m(*WITHHELD) == 0
    part, _ = stream.rows(window, hard=0.3)
    assert r.post("/v1/predictions", _ndjson(part))[1]["accepted"] == window
    assert math.isnan(m("lrwatch_estimated_accuracy")) and m(*WITHHELD) == 1
    assert "estimate_withheld" in r.daemon.engine.active
    soft, acc = stream.rows(window)
    r.post("/v1/predictions", _ndjson(soft))
    assert abs(m("lrwatch_estimated_accuracy") - acc) < 0.1 and m(*WITHHELD) == 1
    assert m("lrwatch_internal_errors_total") == 0
    assert_balanced(r.daemon)
