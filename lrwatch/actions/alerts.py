"""Alerts, the sinks that deliver them, and the one background sender that never blocks training.

An :class:`Alert` is what a firing rule looks like to the outside world: a CamelCase
``alertname`` (``LrwatchLossBlowup``), bounded labels (``alertname``, ``severity``, ``rule`` and
the rule's own labels; never the value) and annotations (``summary``, ``description``, ``value``).
Its identity, :attr:`Alert.key`, is the name plus the labels, exactly as Alertmanager groups and
deduplicates alerts by their label set.

:class:`AlertSender` owns one daemon thread and a bounded queue. :meth:`AlertSender.fire` and
:meth:`AlertSender.resolve` are called from the training thread; they record the alert, enqueue it
and return at once, whatever the network does. The worker delivers every item to every sink,
retries a failed delivery with exponential backoff and then gives up, re-sends the firing alerts
every ``resend_interval`` seconds, and counts all of it in Prometheus:

==================================  =================================================================
``lrwatch_alerts_sent_total``       alerts delivered, by ``sink`` (a batch of 3 counts 3)
``lrwatch_alerts_failed_total``     alerts given up on after the retries, by ``sink``
``lrwatch_alerts_dropped_total``    queue items dropped because the queue was full (or closed)
``lrwatch_alerts_queue_length``     items waiting in the queue
==================================  =================================================================

Sinks: :class:`AlertmanagerSink` (API v2), :class:`WebhookSink` (a generic JSON webhook, schema
below) and :class:`LogSink` (the ``"lrwatch"`` logger). Any object with ``name``,
``wants_resend`` and ``send(alerts, *, now, valid_for)`` is a sink (:class:`Sink`).

Examples
--------
>>> alert_name("loss_blowup")
'LrwatchLossBlowup'
>>> a = Alert.for_rule("loss_blowup", severity="critical", summary="loss blew up",
...                    value=12.5, labels={"team": "ml"}, starts_at=1764300000.0)
>>> a.name, a.labels["alertname"], a.labels["severity"], a.annotations["value"]
('LrwatchLossBlowup', 'LrwatchLossBlowup', 'critical', '12.5')
>>> "value" in a.labels
False
>>> a.to_alertmanager(now=1764300000.0, valid_for=240.0)["endsAt"]
'2025-11-28T03:24:00.000Z'
"""

from __future__ import annotations

import collections
import hashlib
import heapq
import itertools
import json
import logging
import math
import random
import re
import threading
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any, Callable, Deque, Generic, Mapping, Protocol, Sequence, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge

from ..errors import ConfigError, LrwatchError
from ..rules.schema import SEVERITIES  # one definition: the rule files' severities

__all__ = [
    "Alert",
    "alert_name",
    "Sink",
    "AlertmanagerSink",
    "WebhookSink",
    "LogSink",
    "AlertSender",
    "DeliveryError",
    "SEVERITIES",
    "export_no_sinks",
    "make_sender",
]

from .._ratelimit import LogLimiter

_log = logging.getLogger("lrwatch")

_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_WORD = re.compile(r"[A-Za-z0-9]+")
#: How many resend intervals a firing alert stays valid in Alertmanager without a re-send: if
#: lrwatch dies, Alertmanager resolves the alert by itself after that long (Prometheus uses 4).
RESEND_HORIZON = 4


def alert_name(rule: str) -> str:
    """The Alertmanager ``alertname`` of a rule: ``Lrwatch`` + the rule name in CamelCase.

    Words are split on anything that is not a letter or digit (``_``, ``-``, ``.``, spaces);
    each word gets a capital first letter and keeps the rest as written.

    >>> alert_name("loss_blowup"), alert_name("grad-norm-explosion"), alert_name("nan")
    ('LrwatchLossBlowup', 'LrwatchGradNormExplosion', 'LrwatchNan')
    >>> alert_name("eval_accuracy.regression")
    'LrwatchEvalAccuracyRegression'
    """
    words = _WORD.findall(rule)
    if not words:
        raise ConfigError(f"cannot make an alert name from rule name {rule!r}: it has no letters "
                          f"or digits")
    camel = "".join(w[:1].upper() + w[1:] for w in words)
    return camel if camel.startswith("Lrwatch") else "Lrwatch" + camel


def rfc3339(t: float) -> str:
    """Unix seconds as RFC 3339 UTC with milliseconds, as Alertmanager expects.

    >>> rfc3339(0.0)
    '1970-01-01T00:00:00.000Z'
    """
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


def _fmt_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.6g}"
    return str(value)


def _frozen(m: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(m or {}))


