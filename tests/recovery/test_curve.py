"""The range test's decisions, without torch."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from lrwatch.errors import ConfigError
from lrwatch.recovery.curve import RangeTest, geometric_rates, suggest


def _run(losses: list[float], n: int | None = None, **kw: object) -> RangeTest:
    kw.setdefault("fraction", 0.1)
    t = RangeTest(geometric_rates(1e-5, 1.0, n or len(losses)), **kw)  # type: ignore[arg-type]
    for x in losses:
        if t.update(x):
            break
    return t


def test_curve_module_imports_no_torch() -> None:
    code = ("import sys, lrwatch.recovery.curve, lrwatch.recovery; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_stops_at_blowup_and_suggests_a_tenth_of_the_turn() -> None:
    # falls, turns at step 6 (rate 1e-5 * 10**(6/2) = 1e-2), then blows up
    losses = [3.0, 3.0, 2.9, 2.5, 1.8, 1.2, 1.0, 1.3, 4.0, 20.0, 90.0]
    t = _run(losses)
    c = t.curve()
    assert c.stopped == "diverged"
    assert c.steps < len(losses)          # it stopped before the end of the list
    assert c.largest_stable == pytest.approx(1e-2, rel=0.01)
    assert c.suggestion == pytest.approx(1e-3, rel=0.01)
    assert "0.1 x the largest stable rate" in c.reason


def test_nonfinite_loss_stops_at_once() -> None:
    t = _run([2.0, 1.5, 1.0, math.nan, 1.0], n=5)
    c = t.curve()
    assert c.stopped == "nonfinite" and c.steps == 4 and math.isnan(c.losses[-1])
    assert c.suggestion is not None and c.largest_stable <= c.lrs[2]


def test_loss_that_never_turns_says_to_raise_max_lr() -> None:
    c = _run([5.0 - 0.4 * i for i in range(10)]).curve()
    assert c.stopped == "end"
    assert c.largest_stable == c.lrs[-1]
    assert "raise max_lr" in c.reason


def test_a_curve_below_0_stops_where_the_same_curve_above_0_does() -> None:
    """The stop test is a rise of ``diverge - 1`` times the minimum's size above it, for a
    negative minimum too (4 x a negative minimum is below it: every step stopped the test)."""
    losses = [3.0, 3.0, 2.9, 2.5, 1.8, 1.2, 1.0, 1.3, 4.0, 20.0, 90.0]
    up, down = _run(losses).curve(), _run([x - 2.0 for x in losses]).curve()
    assert down.stopped == up.stopped == "diverged" and down.steps == up.steps
    assert down.suggestion == pytest.approx(up.suggestion)
    falling = _run([-1.0 - i for i in range(10)]).curve()
    assert falling.stopped == "end" and "raise max_lr" in falling.reason


def test_loss_that_never_falls_gives_no_suggestion() -> None:
    c = _run([1.0, 2.0, 4.0, 8.0, 16.0, 32.0], n=8).curve()
    assert c.suggestion is None and "lower min_lr" in c.reason
    assert "no suggestion" in c.summary()


def test_rules() -> None:
    lrs = geometric_rates(1e-4, 1.0, 9)
    sm = [5, 5, 4.9, 4, 3, 2, 2.5, 8, 30]
    stable, steep, sug, _ = suggest(lrs, sm, "steepest")
    assert sug == steep and lrs[2] < steep < lrs[5]
    assert suggest(lrs, sm, "min10")[2] == pytest.approx(0.1 * stable)
    assert suggest(lrs, sm, "stable", 0.3)[2] == pytest.approx(0.3 * stable)


@pytest.mark.parametrize("kw, msg", [({"rule": "valley"}, "valid choices: stable"),
                                     ({"fraction": 0}, "fraction"), ({"diverge": 1}, "diverge"),
                                     ({"beta": 1.0}, "beta")])
def test_bad_settings_name_the_fix(kw: dict, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        RangeTest([1e-3, 1e-2, 1e-1], **kw)


def test_bad_range() -> None:
    with pytest.raises(ConfigError, match="min_lr < max_lr"):
        geometric_rates(1.0, 0.1, 10)
    with pytest.raises(ConfigError, match="at least 3"):
        geometric_rates(1e-3, 1.0, 2)


def test_update_after_the_end_is_an_error() -> None:
    t = _run([1.0, 0.5, 0.2], n=3)
    with pytest.raises(RuntimeError, match="over"):
        t.update(0.1)


def test_preflight_turn_needs_a_rise_above_the_start_at_rates_up_to_lr() -> None:
    from lrwatch.recovery.curve import preflight_turn

    lrs = [10 ** (-3 + i / 2) for i in range(9)]          # 1e-3 .. 10, lr = 1 at index 6
    base = 2.0
    # past the edge: the loss climbs back above its start at 0.32 (index 5), below lr
    assert preflight_turn(lrs, [2, 1.9, 1.7, 1.4, 1.2, 2.4, 6, 20, math.nan], base, 1.0) == 4
    # a non-finite loss at a rate below lr is a rise too
    assert preflight_turn(lrs, [2, 1.9, 1.7, 1.4, math.inf], base, 1.0) == 3
    # a wobble that gives back part of the progress is not a turn
    assert preflight_turn(lrs, [2, 1.9, 1.7, 1.4, 1.2, 1.6, 1.1, 5, 9], base, 1.0) is None
    # above the start, but the loss falls to a new low at a higher rate: no turn
    assert preflight_turn(lrs, [1.9, 1.8, 2.1, 1.4, 1.2, 1.1, 1.0, 5, 9], base, 1.0) is None
    # the rise comes only above lr: lr stands
    assert preflight_turn(lrs, [2, 1.9, 1.7, 1.4, 1.2, 1.1, 1.0, 5, 9], base, 1.0) is None
    # at the very first rate: no stable rate to start from
    assert preflight_turn(lrs, [1.9, 2.5, 9.0], base, 1.0) is None


def test_preflight_factor_scales_to_a_fraction_of_the_lowest_point() -> None:
    from lrwatch.recovery.curve import LRCurve, preflight_factor

    lrs = [1e-3, 1e-2, 1e-1, 1.0]
    c = LRCurve(lrs, [1.9, 1.5, 2.5, 9.0], [], "diverged", None, None, None, "stable", 0.3,
                extra={"baseline": 2.0})
    assert preflight_factor(c, 0.1) == pytest.approx(0.3 * 1e-2 / 0.1)
    assert preflight_factor(c, 0.05) is None              # the rise is at 0.1 > 0.05
    c.extra["baseline"] = 3.0                             # 2.5 is below a start of 3.0
    assert preflight_factor(c, 0.1) is None
