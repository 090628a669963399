"""Per-step recording on the device: what the Watcher buffers between two flushes.

A :class:`StepRecorder` turns the optimizer's step hooks and ``log()`` calls into rows of device
scalars (gradient norms, loss scale, tensor learning rates, logged tensors) and host numbers
(float learning rates, momenta, step times). Nothing here converts a tensor to a Python number
until :func:`materialise`, which copies a whole flush to the host in one transfer and turns the
rows into :class:`~lrwatch.samples.Sample` objects.

It records and nothing else: the Watcher owns the step counter, the flush, the rules and the
recovery; the recorder is told the step number a new row gets and calls ``on_commit`` when a
row is complete (the Watcher flushes when enough are waiting).
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .distributed import SQ_REP, SQ_SHARD, split_by_placement
from .probe import (GradGuard, HostGradGuard, LayerIndex, drop_gradient, hold_gradients,
                    return_gradients, tensor_norms, total_norm)
from .samples import Sample, first_rate, not_applied

__all__ = ["Row", "StepRecorder", "Transfer", "as_value", "materialise"]


@dataclass
class Row:
    """What one optimizer step collected before the flush.

    ``keys[i]`` names the i-th device scalar in ``tensors``; ``host`` holds values that were
    already Python numbers (learning rates are floats in ``param_groups``).
    """

    step: int
    time: float = 0.0
    keys: list[str] = field(default_factory=list)
    tensors: list[torch.Tensor] = field(default_factory=list)
    host: dict[str, float] = field(default_factory=dict)
    lr: list[float | None] = field(default_factory=list)   # per group; None: it holds none
    stepped: bool = False  # the optimizer step (or a skip) has happened for this row
    logged: bool = False  # watch.log() has delivered this step's values
    logged_keys: set[str] = field(default_factory=set)   # the names log() gave it

    def put(self, key: str, value: torch.Tensor | float | int) -> None:
        """Keep ``value`` under ``key``; a second value for a key replaces the first (the
        last value wins, on the device or the host)."""
        if isinstance(value, torch.Tensor):
            self.host.pop(key, None)
            if key in self.keys:
                self.tensors[self.keys.index(key)] = value
            else:
                self.keys.append(key)
                self.tensors.append(value)
        else:
            if key in self.keys:
                i = self.keys.index(key)
                del self.keys[i], self.tensors[i]
            self.host[key] = float(value)


class StepRecorder:
    """Rows of per-step values, kept on the device until the flush.

    Parameters
    ----------
    optimizer:
        The watched optimizer (its parameter groups give gradients, rates and momenta).
    device:
        Where the norms are computed and stacked.
    layers:
        Per-layer gradient norms (``None``: the total only).
    sharded:
        Gradients are FSDP2/DTensor shards: record sums of squares, added across ranks at the
        flush.
    sum_ranks:
        With ``sharded``: adds a one-element tensor across the ranks in place (an all-reduce,
        enqueued on the device like the wrapper's own collectives). The guard judges the
        global norm, so every rank drops a spike that only one shard shows, or none does.
    update_ratio, update_ratio_every:
        Measure ||Δθ||/||θ|| on every k-th step (a parameter copy before those steps).
    scaler:
        A ``GradScaler`` whose loss scale is recorded.
    guard:
        What to do with a step whose gradient norm is not finite or a spike
        (:class:`~lrwatch.probe.GradGuard`; the Watcher sets it with :meth:`set_guard` from
        ``RecoveryConfig.guard``): ``"skip"`` hands a fused optimizer the flag
        (``optimizer.found_inf``) so its step is skipped on the device; ``"hold"`` (parameters
        on the CPU, where reading the verdict waits for nothing) takes the gradients away for
        that one step (:func:`~lrwatch.probe.hold_gradients`) and gives them back after it;
        ``"zero"`` zeroes the gradient (:func:`~lrwatch.probe.drop_gradient`); ``None``
        nothing. Each records ``grad_dropped``.
    on_commit:
        Called after a row is complete; the Watcher flushes from there.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, *,
                 layers: LayerIndex | None = None, sharded: bool = False,
                 sum_ranks: Callable[[torch.Tensor], Any] | None = None,
                 update_ratio: bool = False, update_ratio_every: int = 10,
                 scaler: Any = None, on_commit: Callable[[], None] = lambda: None) -> None:
        self.optimizer = optimizer
        self.device = device
        self.layers = layers
        self.sharded = sharded
        self.sum_ranks = sum_ranks
        self.replicas: int | None = None   # see split_stages
        self.update_ratio = update_ratio
        self.update_ratio_every = update_ratio_every
        self.scaler = scaler
        self.guard: str | None = None
        self._judge: GradGuard | None = None
        self._host_judge: HostGradGuard | None = None
        self._found_inf_set = False
        self._held: list[Any] = []      # gradients taken away for this step ("hold")
        self.on_commit = on_commit
        self.rows: list[Row] = []       # committed rows waiting for the flush
        self.open: Row | None = None    # the row of the step in progress
        self._last_wall: float | None = None
        self._ur_armed = False          # the parameters were copied before this step
        self._prev_params: list[torch.Tensor] | None = None

    def take(self) -> list[Row]:
        """The committed rows (the open one too once its step happened), emptied."""
        if self.open is not None and self.open.stepped:
            self.commit(notify=False)
        rows, self.rows = self.rows, []
        return rows

    def discard(self) -> int:
        """Drop the committed rows and the open one (steps of a trajectory a rollback
        abandoned before they were judged: a loop that never calls ``log()`` is rolled back at
        the optimizer's post-step hook, after a step its row still holds; an open row before
        its step holds values taken on the abandoned weights, a late evaluation's); returns
        how many steps."""
        n, self.rows = len(self.rows), []
        if self.open is not None:   # (one not stepped: values taken on the abandoned weights)
            n += self.open.stepped
            self.open = None
        return n

    def commit(self, notify: bool = True) -> None:
        row = self.open
        if row is None:
            return
        self.open = None
        self.rows.append(row)
        if notify:
            self.on_commit()

    def row_for_log(self, next_step: int) -> Row:
        """The row a ``log()`` call belongs to, when it does not join the last completed step's
        (the Watcher decides that: :meth:`~lrwatch.log_api.LogApi.log`).

        A log after the step completes that step's row; a log before the step opens the row of
        the step about to happen, and further logs before that step join it (a key logged
        again there: the last value wins, as for gradient accumulation's micro-batches).
        """
        row = self.open
        if row is not None and row.stepped and row.logged:   # (not left so by the Watcher)
            self.commit()
            row = None
        if row is None:
            row = self.open = Row(step=next_step)
        return row

    def last_logged(self, step: int) -> Row | None:
        """The committed row of ``step`` not sent to the host yet, if ``log()`` gave it
        values; else ``None``."""
        row = self.rows[-1] if self.rows else None
        return row if row is not None and row.step == step and row.logged else None

    def measure_grads(self, next_step: int, *, skipped: bool, guard: bool = True) -> None:
        """Gradient norms (and the loss scale) of the step about to happen; ``guard=False``:
        measured only (the step has already used them: a closure optimizer)."""
        if self.open is not None and self.open.stepped:
            self.commit()
        if self.open is None:
            self.open = Row(step=next_step)
        row = self.open
        params = [p for g in self.optimizer.param_groups for p in g["params"]
                  if p.grad is not None]
        if not params and not skipped:
            # no gradient at all: a step the loop skipped (a Lightning training_step that
            # returned None); a norm of 0 would read as a vanished gradient
            return
        grads = [p.grad for p in params]
        guarding = bool(self.guard and guard and grads and not skipped)
        if self.sharded:
            norms = []
            norm = self._sharded_norm(row, grads, guarding)
        else:
            norms = tensor_norms(grads)  # type: ignore[arg-type]
            norm = total_norm(norms, self.device)
            if LOGGED_NORM not in row.host:   # (the loop's own, from before its clipping)
                row.put("grad_norm", norm)
        if guarding:
            self._guard_step(row, params, norm)
        if self.layers is not None and norms:
            per = self.layers.per_layer(params, norms, self.device)
            for i, label in enumerate(self.layers.labels):
                row.put(f"grad_norm/{label}", per[i])
        self._ur_armed = False
        if self.update_ratio and not skipped and row.step % self.update_ratio_every == 0:
            self._snapshot_params()
            self._ur_armed = True
        if self.scaler is not None:
            scale = getattr(self.scaler, "_scale", None)
            if isinstance(scale, torch.Tensor):
                row.put("loss_scale", scale.detach().reshape(()).float().clone())
        if skipped:
            row.host["skipped"] = 1.0

    def split_stages(self, replicas: int, sum_ranks: Callable[[torch.Tensor], Any]) -> bool:
        """This rank's replicated (plain) gradients are held by ``replicas`` ranks only, fewer
        than the group's (pipeline stages: :mod:`lrwatch.pipeline`): record them as sums of
        squares divided by that count, added across the ranks like shards', and judge the
        guard on the global norm. Per-layer norms and the update ratio (per rank, not yet
        combined across stages) go off; returns whether they were on."""
        was_on = self.layers is not None or self.update_ratio
        self.sharded, self.replicas, self.sum_ranks = True, replicas, sum_ranks
        self.layers, self.update_ratio = None, False
        return was_on

    def _sharded_norm(self, row: Row, grads: list[Any], guarding: bool) -> torch.Tensor:
        """Record the rank-local sums of squares (added across ranks at the flush, in its one
        collective); the norm the guard judges. That is the global one when the guard is on:
        judged per shard, a spike that one shard shows dropped that rank's half of the step
        while the other ranks applied theirs."""
        rep, shards = split_by_placement(grads)  # type: ignore[arg-type]
        local = [total_norm(tensor_norms(rep), self.device).square()]
        sharded = total_norm([], self.device).square()
        if self.replicas is not None:   # (pipeline stages: this stage's, held by `replicas`)
            sharded = sharded + local[0] / self.replicas
            local[0] = torch.zeros_like(local[0])
        for copies, part in shards.items():   # (HSDP: each shard held by `copies` ranks)
            sq = total_norm(tensor_norms(part), self.device).square()
            sharded = sharded + (sq / copies if copies > 1 else sq)
        local.append(sharded)
        if LOGGED_NORM not in row.host:
            row.put(SQ_REP + "grad_norm", local[0])
            row.put(SQ_SHARD + "grad_norm", local[1])
        if guarding and self.sum_ranks is not None:
            sharded = sharded.clone()
            self.sum_ranks(sharded)
        return (local[0] + sharded).sqrt()

    def set_guard(self, mode: str | None, ratio: float | str) -> None:
        """Turn the guard on (``"skip"``, ``"hold"``, ``"zero"``) or off (``None``); ``ratio``:
        the spike threshold of :class:`~lrwatch.probe.GradGuard` (0: non-finite steps only)."""
        if mode not in (None, "skip", "hold", "zero"):
            raise ValueError(f"unknown guard mode {mode!r}")
        self.guard = mode
        self._judge = GradGuard(self.device, ratio=ratio) if mode in ("skip", "zero") else None
        self._host_judge = HostGradGuard(ratio=ratio) if mode == "hold" else None

    def _guard_step(self, row: Row, params: list[Any], norm: torch.Tensor) -> None:
        """Keep a step whose gradient is not finite, or a spike, off the parameters: on the
        device, or on the host where that costs no wait (parameters on the CPU)."""
        if getattr(self.optimizer, "found_inf", None) is not None:
            return   # a GradScaler the Watcher was not given handed the step its own flag
        if self.guard == "hold":
            assert self._host_judge is not None
            held = self._host_judge.bad(float(norm))
            if held:
                self._held = hold_gradients(params)   # given back in step_done
            row.host["grad_dropped"] = 1.0 if held else 0.0
            return
        assert self._judge is not None
        bad = self._judge.bad(norm)
        if self.guard == "zero":
            drop_gradient([p.grad for p in params], bad)
        else:
            self.optimizer.found_inf = bad.to(torch.float32)   # the fused step skips itself
            self._found_inf_set = True
        row.put("grad_dropped", bad.to(torch.float32))

    def step_done(self) -> None:
        """After the optimizer's step: give held gradients back, take the flag handed to a
        fused step back."""
        if self._held:
            held, self._held = self._held, []
            return_gradients(held)
        if self._found_inf_set:
            self._found_inf_set = False
            try:
                del self.optimizer.found_inf
            except AttributeError:
                pass

    def finish_step(self, step: int) -> tuple[Row, float | None]:
        """Record that the optimizer step ``step`` happened: rates, momenta, the step time.

        Returns the row and the seconds since the previous step (``None`` for the first)."""
        if self.open is None:  # the pre-hook failed; record the step anyway
            self.open = Row(step=step)
        row = self.open
        if self._ur_armed and "skipped" not in row.host:
            row.put("update_ratio", self._measure_update_ratio())
            self._ur_armed = False
        self._record_groups(row)
        now = time.perf_counter()
        seconds = None if self._last_wall is None else now - self._last_wall
        if seconds is not None:
            row.host["step_time_seconds"] = seconds
        self._last_wall = now
        row.time = time.time()
        row.stepped = True
        row.step = step
        return row, seconds

    def _record_groups(self, row: Row) -> None:
        for i, group in enumerate(self.optimizer.param_groups):
            lr = group.get("lr")
            if isinstance(lr, torch.Tensor):  # capturable / tensor LR: stays on the device
                row.put(f"lr/{i}", lr.detach().reshape(()).float().clone())
                row.lr.append(math.nan)   # (its place: the value comes as "lr/<i>")
            else:   # (None: a group that holds no rate keeps its place, and so the others')
                row.lr.append(None if lr is None else float(lr))
            mom = group.get("momentum")
            if mom is None and isinstance(group.get("betas"), (tuple, list)):
                mom = group["betas"][0]
            if isinstance(mom, (int, float)):
                row.host[f"momentum/{i}"] = float(mom)

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
            delta = total_norm(tensor_norms(prev), self.device)
            theta = total_norm(tensor_norms(params), self.device)
            return delta / theta.clamp_min(1e-12)


