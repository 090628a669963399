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

The Watcher is the loop's side of lrwatch: the step counter, the flush, the iteration
boundaries and the public API. The rest is in modules of their own: :mod:`lrwatch.wiring`
checks the arguments and builds the parts, which :mod:`lrwatch.watch_setup` puts on the
Watcher; :mod:`lrwatch.step_path` turns the optimizer's (and GradScaler's) steps into rows
that :mod:`lrwatch.steps` records; :mod:`lrwatch.judge` runs the rules over each flush;
:mod:`lrwatch.outputs` exports it (Prometheus, trace, listeners); :mod:`lrwatch.best_keeper`
keeps the best evaluated state; :mod:`lrwatch.recovery.keeper` keeps the snapshots;
:mod:`lrwatch.recovery.executor` carries the recovery policy's plans out and sends the
alerts; :mod:`lrwatch.data_side` hands out the batches (:meth:`Watcher.batches`) and
measures the untrained loss on the first ones; :mod:`lrwatch.checkpointing` is the
checkpoint (``state_dict``/``load_state_dict``); :mod:`lrwatch.log_api` is ``log()`` (and
``log_evaluation()``, for adapters).
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from prometheus_client import CollectorRegistry

from .actions.rollback import scale_learning_rate
from .actions.best import BestEval
from .best_keeper import BestKeeper
from .checkpointing import Checkpointing
from .data_side import DataSide
from .distributed import RankContext
from .flushing import Flushing, resolve_flush_lag
from .log_api import LogApi
from .exporters.prometheus import MetricsServer
from .outputs import Listener, rank_trace_path
from .pipeline import split_stages, stage_peer
from .recovery.executor import PlanExecutor
from .recovery.policy import RecoveryConfig
from .rules import RuleSet
from .step_path import StepPath
from .untrained import UNTRAINED_BATCHES, check_untrained_batches
from .watch_setup import WatcherSetup
from .wiring import (action_params, build_best, build_recorder, check_args, check_probe,
                     check_run_name, closure_limits, guard_mode, pacing, rate_limits,
                     rule_set, schedule_limits, untracked_params)

__all__ = ["Watcher", "Listener", "RecoveryConfig", "BestEval", "rank_trace_path"]

log = logging.getLogger("lrwatch")

