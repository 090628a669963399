"""The alerts of lrwatch's own actions (a rollback, a restart, a stop, the rollback budget
spent): fired to the run's alert sinks when the executor acts, resolved when the run is
healthy again, and the sender and the hook closed at the end of the run.

:class:`ActionAlerts` is a mixin of :class:`~lrwatch.recovery.executor.PlanExecutor` (and so
of the :class:`~lrwatch.watch.Watcher`), over its ``sender``, ``hook``, ``_faults``,
``_action_alerts``, ``should_stop`` and ``run_name``.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

__all__ = ["ActionAlerts"]


class ActionAlerts:
    """Fire, resolve and close the alerts of lrwatch's own actions (see the module docstring)."""

    sender: Any
    hook: Any
    _faults: Any
    _action_alerts: dict[str, Any]
    should_stop: bool
    _internal_error: Callable[[str], None]   # the Watcher's: counted and logged, never raised

    #: alertname of each action's alert (``lrwatch_event`` records say the same in the log)
    ACTION_ALERTS = {"rollback": "LrwatchRollback", "restart": "LrwatchRestart",
                     "stop": "LrwatchStop", "budget_spent": "LrwatchRollbackBudgetSpent"}

    def _fire_action_alert(self, kind: str, severity: str, rule: str, step: int,
                           summary: str, description: str, extra: Mapping[str, Any]) -> None:
        """Tell the alert sinks what lrwatch did (a rollback, a restart, a stop, the budget
        spent). Labels: ``alertname``, ``severity``, ``run`` (so runs sharing an Alertmanager
        stay apart); never the step. Only with a sender; never raises."""
        if self.sender is None:
            return
        try:
            from ..actions.alerts import Alert

            ann = {"summary": summary, "description": description or summary,
                   "step": str(step), "rule": rule,
                   **{k: str(v) for k, v in extra.items() if v not in (None, "")}}
            alert = Alert(self.ACTION_ALERTS[kind],
                          {"severity": severity, "run": str(getattr(self, "run_name", ""))},
                          ann, starts_at=time.time())
            self._action_alerts[kind] = alert
            self.sender.fire(alert)
        except Exception:
            self._internal_error(f"sending the {kind} alert")

    def _close_alerting(self) -> None:
        """At the end of the run: close the alert sender and the hook. A run that ends cleanly
        resolves its alerts; a stopped one leaves them firing (Alertmanager expires them at
        endsAt if nobody looks)."""
        if self.sender is not None:
            try:
                self.sender.close(resolve_active=not self.should_stop)
            except Exception:
                self._internal_error("closing the alert sender")
        if self.hook is not None and hasattr(self.hook, "close"):
            self._faults.guard(self.hook.close)

    def _resolve_action_alerts(self, kinds: Sequence[str]) -> None:
        """The run is healthy again: resolve the alerts of those actions."""
        for kind in kinds:
            alert = self._action_alerts.pop(kind, None)
            if alert is None or self.sender is None:
                continue
            try:
                self.sender.resolve(alert)
            except Exception:
                self._internal_error(f"resolving the {kind} alert")
