"""The tiny base class every detector derives from, and the parameter specs the schema checks.

A detector is a small streaming object (river-style): :meth:`Detector.update` takes one value and
answers ``True`` (anomalous), ``False`` (normal) or ``None`` (no decision yet: warming up, or a
value it cannot judge). Its state is reported by read-only properties and saved by
:meth:`Detector.state_dict` so that a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import math
import re
import reprlib
from collections import deque
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from ...errors import ConfigError, DamagedStateError
from ...samples import decode_number, encode_number

__all__ = ["Detector", "Param", "DIRECTIONS", "MAX_KEPT", "MAX_COUNT", "short",
           "exponent_number"]

DIRECTIONS = ("up", "down", "both")
#: The most values a detector parameter may ask a detector to keep (a window, a warm-up whose
#: values are kept for their median, ``max_bins``): the detector holds them in memory and its
#: state, written into every checkpoint and rollback event, holds them as JSON (about 2 MB per
#: rule and metric at this bound). A window of 10**12 grew the detector with the run.
MAX_KEPT = 100_000
#: The largest count of values any other integer parameter (and a rule's ``for``, ``hysteresis``
#: and ``cooldown``) may give: more samples than a run has (a billion steps), so a larger one
#: only ever means "never" (a typo, or a rule that ``enabled: false`` turns off plainly).
MAX_COUNT = 1_000_000_000

#: A number in exponent notation that YAML 1.1 (PyYAML) reads as text: ``1e-5`` (no dot),
#: ``1.0e5`` (no sign in the exponent).
_YAML_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def exponent_number(value: Any) -> Any:
    """``value`` as a float if it is a number in exponent notation that YAML 1.1 read as text
    (``"1e-5"``, ``"5e-1"``), else ``value`` unchanged: rule files take such numbers as written,
    in detector and in action parameters alike.

    >>> exponent_number("5e-1"), exponent_number("best"), exponent_number(2)
    (0.5, 'best', 2)
    """
    if isinstance(value, str) and _YAML_FLOAT.fullmatch(value.strip()):
        return float(value)
    return value


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 120
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 8
_SHORT.maxlevel = 3


def short(value: Any) -> str:
    """``repr(value)`` cut to a readable length, for error messages that echo what a rule file
    holds: a value of a million items (a YAML alias bomb, a pasted array) must not become a
    message of a million items.

    >>> short("x" * 1000)[:10], len(short("x" * 1000)), short([[1, 2]] * 100)
    ("'xxxxxxxxx", 120, '[[1, 2], [1, 2], [1, 2], [1, 2], [1, 2], [1, 2], [1, 2], [1, 2], ...]')
    """
    return _SHORT.repr(value)


@dataclass(frozen=True)
class Param:
    """One detector parameter: its type, allowed range or choices, and a one-line description.

    ``kind`` is ``int``, ``float``, ``bool`` or ``str``; an ``int`` is accepted where a ``float``
    is expected. ``optional`` parameters may be ``None`` (meaning "not set").
    """

    kind: type
    doc: str
    choices: tuple[Any, ...] | None = None
    min: float | None = None
    max: float | None = None
    min_open: bool = False  # True: the value must be strictly greater than ``min``
    optional: bool = False
    #: an ``int`` parameter that sizes what the detector keeps: at most :data:`MAX_KEPT`
    #: (other ``int`` parameters, counters, at most :data:`MAX_COUNT`)
    keeps: bool = False

    @property
    def upper(self) -> float | None:
        """The largest value allowed: ``max``, else the bound of an ``int`` parameter."""
        if self.max is not None or self.kind is not int:
            return self.max
        return MAX_KEPT if self.keeps else MAX_COUNT

    def check(self, name: str, value: Any) -> Any:
        """Return ``value`` converted to the parameter's type, or raise :class:`ConfigError`."""
        if value is None:
            if self.optional:
                return None
            raise ConfigError(f"parameter {name!r} must be set ({self.describe()})")
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"parameter {name!r} must be true or false, got {short(value)}")
            return value
        if self.kind is float:
            # YAML 1.1 (PyYAML) reads 1e-5 as text: it needs a dot (1.0e-5) to be a number
            value = exponent_number(value)
        if self.kind in (int, float):
            ok = isinstance(value, int) if self.kind is int else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok:
                raise ConfigError(f"parameter {name!r} must be {self.describe()}, got {short(value)}")
            value = self.kind(value)
            if not math.isfinite(value):
                raise ConfigError(f"parameter {name!r} must be finite, got {short(value)}")
            lo_bad = self.min is not None and (value <= self.min if self.min_open else value < self.min)
            hi = self.upper
            if lo_bad or (hi is not None and value > hi):
                why = ""
                if not lo_bad and self.max is None:
                    why = (": the detector keeps this many values, in memory and in the state "
                           "every checkpoint holds" if self.keeps else
                           ": more values than a run has (it would never decide)")
                raise ConfigError(f"parameter {name!r} must be {self.describe()}, got "
                                  f"{short(value)}{why}")
            return value
        if not isinstance(value, str):
            raise ConfigError(f"parameter {name!r} must be a string, got {short(value)}")
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"parameter {name!r}: {short(value)} is not valid "
                              f"(valid choices: {', '.join(map(str, self.choices))})")
        return value

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        kind = {int: "an integer", float: "a number", bool: "true or false"}.get(self.kind, "a string")
        parts = [kind]
        if self.min is not None:
            parts.append(f"{'>' if self.min_open else '>='} {self.min:g}")
        hi = self.upper
        if hi is not None:
            shown = str(hi) if isinstance(hi, int) else f"{hi:g}"
            parts.append(f"{'and ' if self.min is not None else ''}<= {shown}")
        return " ".join(parts) + (" or null" if self.optional else "")


