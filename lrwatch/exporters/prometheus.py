"""Prometheus metric families for training, and the HTTP server that exposes them.

Each :class:`TrainingExporter` owns its metrics and registers one collector in the registry it is
given (never only the global one), so tests and several watchers in one process stay apart. The
collector takes a lock while it is scraped and :meth:`TrainingExporter.observe` takes the same
lock while it updates, so one scrape always sees one consistent flush (``lrwatch_step`` and
``lrwatch_loss`` of the same step).

Gauges hold the last flushed value. Values that a 15 s scrape would miss between flushes are also
kept as histograms (loss, gradient norm, step duration) and counters (steps, non-finite steps), so
a spike between scrapes stays visible with ``max_over_time`` of the bucket rates.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import threading
import weakref
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .._version import __version__
from ..errors import ConfigError
from ..samples import Sample

__all__ = ["EngineMetrics", "TrainingExporter", "MetricsServer", "start_metrics_server",
           "LOG_BUCKETS"]

log = logging.getLogger("lrwatch")

# 1e-6 .. 1e6 in half-decades: losses and gradient norms span many orders of magnitude.
LOG_BUCKETS: tuple[float, ...] = tuple(
    m * 10.0 ** e for e in range(-6, 7) for m in (1.0, 3.0)) + (math.inf,)
STEP_SECONDS_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    math.inf)

# Sample keys exported as plain gauges (name in the sample -> metric name, help).
_GAUGES: dict[str, tuple[str, str]] = {
    "loss": ("lrwatch_loss", "Training loss at the last flushed step."),
    "grad_norm": ("lrwatch_grad_norm",
                  "Global L2 norm of the gradients before clipping, at the last flushed step."),
    "update_ratio": ("lrwatch_update_ratio",
                     "Ratio of the parameter update norm to the parameter norm, ||dθ||/||θ||."),
    "accuracy": ("lrwatch_accuracy", "Training accuracy at the last flushed step."),
    "eval_loss": ("lrwatch_eval_loss", "Loss of the last evaluation."),
    "eval_accuracy": ("lrwatch_eval_accuracy", "Accuracy of the last evaluation."),
    "loss_scale": ("lrwatch_loss_scale", "AMP loss scale at the last flushed step."),
    "untrained_loss": ("lrwatch_untrained_loss",
                       "Untrained loss measured before the first step (median over the first "
                       "batches); the rules compare the loss with it."),
    "constant_loss": ("lrwatch_constant_loss",
                      "Loss of the best constant prediction on the untrained-loss batches, "
                      "measured before the first step; a network well below it is not dead."),
    "samples_per_second": ("lrwatch_samples_per_second",
                           "Training throughput at the last flushed step."),
    "step": ("lrwatch_step", "Global optimizer step of the last flushed sample."),
    "time": ("lrwatch_last_step_timestamp_seconds", "Unix time of the last flushed step."),
}


# Gauges the exporter derives itself (keys no sample value can have).
_DERIVED: dict[str, tuple[str, str]] = {
    "@flush_interval": ("lrwatch_flush_interval_seconds",
                        "Time between the last steps of the last two flushes (step times): "
                        "LrwatchTrainingStalled waits three of these, at least 15 minutes, so "
                        "runs with slow steps or a large flush_every are not stalled."),
    "@steps_per_second": ("lrwatch_steps_per_second",
                          "Optimizer steps per second between the last steps of the last two "
                          "flushes (step times): the rate of lrwatch_training_steps_total is 0 "
                          "in windows between flushes further apart than the window."),
}


class EngineMetrics:
    """The engine and health families that every lrwatch process exports, defined once for the
    training exporter and the daemon: ``lrwatch_build_info{version,python,component}``,
    ``lrwatch_internal_errors_total``, ``lrwatch_rule_firing{rule,severity}`` and
    ``lrwatch_firings_total{rule,severity}``.

    ``registry=None`` leaves them unregistered (the training exporter collects them under its
    own lock); otherwise they are registered there.
    """

    def __init__(self, component: str, registry: CollectorRegistry | None = None) -> None:
        self.build = Info("lrwatch_build", "lrwatch build information.", registry=registry)
        self.build.info({"version": __version__, "python": platform.python_version(),
                         "component": component})
        self.internal_errors = Counter("lrwatch_internal_errors",
                                       "Monitoring failures that lrwatch absorbed (fail open).",
                                       registry=registry)
        self.rule_firing = Gauge("lrwatch_rule_firing", "1 while a rule is firing, else 0.",
                                 ["rule", "severity"], registry=registry)
        self.firings = Counter("lrwatch_firings", "Times a rule started firing.",
                               ["rule", "severity"], registry=registry)
        self._states: set[tuple[str, str]] = set()   # the rule_firing children made

    @property
    def metrics(self) -> list[Any]:
        return [self.build, self.internal_errors, self.rule_firing, self.firings]

    def set_rule_state(self, rule: str, severity: str, firing: bool) -> None:
        """A rule's firing state; a rising edge also counts in ``lrwatch_firings_total``."""
        if firing:
            self.firings.labels(rule, severity).inc()
        self.rule_firing.labels(rule, severity).set(1.0 if firing else 0.0)
        self._states.add((rule, severity))

    def end_firing(self) -> None:
        """Nothing is evaluated any more (the run is over): every ``lrwatch_rule_firing`` is
        0. The series stay (a dashboard shows when the rule stopped), and so do the counts of
        ``lrwatch_firings_total``."""
        for rule, severity in self._states:
            self.rule_firing.labels(rule, severity).set(0.0)


