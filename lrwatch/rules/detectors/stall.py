"""Stall: confident that the run improves by less than ``progress`` over a window that grows
with the run."""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from typing import Any, ClassVar, Mapping

from ...errors import ConfigError
from .base import Detector, Param
from .trend import t_quantile

__all__ = ["Stall"]


class Stall(Detector):
    """Fires when the metric is, with ``confidence``, improving by less than ``progress`` per
    window, the window a ``share`` of the values seen so far (at least ``min_window``).

    ``ReduceLROnPlateau`` asks for a fixed relative improvement within a fixed patience; both
    are in units of one run. Here the patience grows with the run (a quarter of it by default:
    at step 400 the last 100 steps, at step 40,000 the last 10,000), so a long run that improves
    slowly is judged on the time scale it improves on, and "improved" is measured against the
    run's own noise: the window's values are averaged into ``blocks`` consecutive blocks, a
    least-squares line through the block means gives the improvement over the window and its
    standard error, and the rule fires only when the improvement's upper confidence bound
    (Student-t, ``blocks - 2`` degrees of freedom) is below ``progress``. A run that really
    improves by ``progress`` or more per window is judged stalled with probability at most
    ``1 - confidence`` per decision (block means of independent noise); a noisy run needs more
    evidence before it is called stalled, not less.

    Parameters
    ----------
    mode:
        ``min`` (lower is better, a loss) or ``max``.
    share:
        The window as a share of the values seen so far.
    min_window:
        The smallest window (and the values before the first decision).
    progress:
        Improvement per window that counts as progress: relative (``log`` units, 0.01 is about
        1%) with ``log``, absolute without.
    confidence:
        One-sided confidence of the bound.
    blocks:
        Block means the line is fitted to.
    log:
        Judge ``log(x)`` (values ``<= 0`` are skipped).
    max_bins:
        Memory bound: values are kept as sums in at most this many bins; when they are all
        used, neighbouring bins merge (each then holds twice as many values).

    Notes
    -----
    The statistic is the upper bound of the improvement per window (``log`` units with ``log``).
    It keeps firing while the stall lasts; a rule that acts on it wants a ``cooldown``. A
    metric that gets worse fires too (it is not improving). False alarms: a run that improves
    by ``progress`` or more per window fires with probability at most ``1 - confidence`` per
    decision (decisions on overlapping windows are correlated; a power law at 3x the progress,
    100,000 values with 10% noise: one episode of about 30 values). A loss that follows a power law
    ``t**-c`` improves by ``c * log(1 / (1 - share))`` per window however long the run (0.29 c
    at the default share), so the rule judges its exponent, not its length: with ``progress``
    0.01 it is called stalled below c = 0.035. Decisions are made once per block (every
    ``window // blocks`` values), the verdict in between is the last one: O(1) per value
    amortised. The bound assumes independent block means; a loss that oscillates
    slowly (cyclical schedules) makes it too narrow. Memory: ``O(max_bins)``.

    Examples
    --------
    >>> import random
    >>> rng = random.Random(0)
    >>> det = Stall(min_window=40)
    >>> falling = [math.exp(-0.01 * i + rng.gauss(0, 0.01)) for i in range(200)]
    >>> any(det.update(x) for x in falling)
    False
    >>> flat = [falling[-1] * math.exp(rng.gauss(0, 0.01)) for _ in range(200)]
    >>> next(i for i, x in enumerate(flat) if det.update(x))   # once the window is flat
    69
    """

    name: ClassVar[str] = "stall"
    PARAMS: ClassVar[Mapping[str, Param]] = {
        "mode": Param(str, "which direction is better", choices=("min", "max")),
        "share": Param(float, "the window as a share of the values seen", min=0, min_open=True,
                       max=1),
        "min_window": Param(int, "the smallest window", min=8),
        "progress": Param(float, "improvement per window that counts as progress", min=0),
        "confidence": Param(float, "one-sided confidence of the bound", min=0.5, min_open=True,
                            max=0.999999),
        "blocks": Param(int, "block means the line is fitted to", min=4, keeps=True),
        "log": Param(bool, "judge log(x)"),
        "max_bins": Param(int, "bins the values are kept in", min=8, keeps=True),
    }
    _STATE = ("sums", "counts", "width", "n", "stat", "verdict", "next")

    def __init__(self, *, mode: str = "min", share: float = 0.25, min_window: int = 40,
                 progress: float = 0.01, confidence: float = 0.95, blocks: int = 8,
                 log: bool = True, max_bins: int = 256) -> None:
        self._set_params(mode=mode, share=share, min_window=min_window, progress=progress,
                         confidence=confidence, blocks=blocks, log=log, max_bins=max_bins)
        if self.max_bins < 2 * self.blocks:
            raise ConfigError(f"parameter 'max_bins' must be at least 2 * blocks "
                              f"({2 * self.blocks}), got {self.max_bins}")
        self._crit = t_quantile(self.confidence, self.blocks - 2)
        self._crits: dict[int, float] = {self.blocks - 2: self._crit}
        self._sums: list[float] = []     # per bin, oldest first
        self._counts: list[int] = []
        self._cs = [0.0]                 # prefix sums over the bins (derived, not saved)
        self._cc = [0]
        self._width = 1                  # values per full bin
        self._n = 0
        self._stat: float | None = None
        self._verdict: bool | None = None
        self._next = self.min_window     # the value count of the next decision

    @property
    def statistic(self) -> float | None:
        """Upper confidence bound of the improvement over the latest window."""
        return self._stat

    @property
    def window(self) -> int:
        """The window the next decision looks at, in values."""
        return max(self.min_window, math.ceil(self.share * self._n))

    def _prefix(self) -> None:
        self._cs, self._cc = [0.0], [0]
        for s, c in zip(self._sums, self._counts):
            self._cs.append(self._cs[-1] + s)
            self._cc.append(self._cc[-1] + c)

    def _add(self, y: float) -> None:
        if self._counts and self._counts[-1] < self._width:
            self._sums[-1] += y
            self._counts[-1] += 1
            self._cs[-1] += y
            self._cc[-1] += 1
        else:
            self._sums.append(y)
            self._counts.append(1)
            self._cs.append(self._cs[-1] + y)
            self._cc.append(self._cc[-1] + 1)
        if len(self._sums) > self.max_bins:    # merge neighbours: each bin twice as wide
            s, c = self._sums, self._counts
            self._sums = [a + b for a, b in zip(s[0::2], s[1::2])] + ([s[-1]] if len(s) % 2 else [])
            self._counts = [a + b for a, b in zip(c[0::2], c[1::2])] + ([c[-1]] if len(c) % 2 else [])
            self._width *= 2
            self._prefix()

    def _blocks(self, window: int) -> list[tuple[float, float]] | None:
        """(centre, mean) of ``blocks`` block means over the newest ``window`` values (whole
        bins, so at least ``window``), block edges on the bin edges nearest to equal shares."""
        cs, cc = self._cs, self._cc
        total = cc[-1]
        first = max(0, bisect_right(cc, total - window) - 1)
        if len(cc) - 1 - first < self.blocks:
            return None
        start = cc[first]
        span = total - start
        edges = [first]
        for k in range(1, self.blocks):
            j = bisect_left(cc, start + k * span / self.blocks, lo=edges[-1] + 1)
            if j < len(cc) - 1:
                edges.append(j)
        edges.append(len(cc) - 1)
        return [(0.5 * (cc[a] + cc[b] - 1), (cs[b] - cs[a]) / (cc[b] - cc[a]))
                for a, b in zip(edges, edges[1:]) if cc[b] > cc[a]]

    def update(self, x: float, t: float | None = None) -> bool | None:
        if not math.isfinite(x) or (self.log and x <= 0.0):
            return None
        y = math.log(x) if self.log else x
        if abs(y) > 1e150:   # beyond any loss; its square would overflow the fit
            return None
        self._add(y if self.mode == "min" else -y)
        self._n += 1
        if self._n < self._next:
            return self._verdict
        window = self.window
        # a stall is slow: decide once per block, not on every value
        self._next = self._n + max(1, window // self.blocks)
        pts = self._blocks(window)
        if pts is None or len(pts) < 4:
            return self._verdict
        m = len(pts)
        mx = sum(p[0] for p in pts) / m
        my = sum(p[1] for p in pts) / m
        sxx = sxy = syy = 0.0
        for px, py in pts:
            dx, dy = px - mx, py - my
            sxx += dx * dx
            sxy += dx * dy
            syy += dy * dy
        b = sxy / sxx
        se = math.sqrt(max(syy - b * sxy, 0.0) / (m - 2) / sxx)
        crit = self._crit if m == self.blocks else self._t(m - 2)
        upper = (-b + crit * se) * window   # the most the run improves per window, at confidence
        self._stat = upper
        self._verdict = upper < self.progress
        return self._verdict

    def _t(self, df: int) -> float:
        """The critical t value for ``df`` degrees of freedom (fewer blocks than asked for)."""
        if df not in self._crits:
            self._crits[df] = t_quantile(self.confidence, df)
        return self._crits[df]

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._sums = [float(v) for v in self._sums]
        self._counts = [int(v) for v in self._counts]
        self._width, self._n, self._next = int(self._width), int(self._n), int(self._next)
        self._prefix()
