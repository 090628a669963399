"""The start check's decision (issue 13): after its first steps, does the run do better than
the same run restarted at a tenth of its rate? Pure and torch-free.

A rate several times too high often does not blow up: the loss falls, then the run learns
worse, or sits at a constant prediction's level, and no rule sees a failure until the budget
is mostly gone (docs/recovery.md, "The start check"). Measured on the family suite, from the
state the run started from, the tenth makes more progress over the first ten steps than the
configured rate in 85 of 119 would-diverge runs and in none of 54 runs at the tuned rate: a
rate past the edge of stability loses ground at once, a good rate never loses to a tenth of
itself over a few steps (the tuned runs' held-out loss after ten steps at a tenth is 1.26x
theirs, median; 1.006x at the closest, an autoencoder under momentum that barely moves at
either rate).

The executor (:mod:`lrwatch.recovery.shadow`) trains that *shadow* from the start state on the
run's own first batches, at a tenth of the rates the run used, then scores both on the next
batches of the stream, which neither has trained on; :func:`compare` decides. The shadow is
adopted only when its held-out loss is lower with ``confidence`` (one-sided paired t-test over
the held-out batches: each batch scored by both models, so what one batch is harder than
another cancels out). Under the null hypothesis -- the two models are equally good on the
data -- it adopts a tenth in 5% of runs at the default; a slow starter, whose loss moves
little at either rate, is that case.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

from ..rules.detectors.trend import t_quantile

__all__ = ["StartVerdict", "check_cost", "compare", "first_reason", "skip_reason",
           "worst_ratio"]


@dataclass(frozen=True)
class StartVerdict:
    """What :func:`compare` decided and why (``real`` and ``shadow``: mean held-out losses;
    ``t``: the paired t statistic of their difference, ``None`` where none was needed)."""

    adopt: bool
    real: float
    shadow: float
    t: float | None
    reason: str


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def compare(real: Sequence[float], shadow: Sequence[float], confidence: float = 0.95,
            margin: float = 0.0) -> StartVerdict:
    """Adopt the shadow when its losses on the held-out batches are lower than the run's.

    ``real[i]`` and ``shadow[i]`` are the two models' losses on held-out batch ``i``. A shadow
    whose loss is not finite is never adopted; a run whose loss is not finite while the
    shadow's is, always. Otherwise a one-sided paired t-test on ``real - shadow`` at
    ``confidence`` (at least two batches). With ``margin`` the shadow must be lower by more
    than that share of the run's mean held-out loss (its absolute value): the test is on
    ``real - shadow - margin * |mean(real)|`` (the mid-run check's, where a lower rate is a
    little better over a few steps in any run that sits in its own noise).

    >>> compare([2.0, 2.2, 1.9], [1.9, 2.1, 1.8]).adopt                # 5% lower, every batch
    True
    >>> compare([2.0, 2.2, 1.9], [1.9, 2.1, 1.8], margin=0.1).adopt    # not by 10%
    False

    >>> compare([2.0, 2.2, 1.9], [1.0, 1.1, 1.0]).adopt
    True
    >>> compare([1.0, 1.1, 1.0], [1.5, 1.4, 1.6]).adopt
    False
    >>> compare([1.0, 1.1, 0.9], [0.99, 1.12, 0.88]).adopt     # a wash: keep the rate
    False
    >>> compare([float("nan"), 3.0], [1.0, 1.1]).adopt
    True
    """
    if len(real) != len(shadow):
        raise ValueError(f"real and shadow need one loss per held-out batch each, got "
                         f"{len(real)} and {len(shadow)}")
    r, s = [float(x) for x in real], [float(x) for x in shadow]
    mr, ms = _mean(r), _mean(s)
    if not s or not all(math.isfinite(x) for x in s):
        return StartVerdict(False, mr, ms, None, "the shadow's held-out loss is not finite")
    if not all(math.isfinite(x) for x in r):
        return StartVerdict(True, mr, ms, None,
                            "the run's held-out loss is not finite; the shadow's is")
    if len(r) < 2:
        return StartVerdict(False, mr, ms, None, "one held-out batch: no test")
    bar = margin * abs(mr)
    d = [a - b - bar for a, b in zip(r, s)]
    md, sd = _mean(d), statistics.stdev(d)
    by = f" by {margin:.0%} of the run's" if margin else ""
    if sd == 0.0:
        adopt = md > 0
        return StartVerdict(adopt, mr, ms, None, "every held-out batch " + (
            "lower" if adopt else "no lower") + f" for the shadow{by}")
    t = md / (sd / math.sqrt(len(d)))
    crit = t_quantile(confidence, len(d) - 1)
    adopt = t > crit
    return StartVerdict(adopt, mr, ms, t,
                        f"held-out loss {ms:.4g} for the shadow against {mr:.4g} "
                        f"(paired t {t:.2f} {'>' if adopt else '<='} {crit:.2f}, "
                        f"{len(d)} batches" + (f", lower{by} asked" if margin else "") + ")")


def worst_ratio(run: Sequence[float], untrained: Sequence[float]) -> float | None:
    """How much worse than the untouched network the run's first steps left a batch: the
    largest ``run[i] / untrained[i]`` over steps 2 onwards, where ``run[i]`` is the loss the
    run met on its batch ``i`` (before stepping on it) and ``untrained[i]`` the untouched
    network's loss on that same batch. ``None`` when nothing can be compared: fewer than two
    pairs, an untrained loss that is not a positive number, a loss below zero (a
    log-likelihood, whose ratios mean nothing), or a first pair more than 25%
    apart (step 1 meets its batch with the untouched weights, so the two losses are the
    same up to dropout: where they are not, the loss the run logs is not the one the
    untrained level was measured with, a sum against a mean say, and no ratio means
    anything). A loss that is not finite is infinitely worse.

    The gate before the shadow (``RecoveryConfig.start_check_gate``): the batch is one the
    run had not trained on yet, so its difficulty cancels and what is left is what the
    steps did. On the family suite's 54 tuned runs (seeds 0-2) 49 stay at or under 1.05
    (1.000-1.036 outside RMSprop and Adam's first steps; up to 1.41 for RMSprop), while 80
    of the 82 would-diverge runs whose shadow the check adopts go past it (1.08-3e5; the two
    below are a transformer under Adam at 10x whose loss falls at both rates,
    docs/recovery.md "The gate before the shadow")."""
    pairs = list(zip(run, untrained))
    if len(pairs) < 2 or not all(isinstance(b, (int, float)) and math.isfinite(b) and b > 0
                                 for _, b in pairs):
        return None
    if any(got < 0 for got, _ in pairs):   # a log-likelihood: no ratio means anything
        return None
    if not (math.isfinite(pairs[0][0]) and 0.8 <= pairs[0][0] / pairs[0][1] <= 1.25):
        return None
    worst = None
    for got, base in pairs[1:]:
        r = got / base if math.isfinite(got) else math.inf
        worst = r if worst is None else max(worst, r)
    return worst


def skip_reason(held: int, peek: int, step: int, steps: int, batches: int, stopped: bool,
                rolled_back: bool) -> str | None:
    """Why the start check cannot run on the batches it holds, or ``None``: ``held`` batches
    trained on (``steps`` wanted), ``peek`` drawn after them (``batches`` wanted), ``step``
    logged steps by then (one per batch wanted), the run ``stopped`` or ``rolled_back``
    meanwhile."""
    if held < steps or peek < batches:
        return "too few batches"
    if stopped:
        return "the run stopped"
    if rolled_back:
        return "lrwatch rolled the run back meanwhile"
    if step != steps:
        return f"{step} logged steps on its first {steps} batches, not one per batch"
    return None


def first_reason(mine: str | None, every: Sequence[str | None]) -> str | None:
    """The reason every rank agrees on to skip the start check: this rank's own (``mine``), or
    else the first one any rank gave (``every``, in rank order), named by its rank; ``None``
    when no rank has one (the check's collectives need every rank: all run it or none)."""
    if mine is not None:
        return mine
    return next((f"rank {r}: {w}" for r, w in enumerate(every) if w is not None), None)


def check_cost(steps: int, forwards: int, forward_cost: float) -> int:
    """A check's cost in steps: the shadow's ``steps`` and ``forwards`` forward passes at
    ``forward_cost`` of a step each (rounded up)."""
    return steps + math.ceil(forwards * forward_cost - 1e-9)
