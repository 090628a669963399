"""Detectors: golden firing positions on known streams, state round trips, parameter checks."""

from __future__ import annotations

import inspect
import io
import json
import math
import random

import pytest

from lrwatch.errors import ConfigError
from lrwatch.rules.detectors import (DETECTORS, Baseline, Cusum, EmaRatio, NonFinite,
                                     PageHinkley, Plateau, Rate, Regression, Spike, Staleness,
                                     StartRatio, Threshold, Trend, Untrained, Frozen, Drop,
                                     make_detector)
from lrwatch.rules.detectors.base import sorted_median as _median
from lrwatch.rules.detectors.spike import _mad
from lrwatch.rules.detectors.trend import t_quantile
from lrwatch.rules.replay import replay_trace
from lrwatch.rules.schema import parse_rules

NAN, INF = math.nan, math.inf


def fires(det, xs, ts=None):
    ts = ts or [None] * len(xs)
    return [i for i, (x, t) in enumerate(zip(xs, ts)) if det.update(x, t)]


def noisy(n, mean=1.0, sd=0.05, seed=0):
    rng = random.Random(seed)
    return [mean + rng.gauss(0, sd) for _ in range(n)]


# ----------------------------------------------------------------------------- golden streams

def test_nonfinite_golden():
    assert fires(NonFinite(), [1, NAN, 2, INF, -INF, 0]) == [1, 3, 4]
    assert fires(NonFinite(which="nan"), [1, NAN, INF]) == [1]
    assert fires(NonFinite(which="inf"), [1, NAN, INF, -INF]) == [2, 3]


def test_threshold_golden():
    det = Threshold(above=1.0, below=-1.0)
    assert [det.update(x) for x in (0, 1.0, 1.5, -2, NAN, INF)] == [
        False, False, True, True, None, True]


def test_spike_golden_fires_on_jump_only():
    xs = [1.0 + 0.01 * (i % 5) for i in range(60)]
    xs[40] = 5.0
    det = Spike(window=30, threshold=6, warmup=10)
    assert fires(det, xs) == [40]
    assert det.median == pytest.approx(1.02)


def test_spike_log_space_and_floor():
    base = [1e-4 * (1 + 0.01 * (i % 3)) for i in range(40)]
    spiky = base + [1e-3]
    assert fires(Spike(window=30, warmup=10, log=True, min_scale=0.05), spiky) == [40]
    # the same tenfold jump of a near-zero loss stays quiet with an absolute floor
    assert fires(Spike(window=30, warmup=10, log=True, min_scale=0.05, floor=0.01), spiky) == []
    # values <= 0 cannot be judged in log space and are not stored
    det = Spike(window=5, warmup=3, log=True)
    assert [det.update(x) for x in (1.0, 0.0, -1.0)] == [None, None, None]
    assert len(det.state_dict()["buf"]) == 1


def test_spike_directions():
    xs = [1.0 + 0.01 * (i % 4) for i in range(30)] + [0.1]
    assert fires(Spike(window=20, warmup=10), xs) == []
    assert fires(Spike(window=20, warmup=10, direction="down"), xs) == [30]
    assert fires(Spike(window=20, warmup=10, direction="both"), xs) == [30]


def test_spike_run_length_test_is_sized_by_the_streams_own_tail():
    # a stream that never crossed the threshold fires on its second crossing in a row (a
    # rule's `for: 2` without the test), whatever its length
    calm = [1.0 + 0.01 * (i % 4) for i in range(300)] + [10.0] * 5
    det = Spike(window=50, warmup=20, log=True, min_scale=0.02, alpha=1e-5)
    assert fires(det, calm) == [301, 302, 303, 304]
    assert det.run_needed() == 2
    # a heavy-tailed one whose single values cross now and then (1 in 25 here) waits for a run
    # its own rate makes unlikely: 0.04 ** 4 <= 1e-5 < 0.04 ** 3
    tail = [10.0 if i % 25 == 24 else 1.0 + 0.01 * (i % 4) for i in range(299)]
    det = Spike(window=50, warmup=20, log=True, min_scale=0.02, alpha=1e-5)
    assert fires(det, tail + [10.0, 10.0, 10.0, 1.0]) == []
    assert det.run_needed() == 4
    assert fires(det, [10.0] * 5) == [3, 4]
    # alpha=0 (the default) is the plain per-value test
    assert fires(Spike(window=50, warmup=20, log=True, min_scale=0.02), tail)[:2] == [24, 49]
    # the counts travel with the state; a state saved before them loads as an empty history
    det2 = Spike(window=50, warmup=20, log=True, min_scale=0.02, alpha=1e-5)
    det2.load_state_dict(json.loads(json.dumps(det.state_dict())))
    assert det2.run_needed() == det.run_needed()
    old = {k: v for k, v in det.state_dict().items() if k not in ("seen", "beyond", "run")}
    det3 = Spike(window=50, warmup=20, log=True, min_scale=0.02, alpha=1e-5)
    det3.load_state_dict(old)
    assert det3.run_needed() == 2