@dataclass(frozen=True)
class Alert:
    """One alert: a firing (``ends_at is None``) or a resolution (``ends_at`` set).

    Parameters
    ----------
    name : str
        The ``alertname``, CamelCase with the ``Lrwatch`` prefix (see :func:`alert_name`).
    labels : mapping of str to str
        Identity labels. ``alertname`` is set from ``name`` if missing; ``severity`` should be
        one of :data:`SEVERITIES`. Keep them bounded: the value goes in the annotations.
    annotations : mapping of str to str
        ``summary``, ``description``, ``value`` and any other free text.
    starts_at : float
        Unix seconds when the alert started firing.
    ends_at : float or None
        Unix seconds when it resolved; ``None`` while firing.
    generator_url : str
        A link back to whatever produced the alert (a dashboard, a run page); may be empty.

    Raises
    ------
    ConfigError
        A label name that Prometheus would reject, or a non-string label or annotation.
    """

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    starts_at: float = 0.0
    ends_at: float | None = None
    generator_url: str = ""

    def __post_init__(self) -> None:
        labels = {"alertname": self.name, **dict(self.labels)}
        for key, val in labels.items():
            if not isinstance(key, str) or not _LABEL_NAME.match(key):
                raise ConfigError(f"alert label name {key!r} is invalid: use letters, digits and "
                                  f"underscores, not starting with a digit")
            if not isinstance(val, str):
                raise ConfigError(f"alert label {key!r} must be a string, got {val!r}")
        if labels["alertname"] != self.name:
            raise ConfigError(f"label alertname={labels['alertname']!r} differs from the alert "
                              f"name {self.name!r}")
        for key, val in dict(self.annotations).items():
            if not isinstance(key, str) or not isinstance(val, str):
                raise ConfigError(f"alert annotation {key!r} must map a string to a string")
            if not _LABEL_NAME.match(key):
                # Alertmanager answers 400 (the batch's delivery fails): refused here, by name
                raise ConfigError(f"alert annotation name {key!r} is invalid: use letters, "
                                  f"digits and underscores, not starting with a digit")
        object.__setattr__(self, "labels", _frozen(labels))
        object.__setattr__(self, "annotations", _frozen(self.annotations))

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def for_rule(cls, rule: str, *, severity: str, summary: str, description: str = "",
                 value: Any = None, labels: Mapping[str, str] | None = None,
                 annotations: Mapping[str, str] | None = None, starts_at: float | None = None,
                 generator_url: str = "") -> "Alert":
        """An alert for rule ``rule``, with the labels and annotations lrwatch's conventions ask.

        Labels: ``alertname`` (:func:`alert_name` of ``rule``), ``severity``, ``rule`` (the rule
        name as written in the rule file, handy for silences) and ``labels``. Annotations:
        ``summary``, ``description``, ``value`` (formatted, ``"nan"``/``"inf"`` for non-finite)
        and ``annotations``.
        """
        if severity not in SEVERITIES:
            raise ConfigError(f"severity {severity!r} is invalid; choose one of "
                              f"{', '.join(SEVERITIES)}")
        name = alert_name(rule)
        ann = {"summary": summary, "description": description or summary,
               "value": _fmt_value(value)}
        ann.update(annotations or {})
        return cls(name=name,
                   labels={"alertname": name, "severity": severity, "rule": rule,
                           **dict(labels or {})},
                   annotations=ann,
                   starts_at=time.time() if starts_at is None else float(starts_at),
                   generator_url=generator_url)

    @classmethod
    def from_firing(cls, firing: Any, *, generator_url: str = "",
                    starts_at: float | None = None,
                    labels: Mapping[str, str] | None = None) -> "Alert":
        """The alert of an engine :class:`~lrwatch.rules.engine.Firing` (its ``kind`` is ignored:
        pass the alert to :meth:`AlertSender.fire` or :meth:`AlertSender.resolve`).

        ``starts_at`` defaults to the firing's sample time, else now; ``labels`` are added to
        the firing's own (the Watcher's ``run``, so runs sharing an Alertmanager stay apart).
        """
        ann = dict(getattr(firing, "annotations", None) or {})
        summary = ann.pop("summary", None) or firing.message
        if getattr(firing, "kind", "firing") == "resolved" and summary.startswith("resolved: "):
            # The engine prefixes a resolution's message; the alert's status already says it
            # (or a log line reads "RESOLVED ...: resolved: ...").
            summary = summary[len("resolved: "):]
        description = ann.pop("description", "") or (
            f"Rule {firing.rule} fired at step {firing.step}: {summary}")
        ann.setdefault("step", str(firing.step))
        if getattr(firing, "metric", None):
            ann.setdefault("metric", str(firing.metric))
        t = starts_at if starts_at is not None else getattr(firing, "time", None)
        return cls.for_rule(firing.rule, severity=firing.severity, summary=summary,
                            description=description, value=firing.value,
                            labels={**dict(labels or {}),
                                    **dict(getattr(firing, "labels", None) or {})},
                            annotations=ann,
                            starts_at=t, generator_url=generator_url)

    # --- identity and state -------------------------------------------------------------------
    @property
    def key(self) -> tuple[tuple[str, str], ...]:
        """Identity: the sorted label pairs (``alertname`` included), as Alertmanager sees it."""
        return tuple(sorted(self.labels.items()))

    @property
    def fingerprint(self) -> str:
        """A stable 16-hex-digit digest of :attr:`key` (the same across processes and runs).

        >>> Alert("LrwatchX", {"severity": "info"}).fingerprint
        '2150019735389a07'
        """
        blob = "\x00".join(f"{k}\x01{v}" for k, v in self.key)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def firing(self) -> bool:
        return self.ends_at is None

    @property
    def status(self) -> str:
        """``"firing"`` or ``"resolved"``."""
        return "firing" if self.ends_at is None else "resolved"

    def resolved(self, at: float) -> "Alert":
        """This alert, resolved at unix time ``at``."""
        return replace(self, ends_at=float(at))

    # --- wire formats -------------------------------------------------------------------------
    def to_alertmanager(self, *, now: float, valid_for: float) -> dict[str, Any]:
        """The Alertmanager API v2 postable alert.

        While firing, ``endsAt`` is ``now + valid_for``: a re-send pushes it forward, and if the
        re-sends stop (lrwatch died), Alertmanager resolves the alert by itself. Resolved, it is
        the resolution time.
        """
        ends = now + valid_for if self.ends_at is None else self.ends_at
        body: dict[str, Any] = {"labels": dict(self.labels),
                                "annotations": dict(self.annotations),
                                "startsAt": rfc3339(self.starts_at), "endsAt": rfc3339(ends)}
        if self.generator_url:  # Alertmanager validates it as a URI: omit rather than send ""
            body["generatorURL"] = self.generator_url
        return body

    def to_webhook(self) -> dict[str, Any]:
        """One element of the :class:`WebhookSink` body (``endsAt`` is ``null`` while firing)."""
        return {"status": self.status, "labels": dict(self.labels),
                "annotations": dict(self.annotations), "startsAt": rfc3339(self.starts_at),
                "endsAt": None if self.ends_at is None else rfc3339(self.ends_at),
                "generatorURL": self.generator_url, "fingerprint": self.fingerprint}


