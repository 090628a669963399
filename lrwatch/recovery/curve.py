"""The learning-rate range test's curve and what it suggests: pure, no torch.

A range test (Smith 2015, "Cyclical Learning Rates for Training Neural Networks", section 3.3;
fastai's ``lr_find`` and Lightning's ``Tuner.lr_find`` are the usual implementations) trains a
few dozen steps at exponentially increasing learning rates and records the loss. The loss first
barely moves (the rate is too small), then falls (the useful range), then turns and blows up
(the rate is past the edge of stability). This module holds the rate schedule, the blow-up test
that stops the probe, and the rule that turns a curve into one suggested rate. The torch side
(:mod:`lrwatch.recovery.lr_find`) only runs steps and feeds losses in, so the decision can be
tested and replayed without a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import ConfigError

__all__ = ["LRCurve", "geometric_rates", "RangeTest", "SUGGEST_RULES", "suggest",
           "DEFAULT_FRACTION", "preflight_factor", "preflight_turn"]

#: How a curve becomes one rate (see :func:`suggest`).
SUGGEST_RULES = ("stable", "steepest", "min10")
#: Share of the largest stable rate suggested by default (see :func:`suggest`).
DEFAULT_FRACTION = 0.3


def geometric_rates(lo: float, hi: float, n: int) -> list[float]:
    """``n`` rates from ``lo`` to ``hi`` spaced evenly on a log scale.

    >>> [round(r, 6) for r in geometric_rates(1e-3, 1.0, 4)]
    [0.001, 0.01, 0.1, 1.0]
    """
    if not (0 < lo < hi and math.isfinite(hi)):
        raise ConfigError(f"the rate range must satisfy 0 < min_lr < max_lr, got {lo!r}..{hi!r}")
    if not isinstance(n, int) or n < 3:
        raise ConfigError(f"a range test needs at least 3 steps, got {n!r}")
    ratio = (hi / lo) ** (1.0 / (n - 1))
    return [lo * ratio ** i for i in range(n)]


def _centered(values: Sequence[float], half: int) -> list[float]:
    """A centred moving median-then-mean: no lag, unlike the EMA that decides when to stop.

    A lagging smoother shifts every feature of the curve towards larger rates by its lag (with
    the EMA's beta=0.98 of fastai over 100 steps, about a third of a decade); the suggestion is
    read off this lag-free curve instead.
    """
    n = len(values)
    med = []
    for i in range(n):
        w = sorted(values[max(0, i - 1):i + 2])
        med.append(w[len(w) // 2])
    out = []
    for i in range(n):
        w = med[max(0, i - half):i + half + 1]
        out.append(sum(w) / len(w))
    return out


@dataclass
class LRCurve:
    """A finished range test: the rates tried, their losses, and the suggestion.

    ``lrs[i]`` is the rate of step ``i`` (of parameter group 0; other groups keep their ratio to
    it), ``losses[i]`` its training loss (``nan`` when not finite), ``smoothed`` the lag-free
    smoothed curve the suggestion is read from. ``stopped`` says why the test ended
    (``"diverged"``: the loss blew up, ``"nonfinite"``, or ``"end"``: the top of the range).
    ``largest_stable`` is the rate at the smoothed curve's minimum (the largest rate before the
    loss turns up), ``steepest`` the rate of its steepest descent, ``suggestion`` what
    :func:`suggest` made of them with ``rule``.
    """

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    stopped: str
    largest_stable: float | None
    steepest: float | None
    suggestion: float | None
    rule: str
    fraction: float
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.losses)

    def summary(self) -> str:
        """A few lines for a terminal."""
        lines = [f"range test: {self.steps} steps, rates {self.lrs[0]:.3g}..{self.lrs[-1]:.3g}, "
                 f"stopped: {self.stopped}"]
        if self.largest_stable is not None:
            lines.append(f"largest stable rate (smoothed loss at its minimum): "
                         f"{self.largest_stable:.3g}")
        if self.steepest is not None:
            lines.append(f"steepest descent: {self.steepest:.3g}")
        if self.suggestion is None:
            lines.append(f"no suggestion: {self.reason}")
        else:
            lines.append(f"suggested learning rate: {self.suggestion:.3g} ({self.reason})")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        fin = [x if math.isfinite(x) else str(x) for x in self.losses]
        # where the loss was not finite, the smoothed value is a stand-in for the curve's
        # shape (far above the rest), not a loss: written as the loss was
        smooth = [v if isinstance(x, float) else x for v, x in zip(self.smoothed, fin)]
        return {"lrs": self.lrs, "losses": fin, "smoothed": smooth,
                "stopped": self.stopped, "largest_stable": self.largest_stable,
                "steepest": self.steepest, "suggestion": self.suggestion, "rule": self.rule,
                "fraction": self.fraction, "reason": self.reason, **self.extra}


class RangeTest:
    """The decision half of a range test: feed losses in, learn when to stop, get the curve.

    Parameters
    ----------
    lrs:
        The rate of each step (:func:`geometric_rates`).
    beta:
        EMA factor of the smoothed loss that the blow-up test watches (bias-corrected, as in
        fastai). The probes are short, so it is lower than fastai's 0.98: a step here is a
        larger jump in rate.
    diverge:
        Stop once the smoothed loss exceeds ``diverge`` times its minimum (fastai and Lightning
        use 4; for a minimum below 0, once it rose ``diverge - 1`` times the minimum's size
        above it), or a loss is not finite.
    rule, fraction:
        See :func:`suggest`.

    >>> t = RangeTest(geometric_rates(1e-4, 1.0, 9), fraction=0.1)
    >>> for loss in [2.0, 2.0, 1.9, 1.5, 1.0, 0.7, 3.0, 9.0, 40.0]:
    ...     if t.update(loss):
    ...         break
    >>> c = t.curve()
    >>> c.stopped, round(c.largest_stable, 4), round(c.suggestion, 5)
    ('diverged', 0.01, 0.001)
    """

    def __init__(self, lrs: Sequence[float], *, beta: float = 0.7, diverge: float = 4.0,
                 rule: str = "stable", fraction: float = DEFAULT_FRACTION) -> None:
        if rule not in SUGGEST_RULES:
            raise ConfigError(f"unknown suggestion rule {rule!r} "
                              f"(valid choices: {', '.join(SUGGEST_RULES)})")
        if not 0 <= beta < 1:
            raise ConfigError(f"beta must be in [0, 1), got {beta!r}")
        if not diverge > 1:
            raise ConfigError(f"diverge must be above 1, got {diverge!r}")
        if not 0 < fraction <= 1:
            raise ConfigError(f"fraction must be in (0, 1], got {fraction!r}")
        self.lrs = list(lrs)
        self.beta, self.diverge, self.rule, self.fraction = beta, diverge, rule, fraction
        self.losses: list[float] = []
        self._avg = 0.0
        self._best = math.inf
        self.stopped = ""

    @property
    def next_lr(self) -> float | None:
        """The rate of the next step, or ``None`` when the test is over."""
        if self.stopped or len(self.losses) >= len(self.lrs):
            return None
        return self.lrs[len(self.losses)]

    def update(self, loss: float) -> bool:
        """Record the loss of the step just run at :attr:`next_lr`; ``True`` when to stop."""
        if self.next_lr is None:
            raise RuntimeError("the range test is over; read curve()")
        loss = float(loss)
        self.losses.append(loss if math.isfinite(loss) else math.nan)
        if not math.isfinite(loss):
            self.stopped = "nonfinite"
            return True
        self._avg = self.beta * self._avg + (1 - self.beta) * loss
        smooth = self._avg / (1 - self.beta ** len(self.losses))
        self._best = min(self._best, smooth)
        if len(self.losses) > 1 and smooth > self._limit():
            self.stopped = "diverged"
            return True
        if len(self.losses) >= len(self.lrs):
            self.stopped = "end"
            return True
        return False

    def _limit(self) -> float:
        """The smoothed loss past which the test stops: ``diverge`` x its minimum, i.e. a rise
        of ``diverge - 1`` times the minimum's size above it, which is what it stays for a
        minimum below 0 (a negative log-likelihood, an ELBO: ``diverge`` x a negative minimum
        would be below the minimum itself, and every step would stop the test)."""
        best = self._best
        return self.diverge * best if best >= 0 else best + (self.diverge - 1) * -best

    def curve(self) -> LRCurve:
        """The curve so far, with the suggestion."""
        n = len(self.losses)
        lrs = self.lrs[:n]
        finite = [x for x in self.losses if math.isfinite(x)]
        # a non-finite last loss counts as "far above everything", for the shape
        top = max(finite, default=1.0)
        vals = [x if math.isfinite(x) else 10 * abs(top) + 1 for x in self.losses]
        smoothed = _centered(vals, 1) if vals else []
        stable, steep, sugg, reason = suggest(lrs, smoothed, self.rule, self.fraction,
                                              ended=self.stopped or "end")
        if n and not math.isfinite(self.losses[0]):
            # not a rate's doing: the first step at the lowest rate already had no finite loss
            stable = steep = sugg = None
            reason = (f"the loss was not finite at the first step, at the lowest rate "
                      f"{lrs[0]:.3g}: before any rate can matter; check the model, the data "
                      f"and the loss (no rate in any range will help)")
        return LRCurve(lrs, list(self.losses), smoothed, self.stopped or "end", stable, steep,
                       sugg, self.rule, self.fraction, reason)


def suggest(lrs: Sequence[float], smoothed: Sequence[float], rule: str = "stable",
            fraction: float = DEFAULT_FRACTION, ended: str = "diverged"
            ) -> tuple[float | None, float | None, float | None, str]:
    """(largest stable rate, steepest-descent rate, suggestion, why) of a smoothed curve.

    Rules:

    - ``"stable"`` (default): ``fraction`` x the largest stable rate, the rate at the smoothed
      loss's minimum. Past the minimum the loss rises: the rate is beyond the edge of stability
      for the state the test started from. The rule only depends on where the curve turns,
      the part of the curve that the blow-up makes unmistakable even in a short, noisy probe
      (the steepest descent is a derivative of a noisy curve). The default fraction, 0.3, was
      chosen leave-one-family-out on six model families (``benchmarks/lr_find.py``,
      ``docs/lr-find.md``): every held-out family got 0.3 from the other five, and training
      at it ended within 2 points of the tuned rate in 28 of 36 runs, against 17 for fastai's
      tenth. The turn lies above the true edge (an instability needs a few steps to grow
      while the rate keeps rising), so 0.3 of it is still below the edge on most networks.
    - ``"steepest"``: the rate where the smoothed loss falls fastest against log(rate)
      (Lightning's ``suggestion()``), before the minimum. Sensitive to noise in short probes.
    - ``"min10"``: the same as ``"stable"`` with ``fraction`` fixed at 0.1 (fastai's rule).

    If the loss never turns up (``ended="end"``: the top of the range was still stable), the
    largest stable rate is unknown; the top rate is used, and the reason says so. If it fell
    nowhere (the minimum is the first step) there is no useful rate in the range.

    >>> lrs = [10 ** (-4 + i / 2) for i in range(9)]
    >>> s = suggest(lrs, [5, 5, 4.9, 4, 3, 2, 2.5, 8, 30], "stable", 0.1)
    >>> [round(x, 6) for x in s[:3]]
    [0.031623, 0.017783, 0.003162]
    >>> suggest(lrs, [5.0] * 9, "stable", 0.3)[3][:44]
    'the loss did not move at any rate in the ran'
    """
    if not smoothed:
        return None, None, None, "no steps ran"
    i_min = min(range(len(smoothed)), key=lambda i: smoothed[i])
    steep = None
    if i_min >= 1:
        slopes = [(smoothed[i + 1] - smoothed[i]) / math.log(lrs[i + 1] / lrs[i])
                  for i in range(i_min)]
        j = min(range(len(slopes)), key=lambda i: slopes[i])
        steep = math.sqrt(lrs[j] * lrs[j + 1])   # the middle of the steepest segment
    if i_min == 0 and max(smoothed) - smoothed[0] <= 1e-9 * max(1.0, abs(smoothed[0])):
        return None, None, None, ("the loss did not move at any rate in the range: the "
                                  "parameters the optimizer steps may not reach the loss "
                                  "(frozen, or a loss computed without them), or every rate "
                                  "is too small to show: raise max_lr")
    if i_min == 0:
        return None, steep, None, ("the loss fell at no rate in the range: the lowest rate "
                                   f"{lrs[0]:.3g} is already past the edge, or the range is "
                                   "too short; lower min_lr")
    stable = lrs[i_min]
    top = "" if ended != "end" or i_min < len(lrs) - 1 else (
        "; the loss never turned up, so the edge is above the range: raise max_lr")
    if rule == "steepest":
        return stable, steep, steep, f"steepest descent of the smoothed loss{top}"
    f = 0.1 if rule == "min10" else fraction
    return stable, steep, f * stable, f"{f:g} x the largest stable rate {stable:.3g}{top}"


def preflight_turn(lrs: Sequence[float], losses: Sequence[float], baseline: float,
                   lr: float) -> int | None:
    """Where a pre-flight curve shows the configured rate ``lr`` past the edge: the index of
    the curve's lowest loss, or ``None`` when ``lr`` stands.

    ``losses`` is the loss of one *fixed* batch after each step (the pre-flight check's
    reference batch), ``baseline`` its loss before the first step. Without batch noise a
    rise of that curve is the model getting worse, but a network at a good rate can still
    wobble by a few percent near the edge. Two conditions make the turn unmistakable without a
    tuned margin: the loss rose above ``baseline`` (the steps at rates up to ``lr`` undid
    *all* the progress the test made: a wobble only gives back part of it) and the test's
    lowest loss comes before that rise (the loss never recovered at any higher rate either).
    Only rises at rates ``<= lr`` count: a turn at a higher rate says nothing against ``lr``.
    A turn right after the first step (lowest loss at index 0) gives no stable rate to use.

    >>> lrs = [1e-3, 1e-2, 1e-1, 1.0]
    >>> preflight_turn(lrs, [1.9, 1.5, 2.5, 9.0], 2.0, 0.1)   # above 2.0 at 0.1: past the edge
    1
    >>> preflight_turn(lrs, [1.9, 1.5, 1.8, 9.0], 2.0, 0.1)   # a wobble below the baseline
    >>> preflight_turn(lrs, [1.9, 1.5, 2.5, 1.2], 2.0, 0.1)   # and recovered at a higher rate
    """
    raw = [x if math.isfinite(x) else math.inf for x in losses]
    if not raw or not math.isfinite(baseline):
        return None
    low = min(range(len(raw)), key=lambda i: raw[i])
    for j in range(low + 1, len(raw)):
        if lrs[j] > lr:
            return None
        if raw[j] > baseline:
            return low if low > 0 else None
    return None


def preflight_factor(curve: LRCurve, lr: float) -> float | None:
    """What a pre-flight range test around the configured rate ``lr`` says to do: the factor
    to scale the run's rates by, or ``None`` to keep them.

    The test ran from ``lr / 1000`` to ``10 lr`` before the first step and recorded, after each
    step, the loss of one fixed batch (``curve.extra["baseline"]`` is that loss before the
    first step; a curve of training-batch losses without it uses its first loss). When
    :func:`preflight_turn` finds the configured rate past the edge, the run starts at
    ``curve.fraction`` x the rate of the curve's lowest loss (the largest stable rate, read off
    the raw curve: a fixed batch's curve has no batch noise to smooth, and a centred smoother
    would pull a blow-up at a higher rate back onto the rates below it).

    >>> c = LRCurve([1e-3, 1e-2, 1e-1], [2.0, 1.5, 9.0], [2.0, 1.5, 9.0], "diverged",
    ...             largest_stable=1e-2, steepest=None, suggestion=3e-3, rule="stable",
    ...             fraction=0.3, extra={"baseline": 2.1})
    >>> round(preflight_factor(c, 0.1), 6), preflight_factor(c, 0.005)
    (0.03, None)
    """
    if not (lr > 0 and curve.losses):
        return None
    baseline = float(curve.extra.get("baseline", curve.losses[0]))
    low = preflight_turn(curve.lrs, curve.losses, baseline, lr)
    if low is None:
        return None
    return curve.fraction * curve.lrs[low] / lr
