"""One notifier for the Watcher and the daemon: an engine event to the people who watch.

A firing goes to the alert sender (or, without one, to one log line), a resolution resolves the
alert, a ``hook`` action runs the hook. Both front ends decide *which* events to carry (the
Watcher's recovery policy plans them; the daemon follows the rule's ``actions`` and its
``hook_rules``); this class only carries them, the same way for both. It never raises: a
failure is counted through ``on_error`` and logged once a minute per kind (fail open).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

from .._ratelimit import LogLimiter

__all__ = ["Notifier", "EVENT_LOG_EXTRA"]

log = logging.getLogger("lrwatch")

#: Marks the log records of rule events and actions, so a console (``lrwatch demo``) can hold
#: them back and print the events its own way without matching message formats.
EVENT_LOG_EXTRA = {"lrwatch_event": True}


class Notifier:
    """Carries engine events to an alert sender, a hook and the log.

    Parameters
    ----------
    alerts:
        An :class:`~lrwatch.actions.alerts.AlertSender` (``fire`` / ``resolve``), or ``None``.
    hook:
        A :class:`~lrwatch.actions.hooks.HookAction` (``run``), or ``None``.
    on_error:
        Called (no arguments) for every failure, to count it.
    log_without_sender:
        Without a sender, write one log line per firing and resolution (the Watcher's console
        needs them; the daemon logs every event itself and passes ``False``).
    labels:
        Added to every alert (the Watcher's ``run``: rule alerts of runs that share an
        Alertmanager stay apart, as its action alerts do).
    """

    def __init__(self, alerts: Any = None, hook: Any = None, *,
                 on_error: Callable[[], None] | None = None,
                 log_without_sender: bool = True,
                 labels: Mapping[str, str] | None = None) -> None:
        self.labels = dict(labels or {})
        self.alerts = alerts
        self.hook = hook
        self.on_error = on_error
        self.log_without_sender = log_without_sender
        self._limit = LogLimiter()

    def fire(self, event: Any) -> None:
        """Send the alert of a firing (or log it when there is no sender)."""
        self._guard("alert", event, lambda: self._send(event, resolve=False, at=None))

    def resolve(self, event: Any, at: float | None = None) -> None:
        """Resolve the alert of ``event`` (the firing or its resolution) at ``at``."""
        self._guard("resolve", event, lambda: self._send(event, resolve=True, at=at))

    def run_hook(self, event: Any) -> None:
        """Run the hook for ``event`` (queued; the hook itself never blocks)."""
        if self.hook is not None:
            self._guard("hook", event, lambda: self.hook.run(event))

    def _send(self, event: Any, *, resolve: bool, at: float | None) -> None:
        if self.alerts is None:
            if self.log_without_sender:
                # the event's message says it all (a resolution's begins "resolved: ")
                log.warning("lrwatch: %s (%s): %s", getattr(event, "rule", "?"),
                            getattr(event, "severity", ""), getattr(event, "message", ""),
                            extra=EVENT_LOG_EXTRA)
            return
        from .alerts import Alert

        alert = Alert.from_firing(event, labels=self.labels)
        if resolve:
            self.alerts.resolve(alert, at=at)
        else:
            self.alerts.fire(alert)

    def _guard(self, what: str, event: Any, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            if self.on_error is not None:
                try:
                    self.on_error()
                except Exception:  # a counter that fails must not stop the run either
                    pass
            self._limit.log(log, logging.WARNING, what, "lrwatch: could not %s for rule %s "
                            "(training and serving go on)", what, getattr(event, "rule", "?"),
                            exc_info=True)
