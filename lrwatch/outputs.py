"""Where the Watcher's flushed samples go: Prometheus, the trace and the listeners.

:class:`Outputs` owns the :class:`~lrwatch.exporters.prometheus.TrainingExporter` (and the
``/metrics`` server over its registry), the trace writer, the listeners and, at the end of the
run, the one push to a Pushgateway. Under ``export="all"`` every rank exports on
``port + rank`` with a ``rank`` label and writes its own trace (:func:`rank_trace_path`);
the rank is the global one, and a subgroup's rank 0 exporting under ``"rank0"`` is named the
same way when it is not the world's rank 0.

It writes and decides nothing. Fail open: the writes of a flush go through the ``guard`` the
Watcher hands in, and the server, the trace writer and the push count their own failures
(``lrwatch_internal_errors_total``); none is raised into the training loop.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
from prometheus_client import CollectorRegistry

from .distributed import RankContext
from .errors import ConfigError
from .exporters.prometheus import MetricsServer, TrainingExporter, start_metrics_server
from .exporters.trace import TraceWriter
from .probe import LayerIndex
from .samples import Sample

__all__ = ["Outputs", "Listener", "rank_trace_path", "run_info"]

Listener = Callable[[Sample], None]
Guard = Callable[..., None]   # guard(fn, *args): call fn, count and log what it raises


def rank_trace_path(trace: "str | os.PathLike[str]", rank: int) -> str:
    """The trace of rank ``rank``: the rank goes before the suffix, so a ``*.jsonl`` glob
    (``lrwatch replay DIR``, ``lrwatch report``) finds every rank's trace.

    One name for the Watcher (``export="all"``) and the framework callbacks.

    >>> rank_trace_path("runs/run.jsonl", 1), rank_trace_path("run", 2)
    ('runs/run.rank1.jsonl', 'run.rank2')
    """
    root, ext = os.path.splitext(os.fspath(trace))
    return f"{root}.rank{int(rank)}{ext}"


def run_info(run: str, model: Any, optimizer: Any, scheduler: Any) -> dict[str, str]:
    """The labels of ``lrwatch_run_info``: the run and what is trained with what."""
    return {"run": run, "model": type(model).__name__, "optimizer": type(optimizer).__name__,
            "scheduler": type(scheduler).__name__ if scheduler is not None else "",
            "torch": torch.__version__.split("+")[0]}


class Outputs:
    """The exporter, ``/metrics`` server, trace and listeners of one Watcher.

    Parameters
    ----------
    registry, port, host, trace, pushgateway:
        As the Watcher's arguments (``None`` where this rank exports nothing).
    info:
        The labels of ``lrwatch_run_info`` (:func:`run_info`).
    layers:
        The per-layer index whose labels the gradient-norm families get (``None``: none).
    dist, export:
        The rank context and the Watcher's ``export``: with ``"all"`` under
        ``torch.distributed``, a ``rank`` label, ``port + rank`` and one trace per rank (the
        global rank); with ``"rank0"`` on a subgroup whose rank 0 is not the world's, the
        same with that rank's global rank (:meth:`RankContext.export_rank`).
    """

    def __init__(self, *, registry: CollectorRegistry | None, port: int | None, host: str,
                 trace: "str | os.PathLike[str] | None", pushgateway: str | None,
                 info: dict[str, str], layers: LayerIndex | None, dist: RankContext,
                 export: str) -> None:
        const_labels: dict[str, str] = {}
        named = dist.export_rank(export)   # distinct across ranks and subgroups
        if named is not None:
            const_labels = {"rank": str(named)}
            port = port + named if port else port
            trace = rank_trace_path(trace, named) if trace is not None else None
        self.run = info["run"]
        self.grouping = const_labels   # a rank that exports its own pushes its own group
        self.exporter = TrainingExporter(registry, run_info=info,
                                         layer_labels=layers.labels if layers else (),
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
        self.pushgateway = pushgateway
        self.listeners: list[Listener] = []

    def resume(self, step: int) -> int:
        """A run resumed at ``step`` continues its trace (:meth:`TraceWriter.resume`, which
        counts a failure as any trace failure); the lines kept."""
        return self.trace.resume(step) if self.trace is not None else 0

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(sample)`` for every flushed sample, in step order."""
        if not callable(listener):
            raise ConfigError(f"a listener must be callable, got {type(listener).__name__}")
        self.listeners.append(listener)

    def emit(self, samples: list[Sample], guard: Guard) -> None:
        """One flush's samples to the exporter, the trace and every listener."""
        guard(self.exporter.observe, samples)
        trace = self.trace
        if trace is not None:
            guard(trace.write_many, samples)
            # Push to the OS at most once a second (close() flushes the rest): with
            # flush_every=1 a file flush per step would cost more than the probes.
            guard(lambda: trace.flush(min_interval=1.0))
        for s in samples:
            for listener in self.listeners:
                guard(listener, s)

    def close(self, guard: Guard) -> None:
        """Close the trace, push the final metrics (with a Pushgateway), stop the server."""
        if self.trace is not None:
            guard(self.trace.close)
        if self.pushgateway:
            from .exporters.pushgateway import push_summary

            push_summary(self.pushgateway, self.registry, run=self.run,
                         extra_grouping=self.grouping or None,
                         on_error=self.exporter.count_error)
        if self.server is not None:
            self.server.close()
            self.server = None
        self.exporter.close()
