"""The detectors' sorted windows kept in step one value at a time give what sorting the window
afresh on every value gave (the replay speed-up of the sixteenth round): the same decisions
and statistics, value for value, on random streams with NaNs, infinities, zeros, negative
values and repeats, through saves and loads of the state."""

from __future__ import annotations

import copy
import json
import math
import random
from collections import deque
from operator import sub

import pytest

from lrwatch.rules.detectors import StartRatio, Untrained
from lrwatch.rules.detectors.sliding import SortedSpans
from lrwatch.rules.templates import _FORMATTER, render


def _median(vals):
    a = sorted(vals)
    n = len(a)
    return a[n // 2] if n % 2 else 0.5 * (a[n // 2 - 1] + a[n // 2])


def _stream(rng: random.Random, n: int) -> list[float]:
    """Positive values around a level that drifts, with repeats, zeros, negatives, NaNs and
    infinities among them."""
    out, level = [], 2.0
    for _ in range(n):
        level *= math.exp(rng.gauss(0, 0.05))
        u = rng.random()
        if u < 0.05:
            out.append(math.nan)
        elif u < 0.07:
            out.append(rng.choice([math.inf, -math.inf, 0.0, -0.0, -1.0]))
        elif u < 0.2 and out:
            out.append(out[-1])                       # a repeat
        else:
            out.append(round(level * math.exp(rng.gauss(0, 0.2)), rng.choice([1, 2, 6])))
    return out


class _DirectUntrained:
    """The untrained test as it was computed before: every median and the differences'
    median sorted afresh from the window on every value."""

    def __init__(self, window: int, above: float, z: float = 3.0, trend: int | None = None):
        self.window, self.above, self.z, self.trend = window, above, z, trend
        self.buf: deque[float] = deque(maxlen=window)
        self.start: float | None = None
        self.level: float | None = None

    def update(self, x: float, given: float | None) -> bool | None:
        if given is not None and math.isfinite(given) and given > 0.0:
            self.start = given
        if not math.isfinite(x) or x <= 0.0:
            return None
        if self.start is None:
            self.start = x
            return None
        self.buf.append(x)
        if len(self.buf) < self.window:
            return None
        h = self.window // 2
        vals = list(self.buf)
        if 2 * sum(v >= self.above * self.start for v in vals[h:]) < h:
            return False
        self.level = _median(vals[h:]) / self.start
        if self.level < self.above:
            return False
        if self.trend is not None and self.trend < self.window:
            vals, h = vals[-self.trend:], self.trend // 2
        new, old = _median(vals[h:]), _median(vals[:h])
        sd = 1.4826 * _median([abs(b - a) for a, b in zip(vals, vals[1:])]) / math.sqrt(2.0)
        se = 1.2533 * sd * math.sqrt(2.0 / h)
        return not old - new > self.z * se


def _reloaded(det, cls, **params):
    fresh = cls(**params)
    fresh.load_state_dict(json.loads(json.dumps(det.state_dict())))
    return fresh


@pytest.mark.parametrize("window,trend,above", [(8, None, 0.5), (30, None, 0.9),
                                                (80, 40, 1.0), (40, 40, 0.7), (60, 10, 1.2)])
def test_untrained_gives_the_direct_computation_value_for_value(window, trend, above):
    rng = random.Random(window * 7 + (trend or 0))
    params = dict(window=window, above=above, trend=trend)
    det, ref = Untrained(**params), _DirectUntrained(**params)
    decided = 0
    for i, x in enumerate(_stream(rng, 3000)):
        # the measured level comes now and then, and moves (the threshold is recounted)
        given = rng.choice([None, None, None, 1.5, 2.0, math.nan]) if i % 50 == 0 else None
        got, want = det.update_given(x, given), ref.update(x, given)
        assert got == want, (i, x)
        assert det.statistic == ref.level, i
        decided += want is not None
        if i % 397 == 0:            # a resumed run: the sorted copies are rebuilt
            det = _reloaded(det, Untrained, **params)
            saved = (json.loads(json.dumps(det.state_dict())), copy.deepcopy(ref))
        elif i % 397 == 150:        # a rollback: the same detector goes back 150 values
            det.load_state_dict(saved[0])
            ref = copy.deepcopy(saved[1])
    assert decided > 2000


def test_untrained_decides_both_ways_on_the_test_streams():
    # the comparison above must see the slow path (not learning) and the learning verdict
    rng = random.Random(5)
    det, seen = Untrained(window=30, above=0.5), set()
    for x in _stream(rng, 3000):
        seen.add(det.update_given(x, 2.0))
    assert {True, False, None} <= seen


@pytest.mark.parametrize("window", [2, 5, 10, 40])
def test_start_ratio_window_median_gives_the_direct_computation(window):
    rng = random.Random(window)
    det = StartRatio(warmup=3, below=0.8, above=1.5, window=window)
    start: float | None = None
    first: list[float] = []
    buf: deque[float] = deque(maxlen=window)
    for i, x in enumerate(_stream(rng, 3000)):
        got = det.update(x)
        if not math.isfinite(x) or x < 0.0 or (x == 0.0 and start is None):
            want = None
        elif start is None:
            first.append(x)
            if len(first) == 3:
                start = _median(first)
            want = None
        else:
            buf.append(x)
            want = None
            if len(buf) == window:
                r = _median(buf) / start
                want = r > 1.5 or r < 0.8
                # the same median to the bit, -0.0 against 0.0 included
                assert math.copysign(1.0, det.statistic) == math.copysign(1.0, r)
                assert det.statistic == r, i
        assert got == want, (i, x)
        if i % 211 == 0:
            det = _reloaded(det, StartRatio, warmup=3, below=0.8, above=1.5, window=window)


def test_sorted_spans_follow_the_window():
    rng = random.Random(3)
    spans = SortedSpans(((0, 5), (5, 10), (2, 7)), diffs=8)
    buf: deque[float] = deque(maxlen=10)
    for i in range(2000):
        x = float(rng.choice([rng.randint(0, 5), rng.gauss(0, 1)]))
        if len(buf) == 10:
            if i % 100 == 0:
                spans.build(buf)
            spans.slide(buf, x)
        buf.append(x)
        if len(buf) < 10:
            continue
        if i == 9:
            spans.build(buf)
        vals = list(buf)
        assert [spans.median(k) for k in range(3)] == [
            _median(vals[5:]), _median(vals[:5]), _median(vals[3:8])]
        tail = vals[-8:]
        assert spans.diff_median() == _median(map(abs, map(sub, tail[1:], tail[:-1])))


@pytest.mark.parametrize("template", [
    "{rule}: {metric} = {value:.4g} at step {step}", "{value!r} {statistic:>10.2f} {time:.0f}",
    "{labels} {severity!s:^9} {detector!a}", "{{literal}} {value:+.3e}", "{value:,}",
    "{value:{step}}", "{labels[team]} {value}", "{}", "{value.real}", "{nope}", "{value!x}",
    "{value:.3q}", "{oops"])
def test_render_gives_what_the_checked_formatter_gives(template):
    ctx = {"rule": "r", "metric": "loss", "value": 1234.5678, "step": 12, "time": math.nan,
           "severity": "info", "statistic": -0.0, "detector": "spike",
           "labels": {"team": "ml"}}

    def outcome(fn):
        try:
            return fn()
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            return type(exc)

    assert outcome(lambda: render(template, ctx)) == outcome(
        lambda: _FORMATTER.vformat(template, (), ctx))