class Watcher(LogApi, DataSide, PlanExecutor, StepPath, Flushing, Checkpointing, WatcherSetup):
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
        scale is exported, and a step the scaler skips is recorded as ``skipped``: for an
        overflow of its scaled gradients (a finite loss), without their norm, as the scaler's
        calibration, which rolls nothing back; with a non-finite loss as a dropped step.
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
        Identity of the run in ``lrwatch_run_info`` (a random id by default). Under
        ``torch.distributed`` every rank takes rank 0's (its ``run_name`` or id), so that
        every rank reports one run: give it on rank 0 at least.
    start_step:
        The global step the run starts from (for resumed runs).
    pushgateway:
        URL of a Prometheus Pushgateway: at :meth:`close` the final metrics are pushed once,
        grouped by ``job="lrwatch"`` and ``run=run_name``. For short batch jobs that end before
        a scrape; long runs should be scraped instead.
    rules:
        The rules the flushed samples are judged by: a pack name (``"training"``, the default),
        a rule-file path, a :class:`~lrwatch.rules.RuleSet`, a list of these joined in order
        (``["training", "plateau_cut"]`` also cuts the rate of a scheduled run on a stalled
        loss; the training pack cuts it only in a run without a ``scheduler``), or ``None``
        for no rules.
    recovery:
        How to act on ``rollback``/``skip``/``reduce_lr``/``stop`` actions
        (:class:`~lrwatch.recovery.config.RecoveryConfig` or a dict of its fields); ``False``
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
        are then collective: call them on every rank. Leaving a ``with Watcher(...)`` block
        on an exception closes without the final flush (no collective: the other ranks are
        not in it).
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
        :meth:`batches` (see :class:`~lrwatch.recovery.config.RecoveryConfig`). And before
        the first step it measures the untrained loss (below).
    untrained_batches:
        With ``probe_loss``, :meth:`batches` scores the untouched model on this many batches
        before the first step (forward passes only, under ``no_grad``; the batches are then
        trained on as usual) and records their median loss as ``untrained_loss`` in step 1's
        sample. The default rules judge "never learned", "stuck above its untrained loss" and
        "far above the start" against it (``given: untrained_loss``) instead of the first
        batch's loss alone. On the same batches it measures the loss of the best constant
        prediction (``constant_loss``: what a network that learned nothing about its inputs
        scores), which the dead-network rules use as a veto. ``0`` turns both off
        (:mod:`lrwatch.untrained`).
    flush_lag:
        ``1``: a due flush's copy is queued without waiting and judged at the next step, so
        the host never waits for the device and the rules run while it computes; decisions
        take effect one step later. ``0``: judged at once. ``None`` (default): 1 when the
        steps are recorded on a CUDA device, else 0 (:mod:`lrwatch.flushing`).
    """

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None,
        *, scaler: Any = None, flush_every: int = 25, port: int | None = None,
        host: str = "127.0.0.1", trace: str | os.PathLike[str] | None = None,
        registry: CollectorRegistry | None = None, per_layer: bool = False,
        layer_depth: int = 1, max_layers: int = 64, update_ratio: bool = False,
        update_ratio_every: int = 10, batch_size: int | None = None,
        listeners: Iterable[Listener] = (), run_name: str | None = None, start_step: int = 0,
        pushgateway: str | None = None,
        rules: "str | os.PathLike[str] | RuleSet | Sequence[Any] | None" = "training",
        recovery: "RecoveryConfig | Mapping[str, Any] | bool | None" = True,
        alerts: Any = None, alertmanager: str | None = None, hook: Any = None,
        step_hooks: bool = True, process_group: Any = None, export: str = "rank0",
        keep_best: bool | str = True, keep_best_mode: str = "auto",
        probe_loss: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
        untrained_batches: int = UNTRAINED_BATCHES, flush_lag: int | None = None,
    ) -> None:
        self.dist = RankContext(process_group)
        try:   # (a rank that cannot build its Watcher tells the others at their first gather)
            check_args(model, optimizer, flush_every, port, batch_size, keep_best, probe_loss,
                       update_ratio_every, export)
            check_run_name(run_name, pushgateway)
            self.untrained_batches = check_untrained_batches(untrained_batches)
            self.model, self.optimizer = model, optimizer
            self.scheduler, self.scaler = scheduler, scaler
            self.flush_every, self.batch_size = flush_every, batch_size
            self.step, self.export = int(start_step), export
            self._closed, self.flushes = False, 0
            self.recorder = build_recorder(
                model, optimizer, self.dist, scaler=scaler, per_layer=per_layer,
                layer_depth=layer_depth, max_layers=max_layers, update_ratio=update_ratio,
                update_ratio_every=update_ratio_every, on_commit=self._commit_done)
            self.flush_lag = resolve_flush_lag(flush_lag, self.recorder.device)
            ruleset = rule_set(rules)
            settings, failed = pacing(
                flush_every, self.flush_lag, self.step, ruleset, recovery, optimizer=optimizer,
                scaler=scaler, probe_loss=probe_loss, keep_best=keep_best,
                keep_best_mode=keep_best_mode), None
            peer = stage_peer(model) if self.dist.active else None
        except Exception as exc:
            settings, failed, peer = {}, exc, None
        self.run_name = self._agree_run(run_name, settings, failed, peer)
        self._stages = split_stages(self.recorder, self.dist, probe_loss)   # (see StepPath)
        self._sharded = self.recorder.sharded
        self._in_flight = None
        if not (self.dist.is_main or export == "all"):   # this rank exports nothing
            port = trace = pushgateway = alerts = alertmanager = hook = None
        self._setup_outputs(registry, port, host, trace, pushgateway, listeners)
        self._setup_recovery(ruleset, recovery, alerts, alertmanager, hook)
        rule_list = list(ruleset) if ruleset is not None else []
        self._action_params = self.policy.action_params = action_params(rule_list)
        self.best = build_best(keep_best, keep_best_mode, rule_list, recovery, self.dist,
                               on_error=self.exporter.count_error)
        self._evals = BestKeeper(self.best, model, on_error=self._internal_error,
                                 all_or_none=self.dist.all_or_none)
        self._setup_executor(probe_loss, check_probe(self.recovery, probe_loss))
        self.recorder.set_guard(guard_mode(self.recovery, optimizer, scaler),
                                self.recovery.guard_ratio if self.recovery else 0.0)
        self._say_limits()
        self._attach_step_hooks(step_hooks)

    def _agree_run(self, run_name: str | None, settings: Any, failed: Exception | None,
                   peer: Any = None) -> str:
        """One run, one name: every rank takes rank 0's (each drew its own until 6 December;
        a rank given none took rank 0's random id while rank 0 kept its run_name), and the
        ranks' settings that pace the collectives agree (one collective)."""
        agreed = self.dist.agree_settings(run_name or uuid.uuid4().hex[:12], settings, failed,
                                          peer)
        if run_name and run_name != agreed:
            log.warning("lrwatch: run_name %r on this rank, %r on rank 0 of its process "
                        "group: every rank reports rank 0's, one run", run_name, agreed)
        return agreed

    def _say_limits(self) -> None:
        """Say once what this optimizer, scheduler and model leave out of the recovery."""
        closure_limits(self.optimizer, self.policy)
        rate_limits(self.optimizer, self.recovery)
        schedule_limits(self.scheduler, self.recovery)
        untracked_params(self.model, self.optimizer, self.recovery)

    # --- public API ----------------------------------------------------------------------------
    @property
    def metrics_url(self) -> str | None:
        """The ``/metrics`` URL, or ``None`` when no server runs."""
        return self.server.url if self.server else None

    @property
    def server(self) -> MetricsServer | None:
        """The ``/metrics`` server, or ``None`` (none asked for, or closed)."""
        return self.outputs.server

    @property
    def rollbacks(self) -> int:
        """Rollbacks and restarts carried out so far (kept across ``state_dict`` resumes)."""
        return int(self.policy.state.rollbacks)

    @property
    def best_eval(self) -> BestEval | None:
        """The best evaluation whose state is kept (step, metric, value, where), or ``None``.

        An evaluation logged as a tensor counts from the flush that judges it."""
        return self._evals.record

    def restore_best(self) -> BestEval | None:
        """Load the best evaluated state into the model (parameters and buffers, in place).

        A tensor evaluation still waiting for its flush is judged first (this flushes). Returns
        what was restored, or ``None`` when no state is kept (the model is left as it is).
        """
        if self.best is not None and self.best.pending and not self._closed:
            self.flush()
        return self._evals.restore()

    def rebind_scheduler(self, scheduler: Any) -> None:
        """The run's scheduler was replaced mid-run (Lightning's ``StochasticWeightAveraging``
        puts ``SWALR`` in; the framework callback calls this itself): rate cuts scale the new
        one from now on, the policy's standing cut included (its ``swa_lr`` too), and
        snapshots restore its state (one taken under the old scheduler restores the model and
        optimizer only)."""
        if scheduler is self.scheduler:
            return
        self.scheduler = scheduler
        if self._snaps is not None:
            self._snaps.rebind_scheduler(scheduler)
        if scheduler is not None and self.policy.lr_scale != 1.0:
            # a new scheduler reads its base rates off the groups, which carry the cut already;
            # SWALR's target rate is the user's absolute number: that one is cut here
            scale_learning_rate(self.optimizer, None, self.policy.lr_scale, ("swa_lr",))

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(sample)`` for every flushed step sample, in step order."""
        self.outputs.add_listener(listener)

    def close(self) -> None:
        """Flush, stop the server, close the trace and remove the hooks. Idempotent."""
        self._close(final_flush=True)

    def _close(self, final_flush: bool) -> None:
        if self._closed:
            return
        try:   # (a rollback the cooldown held is carried out, and in the trace)
            if final_flush:
                self._final_flush()
        finally:
            self._closed = True
            self._close_alerting()
            self._hooks.remove()
            self.outputs.close(self._faults.guard)

    def __enter__(self) -> "Watcher":
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        # A rank leaving on its own error must start no collective: the other ranks are in
        # their step (their next DDP all-reduce), not in the final flush's gather, which would
        # wait for them until the collective timeout and then replace the error it left on.
        alone = exc_type is not None and self.dist.world > 1
        if alone and not self._closed:
            log.warning("lrwatch: leaving the Watcher on %s under torch.distributed: closed "
                        "without its final flush (a collective the other ranks are not in), "
                        "so the steps since the last flush are not judged or exported; where "
                        "every rank raises alike, call watch.close() on every rank before "
                        "leaving the with block", exc_type.__name__)
        self._close(final_flush=not alone)

    # --- loop side (host side, between steps) --------------------------------------------------
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
        if self._snaps is not None and not self.should_stop and not self._pending:
            self._snaps.take_due(self.step, self.data_position,
                                 restored=self._restored_at == self.step)

    def _internal_error(self, what: str) -> None:   # fail open: counted and logged, not raised
        self._faults.error(what)

    def __repr__(self) -> str:
        return (f"Watcher(step={self.step}, flush_every={self.flush_every}, "
                f"metrics_url={self.metrics_url!r})")
