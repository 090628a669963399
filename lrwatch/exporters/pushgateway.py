"""End-of-job summaries on a Prometheus Pushgateway, for short batch jobs only.

Long runs are scraped (``/metrics``); a job that may end before the next scrape pushes its
registry once, when it finishes, with :func:`push_summary`, and a clean-up step removes the group
again with :func:`delete_summary`. Both fail open: an unreachable or failing Pushgateway is logged
on the ``"lrwatch"`` logger, reported through ``on_error`` (so the caller can count it in
``lrwatch_internal_errors_total``) and answered with ``False``; it never raises into the job.

The group is keyed by ``job`` and ``run``, so the summaries of two runs do not overwrite each
other. The Pushgateway adds the grouping key as labels to every pushed series, which puts a run id
into a label; that is bounded by the groups the gateway holds, which is why the summary is a
single end-of-job push and :func:`delete_summary` exists. A push replaces the whole group (HTTP
``PUT``), so pushing twice for one run leaves only the second summary.

Examples
--------
Nothing listens on port 9 of the loopback interface, so this push fails, is logged and counted,
and returns ``False`` instead of raising:

>>> from prometheus_client import CollectorRegistry, Gauge
>>> registry = CollectorRegistry()
>>> Gauge("lrwatch_final_loss", "Loss at the end of the run.", registry=registry).set(0.42)
>>> failures = []
>>> push_summary("http://127.0.0.1:9", registry, run="nightly-42", timeout=1.0,
...              on_error=lambda: failures.append(1))
False
>>> failures
[1]
"""

from __future__ import annotations

import logging
import re
from typing import Callable, Mapping

from prometheus_client import delete_from_gateway, push_to_gateway
from prometheus_client.registry import CollectorRegistry

from ..errors import ConfigError

__all__ = ["push_summary", "delete_summary"]

_log = logging.getLogger("lrwatch")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_RESERVED_KEYS = ("job", "run")


def push_summary(
    url: str,
    registry: CollectorRegistry,
    *,
    job: str = "lrwatch",
    run: str,
    timeout: float = 5.0,
    extra_grouping: Mapping[str, str] | None = None,
    on_error: Callable[[], object] | None = None,
) -> bool:
    """Push every metric of ``registry`` to the Pushgateway as the group ``job`` + ``run``.

    Parameters
    ----------
    url : str
        The Pushgateway, ``http://host:9091`` or ``host:9091``.
    registry : CollectorRegistry
        The registry to push (the job's own registry, never only the global one).
    job : str, default "lrwatch"
        The ``job`` grouping label.
    run : str
        The run's identity, the ``run`` grouping label; any non-empty string (``/`` included).
    timeout : float, default 5.0
        Seconds to wait for the Pushgateway.
    extra_grouping : mapping of str to str, optional
        More grouping labels (e.g. ``{"rank": "0"}``); ``job`` and ``run`` are not allowed here.
    on_error : callable, optional
        Called with no arguments when the push fails, e.g. to increment
        ``lrwatch_internal_errors_total``. An exception it raises is logged, not propagated.

    Returns
    -------
    bool
        ``True`` when the Pushgateway accepted the push, ``False`` when it failed (logged).

    Raises
    ------
    ConfigError
        When an argument is invalid (checked before any network traffic).
    """
    key = _grouping_key(job, run, extra_grouping, timeout)
    try:
        push_to_gateway(url, job=job, registry=registry, grouping_key=key, timeout=timeout)
    except Exception as exc:  # fail open: whatever went wrong, the job carries on
        _failed("push the end-of-job summary to", url, job, key, exc, on_error)
        return False
    return True


def delete_summary(
    url: str,
    *,
    job: str = "lrwatch",
    run: str,
    timeout: float = 5.0,
    extra_grouping: Mapping[str, str] | None = None,
    on_error: Callable[[], object] | None = None,
) -> bool:
    """Delete the group ``job`` + ``run`` (+ ``extra_grouping``) from the Pushgateway.

    Parameters
    ----------
    url, job, run, timeout, on_error
        As for :func:`push_summary`.
    extra_grouping : mapping of str to str, optional
        The same extra grouping labels the summary was pushed with: a group is only deleted when
        its whole grouping key matches.

    Returns
    -------
    bool
        ``True`` when the Pushgateway accepted the deletion (also when no such group existed),
        ``False`` when it failed (logged).

    Raises
    ------
    ConfigError
        When an argument is invalid (checked before any network traffic).
    """
    key = _grouping_key(job, run, extra_grouping, timeout)
    try:
        delete_from_gateway(url, job=job, grouping_key=key, timeout=timeout)
    except Exception as exc:  # fail open, as for the push
        _failed("delete the end-of-job summary from", url, job, key, exc, on_error)
        return False
    return True


def _grouping_key(
    job: str, run: str, extra: Mapping[str, str] | None, timeout: float
) -> dict[str, str]:
    if not isinstance(job, str) or not job:
        raise ConfigError(f"job must be a non-empty string, got {job!r}")
    if not isinstance(run, str) or not run:
        raise ConfigError(f"run must be a non-empty string, got {run!r}")
    if not timeout > 0:
        raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
    key = {"run": run}
    for name, value in (extra or {}).items():
        if name in _RESERVED_KEYS:
            raise ConfigError(
                f"extra_grouping may not set {name!r}: pass it as the {name}= argument "
                f"(reserved keys: {', '.join(_RESERVED_KEYS)})"
            )
        if not _LABEL_NAME.match(name) or name.startswith("__"):
            raise ConfigError(
                f"extra_grouping key {name!r} is not a valid label name "
                "(letters, digits and '_', not starting with a digit or '__')"
            )
        if not isinstance(value, str) or not value:
            raise ConfigError(f"extra_grouping[{name!r}] must be a non-empty string, got {value!r}")
        key[name] = value
    return key


def _failed(
    what: str,
    url: str,
    job: str,
    key: Mapping[str, str],
    exc: BaseException,
    on_error: Callable[[], object] | None,
) -> None:
    labels = ", ".join(f"{k}={v}" for k, v in {"job": job, **key}.items())
    _log.warning("could not %s the Pushgateway at %s (%s): %s: %s",
                 what, url, labels, type(exc).__name__, exc)
    if on_error is not None:
        try:
            on_error()
        except Exception:
            _log.exception("the on_error callback of the Pushgateway exporter failed")