class _LockedCollector(Collector):
    """Collects the exporter's metrics under its lock, so a scrape sees one consistent flush.

    The last-value gauges of :data:`_GAUGES` are emitted only once measured: an
    ``lrwatch_eval_accuracy`` of 0 before the first evaluation would be a lie.
    """

    def __init__(self, lock: threading.Lock, metrics: Sequence[Any],
                 latest: dict[str, float], const_labels: Mapping[str, str]) -> None:
        self._lock = lock
        self._metrics = metrics
        self._latest = latest
        self._const = dict(const_labels)

    def collect(self) -> Iterator[Any]:
        with self._lock:
            families = [f for m in self._metrics for f in m.collect()]
            for key, (name, doc) in (*_GAUGES.items(), *_DERIVED.items()):
                if key in self._latest:
                    families.append(GaugeMetricFamily(name, doc, value=self._latest[key]))
        if self._const:  # e.g. rank="3" when every rank serves its own endpoint
            for fam in families:
                fam.samples = [s._replace(labels={**s.labels, **self._const})
                               for s in fam.samples]
        return iter(families)

    def describe(self) -> Iterator[Any]:
        return iter([f for m in self._metrics for f in m.describe()])


#: per registry, the collectors lrwatch registered there and the object owning each
_OWNED: "weakref.WeakKeyDictionary[CollectorRegistry, list[tuple[Any, Any]]]" = \
    weakref.WeakKeyDictionary()


def register_owned(registry: CollectorRegistry, owner: Any, collectors: Sequence[Any]) -> None:
    """Register ``collectors`` for ``owner`` (an object with a ``closed`` flag). Collectors of
    an owner that is closed (or gone) make way first, so runs one after another can share a
    registry (a sweep in one process, the global ``REGISTRY``); a name still held by an open
    owner is a :class:`~lrwatch.errors.ConfigError` that says what to do. The values of a
    closed run stay in the registry until the next one replaces them."""
    held = _OWNED.setdefault(registry, [])
    for ref, col in list(held):
        o = ref()
        if o is None or getattr(o, "closed", False):
            try:
                registry.unregister(col)
            except KeyError:
                pass
            held.remove((ref, col))
    for col in collectors:
        try:
            registry.register(col)
        except ValueError as exc:   # duplicated timeseries
            raise ConfigError("this registry already holds the metrics of a Watcher that is "
                              "still open: close() it first, or give each concurrent Watcher "
                              f"a registry of its own ({exc})") from exc
        held.append((weakref.ref(owner), col))


