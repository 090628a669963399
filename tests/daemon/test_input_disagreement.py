"""The input-disagreement drop signal (docs/performance-estimation.md, "Input disagreement"):
classifiers fitted on the labelled reference's inputs disagree with the model more often when
its inputs get noisier, an accuracy drop its confidences miss. The model is scikit-learn's
naive Bayes on its bundled digits, scored on jittered rows (as
``benchmarks/performance_estimation.py`` builds its streams)."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from lrwatch.daemon import build_reference
from lrwatch.daemon.agreement import MIN_ROWS, InputDisagreement
from lrwatch.errors import ConfigError

pytest.importorskip("sklearn")

WINDOW = 500
NOISY = 8.0   # extra noise, in jitter standard deviations: accuracy ~0.89 -> ~0.35


class Digits:
    """GaussianNB on digits: jittered rows of the 60% it was not trained on; every pixel a
    feature ``p0``..``p63``."""

    def __init__(self) -> None:
        from sklearn import datasets
        from sklearn.model_selection import train_test_split
        from sklearn.naive_bayes import GaussianNB
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        x, y = datasets.load_digits(return_X_y=True)
        x_tr, self.x, y_tr, self.y = train_test_split(x, y, train_size=0.4, stratify=y,
                                                      random_state=0)
        self.model = make_pipeline(StandardScaler(), GaussianNB(var_smoothing=1e-2))
        self.model.fit(x_tr, y_tr)
        self.sd = x_tr.std(axis=0) * 0.1
        self.rng = np.random.default_rng(1)
        self.n = 0

    def arrays(self, count: int, noise: float = 0.0
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx = self.rng.choice(len(self.y), count)
        xs = self.x[idx] + self.rng.standard_normal((count, self.x.shape[1])) * self.sd \
            * math.sqrt(1.0 + noise ** 2)
        return xs, self.model.predict_proba(xs), self.y[idx]

    def rows(self, count: int, noise: float = 0.0) -> tuple[list[dict[str, Any]], float]:
        """``count`` labelled records and their realised accuracy."""
        xs, p, y = self.arrays(count, noise)
        out = []
        for j in range(count):
            out.append({"id": f"d{self.n}", "label": int(y[j]), "prediction": p[j].tolist(),
                        "features": {f"p{c}": float(xs[j, c]) for c in range(xs.shape[1])}})
            self.n += 1
        return out, float((p.argmax(axis=1) == y).mean())


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Digits, str]:
    stream = Digits()
    rows, _ = stream.rows(1500)
    ref = build_reference(rows, window_size=WINDOW, sims=100)
    assert ref.estimator is not None and "agreement" in ref.estimator, ref.notes
    path = str(tmp_path_factory.mktemp("disagreement") / "reference.json")
    ref.save(path)
    return stream, path


def _ndjson(recs: list[dict[str, Any]]) -> str:
    return "\n".join(json.dumps(r) for r in recs)


def test_noisier_inputs_that_leave_the_model_confident_fire_the_disagreement_rule(
        run_daemon, digits) -> None:
    """Noisier inputs cost the model more than half its accuracy while its confidences (and
    so the confidence-based drop) barely move; the disagreement of the reference's
    classifiers rises by many standard errors and the serving pack's
    ``input_disagreement_rise`` fires. Unshifted windows stay far below its threshold."""
    from services import promtool_check_metrics

    stream, path = digits
    r = run_daemon(reference=path, window_size=WINDOW)
    m = r.metric
    assert math.isnan(m("lrwatch_estimated_disagreement_rise_zscore"))  # until a window
    for _ in range(2):
        clean, _ = stream.rows(WINDOW)
        assert r.post("/v1/predictions", _ndjson(clean))[1]["accepted"] == WINDOW
        assert abs(m("lrwatch_estimated_disagreement_rise_zscore")) < 3
        assert 0.0 < m("lrwatch_estimated_disagreement_ratio") < 0.2
        assert "input_disagreement_rise" not in r.daemon.engine.active
    noisy, acc = stream.rows(WINDOW, NOISY)
    assert acc < 0.6   # from ~0.89
    assert r.post("/v1/predictions", _ndjson(noisy))[1]["accepted"] == WINDOW
    assert m("lrwatch_estimated_accuracy") > acc + 0.3   # the confidences miss it
    assert m("lrwatch_estimated_disagreement_rise_zscore") > 10
    assert m("lrwatch_estimated_disagreement_ratio") > 0.3
    assert "input_disagreement_rise" in r.daemon.engine.active
    last = json.loads(r.get("/v1/status")[1])["estimation"]["last_window"]
    assert last["estimated_disagreement_z"] > 10
    rc, out = promtool_check_metrics(r.get("/metrics")[1])
    assert rc == 0, out
    assert m("lrwatch_internal_errors_total") == 0


def test_the_signal_survives_its_round_trip_and_missing_inputs(digits) -> None:
    stream, _ = digits
    x, p, y = stream.arrays(600)
    names = [f"p{c}" for c in range(x.shape[1])]
    mon = InputDisagreement.fit(names, x, p, y, 10)
    again = InputDisagreement.from_dict(json.loads(json.dumps(mon.to_dict())))
    xw, pw, _ = stream.arrays(WINDOW, NOISY)
    a, b = mon.window(xw, pw), again.window(xw, pw)
    assert a["disagreement_z"] == pytest.approx(b["disagreement_z"], rel=1e-6)
    assert a["disagreement_z"] > 10
    xw[:, :20] = np.nan   # a third of the inputs missing: read as the reference's mean
    assert math.isfinite(mon.window(xw, pw)["disagreement_z"])
    assert math.isnan(mon.window(xw[:0], pw[:0])["disagreement_z"])


def test_a_reference_without_numeric_inputs_says_why_it_has_no_disagreement_signal() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(200):
        c = int(rng.integers(2))
        p = float(np.clip(0.7 * c + 0.15 + 0.1 * rng.standard_normal(), 0.01, 0.99))
        rows.append({"features": {"colour": "ab"[c]}, "prediction": p,
                     "label": int(rng.random() < p)})
    ref = build_reference(rows, calibrate=False)
    assert ref.estimator is not None and "agreement" not in ref.estimator
    assert any("no input-disagreement drop signal" in n and "numeric" in n
               for n in ref.notes), ref.notes


def test_the_fit_and_the_saved_form_are_checked() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((MIN_ROWS - 1, 2))
    with pytest.raises(ConfigError, match="labelled reference rows"):
        InputDisagreement.fit(["a", "b"], x, rng.random(len(x)), rng.integers(0, 2, len(x)))
    x = rng.standard_normal((100, 2))
    mon = InputDisagreement.fit(["a", "b"], x, rng.random(100), rng.integers(0, 2, 100))
    d = mon.to_dict()
    d["names"] = ["a"]
    with pytest.raises(ConfigError, match="shapes"):
        InputDisagreement.from_dict(d)
    with pytest.raises(ConfigError, match="version"):
        InputDisagreement.from_dict({"version": 99})


def test_an_input_missing_from_most_labelled_rows_is_left_out() -> None:
    """Read as its mean on most reference rows, such an input would make every window where
    it is present look shifted; it is left out of the fit (and the window's value is not
    read)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 3))
    y = (x[:, 0] + x[:, 2] > 0).astype(int)
    p = 1 / (1 + np.exp(-3 * (x[:, 0] + x[:, 2])))
    sparse = x.copy()
    sparse[rng.random(400) < 0.8, 2] = np.nan
    mon = InputDisagreement.fit(["a", "b", "c"], sparse, p, y)
    assert mon.names == ["a", "b"]
    w = rng.standard_normal((500, 3))
    pw = 1 / (1 + np.exp(-3 * (w[:, 0] + w[:, 2])))
    assert math.isfinite(mon.window(w[:, :2], pw)["disagreement_z"])
    with pytest.raises(ConfigError, match="present"):
        InputDisagreement.fit(["c"], sparse[:, 2:], p, y)


def test_windows_of_a_few_records_are_not_read_as_a_rise(digits) -> None:
    """Two records of two that the discriminants decide otherwise than the model read a rise
    of 4.3 standard errors (the normal approximation at this reference's null level of 9%),
    which fired ``input_disagreement_rise`` on unshifted two-record windows; their exact
    binomial tail is the null level squared (z 2.4)."""
    stream, _ = digits
    x, p, y = stream.arrays(1500)
    mon = InputDisagreement.fit([f"p{c}" for c in range(x.shape[1])], x, p, y, 10)
    xs, ps, _ = stream.arrays(400)
    zs = [mon.window(xs[i:i + 1], ps[i:i + 1])["disagreement_z"] for i in range(400)]
    assert max(zs) < 4, sorted(zs)[-5:]
    for n in (2, 5, 30):
        zs = [mon.window(xs[i:i + n], ps[i:i + n])["disagreement_z"] for i in range(0, 400, n)]
        assert max(zs) < 4, (n, sorted(zs)[-3:])
    xn, pn, _ = stream.arrays(30, NOISY)   # 30 noisy rows still read as a rise
    assert mon.window(xn, pn)["disagreement_z"] > 4
