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
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from prometheus_client import CollectorRegistry

from .errors import ConfigError
from .exporters.prometheus import MetricsServer, TrainingExporter, start_metrics_server
from .exporters.trace import TraceWriter
from .probe import LayerIndex, tensor_norms, total_norm
from .samples import Sample

__all__ = ["Watcher", "Listener"]

log = logging.getLogger("lrwatch")

Listener = Callable[[Sample], None]


@dataclass
class _Row:
    """What one optimizer step collected before the flush.

    ``keys[i]`` names the i-th device scalar in ``tensors``; ``host`` holds values that were
    already Python numbers (learning rates are floats in ``param_groups``).
    """

    step: int
    time: float = 0.0
    keys: list[str] = field(default_factory=list)
    tensors: list[torch.Tensor] = field(default_factory=list)
    host: dict[str, float] = field(default_factory=dict)
    lr: list[float | None] = field(default_factory=list)
    stepped: bool = False  # the optimizer step (or a skip) has happened for this row
    logged: bool = False  # watch.log() has delivered this step's values

    def put(self, key: str, value: torch.Tensor | float | int) -> None:
        if isinstance(value, torch.Tensor):
            if key in self.keys:  # a second log() of the same step: last value wins
                self.tensors[self.keys.index(key)] = value
            else:
                self.keys.append(key)
                self.tensors.append(value)
        else:
            self.host[key] = float(value)