#: the trace's keys that are not metrics (docs/design.md, trace format v1), with what they hold
TRACE_KEYS = {"step": "step count", "time": "clock at each step",
              "events": "record of firings and actions"}


def as_value(key: str, value: Any) -> tuple[torch.Tensor | float | None, str | None]:
    """A logged value as a detached device scalar or a float, or ``(None, why)``."""
    if key in TRACE_KEYS:   # the trace writes its own there: the value would vanish from it
        return None, (f"lrwatch: log({key}=...): {key!r} is a key of the trace's own (the "
                      f"Watcher's {TRACE_KEYS[key]}); give the metric another name, e.g. "
                      f"log(my_{key}=...); value ignored")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None, (f"lrwatch: log({key}=...) needs a scalar, got a tensor of shape "
                          f"{tuple(value.shape)}; value ignored")
        return value.detach().reshape(()).float().clone(), None
    # numbers.Real: Python's int and float, and numpy's scalars (np.float32, np.int64, ...)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None, (f"lrwatch: log({key}=...) needs a number or a scalar tensor, got "
                      f"{type(value).__name__}; value ignored")
    try:
        return float(value), None
    except (OverflowError, ValueError, TypeError):
        return None, (f"lrwatch: log({key}=...) got {type(value).__name__} {str(value)[:40]}, "
                      f"which is not a float (too large?); value ignored")


