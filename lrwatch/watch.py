"""The training-side Watcher for plain PyTorch loops.

Three lines::

    watch = lrwatch.Watcher(model, optimizer, scheduler, port=9400, trace="run.jsonl")
    ...                       # in the loop, once per optimizer step:
    watch.log(loss=loss, accuracy=acc)
    watch.close()             # or use it as a context manager

Optimizer step hooks record everything else. Nothing on the step path converts a tensor to a
Python number: per-step values stay on the device and are copied to the host in one transfer every
``flush_every`` steps and at :meth:`Watcher.close`. Each flushed step becomes a
:class:`~lrwatch.samples.Sample` that goes to the listeners (trace, Prometheus, rules engine).
"""

from __future__ import annotations

import logging
import math
import os
import uuid
import warnings
from collections import deque
from dataclasses import replace
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import torch
from prometheus_client import CollectorRegistry

from .actions.alerts import make_sender
from .actions.best import BestEval, keep_best_state
from .actions.notify import Notifier
from .actions.snapshot import Snapshot, SnapshotStore
from .distributed import EXPORT_CHOICES, RankContext, combine_rank_samples, split_by_placement
from .errors import ConfigError
from .exporters.prometheus import MetricsServer, TrainingExporter, start_metrics_server
from .exporters.trace import TraceWriter
from .probe import LayerIndex
from .recovery.executor import PlanExecutor
from .recovery.policy import (CONTROL_ACTIONS, Plan, RecoveryConfig, RecoveryPolicy,
                              SnapshotInfo, check_action_params)
from .rules import Engine, RuleSet, load_pack, load_rules
from .rules.schema import PACKS
from .samples import Sample
from .steps import StepRecorder, as_value, materialise

__all__ = ["Watcher", "Listener", "RecoveryConfig", "BestEval", "rank_trace_path"]

from ._ratelimit import LogLimiter

log = logging.getLogger("lrwatch")

Listener = Callable[[Sample], None]
T = TypeVar("T")


def rank_trace_path(trace: "str | os.PathLike[str]", rank: int) -> str:
    """The trace of rank ``rank``: the rank goes before the suffix, so a ``*.jsonl`` glob
    (``lrwatch replay DIR``, ``lrwatch report``) finds every rank's trace.

    One name for the Watcher (``export="all"``) and the framework callbacks.

    >>> rank_trace_path("runs/run.jsonl", 1), rank_trace_path("run", 2)
    ('runs/run.rank1.jsonl', 'run.rank2')
    """
    root, ext = os.path.splitext(os.fspath(trace))
    return f"{root}.rank{int(rank)}{ext}"


def _rule_set(rules: "str | os.PathLike[str] | RuleSet | None") -> RuleSet | None:
    if rules is None or isinstance(rules, RuleSet):
        return rules
    if isinstance(rules, str) and rules in PACKS:
        return load_pack(rules)
    if isinstance(rules, (str, os.PathLike)):
        return load_rules(rules)
    raise ConfigError(f"rules must be a pack name {sorted(PACKS)}, a rule file path, a RuleSet "
                      f"or None, got {type(rules).__name__}")


def _snapshot_dir(recovery: Any) -> str | None:
    """recovery's snapshot_dir, also with the rules off (``Watcher.recovery`` is None then)."""
    if isinstance(recovery, RecoveryConfig):
        return recovery.snapshot_dir
    return recovery.get("snapshot_dir") if isinstance(recovery, Mapping) else None