class TrainingExporter:
    """The training-side metric families of docs/design.md, fed with flushed samples.

    Parameters
    ----------
    registry:
        Where to register; a fresh ``CollectorRegistry`` when ``None``.
    run_info:
        Labels of ``lrwatch_run_info`` (run name, model, optimizer, ...). Run identity goes here,
        never into the labels of other metrics.
    layer_labels:
        The bounded set of layer names for ``lrwatch_layer_grad_norm``, if per-layer norms are on.
    const_labels:
        Labels added to every sample (``rank`` for per-rank endpoints; keep the set bounded).
    """

    def __init__(self, registry: CollectorRegistry | None = None, *,
                 run_info: Mapping[str, str] | None = None,
                 layer_labels: Sequence[str] = (),
                 const_labels: Mapping[str, str] | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._lock = threading.Lock()
        m: list[Any] = []

        def add(metric: Any) -> Any:
            m.append(metric)
            return metric

        self.engine = EngineMetrics("training")
        for metric in self.engine.metrics:
            add(metric)
        self.run_info = add(Info("lrwatch_run", "Identity of the watched run.", registry=None))
        self.run_info.info(dict(run_info or {}))
        self.learning_rate = add(Gauge("lrwatch_learning_rate",
                                       "Learning rate of each optimizer parameter group.",
                                       ["param_group"], registry=None))
        self.momentum = add(Gauge("lrwatch_momentum",
                                  "Momentum (SGD) or beta1 (Adam family) of each parameter group.",
                                  ["param_group"], registry=None))
        self.latest: dict[str, float] = {}
        self.steps = add(Counter("lrwatch_training_steps",
                                 "Optimizer steps seen.", registry=None))
        self.nonfinite_steps = add(Counter("lrwatch_nonfinite_steps",
                                           "Steps whose loss or gradients were NaN or Inf.",
                                           registry=None))
        self.skipped_steps = add(Counter("lrwatch_skipped_steps",
                                         "Steps whose update never reached the weights "
                                         "(AMP overflow, or lrwatch skip).", registry=None))
        self.rollbacks = add(Counter("lrwatch_rollbacks", "Rollbacks to a known-good snapshot.",
                                     registry=None))
        self.internal_errors = self.engine.internal_errors
        self.actions = add(Counter("lrwatch_actions", "Training-control actions decided "
                                   "(rollback, skip, reduce_lr, stop, lr_recover).", ["action"],
                                   registry=None))
        self.rule_firing = self.engine.rule_firing
        self.firings = self.engine.firings
        self._add_per_step(add)
        self._metrics = m
        # A layer's child is made at its first measurement (once; cached after): made here it
        # would export 0 for layers never measured (sharded parameters have no per-layer
        # norms), and a gradient norm of 0 reads as vanished gradients.
        self._layer_labels = tuple(layer_labels)
        self._layer_children: dict[str, Any] = {}
        self._lr_children: dict[int, Any] = {}   # param_group index -> its series
        self._mom_children: dict[int, Any] = {}
        self._collector = _LockedCollector(self._lock, m, self.latest, const_labels or {})
        self._register()

    def _add_per_step(self, add: Callable[[Any], Any]) -> None:
        """The families of every step's values (histograms) and the per-layer norms."""
        self.loss_hist = add(Histogram("lrwatch_step_loss", "Training loss of every step.",
                                       buckets=LOG_BUCKETS, registry=None))
        self.grad_norm_hist = add(Histogram("lrwatch_step_grad_norm",
                                            "Global gradient norm of every step.",
                                            buckets=LOG_BUCKETS, registry=None))
        self.step_seconds = add(Histogram("lrwatch_step_duration_seconds",
                                          "Wall time between optimizer steps.",
                                          buckets=STEP_SECONDS_BUCKETS, registry=None))
        self.layer_grad_norm = add(Gauge("lrwatch_layer_grad_norm",
                                         "Gradient L2 norm per top-level module (opt-in).",
                                         ["layer"], registry=None))

    def _register(self) -> None:
        self.closed = False
        register_owned(self.registry, self, [self._collector])

    def close(self) -> None:
        """The run is over: its metrics stay in the registry until another Watcher replaces
        them there, with every ``lrwatch_rule_firing`` at 0 (no rule of a finished run fires:
        a process that goes on serving the registry would page for it otherwise)."""
        with self._lock:
            self.engine.end_firing()
        self.closed = True

    # --- feeding -----------------------------------------------------------------------------
    def observe(self, samples: Iterable[Sample]) -> None:
        """Update every family from one flush of samples (in step order).

        A gauge takes the newest value of its key *in the flush*, not only the flush's last
        sample's: an evaluation, an ``accuracy`` or a per-layer norm logged on a step that does
        not end a flush (an evaluation every epoch of 391 steps, ``flush_every=25``) would be
        lost from ``/metrics`` otherwise, and the gauge would keep an older value, or none."""
        with self._lock:
            last: Sample | None = None
            newest: dict[str, float] = {}     # sample key -> its newest value in the flush
            lr_groups: tuple[float, ...] | None = None
            for s in samples:
                last = s
                self._count(s.values)
                newest.update(s.values)
                if s.lr_groups is not None:
                    lr_groups = s.lr_groups
            if last is None:
                return
            before_step = self.latest.get("step")
            self.latest["step"] = float(last.step)
            if last.time is not None:
                before = self.latest.get("time")
                if before is not None and last.time > before:
                    self.latest["@flush_interval"] = last.time - before
                    if before_step is not None and last.step > before_step:
                        self.latest["@steps_per_second"] = \
                            (last.step - before_step) / (last.time - before)
                self.latest["time"] = last.time
            for key in _GAUGES:
                val = newest.get(key)
                if val is not None:
                    self.latest[key] = val
            if lr_groups is not None:   # (a group that holds no rate, NaN: no series)
                self._set_groups(self.learning_rate, self._lr_children,
                                 [(g, v) for g, v in enumerate(lr_groups) if not math.isnan(v)])
            self._set_groups(self.momentum, self._mom_children,
                             [(int(k[len("momentum/"):]), v) for k, v in newest.items()
                              if k.startswith("momentum/") and k[len("momentum/"):].isdigit()])
            for lab in self._layer_labels:
                val = newest.get(f"grad_norm/{lab}")
                if val is not None:
                    child = self._layer_children.get(lab)
                    if child is None:
                        child = self._layer_children[lab] = self.layer_grad_norm.labels(lab)
                    child.set(val)

    def _count(self, v: Mapping[str, float]) -> None:
        """One step's counters and histograms (every step counts, not only a flush's last)."""
        self.steps.inc()
        if v.get("nonfinite_loss") or v.get("nonfinite_grad"):
            self.nonfinite_steps.inc()
        if v.get("skipped") or v.get("grad_dropped"):
            self.skipped_steps.inc()
        loss = v.get("loss")
        if loss is not None and math.isfinite(loss):
            self.loss_hist.observe(loss)
        gn = v.get("grad_norm")
        if gn is not None and math.isfinite(gn):
            self.grad_norm_hist.observe(gn)
        st = v.get("step_time_seconds")
        if st is not None and math.isfinite(st) and st >= 0:
            self.step_seconds.observe(st)

    @staticmethod
    def _set_groups(gauge: Gauge, children: dict[int, Any],
                    values: Sequence[tuple[int, float]]) -> None:
        """Each ``(group, value)`` on the series ``param_group="<group>"`` (the group's index
        in ``optimizer.param_groups``, also where an earlier group has no value)."""
        for g, val in values:
            child = children.get(g)
            if child is None:
                child = children[g] = gauge.labels(str(g))
            child.set(val)

    def set_rule_state(self, rule: str, severity: str, firing: bool) -> None:
        """Record a rule's firing state; a rising edge also counts in ``lrwatch_firings_total``."""
        with self._lock:
            self.engine.set_rule_state(rule, severity, firing)

    def count_error(self) -> None:
        self.internal_errors.inc()


class MetricsServer:
    """The ``/metrics`` HTTP server of one registry, in a daemon thread.

    ``port=0`` picks a free port; :attr:`port` tells which. Stop it with :meth:`close`.

    A process forked while it serves (DataLoader workers) closes its copy of the listening
    socket at once: a persistent worker kept it open after :meth:`close`, so the port stayed
    taken (the next Watcher on it could not serve) and scrapes of it hung unanswered.
    """

    def __init__(self, registry: CollectorRegistry, port: int, host: str = "127.0.0.1") -> None:
        from prometheus_client import start_http_server

        self._server: Any
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.host = host
        self.port: int = int(self._server.server_port)
        _SERVING.add(self)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        server, self._server = self._server, None
        if server is None:   # closed, or this is a forked child (its copy is closed)
            return
        server.shutdown()
        server.server_close()
        self._thread.join(timeout=5)

    def _forget(self) -> None:
        """In a forked child: close this process's copy of the socket, never serve (the
        serving thread is the parent's; ``shutdown()`` here would wait for it for ever)."""
        server, self._server = self._server, None
        if server is not None:
            try:
                server.socket.close()
            except OSError:
                pass


#: the servers of this process, for :func:`_forget_servers_in_child`
_SERVING: "weakref.WeakSet[MetricsServer]" = weakref.WeakSet()


def _forget_servers_in_child() -> None:
    for server in list(_SERVING):
        server._forget()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_servers_in_child)


def start_metrics_server(registry: CollectorRegistry, port: int, host: str = "127.0.0.1",
                         *, on_error: Any = None) -> MetricsServer | None:
    """Start a :class:`MetricsServer`, or log a warning and return ``None`` if the port is taken.

    Training must go on when monitoring cannot start (fail open); ``on_error`` is called so the
    caller can count it in ``lrwatch_internal_errors_total``.
    """
    try:
        return MetricsServer(registry, port, host)
    except (OSError, OverflowError) as exc:   # OverflowError: past 65535 (port + rank)
        log.warning("lrwatch: cannot serve /metrics on %s:%s (%s); training goes on without it "
                    "(give another port, or port=0 for a free one; the failure is counted in "
                    "lrwatch_internal_errors_total)", host, port, exc)
        if on_error is not None:
            on_error()
        return None