# ----------------------------------------------------------------------------------------------
# sinks


class DeliveryError(LrwatchError):
    """A sink could not deliver; ``retry`` is False when trying again cannot help (HTTP 4xx)."""

    def __init__(self, message: str, *, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


class Sink(Protocol):
    """What :class:`AlertSender` needs of a sink.

    ``send`` delivers a batch (in order) or raises; any exception is retried unless it is a
    :class:`DeliveryError` with ``retry=False``. ``name`` is the ``sink`` label of the counters.
    ``wants_resend`` says whether firing alerts are re-sent to it every ``resend_interval``.
    """

    name: str
    wants_resend: bool

    def send(self, alerts: Sequence[Alert], *, now: float, valid_for: float) -> None: ...


def post_json(url: str, payload: Any, *, timeout: float,
              headers: Mapping[str, str] | None = None) -> int:
    """POST ``payload`` as JSON; the status on 2xx, :class:`DeliveryError` otherwise.

    HTTP 4xx other than 408/429 is not retryable (the request itself is wrong).
    """
    data = json.dumps(payload, allow_nan=False).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json",
                                          "User-Agent": "lrwatch", **dict(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        with exc:
            body = exc.read()[:300].decode(errors="replace")
        retry = exc.code >= 500 or exc.code in (408, 429)
        raise DeliveryError(f"POST {url} -> HTTP {exc.code}: {body}", retry=retry) from None
    except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections, bad URLs
        raise DeliveryError(f"POST {url} failed: {exc}") from None


def _check_url(url: str, what: str) -> str:
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ConfigError(f"{what} URL must start with http:// or https://, got {url!r}")
    return url.rstrip("/")


def _check_timeout(timeout: float) -> float:
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


class AlertmanagerSink:
    """Alertmanager API v2: ``POST {url}/api/v2/alerts`` with a JSON list of postable alerts.

    Parameters
    ----------
    url : str
        The Alertmanager, e.g. ``http://127.0.0.1:9093`` (with its path prefix, if any).
    timeout : float, default 5
        Seconds per HTTP request.
    name : str, default "alertmanager"
        The ``sink`` label of the counters.
    """

    wants_resend = True

    def __init__(self, url: str, timeout: float = 5.0, *, name: str = "alertmanager") -> None:
        self.url = _check_url(url, "Alertmanager")
        self.timeout = _check_timeout(timeout)
        self.name = name

    def send(self, alerts: Sequence[Alert], *, now: float, valid_for: float) -> None:
        # Alertmanager keeps one alert per label set: the latest state in a batch is what counts.
        latest: dict[Any, Alert] = {}
        for a in alerts:
            latest.pop(a.key, None)
            latest[a.key] = a
        body = [a.to_alertmanager(now=now, valid_for=valid_for) for a in latest.values()]
        post_json(f"{self.url}/api/v2/alerts", body, timeout=self.timeout)

    def __repr__(self) -> str:
        return f"AlertmanagerSink({self.url!r})"


class WebhookSink:
    """A generic JSON webhook: one ``POST`` per batch.

    The body (modelled on Alertmanager's own webhook notifications)::

        {
          "version": "1",
          "sender": "lrwatch",
          "status": "firing" | "resolved",   # "firing" if any alert's latest state is firing
          "resend": false,                   # true for the periodic re-send of firing alerts
          "alerts": [
            {"status": "firing" | "resolved",
             "labels": {"alertname": "LrwatchLossBlowup", "severity": "critical",
                        "rule": "loss_blowup", ...},
             "annotations": {"summary": "...", "description": "...", "value": "12.5", ...},
             "startsAt": "2025-11-28T03:20:00.000Z",
             "endsAt": null | "2025-11-28T03:25:00.000Z",   # null while firing
             "generatorURL": "",
             "fingerprint": "2150019735389a07"}
          ]
        }

    Parameters
    ----------
    url : str
        Where to POST.
    timeout : float, default 5
        Seconds per HTTP request.
    headers : mapping, optional
        Extra request headers (e.g. ``Authorization``).
    name : str, default "webhook"
        The ``sink`` label of the counters.
    """

    wants_resend = True

    def __init__(self, url: str, timeout: float = 5.0, headers: Mapping[str, str] | None = None,
                 *, name: str = "webhook") -> None:
        self.url = _check_url(url, "webhook")
        self.timeout = _check_timeout(timeout)
        self.headers = dict(headers or {})
        self.name = name

    @staticmethod
    def body(alerts: Sequence[Alert], *, resend: bool = False) -> dict[str, Any]:
        """The JSON body for a batch.

        >>> b = WebhookSink.body([Alert("LrwatchX", {"severity": "info"}, starts_at=0.0)])
        >>> b["status"], b["alerts"][0]["endsAt"], b["alerts"][0]["labels"]
        ('firing', None, {'alertname': 'LrwatchX', 'severity': 'info'})
        """
        last = {a.key: a for a in alerts}  # a fire and its resolve may share a batch
        status = "firing" if any(a.firing for a in last.values()) else "resolved"
        return {"version": "1", "sender": "lrwatch", "status": status, "resend": resend,
                "alerts": [a.to_webhook() for a in alerts]}

    def send(self, alerts: Sequence[Alert], *, now: float, valid_for: float,
             resend: bool = False) -> None:
        post_json(self.url, self.body(alerts, resend=resend), timeout=self.timeout,
                  headers=self.headers)

    def __repr__(self) -> str:
        return f"WebhookSink({self.url!r})"


class LogSink:
    """Writes each alert as one log line (``WARNING`` when firing, ``INFO`` when resolved).

    Firing alerts are not re-sent here: one line per state change is enough in a log.

    >>> LogSink.line(Alert.for_rule("nan_loss", severity="critical", summary="loss is nan",
    ...                             value=float("nan"), starts_at=0.0))
    'lrwatch alert FIRING LrwatchNanLoss rule=nan_loss severity=critical: loss is nan (value=nan)'
    """

    wants_resend = False

    def __init__(self, logger: logging.Logger | None = None, *, name: str = "log") -> None:
        self.logger = logger if logger is not None else logging.getLogger("lrwatch")
        self.name = name

    @staticmethod
    def line(alert: Alert) -> str:
        """The log line of one alert."""
        extra = " ".join(f"{k}={v}" for k, v in sorted(alert.labels.items()) if k != "alertname")
        return (f"lrwatch alert {alert.status.upper()} {alert.name} {extra}: "
                f"{alert.annotations.get('summary', '')} "
                f"(value={alert.annotations.get('value', '')})")

    def send(self, alerts: Sequence[Alert], *, now: float, valid_for: float) -> None:
        for a in alerts:
            self.logger.log(logging.WARNING if a.firing else logging.INFO, "%s", self.line(a))

    def __repr__(self) -> str:
        return f"LogSink({self.logger.name!r})"


# ----------------------------------------------------------------------------------------------
# the bounded queue and the sender

T = TypeVar("T")


class BoundedQueue(Generic[T]):
    """A FIFO that never blocks the producer: when full, the *oldest* item is dropped.

    Dropping the oldest keeps the newest state, which is what matters for alerts (a later
    resolve or firing supersedes an earlier one, and firing alerts are re-sent anyway).
    ``put`` returns the number of items it dropped (0 or 1).

    >>> q = BoundedQueue(2)
    >>> [q.put(i) for i in range(3)], q.drain(10)
    ([0, 0, 1], [1, 2])
    """

    def __init__(self, maxsize: int) -> None:
        if not (isinstance(maxsize, int) and maxsize >= 1):
            raise ConfigError(f"queue_size must be a positive integer, got {maxsize!r}")
        self.maxsize = maxsize
        self._items: Deque[T] = collections.deque()
        # Re-entrant: the sender calls put() while holding the same lock for its own state.
        self.cond = threading.Condition(threading.RLock())

    def put(self, item: T) -> int:
        with self.cond:
            dropped = 0
            if len(self._items) >= self.maxsize:
                self._items.popleft()
                dropped = 1
            self._items.append(item)
            self.cond.notify()
            return dropped

    def drain(self, limit: int) -> list[T]:
        """Take up to ``limit`` items without waiting (call with or without ``cond`` held)."""
        with self.cond:
            out = []
            while self._items and len(out) < limit:
                out.append(self._items.popleft())
            return out

    def __len__(self) -> int:
        return len(self._items)


@dataclass(order=True)
class _Delivery:
    due: float
    seq: int
    sink: Any = field(compare=False)
    alerts: list[Alert] = field(compare=False)
    resend: bool = field(compare=False, default=False)
    attempt: int = field(compare=False, default=0)


_BATCH = 256


def wait_drained(worker: Any, timeout: float) -> bool:
    """Wait until ``worker._outstanding`` reaches 0 (under ``worker._cond``), or ``timeout``.

    Shared by the alert sender and the hook runner: both count work in ``_outstanding`` and
    notify ``_cond`` when an item finishes; a dead worker thread ends the wait at once.
    """
    deadline = time.monotonic() + timeout
    with worker._cond:
        while worker._outstanding > 0:
            left = deadline - time.monotonic()
            if left <= 0 or not worker._thread.is_alive():
                return bool(worker._outstanding == 0)
            worker._cond.wait(min(left, 0.5))
        return True


def _sink_names(sinks: Sequence[Any]) -> list[str]:
    """The sinks' names, checked: at least one sink, each with a name and ``send``, unique."""
    if not sinks:
        raise ConfigError("AlertSender needs at least one sink (AlertmanagerSink, "
                          "WebhookSink or LogSink)")
    names = [getattr(s, "name", None) for s in sinks]
    for s, n in zip(sinks, names):
        if not isinstance(n, str) or not n or not callable(getattr(s, "send", None)):
            raise ConfigError(f"{s!r} is not a sink: it needs a non-empty str 'name' and a "
                              f"'send' method")
    if len(set(names)) != len(names):
        raise ConfigError(f"sink names must be unique (they label the counters), got "
                          f"{names}; pass name=... to tell them apart")
    return names  # type: ignore[return-value]


def _check_timing(resend_interval: Any, max_retries: Any,
                  backoff: Any) -> tuple[float, int, tuple[float, float]]:
    """``resend_interval``, ``max_retries`` and ``backoff``, checked and normalised."""
    if not (isinstance(resend_interval, (int, float)) and resend_interval > 0):
        raise ConfigError(f"resend_interval must be positive seconds, got {resend_interval!r}")
    if not (isinstance(max_retries, int) and max_retries >= 0):
        raise ConfigError(f"max_retries must be an integer >= 0, got {max_retries!r}")
    try:
        b0, b1 = (float(b) for b in backoff)
    except (TypeError, ValueError):
        raise ConfigError(f"backoff must be (first, largest) seconds, got {backoff!r}") \
            from None
    if not (0 <= b0 <= b1):
        raise ConfigError(f"backoff must satisfy 0 <= first <= largest, got {backoff!r}")
    return float(resend_interval), max_retries, (b0, b1)


class AlertSender:
    """Delivers alerts to sinks from one background daemon thread; never blocks, never raises.

    Parameters
    ----------
    sinks : sequence of Sink
        Where every alert goes (Alertmanager, webhook, log, ...). Sink names label the counters
        and must be unique.
    registry : CollectorRegistry, optional
        Where the counters are registered; a fresh one when ``None`` (see :attr:`registry`).
    queue_size : int, default 1000
        Bound of the queue between :meth:`fire`/:meth:`resolve` and the worker. When it is full,
        the *oldest* item is dropped and counted in ``lrwatch_alerts_dropped_total``: the newest
        state wins, and a dropped firing still goes out with the next re-send because the active
        set is kept apart from the queue.
    resend_interval : float, default 60
        Seconds between re-sends of the firing alerts. While firing, an Alertmanager alert's
        ``endsAt`` is ``now + 4 * resend_interval``, so Alertmanager resolves it by itself if
        lrwatch stops re-sending (it crashed, or the run ended without a resolve).
    max_retries : int, default 5
        Retries of one failed delivery (so at most ``1 + max_retries`` attempts) before it is
        given up and counted in ``lrwatch_alerts_failed_total``. HTTP 4xx (other than 408 and
        429) is given up at once: the same request would be rejected again.
    backoff : (float, float), default (0.5, 30.0)
        First and largest retry delay in seconds; the delay doubles per attempt, with jitter
        (between half and all of it) so a fleet of runs does not retry in lockstep.
    clock : callable, default time.time
        Wall-clock unix seconds for ``startsAt``/``endsAt`` (scheduling uses ``time.monotonic``).
    on_error : callable, optional
        Called with no arguments for every delivery given up (e.g. to increment
        ``lrwatch_internal_errors_total``); what it raises is logged, never propagated.

    Notes
    -----
    Retries are scheduled, not slept: while one sink waits for its next attempt the worker goes
    on with the others. One HTTP attempt still occupies the worker for up to the sink's
    ``timeout``, so keep that short. A retry carries only what is still true when it runs: a
    firing resolved meanwhile is not sent again, nor a resolve whose alert fired again.

    Examples
    --------
    >>> import logging
    >>> sender = AlertSender([LogSink(logging.getLogger("lrwatch.quiet"))], resend_interval=60)
    >>> a = Alert.for_rule("nan_loss", severity="critical", summary="loss is nan")
    >>> sender.fire(a); sender.flush(5.0)
    True
    >>> [x.name for x in sender.active]
    ['LrwatchNanLoss']
    >>> sender.resolve(a); sender.close()
    True
    >>> sender.registry.get_sample_value("lrwatch_alerts_sent_total", {"sink": "log"})
    2.0
    """

    def __init__(self, sinks: Sequence[Sink], *, registry: CollectorRegistry | None = None,
                 queue_size: int = 1000, resend_interval: float = 60.0, max_retries: int = 5,
                 backoff: tuple[float, float] = (0.5, 30.0),
                 clock: Callable[[], float] = time.time,
                 on_error: Callable[[], object] | None = None) -> None:
        self.sinks = list(sinks)
        names = _sink_names(self.sinks)
        self.resend_interval, self.max_retries, self.backoff = _check_timing(
            resend_interval, max_retries, backoff)
        self.clock = clock
        self.on_error = on_error
        self._limit = LogLimiter()   # a sink that stays down: one line a minute per sink
        self.registry = registry if registry is not None else CollectorRegistry()

        self._queue: BoundedQueue[Alert] = BoundedQueue(queue_size)
        self._cond = self._queue.cond  # one lock guards queue, active set and work accounting
        self._active: dict[Any, Alert] = {}
        self._outstanding = 0  # queued items + deliveries not yet delivered or given up
        self._retries: list[_Delivery] = []  # heap by due time; worker thread only
        self._seq = itertools.count()
        self._rng = random.Random()
        self._closing = False
        self._deadline = math.inf
        self._next_resend = time.monotonic() + self.resend_interval

        self._register_metrics(names)

        self._thread = threading.Thread(target=self._run, name="lrwatch-alerts", daemon=True)
        self._thread.start()

    def _register_metrics(self, names: Sequence[str]) -> None:
        _drop_no_sinks(self.registry)   # this sender's counts replace the 0 of no sinks
        sent = Counter("lrwatch_alerts_sent", SENT_HELP, ["sink"], registry=None)
        failed = Counter("lrwatch_alerts_failed", "Alerts a sink did not take after every retry.",
                         ["sink"], registry=None)
        self._dropped = Counter("lrwatch_alerts_dropped",
                                "Alerts dropped before delivery because the queue was full.",
                                registry=None)
        qlen = Gauge("lrwatch_alerts_queue_length", "Alerts waiting in the sender's queue.",
                     registry=None)
        qlen.set_function(lambda: float(len(self._queue)))
        from ..exporters.prometheus import register_owned

        register_owned(self.registry, self, [sent, failed, self._dropped, qlen])
        # Label children cached once: the worker never looks labels up again.
        self._sent = {n: sent.labels(n) for n in names}
        self._failed = {n: failed.labels(n) for n in names}

    # --- producer side (training thread): O(1), never blocks on I/O, never raises -------------
    def fire(self, alert: Alert) -> None:
        """Start (or refresh) a firing alert; it is sent now and re-sent until resolved.

        Firing an alert that is already active keeps its original ``starts_at`` and updates its
        annotations (the latest value).
        """
        try:
            if alert.ends_at is not None:
                alert = replace(alert, ends_at=None)
            with self._cond:
                prev = self._active.get(alert.key)
                if prev is not None and prev.starts_at != alert.starts_at:
                    alert = replace(alert, starts_at=prev.starts_at)
                self._active[alert.key] = alert
                self._enqueue(alert)
        except Exception:  # fail open: a monitoring bug must not reach the training loop
            _log.exception("lrwatch: could not queue alert %r", alert)

    def resolve(self, alert: Alert, at: float | None = None) -> None:
        """Resolve an alert (matched by :attr:`Alert.key`) at ``at`` (default: now) and send it."""
        try:
            with self._cond:
                prev = self._active.pop(alert.key, None)
                base = prev if prev is not None else alert
                ends = float(at) if at is not None else (
                    alert.ends_at if alert.ends_at is not None else self.clock())
                self._enqueue(replace(base, annotations=alert.annotations, ends_at=ends))
        except Exception:
            _log.exception("lrwatch: could not queue the resolve of %r", alert)

    def _enqueue(self, alert: Alert) -> None:  # with self._cond held
        if self._closing and not self._thread.is_alive():
            self._dropped.inc()
            return
        self._outstanding += 1
        if self._queue.put(alert):
            self._outstanding -= 1
            self._dropped.inc()

    @property
    def active(self) -> list[Alert]:
        """The alerts firing now (fired and not resolved), oldest first."""
        with self._cond:
            return list(self._active.values())

    @property
    def closed(self) -> bool:
        """Closed (its counters make way for the next run's in a shared registry)."""
        return bool(getattr(self, "_closing", False))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued has been delivered or given up; ``False`` on timeout."""
        return wait_drained(self, timeout)

    def counts(self) -> dict[str, Any]:
        """The delivery counters' totals (``sent`` and ``failed`` by sink, ``dropped``), which
        the daemon saves with its state so that a restart does not reset them."""
        get = self.registry.get_sample_value
        return {"sent": {n: get("lrwatch_alerts_sent_total", {"sink": n}) or 0.0
                         for n in self._sent},
                "failed": {n: get("lrwatch_alerts_failed_total", {"sink": n}) or 0.0
                           for n in self._failed},
                "dropped": get("lrwatch_alerts_dropped_total") or 0.0}

    def restore_counts(self, saved: Mapping[str, Any]) -> None:
        """Add the totals of :meth:`counts` saved before a restart (before anything is
        counted); a sink no longer configured is left out."""
        for key, children in (("sent", self._sent), ("failed", self._failed)):
            for name, v in (saved.get(key) or {}).items():
                if name in children and is_saved_count(v):
                    children[name].inc(v)
        if is_saved_count(saved.get("dropped")):
            self._dropped.inc(saved["dropped"])

    def close(self, timeout: float = 5.0, *, resolve_active: bool = False) -> bool:
        """Deliver what is queued (pending resolves included) within ``timeout``, then stop.

        Firing alerts stay firing in Alertmanager until their ``endsAt`` unless
        ``resolve_active`` is true, which resolves them first (a run that ended cleanly).
        Retries that would fall after the deadline are given up and counted as failed.
        Returns ``True`` if everything was delivered or given up in time. Idempotent.
        """
        if resolve_active:
            for a in self.active:
                self.resolve(a)
        with self._cond:
            if not self._closing:
                self._closing = True
                self._deadline = time.monotonic() + timeout
            self._cond.notify_all()
        self._thread.join(timeout)
        with self._cond:
            return self._outstanding == 0 and not self._thread.is_alive()

    def __enter__(self) -> "AlertSender":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- worker side --------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                if not self._step():
                    return
            except Exception:  # keep the thread alive whatever a sink does
                _log.exception("lrwatch: alert sender worker error")
                time.sleep(0.1)

    def _step(self) -> bool:
        """One round of the worker; ``False`` when it should stop."""
        with self._cond:
            while True:
                now = time.monotonic()
                if len(self._queue):
                    break
                # No re-sends while closing: firing alerts keep their endsAt.
                due = [] if self._closing else [self._next_resend]
                if self._retries:
                    due.append(self._retries[0].due)
                if self._closing:
                    if not self._retries or now >= self._deadline:
                        self._abandon_retries()
                        return False
                    due.append(self._deadline)
                wait = min(due) - now
                if wait <= 0:
                    break
                self._cond.wait(wait)
            items = self._queue.drain(_BATCH)
            self._outstanding -= len(items)
            resend_now = not self._closing and now >= self._next_resend
            if resend_now:
                self._next_resend = now + self.resend_interval
                resends = list(self._active.values())
            todo: list[_Delivery] = []
            if items:
                todo += [_Delivery(now, next(self._seq), s, items) for s in self.sinks]
            if resend_now and resends:
                todo += [_Delivery(now, next(self._seq), s, resends, resend=True)
                         for s in self.sinks if getattr(s, "wants_resend", True)]
            while self._retries and self._retries[0].due <= now:
                d = heapq.heappop(self._retries)
                d.alerts = self._still_current(d.alerts)
                if d.alerts:
                    todo.append(d)
                else:  # everything in it was superseded while it waited
                    self._outstanding -= 1
            self._outstanding += sum(1 for d in todo if d.attempt == 0)
            self._cond.notify_all()
        for d in todo:
            self._deliver(d)
        return True

    def _still_current(self, alerts: list[Alert]) -> list[Alert]:  # with self._cond held
        """What of a delayed batch is still true: a retry must not send a firing that was
        resolved meanwhile (a ghost alert until its ``endsAt``) nor a stale resolve."""
        out = []
        for a in alerts:
            cur = self._active.get(a.key)
            if a.firing and cur is not None:
                out.append(cur)  # the latest annotations
            elif not a.firing and cur is None:
                out.append(a)
        return out

    def _deliver(self, d: _Delivery) -> None:
        name = d.sink.name
        try:
            now = self.clock()
            valid_for = RESEND_HORIZON * self.resend_interval
            if d.resend and isinstance(d.sink, WebhookSink):
                d.sink.send(d.alerts, now=now, valid_for=valid_for, resend=True)
            else:
                d.sink.send(d.alerts, now=now, valid_for=valid_for)
        except Exception as exc:
            retry = getattr(exc, "retry", True)
            d.attempt += 1
            delay = self._delay(d.attempt)
            mono = time.monotonic()
            with self._cond:
                late = self._closing and mono + delay > self._deadline
            if retry and d.attempt <= self.max_retries and not late:
                _log.debug("lrwatch: %s delivery failed (attempt %d): %s; retrying in %.2fs",
                           name, d.attempt, exc, delay)
                d.due = mono + delay
                with self._cond:
                    heapq.heappush(self._retries, d)
                return
            self._give_up(d, exc)
            return
        self._sent[name].inc(len(d.alerts))
        self._done()

    def _delay(self, attempt: int) -> float:
        b0, b1 = self.backoff
        base = min(b1, b0 * 2.0 ** (attempt - 1))
        return base * (0.5 + 0.5 * self._rng.random())

    def _give_up(self, d: _Delivery, exc: BaseException | str) -> None:
        self._limit.warning(_log, d.sink.name, "lrwatch: giving up delivering %d alert(s) to %s "
                            "after %d attempt(s): %s", len(d.alerts), d.sink.name,
                            max(d.attempt, 1), exc)
        self._failed[d.sink.name].inc(len(d.alerts))
        if self.on_error is not None:
            try:
                self.on_error()
            except Exception:
                _log.exception("lrwatch: alert sender on_error callback failed")
        self._done()

    def _done(self) -> None:
        with self._cond:
            self._outstanding -= 1
            self._cond.notify_all()

    def _abandon_retries(self) -> None:  # with self._cond held, at close
        retries, self._retries = self._retries, []
        self._cond.release()
        try:
            for d in retries:
                self._give_up(d, "sender closed before the next retry")
        finally:
            self._cond.acquire()


def is_saved_count(v: Any) -> bool:
    """A saved count worth restoring (a number above 0; a counter cannot go down)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf


#: per registry, the ``lrwatch_alerts_sent_total`` of a process without alert sinks
_NO_SINKS: "weakref.WeakKeyDictionary[CollectorRegistry, Counter]" = weakref.WeakKeyDictionary()


#: One HELP for ``lrwatch_alerts_sent_total`` with sinks and without: a Pushgateway holding the
#: summaries of runs of both kinds (or a federating Prometheus) finds one family, not two
#: inconsistent ones ("This is bad. Fix your pushed metrics!" on every gather).
SENT_HELP = ("Alerts delivered to a sink, re-sends included (0 without a sink label where no "
             "sink is configured).")


def export_no_sinks(registry: CollectorRegistry, owner: Any) -> None:
    """Export ``lrwatch_alerts_sent_total`` at 0, without a ``sink`` label, where no alert
    sink is configured: DESIGN.md lists it among the families every process exports, and a
    dashboard or alert that reads it should see no alerts sent, not missing data. Registered
    for ``owner`` (:func:`~lrwatch.exporters.prometheus.register_owned`); an
    :class:`AlertSender` registered later in the same registry replaces it."""
    from ..exporters.prometheus import register_owned

    sent = Counter("lrwatch_alerts_sent", SENT_HELP, registry=None)
    register_owned(registry, owner, [sent])
    _NO_SINKS[registry] = sent


def _drop_no_sinks(registry: CollectorRegistry) -> None:
    sent = _NO_SINKS.pop(registry, None)
    if sent is not None:
        try:
            registry.unregister(sent)
        except KeyError:   # already made way for a later run
            pass


def make_sender(alerts: Any, alertmanager: str | None, *,
                registry: CollectorRegistry | None = None,
                on_error: Callable[[], None] | None = None) -> Any:
    """The sender for a Watcher's ``alerts=``/``alertmanager=`` arguments, or ``None``.

    ``alerts`` is a ready sender (anything with ``fire``) or a list of sinks;
    ``alertmanager="http://host:9093"`` adds one Alertmanager sink. A ready sender and a URL
    together are ambiguous and rejected.
    """
    if alerts is None and alertmanager is None:
        return None
    if alerts is not None and hasattr(alerts, "fire"):
        if alertmanager is not None:
            raise ConfigError("pass either alerts=AlertSender(...) or alertmanager=URL")
        return alerts
    sinks = list(alerts or [])
    if alertmanager is not None:
        sinks.append(AlertmanagerSink(alertmanager))
    return AlertSender(sinks, registry=registry, on_error=on_error)