class Watcher:
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
        Measure ||Δθ||/||θ|| every step. It keeps a second copy of the parameters on the device,
        so it is off by default.
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
        batch_size: int | None = None,
        listeners: Iterable[Listener] = (),
        run_name: str | None = None,
        start_step: int = 0,
        pushgateway: str | None = None,
    ) -> None:
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

        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.flush_every = flush_every
        self.batch_size = batch_size
        self.run_name = run_name or uuid.uuid4().hex[:12]
        self.step = int(start_step)
        self.pushgateway = pushgateway
        self._listeners: list[Listener] = []
        self._rows: list[_Row] = []  # committed rows waiting for the flush
        self._open: _Row | None = None  # the row of the step in progress
        self._last_step_wall: float | None = None
        self._closed = False
        self._stepped_since_update = False
        self.flushes = 0
        self._warned: set[str] = set()

        params = [p for g in optimizer.param_groups for p in g["params"]]
        self._device = params[0].device if params else torch.device("cpu")
        names = {id(p): n for n, p in model.named_parameters()}
        named = [(names.get(id(p), f"param{i}"), p) for i, p in enumerate(params)]
        self._layers = LayerIndex(named, depth=layer_depth, max_layers=max_layers) \
            if per_layer else None
        self._update_ratio = bool(update_ratio)
        self._prev_params: list[torch.Tensor] | None = None

        # Exporters.
        self.exporter = TrainingExporter(
            registry,
            run_info={"run": self.run_name, "model": type(model).__name__,
                      "optimizer": type(optimizer).__name__,
                      "scheduler": type(scheduler).__name__ if scheduler is not None else "",
                      "torch": torch.__version__.split("+")[0]},
            layer_labels=self._layers.labels if self._layers else ())
        self.registry = self.exporter.registry
        self.server: MetricsServer | None = None
        if port is not None:
            self.server = start_metrics_server(self.registry, port, host,
                                               on_error=self.exporter.count_error)
        self.trace: TraceWriter | None = TraceWriter(trace) if trace is not None else None
        for listener in listeners:
            self.add_listener(listener)

        self._handles = [optimizer.register_step_pre_hook(self._pre_step),
                         optimizer.register_step_post_hook(self._post_step)]
        self._scaler_update: Any = None
        if scaler is not None:
            self._wrap_scaler(scaler)

    # --- public API ----------------------------------------------------------------------------
    @property
    def metrics_url(self) -> str | None:
        """The ``/metrics`` URL, or ``None`` when no server runs."""
        return self.server.url if self.server else None

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(sample)`` for every flushed step sample, in step order."""
        if not callable(listener):
            raise ConfigError(f"a listener must be callable, got {type(listener).__name__}")
        self._listeners.append(listener)

    def log(self, *, batch_size: int | None = None, **metrics: torch.Tensor | float | int) -> None:
        """Record this step's metrics (``loss=``, ``accuracy=``, or any other name).

        Tensors are kept on the device (detached, no host sync); numbers are taken as they are.
        Call it once per optimizer step, before or after ``optimizer.step()``.
        """
        if self._closed:
            return
        row = self._row_for_log()
        for key, value in metrics.items():
            v = self._as_value(key, value)
            if v is not None:
                row.put(key, v)
        if batch_size is not None:
            row.host["_batch"] = float(batch_size)
        row.logged = True
        if row.stepped:
            self._commit()

    def flush(self) -> list[Sample]:
        """Copy what the device holds to the host now and hand it to the listeners."""
        if self._open is not None and self._open.stepped:
            self._commit(flush=False)
        rows, self._rows = self._rows, []
        if not rows:
            return []
        samples = self._materialise(rows)
        self.flushes += 1
        self._emit(samples)
        return samples

    def close(self) -> None:
        """Flush, stop the server, close the trace and remove the hooks. Idempotent."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
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

    # --- step path (no host sync below this line until _materialise) ---------------------------
    def _row_for_log(self) -> _Row:
        """The row a ``log()`` call belongs to.

        A log after the step completes that step's row; a log before the step opens the row of
        the step about to happen. A second log for a row that already has one starts the next.
        """
        row = self._open
        if row is None or row.logged:
            if row is not None and row.stepped:
                self._commit()
            row = self._open = _Row(step=self.step + 1)
        return row

    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        try:
            self._measure_grads(skipped=False)
        except Exception:  # fail open: monitoring never breaks the step
            self._internal_error("measuring gradients")

    def _measure_grads(self, *, skipped: bool) -> None:
        if self._open is not None and self._open.stepped:
            self._commit()
        if self._open is None:
            self._open = _Row(step=self.step + 1)
        row = self._open
        params = [p for g in self.optimizer.param_groups for p in g["params"]
                  if p.grad is not None]
        grads = [p.grad for p in params]
        norms = tensor_norms(grads)  # type: ignore[arg-type]
        row.put("grad_norm", total_norm(norms, self._device))
        if self._layers is not None and norms:
            per = self._layers.per_layer(params, norms, self._device)
            for i, label in enumerate(self._layers.labels):
                row.put(f"grad_norm/{label}", per[i])
        if self._update_ratio and not skipped:
            self._snapshot_params()
        if self.scaler is not None:
            scale = getattr(self.scaler, "_scale", None)
            if isinstance(scale, torch.Tensor):
                row.put("loss_scale", scale.detach().reshape(()).float().clone())
        if skipped:
            row.host["skipped"] = 1.0

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        try:
            self._finish_step()
        except Exception:
            self._internal_error("recording the step")

    def _finish_step(self) -> None:
        if self._open is None:  # the pre-hook failed; record the step anyway
            self._open = _Row(step=self.step + 1)
        row = self._open
        if self._update_ratio and self._prev_params is not None and "skipped" not in row.host:
            row.put("update_ratio", self._measure_update_ratio())
        for i, group in enumerate(self.optimizer.param_groups):
            lr = group.get("lr")
            if isinstance(lr, torch.Tensor):  # capturable / tensor LR: stays on the device
                row.put(f"lr/{i}", lr.detach().reshape(()).float().clone())
                row.lr.append(None)
            elif lr is not None:
                row.lr.append(float(lr))
            mom = group.get("momentum")
            if mom is None and isinstance(group.get("betas"), (tuple, list)):
                mom = group["betas"][0]
            if isinstance(mom, (int, float)):
                row.host[f"momentum/{i}"] = float(mom)
        now = time.perf_counter()
        if self._last_step_wall is not None:
            row.host["step_time_seconds"] = now - self._last_step_wall
        self._last_step_wall = now
        row.time = time.time()
        row.stepped = True
        self.step += 1
        row.step = self.step
        self._stepped_since_update = True
        if row.logged:
            self._commit()

    def _commit(self, flush: bool = True) -> None:
        row = self._open
        if row is None:
            return
        self._open = None
        self._rows.append(row)
        if flush and len(self._rows) >= self.flush_every:
            self.flush()

    def _snapshot_params(self) -> None:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        with torch.no_grad():
            if self._prev_params is None or len(self._prev_params) != len(params) or any(
                    a.shape != b.shape for a, b in zip(self._prev_params, params)):
                self._prev_params = [p.detach().clone() for p in params]
            elif hasattr(torch, "_foreach_copy_"):
                torch._foreach_copy_(self._prev_params, [p.detach() for p in params])
            else:  # pragma: no cover
                for a, b in zip(self._prev_params, params):
                    a.copy_(b)

    def _measure_update_ratio(self) -> torch.Tensor:
        params = [p.detach() for g in self.optimizer.param_groups for p in g["params"]]
        prev = self._prev_params
        assert prev is not None
        with torch.no_grad():
            torch._foreach_sub_(prev, params)  # prev now holds -Δθ; it is refilled next step
            delta = total_norm(tensor_norms(prev), self._device)
            theta = total_norm(tensor_norms(params), self._device)
            return delta / theta.clamp_min(1e-12)

    def _wrap_scaler(self, scaler: Any) -> None:
        """Record steps that the GradScaler skips for overflow (no optimizer hook fires then)."""
        original = scaler.update
        self._scaler_update = original

        def update(*args: Any, **kwargs: Any) -> Any:
            if not self._stepped_since_update and not self._closed:
                try:
                    self._measure_grads(skipped=True)
                    self._finish_step()
                except Exception:
                    self._internal_error("recording a skipped AMP step")
            self._stepped_since_update = False
            return original(*args, **kwargs)

        scaler.update = update

    def _as_value(self, key: str, value: Any) -> torch.Tensor | float | None:
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                self._warn_once(f"bad:{key}", f"lrwatch: log({key}=...) needs a scalar, got a "
                                f"tensor of shape {tuple(value.shape)}; value ignored")
                return None
            return value.detach().reshape(()).float().clone()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self._warn_once(f"bad:{key}", f"lrwatch: log({key}=...) needs a number or a scalar "
                            f"tensor, got {type(value).__name__}; value ignored")
            return None
        return float(value)

    # --- flush: the one host transfer ----------------------------------------------------------
    def _materialise(self, rows: Sequence[_Row]) -> list[Sample]:
        flat = [t for r in rows for t in r.tensors]
        host_vals: list[float] = []
        if flat:
            # One transfer for the whole flush.
            host_vals = torch.stack([t.to(self._device) for t in flat]).cpu().tolist()
        samples: list[Sample] = []
        pos = 0
        for r in rows:
            values: dict[str, float] = {}
            for k in r.keys:
                values[k] = host_vals[pos]
                pos += 1
            for k, v in r.host.items():
                if not k.startswith("_"):
                    values[k] = v
            lrs = [values.pop(f"lr/{i}", lr) if lr is None else lr for i, lr in enumerate(r.lr)]
            lr_groups = tuple(float(x) for x in lrs if x is not None) or None
            if lr_groups:
                values["lr"] = lr_groups[0]
            if "loss" in values:
                values["nonfinite_loss"] = 0.0 if math.isfinite(values["loss"]) else 1.0
            if "grad_norm" in values:
                values["nonfinite_grad"] = 0.0 if math.isfinite(values["grad_norm"]) else 1.0
            batch = r.host.get("_batch", self.batch_size)
            st = values.get("step_time_seconds")
            if batch and st and st > 0:
                values["samples_per_second"] = batch / st
            samples.append(Sample(step=r.step, time=r.time or None, values=values,
                                  lr_groups=lr_groups))
        return samples

    def _emit(self, samples: list[Sample]) -> None:
        self._guard(self.exporter.observe, samples)
        if self.trace is not None:
            self._guard(self.trace.write_many, samples)
            self._guard(self.trace.flush)
        for s in samples:
            for listener in self._listeners:
                self._guard(listener, s)

    # --- fail open -----------------------------------------------------------------------------
    def _guard(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:
            self._internal_error(f"{getattr(fn, '__qualname__', fn)}: {exc}")

    def _internal_error(self, what: str) -> None:
        self.exporter.count_error()
        log.warning("lrwatch: internal error while %s (training goes on)", what, exc_info=True)

    def _warn_once(self, key: str, message: str) -> None:
        self.exporter.count_error()
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def __repr__(self) -> str:
        return (f"Watcher(step={self.step}, flush_every={self.flush_every}, "
                f"metrics_url={self.metrics_url!r})")