def sorted_median(a: list[float]) -> float:
    """The median of the sorted, non-empty list ``a``.

    >>> sorted_median([1.0, 2.0, 10.0]), sorted_median([1.0, 2.0, 3.0, 10.0])
    (2.0, 2.5)
    """
    n = len(a)
    return a[n // 2] if n % 2 else 0.5 * (a[n // 2 - 1] + a[n // 2])


def _enc(v: Any) -> Any:
    """JSON-safe copy of a state value: deques become lists, non-finite floats strings."""
    if isinstance(v, (list, tuple, deque)):
        return [_enc(x) for x in v]
    return encode_number(v)


def _dec(v: Any) -> Any:
    if isinstance(v, list):
        return [_dec(x) for x in v]
    return decode_number(v)


def _is_number(v: Any) -> bool:
    return type(v) is float or type(v) is int


def _kept_kind(fresh: Any, v: Any) -> str | None:
    """What a saved value should have been, ``None`` when ``v`` is of the kind the detector
    keeps in that attribute (``fresh``: its value in a new detector). A number is a number
    (``"nan"``/``"inf"`` decoded), a count a whole number, a buffer a list of numbers or of
    lists of numbers; an attribute that starts as ``None`` keeps ``None``, a number or a
    boolean. Nothing else any detector keeps: a string there broke its next update (every
    later window's verdict, in the daemon) and was restored without a word."""
    if isinstance(fresh, bool):
        return None if isinstance(v, bool) else "true or false"
    if type(fresh) is int:  # a count: 3.0 (an older state, another writer) counts 3
        return None if type(v) is int or type(v) is float and v.is_integer() else \
            "a whole number"
    if type(fresh) is float:
        return None if _is_number(v) else "a number"
    if fresh is None:
        return None if v is None or _is_number(v) or isinstance(v, bool) else \
            "a number or null"
    if isinstance(fresh, (list, deque)):
        ok = isinstance(v, list) and all(
            _is_number(x) or isinstance(x, list) and all(map(_is_number, x)) for x in v)
        return None if ok else "a list of numbers"
    return None


def _has_nan(v: Any) -> bool:
    if isinstance(v, list):
        return any(map(_has_nan, v))
    return isinstance(v, float) and v != v


class Detector:
    """Base class: a streaming test over one metric.

    Subclasses set ``name`` (the ``detector:`` value in rule files), ``PARAMS`` (the parameter
    specs, in the order of the keyword arguments of ``__init__``) and ``_STATE`` (the attribute
    names that :meth:`state_dict` saves; only counters and buffers, never parameters).
    """

    name: ClassVar[str] = ""
    PARAMS: ClassVar[Mapping[str, Param]] = {}
    _STATE: ClassVar[tuple[str, ...]] = ()
    #: Names in ``_STATE`` whose values (or buffers' values) this detector never sets to NaN:
    #: a NaN there in a saved state is damage, and is refused (``best`` NaN silenced the
    #: regression test for good: no level is below NaN).
    _NO_NAN: ClassVar[tuple[str, ...]] = ()
    #: True for detectors that judge the *absence* of a metric (staleness): the engine calls
    #: :meth:`miss` for samples without the metric and :meth:`check` on ``Engine.tick``.
    watches_absence: ClassVar[bool] = False
    #: True for detectors that judge a value together with the latest value of another metric
    #: (the rule key ``given``): the engine calls :meth:`update_given` instead of :meth:`update`.
    takes_given: ClassVar[bool] = False
    #: Parameters that only mean something together with the rule's ``given``.
    GIVEN_PARAMS: ClassVar[tuple[str, ...]] = ()

    def _set_params(self, **params: Any) -> None:
        for key, value in params.items():
            setattr(self, key, self.PARAMS[key].check(key, value))

    @property
    def params(self) -> dict[str, Any]:
        """The parameters this detector was built with."""
        return {k: getattr(self, k) for k in self.PARAMS}

    @property
    def statistic(self) -> float | None:
        """The latest test statistic (what the decision compared with its threshold)."""
        return None

    def update(self, x: float, t: float | None = None) -> bool | None:
        """Take the next value ``x`` (observed at unix time ``t``, if known) and judge it."""
        raise NotImplementedError

    def update_given(self, x: float, given: float | None, t: float | None = None) -> bool | None:
        """Judge ``x`` knowing the latest value of the rule's ``given`` metric (``None``: not
        seen yet). Only detectors with ``takes_given`` do."""
        raise ConfigError(f"detector {self.name!r} takes no 'given'")

    def miss(self, t: float | None = None) -> bool | None:
        """A sample arrived without this metric. Only absence detectors judge it."""
        return None

    def check(self, now: float) -> bool | None:
        """Judge at wall-clock time ``now`` without a new sample. Only absence detectors do."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Counters and buffers as a JSON-serialisable dict (no parameters)."""
        return {"detector": self.name, **{k: _enc(getattr(self, "_" + k)) for k in self._STATE}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved, so that updates continue exactly."""
        if state.get("detector") != self.name:
            raise ConfigError(f"state is for detector {state.get('detector')!r}, not {self.name!r}")
        missing = [k for k in self._STATE if k not in state]
        if missing:
            raise ConfigError(f"{self.name} state lacks {', '.join(missing)}")
        loaded = {}
        fresh = type(self)(**self.params)  # what each attribute holds before any update
        for k in self._STATE:  # every value checked before any is set: all or nothing
            cur = getattr(fresh, "_" + k)
            v = _dec(state[k])
            what = _kept_kind(cur, v)
            if what is None and k in self._NO_NAN and _has_nan(v):
                what = "a number (NaN: this detector never keeps one there)"
            if what:
                raise DamagedStateError(f"{self.name} state {k!r} is {short(state[k])}, not "
                                        f"{what} (a damaged or hand-edited state)")
            loaded[k] = deque(v, maxlen=cur.maxlen) if isinstance(cur, deque) else v
        for k, v in loaded.items():
            setattr(self, "_" + k, v)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


class RunLengthTest:
    """Mixin: a run-length test sized by the stream's own rate of exceedances.

    A detector that decides "this value is beyond the line" calls :meth:`_run_test` with that
    decision and fires only on the k-th such value in a row, ``k`` the smallest number ``>= 2``
    with ``p ** k <= alpha``, where ``p = (beyond + 1) / (seen + 2)`` is the rate of such values
    over the values it decided on before the current run (one of each added, so that a short
    history asks for a long run). A stream whose values never crossed the line before fires on
    its second or third crossing in a row; one whose heavy-tailed values cross now and then
    waits for a run that its own rate makes unlikely (``alpha`` per value, if values are
    independent). Subclasses list ``"seen", "beyond", "run"`` in ``_STATE`` and set ``alpha``.
    """

    alpha: float
    _seen: int
    _beyond: int
    _run: int
    #: Pseudo-counts added to ``beyond`` (and twice to ``seen``). 1: a short history asks for a
    #: long run (the collapse test). 0: the observed rate itself, so a stream that never crossed
    #: the line fires on its second crossing in a row whatever its length (the blow-up test,
    #: which must not get slower on the light-tailed runs it was built for).
    _prior: float = 1.0

    def _init_runs(self) -> None:
        self._seen = 0      # decided values before the current run
        self._beyond = 0    # ... of which beyond the line
        self._run = 0       # the current run of values beyond the line

    def run_needed(self) -> int:
        """The run length the test asks for now (``alpha`` > 0)."""
        p = (self._beyond + self._prior) / (self._seen + 2 * self._prior or 1)
        if p <= 0.0:
            return 2
        return max(2, math.ceil(math.log(self.alpha) / math.log(p) - 1e-9))

    def _run_test(self, beyond: bool) -> bool:
        if beyond:
            self._run += 1
            return self._run >= self.run_needed()
        self._seen += self._run + 1       # the run that just ended joins the history
        self._beyond += self._run
        self._run = 0
        return False