def _check_args(model: Any, optimizer: Any, flush_every: Any, port: Any, batch_size: Any,
                keep_best: Any, probe_loss: Any, update_ratio_every: Any, export: Any) -> None:
    """The Watcher's arguments, each with an error that says what to pass instead."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"optimizer must be a torch.optim.Optimizer, got "
                          f"{type(optimizer).__name__}")
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(flush_every, int) or isinstance(flush_every, bool) or flush_every < 1:
        raise ConfigError(f"flush_every must be a positive integer, got {flush_every!r}")
    if port is not None and (not isinstance(port, int) or not 0 <= port <= 65535):
        raise ConfigError(f"port must be None or an integer in 0..65535, got {port!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(keep_best, (bool, str)) or keep_best == "":
        raise ConfigError(f"keep_best must be True (eval_accuracy if logged, else "
                          f"eval_loss), False, or a metric name, got {keep_best!r}")
    if (not isinstance(update_ratio_every, int) or isinstance(update_ratio_every, bool)
            or update_ratio_every < 1):
        raise ConfigError(f"update_ratio_every must be an integer >= 1, "
                          f"got {update_ratio_every!r}")
    if export not in EXPORT_CHOICES:
        raise ConfigError(f"export must be one of {', '.join(map(repr, EXPORT_CHOICES))}, "
                          f"got {export!r}")
    if probe_loss is not None and not callable(probe_loss):
        raise ConfigError(f"probe_loss must be callable as probe_loss(model, batch) -> "
                          f"loss, got {type(probe_loss).__name__}")


class Watcher(PlanExecutor):
    """Watches a plain PyTorch training loop.

    Parameters
    ----------
    model:
        The module being trained (used for parameter names, per-layer norms and the device).
    optimizer:
        Any ``torch.optim.Optimizer``; its step hooks record gradient norms, learning rates and
        update ratios.
    scheduler:
        The LR scheduler, if any (recorded for later rollbacks; learning rates are read from the
        optimizer's param groups, which the scheduler writes).
    scaler:
        A ``torch.amp.GradScaler``: gradient norms are then measured after unscaling, the loss
        scale is exported, and steps the scaler skips for overflow are recorded as non-finite.
    flush_every:
        Steps between host transfers. Larger is cheaper; the rules see samples at each flush.
    port:
        Serve ``/metrics`` on this port (0 picks a free one; ``None`` serves nothing). A taken
        port logs a warning and counts an internal error; training goes on.
    host:
        Address to bind the metrics server to (loopback by default).
    trace:
        Path of a JSONL trace (format v1) to write, or ``None``.
    registry:
        The ``CollectorRegistry`` to register into; a fresh one by default.
    per_layer:
        Also export gradient norms per top-level module (``layer_depth`` levels deep, at most
        ``max_layers`` labels so the label set stays bounded).
    update_ratio:
        Measure ||Δθ||/||θ||. It keeps a second copy of the parameters on the device, so it is
        off by default.
    update_ratio_every:
        Measure the update ratio on every k-th step only (the parameters are copied before those
        steps alone). The ratio moves slowly, and copying every parameter every step doubled the
        cost of watching (``docs/overhead.md``); 1 measures every step.
    batch_size:
        Samples per step, for ``samples_per_second`` (``log(batch_size=...)`` overrides it).
    listeners:
        Callables that receive every flushed :class:`~lrwatch.samples.Sample`, in step order.
    run_name:
        Identity of the run in ``lrwatch_run_info`` (a random id by default).
    start_step:
        The global step the run starts from (for resumed runs).
    pushgateway:
        URL of a Prometheus Pushgateway: at :meth:`close` the final metrics are pushed once,
        grouped by ``job="lrwatch"`` and ``run=run_name``. For short batch jobs that end before
        a scrape; long runs should be scraped instead.
    rules:
        The rules the flushed samples are judged by: a pack name (``"training"``, the default),
        a rule-file path, a :class:`~lrwatch.rules.RuleSet`, or ``None`` for no rules.
    recovery:
        How to act on ``rollback``/``skip``/``reduce_lr``/``stop`` actions
        (:class:`~lrwatch.recovery.policy.RecoveryConfig` or a dict of its fields); ``False``
        only reports. Recovery keeps snapshots (CPU copies by default, or ``snapshot_dir``).
    alerts:
        An :class:`~lrwatch.actions.alerts.AlertSender`, or a list of sinks, for ``alert``
        actions. ``alertmanager="http://host:9093"`` is a shortcut for one Alertmanager sink.
        With a sink, lrwatch's own actions are alerts too: ``LrwatchRollback``,
        ``LrwatchRestart`` (resolved once the run passes its probation), ``LrwatchStop`` and
        ``LrwatchRollbackBudgetSpent`` (see ``docs/alerts.md``). Given-up deliveries count in
        ``lrwatch_internal_errors_total``.
    hook:
        A :class:`~lrwatch.actions.hooks.HookAction` run for ``hook`` actions.
    step_hooks:
        Register the optimizer's step pre/post hooks (the default). Framework adapters whose
        optimizer steps run a closure (the gradients do not exist yet when the pre-hook fires)
        pass ``False`` and call :meth:`before_step` / :meth:`after_step` themselves.
    process_group:
        Under ``torch.distributed`` (detected automatically), the group whose ranks share one
        view of the run (default: the world). Norms are shard-correct (FSDP2 / DTensor
        sharded gradients are summed as squares across ranks, once per flush), every rank
        judges identical samples and so takes identical decisions. ``flush()`` and ``close()``
        are then collective: call them on every rank.
    export:
        ``"rank0"`` (default): only rank 0 serves ``/metrics``, writes the trace, pushes and
        alerts. ``"all"``: every rank serves on ``port + rank`` with a ``rank`` label and
        writes its own trace, the rank before the suffix (``run.jsonl`` ->
        ``run.rank1.jsonl``, :func:`rank_trace_path`).
    keep_best:
        Keep the model's state (parameters and buffers) at its best evaluation, for
        ``{stop: {restore: best}}`` and :meth:`restore_best`. ``True``: ``eval_accuracy``
        (higher is better) if it is logged, else ``eval_loss`` (lower is better); a metric
        name watches that metric; ``False`` keeps nothing. Kept in CPU memory, or in
        ``snapshot_dir/best-eval.pt`` when recovery has a ``snapshot_dir``. It costs one copy
        per improving evaluation; an evaluation logged as a tensor is judged at the next flush
        and holds one device copy until then.
    keep_best_mode:
        ``"max"``, ``"min"``, or ``"auto"`` (from the metric's name).
    probe_loss:
        ``probe_loss(model, batch) -> loss``: lets a rollback measure the learning rate with
        a short range test instead of guessing a factor (``recovery`` ``probe="auto"``, on
        restarts and on rollbacks that failed again). The test runs on the last
        ``probe_steps`` batches :meth:`batches` yielded (or adapters passed to
        :meth:`remember_batch`), from the restored state, and leaves everything as it was;
        the Watcher keeps references to those batches. With ``recovery`` ``lr_check="auto"``
        it also runs the pre-flight learning-rate check on the first batches of
        :meth:`batches` (see :class:`~lrwatch.recovery.policy.RecoveryConfig`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        *,
        scaler: Any = None,
        flush_every: int = 25,
        port: int | None = None,
        host: str = "127.0.0.1",
        trace: str | os.PathLike[str] | None = None,
        registry: CollectorRegistry | None = None,
        per_layer: bool = False,
        layer_depth: int = 1,
        max_layers: int = 64,
        update_ratio: bool = False,
        update_ratio_every: int = 10,
        batch_size: int | None = None,
        listeners: Iterable[Listener] = (),
        run_name: str | None = None,
        start_step: int = 0,
        pushgateway: str | None = None,
        rules: "str | os.PathLike[str] | RuleSet | None" = "training",
        recovery: "RecoveryConfig | Mapping[str, Any] | bool | None" = True,
        alerts: Any = None,
        alertmanager: str | None = None,
        hook: Any = None,
        step_hooks: bool = True,
        process_group: Any = None,
        export: str = "rank0",
        keep_best: bool | str = True,
        keep_best_mode: str = "auto",
        probe_loss: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
    ) -> None:
        _check_args(model, optimizer, flush_every, port, batch_size, keep_best, probe_loss,
                    update_ratio_every, export)
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.flush_every = flush_every
        self.batch_size = batch_size
        self.run_name = run_name or uuid.uuid4().hex[:12]
        self.step = int(start_step)
        self._listeners: list[Listener] = []
        self._closed = False
        self._stepped_since_update = False
        self.flushes = 0
        self._warned: set[str] = set()
        self._limit = LogLimiter()   # an internal error repeating at every flush: a line a minute
        self.dist = RankContext(process_group)
        self.export = export
        self._setup_recorder(per_layer, layer_depth, max_layers, update_ratio, update_ratio_every)
        if not (self.dist.is_main or export == "all"):   # this rank exports nothing
            port = trace = pushgateway = alerts = alertmanager = hook = None
        self.pushgateway = pushgateway
        self._setup_exporters(registry, port, host, trace)
        for listener in listeners:
            self.add_listener(listener)
        ruleset = _rule_set(rules)
        self._setup_recovery(ruleset, recovery, alerts, alertmanager, hook)
        rule_list = list(ruleset) if ruleset is not None else []
        check_action_params(rule_list)
        self._action_params = {r.name: r.action_params for r in rule_list if r.action_params}
        self.policy.action_params = self._action_params
        # Ranks keep their own copy (FSDP shards differ): one file per rank.
        self.best = keep_best_state(
            keep_best, keep_best_mode, rule_list, snapshot_dir=_snapshot_dir(recovery),
            filename=f"best-eval.rank{self.dist.rank}.pt" if self.dist.active else "best-eval.pt",
            on_error=self.exporter.count_error)
        self._setup_probe(probe_loss)
        self._stop_restored: BestEval | None = None  # what a stop restored (adapters re-apply)
        self._handles = [optimizer.register_step_pre_hook(self._pre_step),
                         optimizer.register_step_post_hook(self._post_step)] if step_hooks else []
        self._scaler_update: Any = None
        if scaler is not None:
            self._wrap_scaler(scaler)

    def _setup_recorder(self, per_layer: bool, layer_depth: int, max_layers: int,
                        update_ratio: bool, update_ratio_every: int) -> None:
        """The per-step recorder; per-layer norms and the update ratio are off for shards."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self._device = params[0].device if params else torch.device("cpu")
        self._sharded = bool(self.dist.active and split_by_placement(params)[1])
        if self._sharded and (per_layer or update_ratio):
            warnings.warn("lrwatch: per-layer norms and the update ratio are not yet shard-aware; "
                          "they are off for sharded (FSDP2/DTensor) parameters", stacklevel=3)
            per_layer = update_ratio = False
        names = {id(p): n for n, p in self.model.named_parameters()}
        named = [(names.get(id(p), f"param{i}"), p) for i, p in enumerate(params)]
        self._layers = LayerIndex(named, depth=layer_depth, max_layers=max_layers) \
            if per_layer else None
        self.recorder = StepRecorder(self.optimizer, self._device, layers=self._layers,
                                     sharded=self._sharded, update_ratio=bool(update_ratio),
                                     update_ratio_every=update_ratio_every, scaler=self.scaler,
                                     on_commit=self._commit_done)

    def _setup_exporters(self, registry: CollectorRegistry | None, port: int | None, host: str,
                         trace: "str | os.PathLike[str] | None") -> None:
        """The Prometheus exporter and server, and the trace (per rank with ``export="all"``)."""
        const_labels: dict[str, str] = {}
        if self.dist.active and self.export == "all":
            const_labels = {"rank": str(self.dist.rank)}
            port = port + self.dist.rank if port else port
            trace = rank_trace_path(trace, self.dist.rank) if trace is not None else None
        model, optimizer, scheduler = self.model, self.optimizer, self.scheduler
        self.exporter = TrainingExporter(
            registry,
            run_info={"run": self.run_name, "model": type(model).__name__,
                      "optimizer": type(optimizer).__name__,
                      "scheduler": type(scheduler).__name__ if scheduler is not None else "",
                      "torch": torch.__version__.split("+")[0]},
            layer_labels=self._layers.labels if self._layers else (),
            const_labels=const_labels)
        self.registry = self.exporter.registry
        self.server: MetricsServer | None = None
        if port is not None:
            self.server = start_metrics_server(self.registry, port, host,
                                               on_error=self.exporter.count_error)
        # Every dropped trace write counts in lrwatch_internal_errors_total; the first is
        # logged once. An unopenable path never raises here: training starts regardless.
        self.trace: TraceWriter | None = (
            TraceWriter(trace, on_error=self.exporter.count_error) if trace is not None else None)

    def _setup_recovery(self, ruleset: RuleSet | None, recovery: Any, alerts: Any,
                        alertmanager: str | None, hook: Any) -> None:
        """The engine, the pure recovery policy, alerting and the snapshot store."""
        self.engine: Engine | None = Engine(ruleset) if ruleset is not None else None
        self.recovery = RecoveryConfig.coerce(recovery) if self.engine is not None else None
        # Every recovery decision and counter (budget, compounding, probation, ramps, the
        # rate's scale) lives in the pure policy; the Watcher carries its plans out.
        self.policy = RecoveryPolicy(self.recovery)
        self.data_position = 0
        self.skipped_batches = 0
        self.should_stop = False
        self.exit_status = 0
        self.stop_reason: str | None = None
        self._skip_remaining = 0
        self._pending: list[tuple[Plan, Snapshot | None]] = []
        self._snap_awaiting_engine: dict[int, Snapshot] = {}
        self._boundary_kind: str | None = None
        self._snap_seconds: list[float] = []
        self.sender = make_sender(alerts, alertmanager, registry=self.registry,
                                  on_error=self.exporter.count_error)
        self._action_alerts: dict[str, Any] = {}   # kind -> the firing alert of an action
        self.hook = hook
        self.notifier = Notifier(self.sender, hook, on_error=self.exporter.count_error)
        self.store: SnapshotStore | None = None
        if self.recovery is None:
            return
        rc = self.recovery
        self.store = SnapshotStore(keep=rc.keep, directory=rc.snapshot_dir,
                                   good_after=rc.good_after, budget=rc.budget,
                                   min_interval=rc.min_interval, max_interval=rc.max_interval,
                                   on_error=self.exporter.count_error,
                                   deferred_schedule=self.dist.active)
        # The state we start from is the first rollback target: known good by definition.
        first = self.store.take(self.step, self.data_position, self.model, self.optimizer,
                                self.scheduler, self.scaler, good=True,
                                extra=self._snap_extra(), pinned=True)
        if first is not None:
            first.extra["engine_state"] = self.engine.state_dict()  # type: ignore[union-attr]

    def _setup_probe(self, probe_loss: Callable[..., Any] | None) -> None:
        """Range tests (a rollback's probe, the pre-flight check) and the batches they reuse."""
        if self.recovery is not None and self.recovery.lr_check != "off" and probe_loss is None:
            raise ConfigError("recovery lr_check='auto' runs a range test before the first "
                              "step and needs probe_loss(model, batch) -> loss; pass "
                              "probe_loss= or set lr_check='off'")
        self._probe_loss = probe_loss
        self._probing = False
        self._late_records: list[dict[str, Any]] = []  # events that happened after a flush
        wants = (self.recovery is not None and self.recovery.probe != "off"
                 and probe_loss is not None)
        self._recent: deque[Any] | None = (
            deque(maxlen=self.recovery.probe_steps) if wants else None)  # type: ignore
        self.policy.probe_available = wants

    # --- public API ----------------------------------------------------------------------------
    @property
    def metrics_url(self) -> str | None:
        """The ``/metrics`` URL, or ``None`` when no server runs."""
        return self.server.url if self.server else None

    @property
    def rollbacks(self) -> int:
        """Rollbacks and restarts carried out so far (kept across ``state_dict`` resumes)."""
        return int(self.policy.state.rollbacks)

    @property
    def best_eval(self) -> BestEval | None:
        """The best evaluation whose state is kept (step, metric, value, where), or ``None``.

        An evaluation logged as a tensor counts from the flush that judges it."""
        return self.best.record if self.best is not None else None

    def restore_best(self) -> BestEval | None:
        """Load the best evaluated state into the model (parameters and buffers, in place).

        A tensor evaluation still waiting for its flush is judged first (this flushes). Returns
        what was restored, or ``None`` when no state is kept (the model is left as it is).
        """
        if self.best is None:
            return None
        if self.best.pending and not self._closed:
            self.flush()
        restored = self.best.restore(self.model)
        if restored is None:
            log.warning("lrwatch: restore_best(): no best evaluated state is kept")
        return restored

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(sample)`` for every flushed step sample, in step order."""
        if not callable(listener):
            raise ConfigError(f"a listener must be callable, got {type(listener).__name__}")
        self._listeners.append(listener)

    def batches(self, iterable: Iterable[T]) -> Iterator[T]:
        """Yield the batches of ``iterable``, acting on lrwatch's decisions between them.

        After a rollback it drops the configured window of batches (``skip_batches``); after a
        ``stop`` it ends the loop. ``data_position`` counts the batches drawn, and snapshots
        record it.
        """
        self._boundary_kind = "batches"
        if self._probe_loss is not None and self.policy.lr_check_due(self.step):
            iterable = self._lr_check(iter(iterable))
        for batch in iterable:
            self._boundary("batches")
            if self.should_stop:
                return
            if self.skip_batch():
                continue
            if self._recent is not None:
                self._recent.append(batch)
            yield batch
        self._safe_point()

    def skip_batch(self) -> bool:
        """Count one batch drawn by the framework; ``True`` if it falls in a rollback's skip window.

        For adapters whose framework draws the data itself (so :meth:`batches` cannot wrap the
        loop): call it once per batch drawn, and drop the batch when it returns ``True``. It
        counts ``data_position`` and ``skipped_batches`` exactly as :meth:`batches` does, but
        carries out no decisions (the adapter calls :meth:`log` at its own iteration boundary).
        """
        self.data_position += 1
        if self._skip_remaining > 0:
            self._skip_remaining -= 1
            self.skipped_batches += 1
            return True
        return False

    def remember_batch(self, batch: Any) -> None:
        """Keep ``batch`` among the recent ones a rollback's range test runs on (adapters
        whose framework draws the data; :meth:`batches` does it itself)."""
        if self._recent is not None:
            self._recent.append(batch)

    def state_dict(self) -> dict[str, Any]:
        """Counters and detector state, so a resumed run keeps its rules and rollback budget."""
        return {"step": self.step, "data_position": self.data_position,
                "skip_remaining": self._skip_remaining,
                "policy": self.policy.state_dict(),
                "engine": self.engine.state_dict() if self.engine is not None else None,
                "best": self.best.state_dict() if self.best is not None else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self.data_position = int(state.get("data_position", 0))
        self._skip_remaining = int(state.get("skip_remaining", 0))
        policy = dict(state.get("policy", {}))
        for key in ("lr_scale", "ramp"):   # kept beside the policy before version 0.x
            if key in state and key not in policy:
                policy[key] = state[key]
        self.policy.load_state_dict(policy)
        if self.engine is not None and state.get("engine") is not None:
            self.engine.load_state_dict(state["engine"])
        if self.best is not None and state.get("best"):
            self.best.load_state_dict(state["best"])

    def log(self, *, batch_size: int | None = None, **metrics: torch.Tensor | float | int) -> None:
        """Record this step's metrics (``loss=``, ``accuracy=``, or any other name).

        Tensors are kept on the device (detached, no host sync); numbers are taken as they are.
        Call it once per optimizer step, before or after ``optimizer.step()``.
        """
        if self._closed:
            return
        row = self.recorder.row_for_log(self.step + 1)
        best = self.best.metric_for(metrics) if self.best is not None else None
        for key, value in metrics.items():
            v, why = as_value(key, value)
            if v is None:
                self._warn_once(f"bad:{key}", why or "")
                continue
            row.put(key, v)
            if key == best:
                self._offer_best(row.step, v)
        if batch_size is not None:
            row.host["_batch"] = float(batch_size)
        row.logged = True
        if row.stepped:
            self.recorder.commit()
            self._boundary("log")

    def flush(self) -> list[Sample]:
        """Copy what the device holds to the host now and hand it to the listeners."""
        rows = self.recorder.take()
        pending = self.best.pending_values() if self.best is not None else []
        if not rows and not self.dist.active:
            if pending:
                self._decide_best(materialise([], pending, self._device, self.batch_size)[1])
            return []
        samples, best_values = materialise(rows, pending, self._device, self.batch_size)
        if pending:  # before the rules judge this flush: a stop restores the best known now
            self._decide_best(best_values)
        self.flushes += 1
        if self.dist.active:
            samples = self._agree(samples)
        if self.engine is not None:
            samples = self._judge(samples)
        self._emit(samples)
        return samples

    def close(self) -> None:
        """Flush, stop the server, close the trace and remove the hooks. Idempotent."""
        if self._closed:
            return
        try:
            self.flush()
            if self.policy.held is not None and not self.should_stop:
                self._queue(self.policy.release_held(self._progress()), [])
            self._safe_point()
        finally:
            self._closed = True
            if self.sender is not None:
                # A run that ends cleanly resolves its alerts; a stopped one leaves them firing
                # (Alertmanager expires them at endsAt if nobody looks).
                try:
                    self.sender.close(resolve_active=not self.should_stop)
                except Exception:
                    self._internal_error("closing the alert sender")
            if self.hook is not None and hasattr(self.hook, "close"):
                self._guard(self.hook.close)
            for h in self._handles:
                h.remove()
            if self._scaler_update is not None:
                try:
                    del self.scaler.update
                except AttributeError:  # pragma: no cover
                    pass
            if self.trace is not None:
                self._guard(self.trace.close)
            if self.pushgateway:
                from .exporters.pushgateway import push_summary

                push_summary(self.pushgateway, self.registry, run=self.run_name,
                             on_error=self.exporter.count_error)
            if self.server is not None:
                self.server.close()
                self.server = None

    def __enter__(self) -> "Watcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def before_step(self) -> None:
        """Measure the gradients now (they must be final: unscaled, not yet clipped or stepped).

        Only for ``step_hooks=False``; the optimizer's pre-step hook does this otherwise.
        """
        self._pre_step(self.optimizer, (), {})

    def after_step(self, *, skipped: bool = False) -> None:
        """Record that the optimizer step happened (or was skipped, e.g. by AMP overflow).

        Only for ``step_hooks=False``; the optimizer's post-step hook does this otherwise.
        """
        if skipped:  # counted in lrwatch_skipped_steps_total from the flag, at the flush
            if self.recorder.open is not None:
                self.recorder.open.host["skipped"] = 1.0
        self._post_step(self.optimizer, (), {})

    # --- step path (no host sync here: the recorder keeps device scalars until the flush) ----
    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._probing:   # a range test's throw-away steps are not the run's
            return
        try:
            self.recorder.measure_grads(self.step + 1, skipped=False)
        except Exception:  # fail open: monitoring never breaks the step
            self._internal_error("measuring gradients")

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._probing:
            return
        try:
            self._finish_step()
        except Exception:
            self._internal_error("recording the step")
        self._boundary("post")

    def _finish_step(self) -> None:
        row, seconds = self.recorder.finish_step(self.step + 1)
        if seconds is not None and self.store is not None:
            self.store.observe_step_time(seconds)
        self.step += 1
        self._stepped_since_update = True
        if row.logged:
            self.recorder.commit()

    def _commit_done(self) -> None:
        if len(self.recorder.rows) >= self.flush_every:
            self.flush()

    def _wrap_scaler(self, scaler: Any) -> None:
        """Record steps that the GradScaler skips for overflow (no optimizer hook fires then)."""
        original = scaler.update
        self._scaler_update = original

        def update(*args: Any, **kwargs: Any) -> Any:
            if not self._stepped_since_update and not self._closed and not self._probing:
                try:
                    self.recorder.measure_grads(self.step + 1, skipped=True)
                    self._finish_step()
                except Exception:
                    self._internal_error("recording a skipped AMP step")
            self._stepped_since_update = False
            return original(*args, **kwargs)

        scaler.update = update

    # --- flush: the one host transfer ----------------------------------------------------------
    def _emit(self, samples: list[Sample]) -> None:
        self._guard(self.exporter.observe, samples)
        if self.trace is not None:
            self._guard(self.trace.write_many, samples)
            # Push to the OS at most once a second (close() flushes the rest): with
            # flush_every=1 a file flush per step would cost more than the probes.
            self._guard(lambda: self.trace.flush(min_interval=1.0))
        for s in samples:
            for listener in self._listeners:
                self._guard(listener, s)

    # --- rules and actions (host side, at the flush) -------------------------------------------
    def _judge(self, samples: list[Sample]) -> list[Sample]:
        """Run the engine over the flushed samples and decide what to do about its events."""
        engine = self.engine
        assert engine is not None
        out: list[Sample] = []
        events_all: list[Any] = []
        for s in samples:
            try:
                events = engine.update(s)
            except Exception:
                self._internal_error(f"evaluating rules at step {s.step}")
                events = []
            for e in events:
                self.exporter.set_rule_state(e.rule, e.severity, e.kind == "firing")
            events_all.extend(events)
            snap = self._snap_awaiting_engine.pop(s.step, None)
            if snap is not None:
                snap.extra["engine_state"] = engine.state_dict()
            if self.store is not None and not any(
                    set(f.actions) & set(CONTROL_ACTIONS) for f in engine.active.values()):
                promoted = self.store.promote(s.step)
                if promoted:
                    self.policy.promoted(SnapshotInfo(p.step, True, p.pinned) for p in promoted)
            if events:
                s = replace(s, events=s.events + tuple(_event_record(e) for e in events))
            out.append(s)
        records: list[dict[str, Any]] = []
        plans = self._plan(events_all, self._progress(out[-1].step if out else None))
        self._queue(plans, records)
        if self._late_records and out:
            out[0] = replace(out[0], events=tuple(self._late_records) + out[0].events)
            self._late_records = []
        if records and out:
            out[-1] = replace(out[-1], events=out[-1].events + tuple(records))
        if self._pending and self.engine is not None:
            # Restore the detectors' view of the run at the target now, so replay (which reads
            # the engine state from the event) and live stay identical.
            for _, target in self._pending:
                if target is not None and target.extra.get("engine_state") is not None:
                    self._restore_engine(target.extra["engine_state"])
        return out





    def _boundary(self, where: str) -> None:
        """An iteration boundary: carry out pending decisions, then snapshot if one is due.

        Snapshots and restores must happen at the same point of the loop, or a restored
        scheduler is one ``step()`` off its model. The strongest boundary seen wins:
        ``batches()`` (before the next batch), else ``log()`` called after the optimizer step
        (the end of an iteration, after ``scheduler.step()``), else the optimizer's post-step
        hook.
        """
        if where == "log" and self._boundary_kind in (None, "post"):
            self._boundary_kind = "log"
        if where != (self._boundary_kind or "post"):
            return
        if not self._safe_point():
            self._ramp_step()   # (a restart's own step runs at the ramp's first rate)
        if (self.store is not None and not self.should_stop and not self._pending
                and self.store.due(self.step)):
            snap = self.store.take(self.step, self.data_position, self.model, self.optimizer,
                                   self.scheduler, self.scaler, extra=self._snap_extra())
            if snap is not None:
                self._snap_seconds.append(snap.seconds)
                if self.engine is not None and self.engine.last_step == snap.step:
                    # The flush that judged this step came first (log() flushes, then takes
                    # the snapshot): the engine's state now is the one at the snapshot.
                    snap.extra["engine_state"] = self.engine.state_dict()
                else:
                    self._snap_awaiting_engine[snap.step] = snap

    def _agree(self, samples: list[Sample]) -> list[Sample]:
        """One collective per flush: every rank's rows, combined identically on every rank."""
        took = max(self._snap_seconds, default=0.0)
        self._snap_seconds.clear()
        gathered = self.dist.gather((samples, took))
        merged = combine_rank_samples([g[0] for g in gathered])
        if self.store is not None:
            # Every rank adapts the snapshot interval from the same (slowest) figures, so all
            # of them snapshot at the same steps and a rollback finds the same step everywhere.
            slowest = max(g[1] for g in gathered)
            times = [s.values["step_time_seconds"] for s in merged
                     if "step_time_seconds" in s.values]
            if slowest > 0 and times:
                self.store.adapt(slowest, sorted(times)[len(times) // 2])
        return merged






    def _snap_extra(self) -> dict[str, Any]:
        return {"lr_scale": self.policy.lr_scale}

    # --- the best evaluated state ----------------------------------------------------------------
    def _offer_best(self, step: int, value: torch.Tensor | float) -> None:
        # The model as it is now is the evaluated one: evaluation runs between steps.
        assert self.best is not None
        try:
            self.best.offer(step, value, self.model.state_dict)
        except Exception:
            self.best.discard_pending()
            self._internal_error("keeping the best evaluated state")

    def _decide_best(self, values: Sequence[float]) -> None:
        assert self.best is not None
        try:
            self.best.decide_at_flush(values)
        except Exception:
            self._internal_error("keeping the best evaluated state")



    # --- fail open -----------------------------------------------------------------------------
    def _guard(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:
            self._internal_error(f"{getattr(fn, '__qualname__', fn)}: {exc}")

    def _internal_error(self, what: str) -> None:
        self.exporter.count_error()
        self._limit.warning(log, what.split(":", 1)[0], "lrwatch: internal error while %s "
                            "(training goes on)", what, exc_info=True)

    def _warn_once(self, key: str, message: str) -> None:
        self.exporter.count_error()
        if key not in self._warned:
            self._warned.add(key)
            # log() -> _warn_once(): point at the line that called log()
            warnings.warn(message, stacklevel=3)

    def __repr__(self) -> str:
        return (f"Watcher(step={self.step}, flush_every={self.flush_every}, "
                f"metrics_url={self.metrics_url!r})")


def _event_record(e: Any) -> dict[str, Any]:
    """A rule event as it goes into the trace's ``events``."""
    rec: dict[str, Any] = {"type": e.kind, "rule": e.rule, "severity": e.severity,
                           "step": e.step}
    if e.kind == "firing":
        v = e.value
        rec["value"] = v if v is None or math.isfinite(v) else str(v)
        rec["actions"] = list(e.actions)
        rec["message"] = e.message
    return rec
