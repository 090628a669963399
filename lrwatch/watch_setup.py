"""The Watcher's parts built at construction: the outputs (Prometheus, the trace, the
listeners) and the recovery side (the rules engine, the pure recovery policy, alerting and
the snapshots). :mod:`lrwatch.wiring` checks the arguments; this puts the parts on the
Watcher.

:class:`WatcherSetup` is a mixin over the Watcher's state (``run_name``, ``model``,
``optimizer``, ``scheduler``, ``scaler``, ``recorder``, ``dist``, ``export``, ``step``,
``flush_lag``) and its ``add_listener`` and ``_internal_error``.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry

from ._failopen import FailOpen
from .actions.alerts import export_no_sinks, make_sender
from .actions.notify import Notifier
from .judge import Judge
from .outputs import Listener, Outputs, run_info
from .recovery.keeper import SnapshotKeeper
from .recovery.policy import RecoveryConfig, RecoveryPolicy
from .rules import Engine, RuleSet

__all__ = ["WatcherSetup"]


class WatcherSetup:
    """Builds the Watcher's outputs and recovery parts (see the module docstring)."""

    # attributes the Watcher provides (declared for readers and type checkers)
    run_name: str
    model: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    recorder: Any
    dist: Any
    export: str
    step: int
    flush_lag: int
    add_listener: Callable[[Listener], None]
    _internal_error: Callable[[str], None]

    def _setup_outputs(self, registry: CollectorRegistry | None, port: int | None, host: str,
                       trace: "str | os.PathLike[str] | None", pushgateway: str | None,
                       listeners: Iterable[Listener]) -> None:
        """Prometheus, the trace and the listeners (per rank with ``export="all"``)."""
        self.outputs = Outputs(
            registry=registry, port=port, host=host, trace=trace, pushgateway=pushgateway,
            info=run_info(self.run_name, self.model, self.optimizer, self.scheduler),
            layers=self.recorder.layers, dist=self.dist, export=self.export)
        # the same objects as the outputs' (the trace is opened again by a checkpoint loaded
        # mid-run and at the end, Flushing._reopen_trace; nothing else is replaced)
        self.exporter, self.registry = self.outputs.exporter, self.outputs.registry
        self.trace, self.pushgateway = self.outputs.trace, self.outputs.pushgateway
        self._faults = FailOpen(self.exporter.count_error)
        for listener in listeners:
            self.add_listener(listener)

    def _setup_recovery(self, ruleset: RuleSet | None, recovery: Any, alerts: Any,
                        alertmanager: str | None, hook: Any) -> None:
        """The engine, the pure recovery policy, alerting and the snapshots."""
        self.engine: Engine | None = Engine(ruleset) if ruleset is not None else None
        self.recovery = RecoveryConfig.coerce(recovery) if self.engine is not None else None
        # Every recovery decision and counter (budget, compounding, probation, ramps, the
        # rate's scale) lives in the pure policy; the Watcher carries its plans out.
        self.policy = RecoveryPolicy(self.recovery)
        self.data_position = 0
        self.skipped_batches = 0
        self._boundary_kind: str | None = None
        self._observed = None   # the start check's batches, where the framework draws them
        self.sender = make_sender(alerts, alertmanager, registry=self.registry,
                                  on_error=self.exporter.count_error)
        if self.sender is None:   # lrwatch_alerts_sent_total at 0, not missing
            export_no_sinks(self.registry, self.exporter)
        self.hook = hook
        self.notifier = Notifier(self.sender, hook, on_error=self.exporter.count_error,
                                 labels={"run": self.run_name})
        self._snaps: SnapshotKeeper | None = None
        if self.recovery is not None:
            self._snaps = self._snapshot_keeper()
        self.store = self._snaps.store if self._snaps else None
        if self.store is not None:   # a step is judged a flush late: see SnapshotStore._trim
            self.store.pending_slack = self.flush_lag
        self._rules = Judge(self.engine, set_rule_state=self.exporter.set_rule_state,
                            on_judged=self._snaps.judged if self._snaps else None,
                            on_error=self._internal_error) if self.engine is not None else None

    def _snapshot_keeper(self) -> SnapshotKeeper:
        """The snapshots, with the run's start taken (the ranks agree on memory first)."""
        snaps = SnapshotKeeper(
            self.recovery, engine=self.engine, policy=self.policy, model=self.model,
            optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
            on_error=self.exporter.count_error, deferred_schedule=self.dist.active)
        if self.dist.active:   # the first snapshot and the start check decide on these
            try:
                snaps.agree_memory(self.dist.gather(snaps.memory_report()))
            except Exception:
                self._internal_error("gathering the ranks' host memory")
        snaps.take_first(self.step, self.data_position)
        return snaps
