"""Means and spreads of finite values near the float range, without overflow (pure numpy).

``np.mean``, ``np.std`` and a sum of squares overflow to infinity (with numpy's raw
"overflow encountered" warnings on stderr) for finite values near 1e308: a feature of 1e308s
and 0s has a finite mean and standard deviation, but their sums do not fit a float. Each
function here divides by a power of two near the largest magnitude first (exact: the result
is bit for bit the plain one's whenever that does not overflow) and multiplies it back; a
result that still does not fit (a spread of values at both ends of the range) is the largest
float.
Values near the float range are legitimate inputs (docs/daemon.md, "Hostile input"): the
statistics of a reference or a window holding them must stay finite.

>>> import numpy as np
>>> a = np.array([1e308, 0.0, 1e308, 0.0])
>>> float(mean(a)), round(float(std(a, ddof=1)) / 1e307, 3)
(5e+307, 5.774)
"""

from __future__ import annotations

import sys

import numpy as np

__all__ = ["mean", "std", "rms"]

_MAX = sys.float_info.max


def _scaled(a: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    s = np.max(np.abs(a), axis=axis, keepdims=True) if a.size else np.ones(())
    s = np.where((s > 0) & np.isfinite(s), s, 1.0)
    s = np.ldexp(1.0, np.frexp(s)[1] - 1)  # a power of two: dividing by it loses no bit
    return a / s, np.squeeze(s, axis=axis) if axis is not None else s.reshape(())


def _back(v: np.ndarray, s: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.clip(v * s, -_MAX, _MAX)


def mean(a: np.ndarray, axis: int | None = None) -> np.ndarray:
    """``a.mean(axis)`` of finite ``a``, without overflow."""
    b, s = _scaled(np.asarray(a, dtype=np.float64), axis)
    return _back(b.mean(axis=axis), s)


def std(a: np.ndarray, ddof: int = 0, axis: int | None = None) -> np.ndarray:
    """``a.std(axis, ddof=ddof)`` of finite ``a``, without overflow."""
    b, s = _scaled(np.asarray(a, dtype=np.float64), axis)
    return _back(b.std(axis=axis, ddof=ddof), s)


def rms(a: np.ndarray, axis: int | None = None) -> np.ndarray:
    """``sqrt(mean(a ** 2, axis))`` of finite ``a``, without overflow."""
    b, s = _scaled(np.asarray(a, dtype=np.float64), axis)
    return _back(np.sqrt((b * b).mean(axis=axis)), s)