def materialise(rows: Sequence[Row], extra: Sequence[torch.Tensor], device: torch.device,
                batch_size: int | None) -> tuple[list[Sample], list[float]]:
    """The rows as samples, and the host values of ``extra`` device scalars (pending
    evaluations), all from one transfer (which the host waits for)."""
    return Transfer(rows, extra, device).result(batch_size)


class Transfer:
    """One flush's device values on their way to the host, in one copy.

    ``asynchronous`` (CUDA values only): the copy goes to page-locked host memory without the
    host waiting, and an event marks its end; :meth:`result` waits on that event. Queued at one
    step and read at the next, the wait is for work the device has long finished while the
    next step's work keeps it busy. Otherwise the copy is made at once.
    """

    def __init__(self, rows: Sequence[Row], extra: Sequence[torch.Tensor], device: torch.device,
                 *, asynchronous: bool = False) -> None:
        self.rows = list(rows)
        self.n_extra = len(extra)
        self.device, self.asynchronous = device, asynchronous
        flat = [t for r in self.rows for t in r.tensors] + list(extra)
        self._values: list[float] | None = [] if not flat else None
        self._host: torch.Tensor | None = None
        self._event: Any = None
        self._late: list[tuple[Row, list[str], Transfer]] = []
        if not flat:
            return
        stacked = torch.stack([t.to(device) for t in flat])
        if asynchronous and stacked.is_cuda:
            try:
                host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
            except RuntimeError:   # no page-locked memory to be had: copy at once
                host = None
            if host is not None:
                host.copy_(stacked, non_blocking=True)
                self._event = torch.cuda.Event()
                self._event.record(torch.cuda.current_stream(stacked.device))
                self._host = host
                return
        self._values = stacked.cpu().tolist()

    def add_late(self, row: Row, values: dict[str, torch.Tensor]) -> None:
        """Device values logged for ``row`` (one of this transfer's) after its copy was queued:
        copied on their own the same way (without the host waiting, on CUDA), and put into
        the row's host values when :meth:`result` reads this transfer."""
        if values:
            self._late.append((row, list(values), Transfer(
                [], list(values.values()), self.device, asynchronous=self.asynchronous)))

    def result(self, batch_size: int | None) -> tuple[list[Sample], list[float]]:
        """The rows as samples and the extra values (waiting for the copy if it is in flight)."""
        for row, keys, late in self._late:
            row.host.update(zip(keys, late.result(None)[1]))
        self._late = []
        if self._values is None:
            assert self._host is not None
            self._event.synchronize()
            self._values = self._host.tolist()
            self._host = self._event = None
        host_vals = self._values
        extra_vals = host_vals[len(host_vals) - self.n_extra:] if self.n_extra else []
        samples: list[Sample] = []
        pos = 0
        for r in self.rows:
            values = dict(zip(r.keys, host_vals[pos:pos + len(r.keys)]))
            pos += len(r.keys)
            samples.append(_sample(r, values, batch_size))
        return samples, extra_vals


