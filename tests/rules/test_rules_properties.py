"""Hypothesis: no exception on any float sequence (nan/inf included), and bounded memory."""

from __future__ import annotations

import json
import math
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lrwatch.rules import Engine, load_pack
from lrwatch.rules.detectors import DETECTORS
from lrwatch.samples import Sample

# Parameters chosen so that every code path (warm-up over, alarms possible) is reachable fast.
FACTORIES = {
    "nonfinite": lambda: DETECTORS["nonfinite"](),
    "threshold": lambda: DETECTORS["threshold"](above=1.5, below=0.2),
    "spike": lambda: DETECTORS["spike"](window=20, warmup=5, log=True, min_scale=0.01),
    "ema_ratio": lambda: DETECTORS["ema_ratio"](above=1.5, below=0.5, warmup=2),
    "cusum": lambda: DETECTORS["cusum"](warmup=10, h=3.0, log=True),
    "page_hinkley": lambda: DETECTORS["page_hinkley"](delta=0.01, threshold=1.0,
                                                      min_instances=5, direction="both"),
    "trend": lambda: DETECTORS["trend"](window=10, confidence=0.9),
    "regression": lambda: DETECTORS["regression"](warmup=3),
    "plateau": lambda: DETECTORS["plateau"](patience=5),
    "baseline": lambda: DETECTORS["baseline"](warmup=3, arm=0.9, level=0.95, smooth=0.5),
    "start_ratio": lambda: DETECTORS["start_ratio"](warmup=2, above=5.0, below=0.1),
    "untrained": lambda: DETECTORS["untrained"](window=8, above=0.5),
    "frozen": lambda: DETECTORS["frozen"](count=3, rtol=0.01),
    "drop": lambda: DETECTORS["drop"](mode="min", z=3.0, count=2, window=5, warmup=4,
                                      log=True, min_drop=0.05),
    "rate": lambda: DETECTORS["rate"](above=1.0, below=0.1, counter=True),
    "staleness": lambda: DETECTORS["staleness"](seconds=2.5, samples=3),
    "above_min": lambda: DETECTORS["above_min"](window=6, factor=1.5),
    "below_max": lambda: DETECTORS["below_max"](factor=0.2),
    "fewer": lambda: DETECTORS["fewer"](count=4),
    "stall": lambda: DETECTORS["stall"](min_window=8, blocks=4, max_bins=8),
}


def test_factories_cover_every_detector():
    assert set(FACTORIES) == set(DETECTORS)

anyfloat = st.floats(allow_nan=True, allow_infinity=True)
# values near the usual magnitudes of losses, norms and learning rates, plus the nasty ones
metricish = st.one_of(anyfloat, st.floats(min_value=-10, max_value=10),
                      st.sampled_from([0.0, -0.0, 1e-300, 5e-324, 1e308, math.nan, math.inf,
                                       -math.inf]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(DETECTORS)),
       xs=st.lists(st.tuples(metricish, st.one_of(st.none(), anyfloat), st.booleans()),
                   max_size=80))
def test_detectors_never_raise(name, xs):
    det = FACTORIES[name]()
    for x, t, missing in xs:
        r = det.miss(t) if missing else det.update(x, t)
        assert r in (True, False, None)
        if t is not None:
            assert det.check(t) in (True, False, None)
        _ = det.statistic
    json.dumps(det.state_dict(), allow_nan=False)


sample_values = st.dictionaries(
    st.sampled_from(["loss", "grad_norm", "lr", "update_ratio", "eval_loss", "eval_accuracy",
                     "nonfinite_grad", "nonfinite_loss", "drift_detected", "model_accuracy",
                     "ingest_error_ratio", "label_coverage"]),
    metricish, max_size=8)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pack=st.sampled_from(["training", "serving"]),
       samples=st.lists(st.tuples(sample_values, st.one_of(st.none(), anyfloat)), max_size=60),
       ticks=st.lists(anyfloat, max_size=3))
def test_engine_with_default_packs_never_raises(pack, samples, ticks):
    eng = Engine(load_pack(pack))
    for step, (vals, t) in enumerate(samples):
        for e in eng.update(Sample(step=step, time=t, values=vals)):
            assert e.kind in ("firing", "resolved")
            json.dumps(e.to_json("t"), allow_nan=False)
    for now in ticks:
        eng.tick(now)
    state = json.loads(json.dumps(eng.state_dict(), allow_nan=False))
    Engine(load_pack(pack)).load_state_dict(state)


def _stream(seed: int, n: int):
    rng = random.Random(seed)
    for i in range(n):
        x = math.exp(rng.gauss(0, 1)) * (1 + math.sin(i / 50))
        if rng.random() < 0.01:
            x = rng.choice([math.nan, math.inf, 0.0, 1e9])
        yield i, x


def test_detector_state_stays_bounded():
    for name in sorted(DETECTORS):
        det = FACTORIES[name]()
        sizes = []
        for i, x in _stream(1, 20000):
            det.update(x, 1000.0 + i)
            if i in (999, 19999):
                sizes.append(len(json.dumps(det.state_dict())))
        assert sizes[1] <= sizes[0] * 1.5 + 200, (name, sizes)


def test_engine_state_stays_bounded():
    eng = Engine(load_pack("training"))
    sizes = []
    for i, x in _stream(2, 20000):
        vals = {"loss": x, "grad_norm": x / 3, "lr": 1e-3, "update_ratio": x / 1000}
        if i % 100 == 0:
            vals["eval_loss"] = x
        eng.update(Sample(step=i, time=1000.0 + i, values=vals))
        if i in (1999, 19999):
            sizes.append(len(json.dumps(eng.state_dict())))
    assert sizes[1] <= sizes[0] * 1.5 + 500, sizes


def test_trend_skips_values_whose_squares_overflow():
    """Found by the property test above: 1e308 in a trend window made math.fsum raise."""
    from lrwatch.rules.detectors.trend import Trend

    det = Trend(window=6, confidence=0.99, direction="up", min_change=0.01)
    for x in [0.0, 0.0, 1e308, 1e308, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0]:
        det.update(x)
    assert det.statistic is not None and det.statistic == det.statistic   # finite, no raise
