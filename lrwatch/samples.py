"""The unit of data that flows from the front ends (training, serving) into the engine."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["Sample", "encode_number", "decode_number", "first_rate", "not_applied", "NONFINITE"]

#: How trace format v1 (and every JSON lrwatch writes) spells a non-finite number.
NONFINITE = ("nan", "inf", "-inf")


def encode_number(v: Any) -> Any:
    """``v`` for JSON: a non-finite float becomes ``"nan"``/``"inf"``/``"-inf"`` (trace format
    v1); anything else is returned unchanged.

    >>> encode_number(float("-inf")), encode_number(2.5), encode_number(None)
    ('-inf', 2.5, None)
    """
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if v != v else ("inf" if v > 0 else "-inf")
    return v


def decode_number(v: Any) -> Any:
    """The inverse of :func:`encode_number`: ``"nan"``/``"inf"``/``"-inf"`` become floats.

    >>> decode_number("inf"), decode_number(3), decode_number("x")
    (inf, 3, 'x')
    """
    if isinstance(v, str) and v in NONFINITE:
        return float(v)
    return v


def first_rate(lr_groups: tuple[float, ...]) -> float:
    """The run's learning rate (``values["lr"]``) from every group's (``lr_groups``, one per
    parameter group, NaN for a group that holds no rate: ``lr=None``): the first group's
    that has one, else the first's (NaN).

    >>> first_rate((float("nan"), 0.001, 0.01)), first_rate((0.1, 0.01))
    (0.001, 0.1)
    """
    first = lr_groups[0]
    if first == first:   # not NaN: the common case, without a generator
        return first
    return next((x for x in lr_groups if not math.isnan(x)), first)


def not_applied(values: dict[str, float], norm_keys: tuple[str, ...]) -> None:
    """The ``values`` (edited in place) of a step a ``GradScaler`` skipped: its gradients held
    an inf or a NaN, and it never reached the parameters. ``norm_keys``: the names the step's
    gradient norms are recorded under (each also with ``/layer`` after it).

    With a finite loss, at a loss scale of at least 1, that is the scaler's own calibration
    (a scale too high for fp16 gradients, which it halves), not a failure of the run: the
    norms of gradients it scaled say nothing of the run and are left out, so no non-finite
    rule fires (every such overflow rolled the run back or restarted it until the sixteenth
    round). A non-finite loss, or gradients that overflow even unscaled (a scale below 1), is
    a step the scaler dropped: ``grad_dropped``, as the guard's drops, which the recovery
    policy deals with alike (a first one in a quiet stretch rolls nothing back, a repeat
    does).

    >>> v = {"loss": 0.7, "loss_scale": 65536.0, "grad_norm": float("inf"), "skipped": 1.0}
    >>> not_applied(v, ("grad_norm",)); v
    {'loss': 0.7, 'loss_scale': 65536.0, 'skipped': 1.0}
    >>> v = {"loss": float("nan"), "grad_norm": float("nan"), "skipped": 1.0}
    >>> not_applied(v, ("grad_norm",)); v["grad_dropped"]
    1.0
    """
    loss, scale = values.get("loss", 0.0), values.get("loss_scale", 1.0)
    if math.isfinite(loss) and scale >= 1.0:
        for key in [k for k in values
                    if k in norm_keys or k.startswith(tuple(b + "/" for b in norm_keys))]:
            del values[key]
    else:
        values["grad_dropped"] = 1.0


@dataclass(frozen=True)
class Sample:
    """One optimizer step (training) or one window (serving).

    Parameters
    ----------
    step:
        The global step (training) or window index (serving); increasing.
    time:
        Unix seconds when the step finished, or ``None`` when unknown.
    values:
        Metric name to float. Non-finite values are kept as ``nan``/``inf``. ``lr`` holds the
        learning rate of the first parameter group that has one (:func:`first_rate`);
        ``lr_groups`` holds all of them.
    lr_groups:
        The learning rate of every parameter group, in group order (NaN for a group that
        holds none: ``lr=None``), or ``None`` when not measured (no group holds one).
    events:
        Things that happened at this step (rollbacks, firings), as JSON-ready dicts.

    Examples
    --------
    >>> s = Sample(step=3, time=None, values={"loss": 2.5, "lr": 0.1}, lr_groups=(0.1, 0.01))
    >>> s.get("loss"), s.get("accuracy")
    (2.5, None)
    """

    step: int
    time: float | None = None
    values: Mapping[str, float] = field(default_factory=dict)
    lr_groups: tuple[float, ...] | None = None
    events: tuple[Mapping[str, Any], ...] = ()

    def get(self, name: str) -> float | None:
        """The value of metric ``name`` at this step, or ``None`` when it was not measured."""
        return self.values.get(name)

    def is_finite(self, name: str) -> bool:
        v = self.values.get(name)
        return v is not None and math.isfinite(v)