#: set in a row whose ``grad_norm`` the loop logged itself (what ``clip_grad_norm_`` returned:
#: the norm before its clipping, which the step hook, running after it, cannot see)
LOGGED_NORM = "_grad_norm_logged"

#: the gradient norms a step records (the total, per layer, and their per-rank squares)
_NORM_KEYS = ("grad_norm", SQ_REP + "grad_norm", SQ_SHARD + "grad_norm")


def _sample(r: Row, values: dict[str, float], batch_size: int | None) -> Sample:
    for k, v in r.host.items():
        if not k.startswith("_"):
            values[k] = v
    # every group in its place (a group with no rate as NaN), so that group g's rate is
    # exported as param_group="g"; none when no group holds a rate
    lrs = [values.pop(f"lr/{i}", lr) for i, lr in enumerate(r.lr)]
    lr_groups = (tuple(math.nan if x is None else float(x) for x in lrs)
                 if any(x is not None for x in lrs) else None)
    if lr_groups:
        values["lr"] = first_rate(lr_groups)
    if values.get("skipped", 0.0) >= 0.5:
        not_applied(values, _NORM_KEYS)
    if "loss" in values:
        values["nonfinite_loss"] = 0.0 if math.isfinite(values["loss"]) else 1.0
    if "grad_norm" in values:
        values["nonfinite_grad"] = 0.0 if math.isfinite(values["grad_norm"]) else 1.0
    batch = r.host.get("_batch", batch_size)
    st = values.get("step_time_seconds")
    if batch and st and st > 0:
        values["samples_per_second"] = batch / st
    return Sample(step=r.step, time=r.time or None, values=values, lr_groups=lr_groups)
