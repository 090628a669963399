"""The replay's hot paths made cheaper in the seventeenth round give what the plain code gave,
to the bit: the spike detector's MAD (found by bisection, not by walking the merge), a trace
line's Sample (built without the frozen dataclass's __init__), and the measured start level the
start-ratio and untrained detectors take (``given_level`` inlined), and the trend test
with its running sums in local variables."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import pytest

from lrwatch.rules.detectors import StartRatio, Trend, Untrained
from lrwatch.rules.detectors.spike import _mad
from lrwatch.rules.detectors.start_ratio import given_level
from lrwatch.rules.engine import Firing
from lrwatch.samples import Sample
from lrwatch.trace import _DECODER, _decode, parse_record


def _median(vals):
    a = sorted(vals)
    n = len(a)
    return a[n // 2] if n % 2 else 0.5 * (a[n // 2 - 1] + a[n // 2])


def _walked_mad(a, m):
    """The MAD as it was computed before: the merge of the deviations to the left and to the
    right of ``m`` walked to its middle (ties to the left)."""
    n = len(a)
    j = sum(1 for x in a if x < m)
    i = j - 1
    k_lo, k_hi = (n - 1) // 2, n // 2
    lo = d = 0.0
    for c in range(k_hi + 1):
        if i >= 0 and (j >= n or m - a[i] <= a[j] - m):
            d = m - a[i]
            i -= 1
        else:
            d = a[j] - m
            j += 1
        if c == k_lo:
            lo = d
    return 0.5 * (lo + d)


def test_the_mad_is_the_walked_merges_to_the_bit():
    rng = random.Random(17)
    for n in range(1, 80):
        for trial in range(60):
            # repeats, zeros of both signs, and centres at, between and beyond the values
            pool = [rng.gauss(0, 1), rng.gauss(0, 1), 0.5, 1.0, 0.0, -0.0, 1e-300]
            a = sorted(rng.choice(pool) if trial % 2 else rng.gauss(0, 1) for _ in range(n))
            for m in (_median(a), rng.choice(a), rng.gauss(0, 3), a[0] - 1.0, a[-1] + 1.0):
                want = _walked_mad(a, m)
                got = _mad(a, m)
                # the median of the deviations, but for the sign of a zero (-0.0 - 0.0)
                assert got == _median([abs(x - m) for x in a])
                assert got == want and math.copysign(1, got) == math.copysign(1, want), (a, m)


@pytest.mark.parametrize("line", [
    '{"step": 3, "time": 1.5, "lr": 0.1, "loss": 2.0, "grad_norm": "nan", "acc": 1}',
    '{"step": 4, "lr": [0.1, "nan"], "loss": "-inf", "events": [{"type": "rollback"}]}',
    '{"step": 5.0, "time": null, "loss": 1e308}',
    '{"step": 6}', '{"step": 7, "lr": NaN, "time": Infinity, "loss": -0.0}',
    '{"step": 8, "lr": 1, "time": 2, "grad_norm": 3}', '{"step": 9, "lr": "inf", "time": "nan"}'])
def test_a_parsed_line_is_the_sample_built_field_by_field(line):
    rec = json.loads(line)
    got = parse_record(rec)
    lr = rec.get("lr")
    groups = None if lr is None else tuple(
        float(x) for x in (lr if isinstance(lr, list) else [lr]))
    values = {} if groups is None else {"lr": groups[0]}
    values.update({k: float(v) for k, v in rec.items()
                   if k not in ("step", "time", "lr", "events") and v is not None})
    t = rec.get("time")
    t = {"nan": math.nan}.get(t, t) if isinstance(t, str) else t
    want = Sample(step=int(rec["step"]), time=None if t is None else float(t), values=values,
                  lr_groups=groups, events=tuple(rec.get("events", ())))
    # every field (one added to Sample and not to the reader's fast path fails here), in order
    assert list(vars(got).items()) == list(vars(want).items()) or (
        repr(got) == repr(want) and list(vars(got)) == list(vars(want)))
    assert list(vars(got)) == [f.name for f in dataclasses.fields(Sample)]
    assert type(got) is Sample and hash(got.step) == hash(want.step)
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.step = 7  # type: ignore[misc]


class _OldStartRatio(StartRatio):
    """The start level taken through ``given_level``, as before."""

    def update_given(self, x, given, t=None):
        level = given_level(given)
        if level is not None:
            self._start = level
            if self._first:
                self._first.clear()
        elif self.given_only and self._start is None:
            return None
        return StartRatio.update(self, x, t)


_GIVENS = [None, math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, 1e-320, 2.0, 3.5]


@pytest.mark.parametrize("params", [dict(above=10.0), dict(below=0.85, window=4, given_only=True),
                                    dict(warmup=3, above=2.0, below=0.5, window=3)])
def test_the_start_ratio_takes_the_measured_level_as_given_level_says(params):
    rng = random.Random(len(params))
    det, ref = StartRatio(**params), _OldStartRatio(**params)
    for i in range(3000):
        x = rng.choice([rng.uniform(0.5, 30.0), 0.0, -0.0, -1.0, math.nan, math.inf])
        g = rng.choice(_GIVENS) if i % 7 == 0 else None
        assert det.update_given(x, g) == ref.update_given(x, g), i
        assert det.statistic == ref.statistic and det.start == ref.start, i


def test_the_untrained_test_takes_the_measured_level_as_given_level_says():
    rng = random.Random(4)
    det = Untrained(window=8, above=0.5)
    start = None
    for i in range(3000):
        x = rng.choice([rng.uniform(0.5, 3.0), 0.0, -1.0, math.nan, math.inf])
        g = rng.choice(_GIVENS) if i % 5 == 0 else None
        level = given_level(g)
        det.update_given(x, g)
        if level is not None:
            start = level
        elif start is None and 0.0 < x < math.inf:
            start = x                         # warmup 1: the first positive finite value
        assert det._start == start, (i, g)


class _OldTrend(Trend):
    """The trend test with its sums kept on the detector between every operation, as before."""

    def update(self, x, t=None):
        if not math.isfinite(x) or (self.log and x <= 0.0):
            return None
        y = math.log(x) if self.log else x
        if abs(y) > 1e150:
            return None
        buf = self._buf
        if len(buf) == self.window:
            old = buf.popleft()
            self._sy -= old
            self._syy -= old * old
            self._sty -= self._sy
        self._sty += len(buf) * y
        self._sy += y
        self._syy += y * y
        buf.append(y)
        self._since += 1
        if self._since >= self.window:
            self._recompute()
        n = len(buf)
        if n < self.window:
            return None
        sxx = n * (n * n - 1) / 12.0
        sxy = self._sty - 0.5 * (n - 1) * self._sy
        syy = self._syy - self._sy * self._sy / n
        b = sxy / sxx
        se = math.sqrt(max(syy - b * sxy, 0.0) / (n - 2) / sxx)
        if se > 1e-12 * (abs(self._sy) / n + 1e-300):
            tt = b / se
        else:
            tt = 0.0 if b == 0 else math.copysign(1e12, b)
        self._t = tt
        if self.direction == "down":
            tt = -tt
        if tt <= self._crit:
            return False
        change = abs(b) * (n - 1)
        if self.log:
            return change > self.min_change
        return change > self.min_change * abs(self._sy / n)


@pytest.mark.parametrize("params", [
    dict(window=6, direction="down", log=True, min_change=0.5),
    dict(window=5, direction="up", min_change=0.05, confidence=0.99),
    dict(window=30, direction="up", log=True, min_change=0.0, confidence=0.999)])
def test_the_trend_test_gives_what_it_gave_with_its_sums_on_the_detector(params):
    rng = random.Random(params["window"])
    det, ref = Trend(**params), _OldTrend(**params)
    level, decided = 2.0, 0
    for i in range(5000):
        level *= math.exp(rng.gauss(-0.002, 0.05))
        x = rng.choice([level, level, level, level, 0.0, -level, math.nan, math.inf, 1e200,
                        5.0 * level, 1.0])
        got, want = det.update(x), ref.update(x)
        assert got == want and det.statistic == ref.statistic, (i, x)
        assert (det._sy, det._syy, det._sty, det._since) == (
            ref._sy, ref._syy, ref._sty, ref._since), i
        decided += want is not None
        if i % 613 == 0:   # a resumed run
            state = json.loads(json.dumps(det.state_dict()))
            det, ref = Trend(**params), _OldTrend(**params)
            det.load_state_dict(state)
            ref.load_state_dict(state)
    assert decided > 2000


def test_a_firing_is_never_falsy():
    # the engine picks the referenced rules firing now by their firing's truth (in C)
    assert Firing("", 0, None, "", (), None, "", labels={}, annotations={})
    assert not hasattr(Firing, "__len__") and not hasattr(Firing, "__bool__")


def _outcome(fn, line):
    try:
        return "ok", repr(fn(line))
    except (ValueError, RecursionError) as exc:   # json.JSONDecodeError: a ValueError
        return type(exc).__name__, str(exc)


def test_a_line_decodes_as_the_json_decoder_decodes_it_errors_included():
    lines = ['{"step": 1}\n', '{"step": 1}', '{"step": 1} \n', '{"step": 1}\n\n', '{"a": 1}\r\n',
             '{"step": 1}x\n', '{"step": 1}{"a": 2}\n', '{"step": 1, "step": 2}\n', '{"a": }\n',
             '{"a": {"b": 1, "b": 2}}\n', '{', '{"a": NaN}\n', '{}\n', '{} \t\r\n', ' {"a": 1}\n',
             '{"a": 1}\n ', '{"a": [1, {"b": 2}]}\n', '{"a": 1,}\n', '[1]\n', '"x"\n', '\n']
    rng = random.Random(9)
    base = '{"step": 12, "loss": 1.5, "lr": [0.1, "nan"], "events": [{"type": "rollback"}]}\n'
    for _ in range(2000):   # a record with a few characters dropped, added or changed
        chars = list(base)
        for _ in range(rng.randint(1, 3)):
            i, c = rng.randrange(len(chars)), rng.choice('{}[]",: \n\t1ae')
            chars[i:i + rng.randint(0, 1)] = [c] if rng.random() < 0.7 else []
        lines.append("".join(chars))
    kinds = set()
    for line in lines:
        want = _outcome(_DECODER.decode, line)
        assert _outcome(_decode, line) == want, line
        kinds.add(want[0])
    assert kinds == {"ok", "JSONDecodeError", "ValueError"}   # repeated keys among them