def test_spike_keeps_firing_on_blowup_and_adapts_to_level_shift():
    xs = [1.0 + 0.01 * (i % 4) for i in range(30)] + [1.5 ** k for k in range(2, 12)]
    assert fires(Spike(window=20, warmup=10, log=True, min_scale=0.02), xs) == list(range(30, 40))
    shift = [1.0 + 0.01 * (i % 4) for i in range(30)] + [3.0 + 0.03 * (i % 4) for i in range(60)]
    hits = fires(Spike(window=20, warmup=10, log=True, min_scale=0.02), shift)
    assert hits[0] == 30 and hits[-1] < 30 + 20  # the new level becomes normal within a window


def test_mad_matches_definition():
    rng = random.Random(5)
    for n in range(1, 40):
        a = sorted(rng.uniform(-3, 3) for _ in range(n))
        m = _median(a)
        dev = sorted(abs(x - m) for x in a)
        assert _mad(a, m) == pytest.approx(_median(dev))


def test_ema_ratio_golden():
    det = EmaRatio(alpha=0.5, above=3.0, below=0.2, warmup=2)
    # ema: 1 -> 1 -> 1 ; ratios 1, 1, then 10 (fires), then 0.1 vs ema 5.5 (fires)
    assert [det.update(x) for x in (1.0, 1.0, 1.0, 10.0, 0.1 * 5.5 / 5.5 * 0.5)] == [
        None, None, False, True, True]


