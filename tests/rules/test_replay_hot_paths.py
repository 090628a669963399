"""The replay's hot paths made cheaper in the seventeenth round give what the plain code gave,
to the bit: the spike detector's MAD (found by bisection, not by walking the merge), a trace
line's Sample (built without the frozen dataclass's __init__), and the measured start level the
start-ratio and untrained detectors take (``given_level`` inlined)."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import pytest

from lrwatch.rules.detectors import StartRatio, Untrained
from lrwatch.rules.detectors.spike import _mad
from lrwatch.rules.detectors.start_ratio import given_level
from lrwatch.samples import Sample
from lrwatch.trace import parse_record


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
    '{"step": 6}'])
def test_a_parsed_line_is_the_sample_built_field_by_field(line):
    rec = json.loads(line)
    got = parse_record(rec)
    lr = rec.get("lr")
    groups = None if lr is None else tuple(
        float(x) for x in (lr if isinstance(lr, list) else [lr]))
    values = {} if groups is None else {"lr": groups[0]}
    values.update({k: float(v) for k, v in rec.items()
                   if k not in ("step", "time", "lr", "events") and v is not None})
    want = Sample(step=int(rec["step"]), time=rec.get("time"), values=values,
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
