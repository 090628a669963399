"""benchmarks/guard_scan.py: the guard's rule as the scan replays it (pure; no cache needed)."""

from __future__ import annotations

import math

from benchmarks.guard_scan import RULES, held_steps


def test_a_spike_above_the_ratio_is_held_and_does_not_enter_the_median() -> None:
    norms = [1.0] * 30 + [150.0, 1.0, 150.0] + [1.0] * 5
    held, largest = held_steps(norms, RULES["fixed 100 (shipped)"])
    assert held == [30, 32] and largest == 1.0


def test_non_finite_norms_are_held_before_the_warm_up_too() -> None:
    held, _ = held_steps([1.0, math.nan, 1.0, None, 1.0], RULES["fixed 100 (shipped)"])
    assert held == [1, 3]


def test_the_adaptive_rule_rises_with_the_runs_own_spikes() -> None:
    quiet = [1.0] * 30 + [40.0]                       # a poisoned batch in a quiet run
    spiky = [1.0] * 30 + [15.0] + [1.0] * 10 + [40.0]  # the run spiked 15x before: 45x now
    assert held_steps(quiet, RULES["adaptive 20 x3"])[0] == [30]
    assert held_steps(spiky, RULES["adaptive 20 x3"])[0] == []
    assert held_steps(spiky, RULES["fixed 30"])[0] == [41]