def test_ema_ratio_ignores_nonpositive_start_and_smooth_warmup():
    det = EmaRatio(alpha=0.3, above=4.0, warmup=3)
    lr = [0.0] + [1e-3 * i / 100 for i in range(1, 101)] + [1e-3] * 50
    assert fires(det, lr) == []
    lr2 = [1e-3 * 0.1 ** (i // 30) for i in range(100)]  # step decays
    assert fires(EmaRatio(alpha=0.3, above=4.0, warmup=3), lr2) == []
    lr3 = [1e-3] * 20 + [1e-2] * 20
    assert fires(EmaRatio(alpha=0.3, above=4.0, warmup=3), lr3) == [20]  # then the EMA adapts


def test_ema_ratio_clip_keeps_one_spike_from_making_ordinary_values_look_vanished():
    # blind set AG's NALU: one gradient norm 1,300x its level at step 10, then ordinary norms
    # 30x below the level; the plain EMA, inflated by the spike, calls them "vanished"
    norms = [100.0] * 10 + [134_695.0] + [3.0] * 30
    plain = EmaRatio(alpha=0.05, below=0.001, warmup=5)
    clipped = EmaRatio(alpha=0.05, below=0.001, warmup=5, clip=10.0)
    assert fires(plain, norms) != []
    assert fires(clipped, norms) == []


def test_ema_ratio_clip_still_sees_a_real_vanishing_and_follows_a_rise():
    det = EmaRatio(alpha=0.05, below=0.001, warmup=5, clip=10.0)
    assert fires(det, [1.0] * 30 + [1e-5] * 3) == [30, 31, 32]
    rise = EmaRatio(alpha=0.05, below=0.001, warmup=5, clip=10.0)
    for x in [1.0] * 10 + [1000.0] * 200:            # a sustained level is followed ...
        rise.update(x)
    assert rise.ema == pytest.approx(1000.0, rel=1e-3)
    slow = EmaRatio(alpha=0.05, below=0.001, warmup=5, clip=10.0)
    for x in [1.0] * 10 + [1000.0] * 5:              # ... at no more than 1.45x per value
        slow.update(x)
    assert slow.ema == pytest.approx(1.45 ** 5, rel=1e-6)


def test_ema_ratio_clip_must_be_at_least_one():
    with pytest.raises(ConfigError):
        EmaRatio(alpha=0.05, below=0.001, clip=0.5)


def test_cusum_golden():
    det = Cusum(k=0.5, h=4.0, warmup=10, alpha=0.0)
    xs = [0.0, 1.0] * 5 + [0.5] * 5 + [3.0] * 3
    # reference mean 0.5, sd 0.527; 3.0 gives z = 4.74, S+ = 4.24 > 4 at the first 3.0
    assert fires(det, xs) == [15, 16, 17]  # restarts after each alarm and re-accumulates


def test_cusum_down_and_log():
    det = Cusum(k=0.5, h=4.0, warmup=10, alpha=0.0, direction="down", log=True)
    xs = [1.0, 2.0] * 5 + [0.01]
    assert fires(det, xs) == [10]
    assert det.statistic > 4.0  # the alarm reports the sum that crossed h, not the restart
    det.update(1.5)
    assert det.statistic < 4.0  # the sums restarted after the alarm


def test_cusum_alarm_statistic_is_the_crossing_sum():
    det = Cusum(k=0.5, h=4.0, warmup=10, alpha=0.0)
    for x in [0.0, 1.0] * 5 + [0.5] * 5:
        det.update(x)
    assert det.update(3.0) is True
    assert det.statistic == pytest.approx(4.24, abs=0.01)


def test_cusum_diff_scale_sees_a_shift_that_a_trend_hides():
    # a loss falling 100-fold over 100 steps with x2 batch jitter, then x5 for 30 steps: the
    # spread of the values is mostly the fall, their step-to-step differences are the jitter
    kw = dict(k=0.5, h=5.0, warmup=30, alpha=0.03, direction="up", log=True)
    for seed in range(6):
        rng = random.Random(seed)
        ys = [math.exp(-4.6 * min(i, 100) / 100 + rng.gauss(0.0, 0.8)) for i in range(160)]
        ys += [5.0 * math.exp(-4.6 + rng.gauss(0.0, 0.8)) for _ in range(30)]
        level, diff = fires(Cusum(**kw), ys), fires(Cusum(scale="diff", **kw), ys)
        assert diff and 160 <= diff[0] <= 166            # no alarm before, a fast one after
        assert not level or diff[0] < level[0]


def test_cusum_diff_scale_is_the_jitter():
    rng = random.Random(0)
    det = Cusum(warmup=200, alpha=0.0, scale="diff")
    for i in range(400):
        det.update(0.01 * i + rng.gauss(0.0, 2.0))  # a trend of 4 sds over the stream
    assert math.sqrt(det.state_dict()["var"]) == pytest.approx(2.0, rel=0.15)


def test_cusum_diff_scale_survives_a_step_past_the_float_range():
    """(y - prev) ** 2 of a jump of 2e200 raised OverflowError: a traceback in replay, and live
    an internal error with the rule not judging the sample. Such a step goes unjudged (as a
    non-finite value does), the reference stays finite, and a run that stays at the new level
    is judged from its next value."""
    for restart in (True, False):
        det = Cusum(warmup=5, scale="diff", restart=restart)
        out = [det.update(x) for x in [1.0, 2.0] * 10]
        out += [det.update(x) for x in (1e200, -1e200, -1e200, 1e300)]
        assert out[-4:-2] == [None, None] and out[-2] is True and out[-1] is None
        assert all(math.isfinite(v) for v in (det.mean, det.state_dict()["var"]))
    rules = parse_rules("rules: [{name: shift, metric: x, detector: cusum, params: "
                        "{scale: diff, warmup: 5}, severity: warning}]")
    trace = "".join(json.dumps({"step": i, "x": x}) + "\n"
                    for i, x in enumerate([1.0, 2.0] * 10 + [1e200, -1e200, -1e200], 1))
    res = replay_trace(io.StringIO(trace), rules)
    assert res.error is None and [(e.rule, e.step) for e in res.firings] == [("shift", 23)]


def test_cusum_without_restart_stays_anomalous_while_the_shift_lasts():
    xs = [0.0, 1.0] * 5 + [0.5] * 5 + [3.0] * 6 + [0.5] * 20
    kept = Cusum(k=0.5, h=4.0, warmup=10, alpha=0.0, restart=False)
    out = [kept.update(x) for x in xs]
    # anomalous through the shift, then while the capped sum (2h = 8) falls back to h by k
    assert [i for i, v in enumerate(out) if v] == list(range(15, 28))
    again = Cusum(k=0.5, h=4.0, warmup=10, alpha=0.0, restart=False)
    assert max((again.update(x), again.statistic)[1] for x in xs) == 8.0
    restarted = Cusum(k=0.5, h=4.0, warmup=10, alpha=0.0)
    assert fires(restarted, xs) == [15, 16, 17, 18, 19, 20]


def test_cusum_state_from_before_diff_scale_loads():
    det = Cusum(warmup=3)
    for x in (1.0, 2.0, 3.0, 2.0):
        det.update(x)
    state = det.state_dict()
    del state["prev"]  # saved by a version without scale="diff"
    again = Cusum(warmup=3)
    again.load_state_dict(state)
    assert again.update(2.5) == det.update(2.5)


def test_page_hinkley_golden():
    det = PageHinkley(delta=0.0, threshold=3.0, min_instances=5, alpha=1.0)
    xs = [0.0] * 10 + [1.0] * 10
    # mean after k ones: k/(10+k); m_t grows by 1 - k/(10+k) each step: 0.909, 1.742, 2.511, 3.225
    assert fires(det, xs) == [13]


def test_page_hinkley_down():
    det = PageHinkley(delta=0.0, threshold=3.0, min_instances=5, alpha=1.0, direction="down")
    assert fires(det, [1.0] * 10 + [0.0] * 10) == [13]


def test_trend_golden():
    det = Trend(window=10, confidence=0.99)
    flat = [1.0, 1.1] * 10
    ramp = [1.1 + 0.2 * i for i in range(1, 6)]
    hits = fires(det, flat + ramp)
    assert hits and hits[0] >= 20
    assert fires(Trend(window=10, confidence=0.99), flat) == []
    down = fires(Trend(window=10, direction="down"), [10.0 - i for i in range(12)])
    assert down == [9, 10, 11]
    # min_change keeps a tiny but perfectly regular drift quiet
    assert fires(Trend(window=10, min_change=0.5), [1 + 1e-4 * i for i in range(20)]) == []


def test_trend_incremental_sums_match_recomputation():
    det = Trend(window=7)
    rng = random.Random(1)
    for i in range(100):
        det.update(rng.uniform(-5, 5))
        buf = list(det._buf)
        assert det._sy == pytest.approx(math.fsum(buf), abs=1e-9)
        assert det._sty == pytest.approx(math.fsum(j * y for j, y in enumerate(buf)), abs=1e-9)


def test_t_quantile_accuracy():
    # reference values of Student's t
    for p, df, ref in [(0.95, 10, 1.812), (0.99, 20, 2.528), (0.999, 48, 3.269), (0.99, 5, 3.365)]:
        assert t_quantile(p, df) == pytest.approx(ref, abs=0.01)


def test_regression_golden():
    det = Regression(mode="min", confidence=0.99, smooth=1.0, warmup=3)
    evals = [1.0, 0.8, 0.7, 0.65, 0.66, 0.64, 0.65, 0.63, 0.64, 0.64, 0.9, 1.0, 1.1]
    assert fires(det, evals) == [10, 11, 12]
    det = Regression(mode="max", confidence=0.99, smooth=1.0, warmup=3)
    acc = [0.5, 0.6, 0.7, 0.72, 0.71, 0.73, 0.72, 0.73, 0.72, 0.73, 0.6, 0.5, 0.4]
    assert fires(det, acc) == [11, 12]
    # a small regression needs more evidence than a large one: sequential, not a patience
    det = Regression(mode="max", confidence=0.99, smooth=1.0, warmup=3)
    small = acc[:10] + [0.67] * 14
    hits = fires(det, small)
    assert hits and hits[0] > 12


def test_regression_new_best_restarts_and_short_plateau_is_quiet():
    rng = random.Random(7)
    plateau = [0.5 + rng.gauss(0, 0.01) for _ in range(50)]
    assert fires(Regression(mode="min", confidence=0.99), plateau) == []
    det = Regression(mode="min", smooth=1.0)
    fires(det, [1.0, 0.9, 0.91, 0.9, 0.91, 0.9, 1.5])
    assert det.statistic > 0
    det.update(0.1)
    assert det.statistic == 0.0 and det.best == pytest.approx(0.1)


def test_plateau_golden():
    det = Plateau(mode="max", patience=3, rel_delta=0.0, min_delta=0.01)
    assert [det.update(x) for x in (0.1, 0.2, 0.205, 0.2, 0.21, 0.3)] == [
        None, False, False, False, True, False]


def test_baseline_golden():
    det = Baseline(warmup=3, arm=0.5, level=0.9)
    # never armed: a run that never trained is a plateau, not a collapse
    assert fires(det, [2.3, 2.3, 2.3, 2.2, 2.3, 2.3]) == []
    up = Baseline(warmup=3, arm=0.5, level=0.9)
    assert fires(up, [2.0, 2.0, 2.0, 1.0, 0.9, 1.9, 0.5]) == [5]
    acc = Baseline(warmup=2, arm=3.0, level=1.2, direction="down")
    assert fires(acc, [0.1, 0.1, 0.5, 0.9, 0.11, 0.9]) == [4]


def test_baseline_median_ignores_one_or_two_hard_batches():
    # a trained run (0.3) with a heavy-tailed batch loss: single and paired hard batches
    healthy = [0.85, 0.84, 0.86] + [0.3] * 10 + [2.4, 0.4, 0.3, 0.3, 0.9, 2.0, 0.3, 0.3, 0.3]
    ewma = Baseline(warmup=3, arm=0.4, level=0.9, smooth=0.5)
    assert fires(ewma, healthy) != []  # the EWMA carries a 2.4 over two steps
    med = Baseline(warmup=3, arm=0.4, level=0.9, median=5)
    assert fires(med, healthy) == []
    # a dead network: every batch back at the untrained level; 3 of 5 there
    dead = Baseline(warmup=3, arm=0.4, level=0.9, median=5)
    assert fires(dead, [0.85, 0.84, 0.86] + [0.3] * 10 + [0.86] * 4)[0] == 15
    # it arms only when 3 of the last 5 reached `arm`: one lucky batch does not
    lucky = Baseline(warmup=3, arm=0.4, level=0.9, median=5)
    assert fires(lucky, [0.85, 0.84, 0.86, 0.8, 0.2, 0.8, 0.9, 0.85, 0.86, 0.9]) == []


def test_baseline_run_length_test_sized_by_the_runs_own_rate() -> None:
    start = [0.85, 0.84, 0.86]
    # a clean run that trained for 200 steps, then collapsed: p = 1/201, a run of 3 is needed
    clean = start + [0.3] * 200 + [0.86] * 5
    det = Baseline(warmup=3, arm=0.4, level=0.9, alpha=1e-5)
    assert fires(det, clean)[0] == len(start) + 200 + 2
    # after 400 clean steps p^2 <= alpha: the second step at the level fires
    longer = Baseline(warmup=3, arm=0.4, level=0.9, alpha=1e-5)
    assert fires(longer, start + [0.3] * 400 + [0.86] * 5)[0] == len(start) + 400 + 1
    # the same collapse right after arming: a short history asks for a long run (p near 1/2)
    early = Baseline(warmup=3, arm=0.4, level=0.9, alpha=1e-5)
    assert early.run_needed() == 17
    # three steps after arming p = 1/5: the eighth step at the level fires
    assert fires(early, start + [0.3] * 3 + [0.86] * 10)[0] == len(start) + 3 + 7
    # heavy-tailed batches reached the level 8 times in 200 steps, in singles and pairs: a pair
    # is not a collapse, a run of 4 is
    rng = random.Random(3)
    tail = [0.3] * 200
    for i in rng.sample(range(0, 198, 4), 4):
        tail[i] = tail[i + 1] = 2.0
    heavy = Baseline(warmup=3, arm=0.4, level=0.9, alpha=1e-5)
    assert fires(heavy, start + [0.3] + tail) == []
    assert heavy.run_needed() == 4
    assert [heavy.update(x) for x in [0.9] * 4] == [False, False, False, True]
    # alpha = 0 keeps the per-value decision
    plain = Baseline(warmup=3, arm=0.4, level=0.9)
    assert fires(plain, start + [0.3] + tail) != []


def test_baseline_run_length_state_round_trip_and_old_states() -> None:
    seq = [0.85, 0.84, 0.86] + [0.3] * 30 + [2.0, 0.3, 0.3] + [0.9] * 6
    ref = Baseline(warmup=3, arm=0.4, level=0.9, alpha=1e-3)
    want = [ref.update(x) for x in seq]
    det = Baseline(warmup=3, arm=0.4, level=0.9, alpha=1e-3)
    got = [det.update(x) for x in seq[:35]]
    copy = Baseline(warmup=3, arm=0.4, level=0.9, alpha=1e-3)
    copy.load_state_dict(json.loads(json.dumps(det.state_dict())))
    assert got + [copy.update(x) for x in seq[35:]] == want
    old = det.state_dict()
    for k in ("seen", "beyond", "run"):
        del old[k]  # what an lrwatch before the run-length test wrote
    fresh = Baseline(warmup=3, arm=0.4, level=0.9, alpha=1e-3)
    fresh.load_state_dict(old)
    assert fresh.armed and fresh.run_needed() >= 2
    with pytest.raises(ConfigError, match="alpha"):
        Baseline(alpha=0.7)


def test_baseline_state_from_before_median_loads() -> None:
    det = Baseline(warmup=3, arm=0.5, level=0.9, median=3)
    for x in (2.0, 2.0, 2.0, 0.5, 0.5):
        det.update(x)
    state = det.state_dict()
    del state["recent"]  # what an lrwatch before the median wrote
    fresh = Baseline(warmup=3, arm=0.5, level=0.9, median=3)
    fresh.load_state_dict(state)
    assert fresh.armed and fresh.update(0.5) is False


def test_start_ratio_golden():
    det = StartRatio(above=10.0)
    # the second step is 23x the untrained loss: no history is needed to see it
    assert fires(det, [1.35, 31.1, 14.5, 4.5, 2.05]) == [1, 2]
    # a slow geometric climb from a trained level crosses the start level x10 eventually
    climb = StartRatio(above=10.0)
    xs = [2.3, 1.0, 0.5] + [0.5 * 1.5 ** k for k in range(1, 15)]
    first = fires(climb, xs)[0]
    assert xs[first] > 23.0 and xs[first - 1] <= 23.0
    # the start is a median of the warm-up; zero, negative and non-finite values are skipped
    med = StartRatio(warmup=3, above=2.0, below=0.1)
    assert [med.update(x) for x in (0.0, -1.0, NAN, 3.0, 1.0, 2.0)] == [None] * 6
    assert med.start == 2.0
    assert [med.update(x) for x in (4.0, 4.1, 0.1, 0.3)] == [False, True, True, False]
    # after the start, a zero is a ratio of 0 (a loss that underflowed: below any bound)
    assert med.update(0.0) is True and med.statistic == 0.0
    with pytest.raises(ConfigError, match="needs 'above', 'below'"):
        StartRatio()
    with pytest.raises(ConfigError, match="must be smaller"):
        StartRatio(above=1.0, below=2.0)


def test_rate_golden():
    det = Rate(above=5.0, alpha=1.0, counter=True)
    pts = [(0, 0.0), (2, 1.0), (12, 2.0), (3, 3.0), (3, 3.0), (4, None)]
    assert [det.update(x, t) for x, t in pts] == [None, False, True, False, None, None]
    assert det.statistic == 3.0  # counter reset: the new value is the increase


def test_start_ratio_window_uses_the_median():
    det = StartRatio(above=2.0, window=3)
    # no decision until the window is full; one batch above 2x does not count, two of the
    # last three do
    assert [det.update(x) for x in (1.0, 2.5, 0.9, 0.9, 2.5, 2.6)] == [
        None, None, None, False, False, True]


def test_untrained_golden():
    # a dead network: flat at the untrained level after a few steps of progress
    det = Untrained(window=10, above=0.9)
    dead = [2.3, 2.0, 1.8, 2.3, 2.31, 2.29, 2.3, 2.3, 2.31, 2.29, 2.3, 2.3, 2.29]
    assert [det.update(x) for x in dead][10:] == [True, True, True]
    assert det.statistic == pytest.approx(2.3 / 2.3, rel=0.01)
    # stuck above the untrained level and noisy: fires; a steep recovery from a transient does
    # not, although it is far above the untrained level
    stuck = Untrained(window=10, above=0.9)
    assert stuck.update(2.3) is None
    assert any(stuck.update(x) for x in [5.0, 6.1, 4.8, 5.5, 6.0, 5.2, 4.9, 5.8, 5.1, 5.6])
    rec = Untrained(window=10, above=0.9)
    rec.update(2.3)
    assert not any(rec.update(x) for x in [20.0 * 0.8 ** i for i in range(10)])
    # below the level: never fires, however flat
    low = Untrained(window=10, above=0.9)
    low.update(2.3)
    assert not any(low.update(1.0) for _ in range(30))
    assert Untrained().update(float("nan")) is None


def test_untrained_trend_judges_the_fall_on_the_newest_values_only():
    # a loss that came down from a blow-up in the older half of the window and then settled
    # at 1.05x the level: over the whole window the fall reads as learning; over the newest
    # half (trend) it has stopped, so the run is not learning
    rng = random.Random(3)
    settled = [1.0] + [4.0 * 0.9 ** i + 1.05 for i in range(20)] + [
        1.05 * (1 + 0.01 * rng.gauss(0, 1)) for _ in range(40)]
    whole, newest = Untrained(window=40, above=1.0), Untrained(window=40, above=1.0, trend=20)
    got_whole = [whole.update(x) for x in settled]
    got_newest = [newest.update(x) for x in settled]
    assert not any(got_whole[41:52]), got_whole          # the fall is still in the window
    assert all(got_newest[50:]), got_newest              # it is not falling now
    assert newest.statistic == pytest.approx(1.05, rel=0.02)   # the level: newer half of 40
    # still falling in the newest values: learning either way
    falling = Untrained(window=40, above=1.0, trend=20)
    assert not any(falling.update(x) for x in [1.0] + [3.0 - 0.02 * i for i in range(60)])
    # trend == window is the whole-window test; a trend longer than the window is refused
    same, plain = Untrained(window=40, above=1.0, trend=40), Untrained(window=40, above=1.0)
    assert [same.update(x) for x in settled] == [plain.update(x) for x in settled]
    with pytest.raises(ConfigError, match="at most 'window'"):
        Untrained(window=40, trend=60)


def test_frozen_golden():
    det = Frozen(count=3)
    # identical held-out accuracies (a constant prediction) fire; any change breaks the run
    assert [det.update(x) for x in (0.31, 0.3096, 0.3096, 0.3096, 0.3097)] == [
        None, None, False, True, False]
    loose = Frozen(count=2, rtol=0.01)
    assert [loose.update(x) for x in (1.0, 1.005, 1.2)] == [None, True, False]
    assert loose.statistic == pytest.approx((1.2 - 1.005) / 1.2)
    assert loose.update(float("inf")) is None and loose.update(1.2) is None   # window restarts


def test_staleness_golden():
    assert Staleness(seconds=10.0).check(100.0) is None  # never seen: nothing to judge
    det = Staleness(seconds=10.0, samples=3)
    assert det.update(1.0, 100.0) is False
    assert [det.check(t) for t in (105.0, 110.0, 110.5)] == [False, False, True]
    assert [det.miss(None), det.miss(None), det.miss(None)] == [False, False, True]
    assert det.update(1.0, 111.0) is False and det.misses == 0


# ----------------------------------------------------------------------------- state round trip

FACTORIES = {
    "nonfinite": lambda: NonFinite(),
    "threshold": lambda: Threshold(above=1.5, below=0.2),
    "spike": lambda: Spike(window=20, warmup=5, log=True, min_scale=0.01),
    "ema_ratio": lambda: EmaRatio(above=1.5, below=0.5, warmup=2),
    "cusum": lambda: Cusum(warmup=10, h=3.0),
    "page_hinkley": lambda: PageHinkley(delta=0.01, threshold=1.0, min_instances=5,
                                        direction="both"),
    "trend": lambda: Trend(window=10, confidence=0.9),
    "regression": lambda: Regression(warmup=3),
    "plateau": lambda: Plateau(patience=5),
    "baseline": lambda: Baseline(warmup=3, arm=0.9, level=0.95, smooth=0.5),
    "baseline_median": lambda: Baseline(warmup=3, arm=0.9, level=0.95, median=3),
    "baseline_run": lambda: Baseline(warmup=3, arm=0.9, level=0.95, alpha=0.01),
    "start_ratio": lambda: StartRatio(warmup=2, above=5.0, below=0.1),
    "start_ratio_window": lambda: StartRatio(warmup=1, above=2.0, window=5),
    "untrained": lambda: Untrained(window=10, above=0.5),
    "frozen": lambda: Frozen(count=3, rtol=0.01),
    "drop": lambda: Drop(mode="max", z=3.0, count=2, window=5, warmup=4),
    "rate": lambda: Rate(above=1.0, below=0.1),
    "staleness": lambda: Staleness(seconds=2.5, samples=3),
    "above_min": lambda: DETECTORS["above_min"](window=6, factor=1.5),
    "below_max": lambda: DETECTORS["below_max"](factor=0.2),
    "drop_floor": lambda: Drop(mode="min", z=3.0, count=2, window=5, warmup=4, log=True,
                             min_drop=0.1),
    "fewer": lambda: DETECTORS["fewer"](count=4),
    "stall": lambda: DETECTORS["stall"](min_window=8, blocks=4, max_bins=8),
}


def test_fewer_fires_until_the_evidence_exists():
    det = DETECTORS["fewer"](count=3)
    assert [det.update(x) for x in (1.0, NAN, 2.0, 3.0, 4.0)] == [True, None, True, False, False]
    assert det.statistic == 4.0


def test_drop_min_drop_keeps_a_tiny_drift_quiet_however_many_sigmas():
    # an evaluation loss that barely jitters, then drifts up 0.4% per evaluation
    flat = [1.0 + 1e-6 * (i % 2) for i in range(12)]
    drift = [1.0 * 1.004 ** k for k in range(1, 11)]
    plain = Drop(mode="min", z=10.0, count=3, warmup=10, log=True)
    floor = Drop(mode="min", z=10.0, count=3, warmup=10, log=True, min_drop=math.log(1.1))
    assert any(plain.update(x) for x in flat + drift)          # thousands of sigmas
    assert not any(floor.update(x) for x in flat + drift)      # but only 4% above the best
    jump = [1.0 * 1.2 ** k for k in range(1, 4)]               # 20% per evaluation: a drop
    floor2 = Drop(mode="min", z=10.0, count=3, warmup=10, log=True, min_drop=math.log(1.1))
    assert [floor2.update(x) for x in flat + jump][-1] is True


def test_above_min_against_the_plain_window_minimum():
    rng = random.Random(7)
    det = DETECTORS["above_min"](window=7, factor=1.5)
    seen: list[float] = []
    for _ in range(500):
        x = math.exp(rng.gauss(0, 0.4))
        seen.append(x)
        fired = det.update(x)
        ratio = x / min(seen[-7:])
        assert det.statistic == pytest.approx(ratio)
        assert fired == (ratio >= 1.5)
    assert det.update(-1.0) is None and det.update(NAN) is None


def test_below_max_against_the_running_maximum():
    rng = random.Random(8)
    det = DETECTORS["below_max"](factor=0.2)
    seen: list[float] = []
    for i in range(400):  # a cosine schedule with noise, to zero
        x = max(0.0, 0.5 * (1 + math.cos(math.pi * i / 399)) * math.exp(rng.gauss(0, 0.05)))
        fired = det.update(x)
        seen.append(x)
        assert fired == (x <= 0.2 * max(seen)) and det.statistic == pytest.approx(x / max(seen))
    assert det.update(-1.0) is None and det.update(NAN) is None
    assert DETECTORS["below_max"](factor=0.5).update(0.0) is None   # no maximum yet


def test_below_max_counts_levels_that_lasted():
    rng = random.Random(9)
    det = DETECTORS["below_max"](factor=0.3, hold=4)
    seen: list[float] = []
    for _ in range(300):
        x = rng.choice([0.01, 0.02, 0.05, 1.0]) if rng.random() < 0.2 else 0.01
        fired = det.update(x)
        seen.append(x)
        levels = [min(seen[i - 3:i + 1]) for i in range(3, len(seen))]
        if not levels:
            assert fired is None
            continue
        assert fired == (x <= 0.3 * max(levels))


def test_factories_cover_every_detector():
    assert {k.removesuffix("_window").removesuffix("_floor").removesuffix("_median")
            .removesuffix("_run") for k in FACTORIES} == set(DETECTORS)


def _stream(seed):
    rng = random.Random(seed)
    xs = []
    for i in range(200):
        x = math.exp(rng.gauss(0, 0.5)) * (1 + i / 100)
        if rng.random() < 0.05:
            x = rng.choice([NAN, INF, 0.0, -1.0, 50.0])
        xs.append(x)
    return xs


def _run(det, xs, start):
    out = []
    for i, x in enumerate(xs):
        t = 1000.0 + (start + i) * (0.5 if (start + i) % 17 else 7.0)
        if (start + i) % 11 == 0 and det.watches_absence:
            out.append(("miss", det.miss(t)))
        else:
            out.append((det.update(x, t), det.statistic))
    return out


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_state_dict_round_trip_resumes_exactly(name):
    xs = _stream(hash(name) % 1000)
    whole = FACTORIES[name]()
    expected = _run(whole, xs, 0)
    for cut in (0, 1, 7, 60, 150):
        first = FACTORIES[name]()
        got = _run(first, xs[:cut], 0)
        state = json.loads(json.dumps(first.state_dict(), allow_nan=False))
        second = FACTORIES[name]()
        second.load_state_dict(state)
        got += _run(second, xs[cut:], cut)
        assert repr(got) == repr(expected), (name, cut)  # repr: nan == nan


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_params_match_signature(name):
    cls = DETECTORS[name]
    sig = inspect.signature(cls.__init__)
    kwargs = [p for p in sig.parameters if p != "self"]
    assert kwargs == list(cls.PARAMS)
    assert all(sig.parameters[p].kind is inspect.Parameter.KEYWORD_ONLY for p in kwargs)
    assert cls.__doc__ and "Examples" in cls.__doc__ and "False alarms" in cls.__doc__


def test_bad_params_list_valid_choices():
    with pytest.raises(ConfigError, match=r"valid choices: up, down, both"):
        Spike(direction="sideways")
    with pytest.raises(ConfigError, match=r"'window' must be an integer >= 3"):
        Spike(window=2)
    with pytest.raises(ConfigError, match="needs 'above', 'below' or both"):
        Threshold()
    with pytest.raises(ConfigError, match=r"valid choices: nonfinite, threshold"):
        make_detector("nope")
    with pytest.raises(ConfigError, match=r"unknown parameter 'windw'"):
        make_detector("spike", windw=3)
    with pytest.raises(ConfigError, match="must be true or false"):
        Spike(log="yes")


def test_load_state_dict_rejects_other_detector():
    with pytest.raises(ConfigError, match="not 'spike'"):
        Spike().load_state_dict(Threshold(above=1).state_dict())
    with pytest.raises(ConfigError, match="lacks"):
        Spike().load_state_dict({"detector": "spike"})


def test_fewer_as_a_veto_waits_for_the_evaluations():
    # a loss rule that must not act before 3 evaluations exist (when the run logs any)
    from lrwatch.rules import Engine, parse_rules
    from lrwatch.samples import Sample

    rules = parse_rules("""\
rules:
  - {name: high, metric: loss, detector: threshold, params: {above: 1}, severity: info}
  - {name: few_evals, metric: eval_loss, detector: fewer, params: {count: 3}, severity: info}
  - name: act
    when: {firing: high, unless: [few_evals]}
    severity: critical
""")

    def first(every: int | None) -> int | None:
        eng = Engine(rules)
        for step in range(1, 60):
            vals = {"loss": 2.0}
            if every and step % every == 0:
                vals["eval_loss"] = 1.0
            for e in eng.update(Sample(step=step, values=vals)):
                if e.rule == "act" and e.kind == "firing":
                    return step
        return None

    assert first(None) == 1        # no evaluations at all: nothing to wait for
    assert first(10) == 1          # nothing logged yet at step 1: the veto is not firing
    assert first(1) == 3           # evaluating every step: the third evaluation lifts the veto


# ----------------------------------------------------------------------------- stall


def _power_law(c: float, n: int, noise: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [i ** -c * math.exp(rng.gauss(0, noise)) for i in range(1, n + 1)]


def test_stall_judges_the_exponent_of_a_power_law_not_the_run_length():
    # a loss t**-0.3 improves 8.6% per quarter of the run at step 400 and at step 40,000 alike
    for n in (400, 40_000):
        det = DETECTORS["stall"]()
        assert not any(det.update(x) for x in _power_law(0.3, n, 0.05, 1)), n
    # a loss that stopped improving is a stall, on the scale of the run so far
    det = DETECTORS["stall"]()
    xs = _power_law(0.3, 2000, 0.05, 2)
    xs += [xs[-1] * math.exp(random.Random(3).gauss(0, 0.05)) for _ in range(2000)]
    hits = [i for i, x in enumerate(xs) if det.update(x)]
    assert hits and 2000 < hits[0] < 4000
    assert det.statistic is not None and det.statistic < 0.01


def test_stall_a_rising_loss_is_not_improving_and_noise_needs_evidence():
    det = DETECTORS["stall"](min_window=40)
    rising = [math.exp(0.002 * i) for i in range(100)]
    assert [det.update(x) for x in rising][-1] is True
    # very noisy, improving 3% per window (a power law, c = 0.1): a few false calls at most,
    # where a point estimate below 1% would fire on a large share of its decisions
    for seed in range(5):
        noisy = DETECTORS["stall"](min_window=40)
        hits = sum(bool(noisy.update(x)) for x in _power_law(0.1, 2000, 0.3, seed))
        assert hits < 100, (seed, hits)


def test_stall_max_mode_and_bounded_memory_keep_every_value():
    det = DETECTORS["stall"](mode="max", max_bins=16, blocks=4, min_window=8)
    xs = [1.0 + 0.01 * i for i in range(1000)]   # a metric that rises: progress
    assert not any(det.update(x) for x in xs)
    assert len(det._sums) <= 16 and sum(det._counts) == 1000
    assert math.isclose(-sum(det._sums), math.fsum(math.log(x) for x in xs), rel_tol=1e-9)
    flat = DETECTORS["stall"](mode="max", min_window=20)
    assert [flat.update(0.9) for _ in range(30)][-1] is True
    with pytest.raises(ConfigError, match="max_bins"):
        DETECTORS["stall"](blocks=10, max_bins=16)
