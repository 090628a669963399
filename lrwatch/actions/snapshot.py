"""Health-tagged snapshots of a training run, kept in memory or on disk.

A snapshot holds everything a rollback must restore bit for bit: the model, optimizer, LR
scheduler and GradScaler states, the model's buffers its ``state_dict`` leaves out
(``persistent=False``, :mod:`~lrwatch.actions.loose_buffers`), the RNG states (CPU, CUDA where present, Python, NumPy) and the
data position. A snapshot is *pending* when taken and becomes *known good* only once the rules
have stayed quiet for ``good_after`` steps after it; a rollback goes to the newest known-good one.

The interval between snapshots adapts to an overhead budget: after every snapshot the store
compares the time it took with the mean step time and spaces the next one so that snapshots cost
at most ``budget`` (2% by default) of training time.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import math
import os
import random
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from ..errors import ConfigError

__all__ = ["Snapshot", "SnapshotStore", "all_finite", "capture_state", "restore_state", "settle",
           "cpu_copy",
           "save_verified", "load_verified"]

from .._ratelimit import LogLimiter
from .host_copy import HostCopy
from .scheduler_state import restorable, scheduler_state, storable
from .loose_buffers import loose_buffers, restore_loose
from .optimizer_shard import is_sharded, shard_state, shard_to_load
from .host_memory import MemoryReport, copies_fit, reports_fit

log = logging.getLogger("lrwatch")


def cpu_copy(obj: Any) -> Any:
    """A deep copy of ``obj`` with every tensor copied to the CPU (never a shared reference)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):  # dict and OrderedDict (model state dicts)
        return type(obj)((k, cpu_copy(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [cpu_copy(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(cpu_copy(v) for v in obj)
    return obj  # ints, floats, strings, None: immutable


def save_verified(state: Mapping[str, Any], final: Path) -> str:
    """Write ``state`` to ``final`` atomically (temporary file, fsync, rename); its sha256.

    A crash mid-write leaves the previous file intact, never a truncated one.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_suffix(final.suffix + ".tmp")
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    return hashlib.sha256(data).hexdigest()


def load_verified(path: str | os.PathLike[str], checksum: str | None) -> dict[str, Any]:
    """Load what :func:`save_verified` wrote: sha256-checked, ``weights_only``, onto the CPU."""
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != checksum:
        raise OSError(f"{path} is corrupt: sha256 {digest} != {checksum}")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(py_internal) + [py_version],
        "python_gauss": py_gauss,
        # NumPy's legacy global state as plain numbers/tensors so torch.load(weights_only) reads it.
        "numpy": [np_state[0], torch.from_numpy(np.asarray(np_state[1]).astype(np.int64)),
                  int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((int(py[-1]), tuple(int(x) for x in py[:-1]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def capture_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None,
                  scaler: Any = None, copier: HostCopy | None = None) -> dict[str, Any]:
    """Everything a rollback restores, as CPU copies.

    With a ``copier`` (:class:`~lrwatch.actions.host_copy.HostCopy`) the copies of CUDA tensors
    may still be in flight on return: call ``copier.wait()`` before reading them. Without one
    the CUDA tensors are copied the same way (no host sync per tensor) and the state carries
    its copier: :func:`restore_state` and :func:`settle` wait for it.
    """
    own = copier is None
    copier = copier if copier is not None else HostCopy()
    state: dict[str, Any] = {
        "model": copier.copy(model.state_dict()),
        # (registered with persistent=False: in no state_dict, this rank's own)
        "buffers": copier.copy(loose_buffers(model)),
        # (a ZeroRedundancyOptimizer: this rank's shard, optimizer_shard)
        "optimizer": copier.copy(shard_state(optimizer) if is_sharded(optimizer)
                                 else optimizer.state_dict()),
        # (None for a scheduler of one's own without state_dict(): the rest is still held)
        "scheduler": scheduler_state(scheduler, copier.copy),
        "scheduler_type": type(scheduler).__qualname__ if scheduler is not None else None,
        "scaler": _scaler_state(scaler, copier) if scaler is not None else None,
        "rng": _rng_state(),
    }
    if own and copier.pending:
        state[_IN_FLIGHT] = copier.finish()
    return state


_IN_FLIGHT = "host_copy"   # the HostCopy of a captured state whose copies may be in flight


def all_finite(model: torch.nn.Module) -> bool:
    """Whether every parameter and floating buffer of ``model`` is finite (one host read).
    Tensors that hold no values yet (on the ``meta`` device, a lazy module's uninitialized
    parameters) have nothing to judge and are passed over."""
    checks = [torch.isfinite(t).all() for t in itertools.chain(model.parameters(), model.buffers())
              if _holds_values(t) and t.is_floating_point() and t.numel()]
    return bool(torch.stack([c.to(checks[0].device) for c in checks]).all()) if checks else True


def _holds_values(t: torch.Tensor) -> bool:
    return t.device.type != "meta" and not isinstance(
        t, torch.nn.parameter.UninitializedTensorMixin)


def settle(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """``state`` once the host copies :func:`capture_state` queued have landed (one wait on
    their events; nothing to wait for when they were made synchronously)."""
    copier = state.get(_IN_FLIGHT)
    if copier is not None:
        copier.wait()
    return state


def _scaler_state(scaler: Any, copier: HostCopy) -> dict[str, Any]:
    """A ``GradScaler``'s state with its scale and growth tracker as tensors.

    ``GradScaler.state_dict()`` reads both to Python numbers, a host sync on a GPU; copying the
    tensors instead keeps the snapshot off the host's critical path. :func:`restore_state`
    turns them back into numbers. Scalers without those tensors (not yet used, disabled, or
    another implementation) give their own ``state_dict()``.
    """
    scale, tracker = getattr(scaler, "_scale", None), getattr(scaler, "_growth_tracker", None)
    if not (isinstance(scale, torch.Tensor) and isinstance(tracker, torch.Tensor)
            and hasattr(scaler, "get_growth_factor")):
        return copier.copy(scaler.state_dict())
    return {"scale": copier.copy(scale), "growth_factor": scaler.get_growth_factor(),
            "backoff_factor": scaler.get_backoff_factor(),
            "growth_interval": scaler.get_growth_interval(),
            "_growth_tracker": copier.copy(tracker)}


def _scaler_numbers(state: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(state)
    if isinstance(out.get("scale"), torch.Tensor):
        out["scale"] = float(out["scale"].reshape(-1)[0])
    if isinstance(out.get("_growth_tracker"), torch.Tensor):
        out["_growth_tracker"] = int(out["_growth_tracker"].reshape(-1)[0])
    return out


def restore_state(state: Mapping[str, Any], model: torch.nn.Module,
                  optimizer: torch.optim.Optimizer, scheduler: Any = None,
                  scaler: Any = None) -> None:
    """Restore what :func:`capture_state` captured, in place (parameters keep their identity).

    On a CUDA device the tensors go back without the host waiting on each: pinned host copies
    are queued to their device tensors on the current stream (:func:`_copy_into`, where
    ``load_state_dict`` would make one blocking copy per tensor), and the optimizer's state is
    placed where ``Optimizer.load_state_dict`` puts it before it is loaded
    (:func:`_placed_state`)."""
    settle(state)
    # (a ZeroRedundancyOptimizer: this rank's shard, refused before anything is put back
    # where it was taken on another layout; optimizer_shard)
    sharded = is_sharded(optimizer)
    saved = shard_to_load(optimizer, state["optimizer"]) if sharded else state["optimizer"]
    with torch.no_grad():
        if not _copy_into(model, state["model"]):
            model.load_state_dict(state["model"])
    restore_loose(model, state.get("buffers") or {})   # (none in a state from before them)
    if sharded:   # into the local optimizer, its rates then the wrapper's groups' too
        _restore_optimizer(optimizer.optim, saved)
        optimizer._sync_param_groups(optimizer.optim.param_groups, optimizer.param_groups)
    else:
        _restore_optimizer(optimizer, saved)
    if restorable(scheduler) and state.get("scheduler") is not None and (
            state.get("scheduler_type") in (None, type(scheduler).__qualname__)):
        # (a state of another kind of scheduler, from before the run's scheduler was swapped
        # -- Lightning's SWA puts SWALR in -- is not loaded into the new one)
        scheduler.load_state_dict(cpu_copy(state["scheduler"]))
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(_scaler_numbers(state["scaler"]))
    _set_rng_state(state["rng"])


def _restore_optimizer(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]) -> None:
    """``saved`` (an optimizer state dict) into ``optimizer``. Keys a param group gained after
    the snapshot (SWA's ``swa_lr``, a scheduler's ``initial_lr``) are kept: the code that added
    them still reads them."""
    later = [dict(g) for g in optimizer.param_groups]
    saved, added = _with_added_groups(optimizer, saved)
    optimizer.load_state_dict(_placed_state(optimizer, saved))
    for group, now in zip(optimizer.param_groups, later):
        for key, value in now.items():
            if key not in group:
                group[key] = value
    first_added = len(later) - added
    for group, now in zip(optimizer.param_groups[first_added:], later[first_added:]):
        group.update(now)   # an added group's settings as they are (a tensor rate included)


# Modules whose own ``_load_from_state_dict`` only does what a plain copy does for a state dict
# the same module wrote (batch norm's handles state dicts of older torch versions).
_PLAIN_LOADERS = (torch.nn.Module._load_from_state_dict,
                  torch.nn.modules.batchnorm._NormBase._load_from_state_dict)


def _copy_into(model: torch.nn.Module, saved: Mapping[str, Any]) -> bool:
    """Copy ``saved`` into ``model``'s CUDA tensors in place, queued without the host waiting,
    when that is exactly what ``load_state_dict`` would do: the same keys, every entry a plain
    tensor of the live one's shape and dtype, in pinned host memory, and no module with load
    hooks or a loader of its own (:func:`_live_state`). Returns whether it did (else nothing
    was touched)."""
    live = _live_state(model)
    if live is None or list(live) != list(saved):
        return False
    pairs = []
    for key, dst in live.items():
        src = saved[key]
        if (type(src) is not torch.Tensor or not dst.is_cuda or src.device.type != "cpu"
                or not src.is_pinned() or dst.shape != src.shape or dst.dtype != src.dtype):
            return False
        pairs.append((dst.detach(), src))
    for dst, src in pairs:
        dst.copy_(src, non_blocking=True)
    return True


def _live_state(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """``model``'s state dict with its live tensors, when loading a state dict into it is a
    plain copy into them: ``None`` for a model that loads its own way, a module with load
    hooks, a loader of its own or extra state, or an entry that is not one of the model's own
    parameters or buffers (a ``state_dict`` hook or override handing out converted copies,
    which a copy in place would fill instead of the model)."""
    if type(model).load_state_dict is not torch.nn.Module.load_state_dict:
        return None   # a model that loads its own way
    for m in model.modules():
        if (m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks
                or type(m)._load_from_state_dict not in _PLAIN_LOADERS
                or type(m).get_extra_state is not torch.nn.Module.get_extra_state):
            return None   # (extra state is set by set_extra_state, not copied)
    live = model.state_dict(keep_vars=True)
    own = {id(t) for t in itertools.chain(model.parameters(), model.buffers())}
    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) or id(t) not in own
           for t in live.values()):
        return None
    return live


def _with_added_groups(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]
                       ) -> tuple[Mapping[str, Any], int]:
    """``saved`` (an optimizer state dict) with the param groups added to ``optimizer`` since
    it was captured (``add_param_group``: a backbone unfrozen mid-run), and how many: the
    groups it knew are restored, an added one keeps its settings and loses its per-parameter
    state (its parameters are back at the snapshot's values, where the optimizer held none
    for them). ``saved`` as it is (and 0) unless it holds fewer groups than ``optimizer``,
    each of the same size as the live one (else ``load_state_dict`` says what is wrong)."""
    groups, live = saved.get("param_groups"), optimizer.param_groups
    if (not isinstance(groups, list) or not 0 < len(groups) < len(live)
            or any(len(g.get("params", ())) != len(now["params"])
                   for g, now in zip(groups, live))):
        return saved, 0
    ids = [i for g in groups for i in g["params"]]
    fresh = itertools.count(1 + max((i for i in ids if isinstance(i, int)), default=-1))
    extra = [{**{k: v for k, v in g.items() if k != "params"},
              "params": [next(fresh) for _ in g["params"]]} for g in live[len(groups):]]
    return {**saved, "param_groups": list(groups) + extra}, len(extra)


def _placed_state(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the optimizer state dict ``saved`` with each tensor already where
    ``Optimizer.load_state_dict`` puts it (the parameter's device, and dtype if it is floating;
    ``step`` on the device only in fused or capturable groups), copied there without the host
    waiting; ``load_state_dict`` then finds it in place. Nothing is shared with ``saved``."""
    params, exact = [], []
    for group in optimizer.param_groups:
        for p in group["params"]:
            params.append(p)
            exact.append(bool(group.get("fused") or group.get("capturable")))
    ids = [i for g in saved.get("param_groups", []) for i in g.get("params", [])]
    entries = saved.get("state")
    if len(ids) != len(params) or not isinstance(entries, dict):
        return cpu_copy(saved)   # load_state_dict says what is wrong
    where = {i: (p, e) for i, p, e in zip(ids, params, exact)}
    state: dict[Any, Any] = {}
    for pid, entry in entries.items():
        p, on_device = where.get(pid, (None, False))
        if p is None or not p.is_cuda or not isinstance(entry, dict):
            state[pid] = cpu_copy(entry)
            continue
        state[pid] = {k: _placed(v, p, k != "step" or on_device, k == "step")
                      for k, v in entry.items()}
    out = dict(saved)
    out["state"] = state
    out["param_groups"] = cpu_copy(saved["param_groups"])
    return out


def _placed(value: Any, param: torch.Tensor, on_device: bool, step: bool) -> Any:
    if not isinstance(value, torch.Tensor):
        return cpu_copy(value)
    if not on_device:
        return value.detach().to("cpu", copy=True)
    if step:
        dtype = torch.float32
    else:
        dtype = param.dtype if param.is_floating_point() else value.dtype
    return value.detach().to(device=param.device, dtype=dtype, non_blocking=True, copy=True)


def _rank_tag() -> str:
    """``".rank<r>"`` in a ``torch.distributed`` group of more than one process, else ``""``."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return f".rank{dist.get_rank()}"
    return ""


@dataclass
class Snapshot:
    """One captured state. ``state`` is ``None`` when it lives on disk at ``path``."""

    step: int
    data_position: int
    state: dict[str, Any] | None
    seconds: float
    path: str | None = None
    checksum: str | None = None
    good: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    pinned: bool = False  # never trimmed (the state a run started from)
    #: host copies possibly still in flight (see :class:`~lrwatch.actions.host_copy.HostCopy`)
    copies: HostCopy | None = field(default=None, repr=False, compare=False)
    #: on disk: the scheduler's state where the file could not hold it (objects of the
    #: user's that ``weights_only`` refuses, :mod:`~lrwatch.actions.scheduler_state`)
    scheduler_state: Any = field(default=None, repr=False, compare=False)

    def wait(self) -> None:
        """Block until the captured tensors have landed in host memory (a no-op once they have)."""
        if self.copies is not None:
            self.copies.wait()
            self.copies = None

    def load(self) -> dict[str, Any]:
        """The captured state; from disk it is checksum-verified and loaded with weights_only."""
        if self.state is not None:
            self.wait()
            return self.state
        assert self.path is not None
        state = load_verified(self.path, self.checksum)
        if self.scheduler_state is not None:
            state["scheduler"] = self.scheduler_state
        return state


class SnapshotStore:
    """Takes, keeps and promotes snapshots.

    Parameters
    ----------
    keep:
        How many snapshots to keep besides the pinned start: at most ``keep - 1`` pending ones
        (no snapshot is due while that many are pending) and the two newest known-good ones,
        so ``keep + 1`` while ``keep - 1`` are pending and two are good (see :meth:`_trim`),
        and one more while a failure is open: the newest known-good one before its onset
        (:attr:`keep_before`).
        A pending snapshot is never dropped before it is judged.
    directory:
        Write snapshots here (atomic rename, sha256 checksum, ``weights_only`` load) instead of
        keeping CPU copies in memory: ``snapshot-<step>.pt`` and its ``.json``, under
        ``torch.distributed`` ``snapshot-<step>.rank<r>.pt``, the pinned start
        ``snapshot-<step>.start-<hex>.pt`` (see :meth:`_filename`). If a
        write fails with ``OSError`` (read-only, full, removed), that snapshot and all later
        ones are kept in memory (``directory`` becomes ``None``), with one warning and one
        ``on_error`` call: a rollback must not be lost to an unusable disk.
    good_after:
        Steps the rules must stay quiet after a snapshot before it counts as known good.
    budget:
        Target share of training time spent snapshotting; the interval adapts to it.
    min_interval, max_interval:
        Bounds of the adaptive interval, in steps.
    on_error:
        Called (no arguments) when a snapshot cannot be taken or written (the fall-back to
        memory included), so the caller can count it.
    deferred_schedule:
        Do not adapt the interval from this process's own timings; the caller calls
        :meth:`adapt` with figures every rank agrees on, so that all ranks snapshot at the same
        steps (a coordinated rollback needs the same snapshot step everywhere).
    """

    def __init__(self, *, keep: int = 3, directory: str | os.PathLike[str] | None = None,
                 good_after: int = 50, budget: float = 0.02, min_interval: int = 10,
                 max_interval: int = 1000, on_error: Callable[[], None] | None = None,
                 deferred_schedule: bool = False) -> None:
        if keep < 2:
            raise ConfigError(f"keep must be at least 2 (a known-good and a pending snapshot), "
                              f"got {keep}")
        if not 0 < budget < 1:
            raise ConfigError(f"budget must be a fraction in (0, 1), got {budget}")
        if not isinstance(min_interval, int) or isinstance(min_interval, bool) or not (
                isinstance(max_interval, int) and not isinstance(max_interval, bool)
                or max_interval == math.inf):
            raise ConfigError(f"min_interval must be an integer and max_interval an integer or "
                              f"infinity (steps), got {min_interval!r} and {max_interval!r}")
        if good_after < 0 or min_interval < 1 or max_interval < min_interval:
            raise ConfigError("need good_after >= 0 and 1 <= min_interval <= max_interval")
        self.keep = keep
        #: Pending snapshots held beyond the ``keep - 1`` that :meth:`due` allows while their
        #: promotion may be in flight (the Watcher sets 1 with ``flush_lag=1``; since the
        #: twelfth round no pending snapshot within that is trimmed, so it only matters for
        #: one taken out of schedule; see :meth:`_trim`).
        self.pending_slack = 0
        #: The step the earliest failure not answered yet began (a ``for:`` window under
        #: way, a rule firing whose rollback has not come yet; the keeper sets it at every
        #: judged step), or ``None``: the newest known-good snapshot before it is kept
        #: besides the two newest, so the rollback it asks for still has a target before it.
        self.keep_before: int | None = None
        self.directory = Path(directory) if directory is not None else None
        self._rank_tag = _rank_tag()
        #: this store's own name for its pinned start (see :meth:`_filename`; not from an
        #: RNG the snapshots capture)
        self._start_tag = f".start-{os.urandom(4).hex()}"
        self.good_after = good_after
        self.budget = budget
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.interval = min_interval
        self.on_error = on_error
        self._limit = LogLimiter()   # a capture failing at every interval: a line a minute
        self.snapshots: deque[Snapshot] = deque()
        self.taken = 0
        self.failed = 0
        #: times ``directory`` proved unwritable and the store switched to memory (0 or 1)
        self.fallbacks = 0
        self.seconds = 0.0
        self._next_step: int | None = None
        self._step_seconds: float | None = None
        self.deferred_schedule = deferred_schedule
        #: under ``torch.distributed``: every rank's memory as of the last flush (the Watcher
        #: gathers them), so that all ranks skip the same snapshots when memory runs short
        self.memory_reports: list[MemoryReport] | None = None

    # --- scheduling --------------------------------------------------------------------------
    def observe_step_time(self, seconds: float) -> None:
        """Feed the measured step time (an EMA keeps the interval stable)."""
        if seconds > 0 and math.isfinite(seconds):
            self._step_seconds = seconds if self._step_seconds is None else (
                0.9 * self._step_seconds + 0.1 * seconds)

    def due(self, step: int) -> bool:
        """Whether a snapshot should be taken at ``step``.

        Never while ``keep - 1`` snapshots are still pending: replacing them would keep every
        pending snapshot younger than ``good_after`` forever, and none would become known good.
        """
        if sum(1 for s in self.snapshots if not s.good) >= self.keep - 1:
            return False
        return self._next_step is None or step >= self._next_step

    def adapt(self, took: float, step_seconds: float) -> None:
        """Set the interval from a snapshot's duration and the step time (see ``budget``)."""
        if took > 0 and step_seconds > 0 and math.isfinite(took + step_seconds):
            need = took / (self.budget * step_seconds)
            self.interval = int(min(self.max_interval, max(self.min_interval, math.ceil(need))))

    def _reschedule(self, step: int, took: float) -> None:
        if self._step_seconds and not self.deferred_schedule:
            need = took / (self.budget * self._step_seconds)
            self.interval = int(min(self.max_interval, max(self.min_interval, math.ceil(need))))
        self._next_step = step + self.interval

    # --- taking ------------------------------------------------------------------------------
    def take(self, step: int, data_position: int, model: torch.nn.Module,
             optimizer: torch.optim.Optimizer, scheduler: Any = None, scaler: Any = None,
             *, good: bool = False, extra: Mapping[str, Any] | None = None,
             pinned: bool = False) -> Snapshot | None:
        """Capture a snapshot now. Returns ``None`` (and reports) if it could not be written,
        or if a copy in memory would take more than half of the host's available memory
        (:func:`~lrwatch.actions.host_memory.copies_fit`; under ``torch.distributed``, decided
        on ``memory_reports``, the ranks' reports as of the last flush, so that every rank
        skips the same snapshots)."""
        t0 = time.perf_counter()
        if self.directory is None:
            fits, why = self._fits(model, optimizer)
            if not fits:
                self.failed += 1
                self._limit.warning(log, "memory", "lrwatch: snapshot at step %d skipped: %s; "
                                    "recovery={'snapshot_dir': DIR} keeps snapshots on disk "
                                    "(a rollback with no snapshot to go to stops the run)",
                                    step, why)
                if self.on_error is not None:
                    self.on_error()
                self._reschedule(step, 0.0)
                return None
        try:
            # In memory, CUDA tensors go to pinned host memory without a host sync; they are
            # waited for when the snapshot is first read. On disk the bytes are needed now.
            copier = HostCopy(asynchronous=self.directory is None)
            state = capture_state(model, optimizer, scheduler, scaler, copier)
            snap = Snapshot(step=step, data_position=data_position, state=state, seconds=0.0,
                            good=good, extra=dict(extra or {}), pinned=pinned,
                            copies=copier.finish() if copier.pending else None)
            if self.directory is not None:
                try:
                    self._write(snap)
                except OSError as exc:
                    self._fall_back_to_memory(snap, exc)
        except Exception as exc:  # cannot even capture: report, count, train on
            self.failed += 1
            self._limit.warning(log, "capture", "lrwatch: snapshot at step %d failed (%s); "
                                "training goes on", step, exc)
            if self.on_error is not None:
                self.on_error()
            self._reschedule(step, time.perf_counter() - t0)
            return None
        took = time.perf_counter() - t0
        snap.seconds = took
        self.seconds += took
        self.taken += 1
        self.snapshots.append(snap)
        self._trim()
        self._reschedule(step, took)
        return snap

    def _fits(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
              ) -> tuple[bool, str]:
        if not self.deferred_schedule:
            return copies_fit(model, optimizer, 1)
        if self.memory_reports is None:   # the ranks have not reported: nothing to agree on
            return True, ""
        return reports_fit(self.memory_reports, 1)

    def _fall_back_to_memory(self, snap: Snapshot, exc: OSError) -> None:
        """``directory`` cannot be written (read-only, full, gone): keep ``snap`` and every
        later snapshot in memory, so a rollback still has somewhere to go. Logged once (the
        store stops trying the directory) and reported to ``on_error``."""
        self.failed += 1
        self.fallbacks += 1
        where, self.directory = self.directory, None
        assert where is not None
        if snap.path:   # the data file was written, its metadata was not: the memory copy wins
            self._delete(snap)
        try:   # a half-written temporary file (a full disk) would only take more space
            (where / (self._filename(snap.step, snap.pinned) + ".tmp")).unlink(missing_ok=True)
        except OSError:
            pass
        snap.path = snap.checksum = None
        log.warning("lrwatch: cannot write snapshots to %s (%s); keeping them in memory from "
                    "step %d on, and training goes on", where, exc, snap.step)
        if self.on_error is not None:
            try:
                self.on_error()
            except Exception:  # pragma: no cover - a counter that fails must not stop us
                log.exception("lrwatch: snapshot on_error callback failed")

    def _write(self, snap: Snapshot) -> None:
        assert self.directory is not None and snap.state is not None
        snap.wait()
        final = self.directory / self._filename(snap.step, snap.pinned)
        state = snap.state
        if state.get("scheduler") is not None and not storable(state["scheduler"]):
            self._limit.warning(log, "scheduler", "lrwatch: the scheduler's state holds "
                                "objects a snapshot file cannot hold (torch.save, then "
                                "torch.load(weights_only=True)): it is kept in memory beside "
                                "each snapshot in %s", self.directory)
            snap.scheduler_state, state = state["scheduler"], {**state, "scheduler": None}
        snap.checksum = save_verified(state, final)
        snap.path = str(final)
        meta = {"step": snap.step, "data_position": snap.data_position,
                "sha256": snap.checksum, "file": final.name}
        (final.with_suffix(".json")).write_text(json.dumps(meta))
        snap.state = None  # the disk copy is the snapshot; keep memory free

    def _filename(self, step: int, pinned: bool = False) -> str:
        """``snapshot-<step>.pt``; under ``torch.distributed`` (a group of more than one
        process) ``snapshot-<step>.rank<r>.pt``, the global rank: the ranks of one machine,
        or of a shared filesystem, share ``directory``, and each must write, verify and delete
        its own files (the same name made the ranks overwrite each other's snapshots, or one
        rank's rename find the other's temporary file gone). The pinned start is
        ``snapshot-<step>.start-<8 hex>[.rank<r>].pt``, the hex this store's own: a resumed
        Watcher takes its start (step 0) before its checkpoint is loaded, and under the plain
        name it overwrote, then deleted (replaced by the resumed state), the start of the run
        it resumes, which the checkpoint names for a restart (``before_failure``)."""
        tag = self._start_tag if pinned else ""
        return f"snapshot-{step:010d}{tag}{self._rank_tag}.pt"

    def _trim(self) -> None:
        """Drop snapshots beyond ``keep`` (the pinned start never counts, nor is dropped).

        Known-good ones go first, oldest first, but never the two newest: when a rollback to
        the newest did not help, the one before it is the next target. A pending snapshot is
        never dropped to make room while :meth:`due` allows it (at most ``keep - 1`` are
        pending, plus ``pending_slack`` whose promotion may be in flight): dropping it before
        its ``good_after`` steps are judged would keep every snapshot pending forever when the
        interval is shorter than ``good_after``. So at most ``keep + 1`` snapshots are held
        besides the pinned start (``keep - 1`` pending and the two newest known-good ones;
        ``keep + 2`` while a failure is open, :attr:`keep_before`),
        and ``keep`` again as soon as a pending one is promoted; a snapshot taken out of
        schedule (the final one of a stopped run) may add one more pending."""
        while sum(1 for s in self.snapshots if not s.pinned) > self.keep:
            victim = self._victim()
            if victim is None:
                break
            self.snapshots.remove(victim)
            self._delete(victim)

    def _victim(self) -> Snapshot | None:
        """The snapshot :meth:`_trim` drops next, or ``None`` (see there). The newest
        known-good snapshot before :attr:`keep_before` is kept too (a failure whose ``for:``
        window outlasts the interval times ``keep`` would otherwise find every snapshot from
        before its onset trimmed: the rollback went back to the run's start)."""
        good = [s for s in self.snapshots if s.good and not s.pinned]
        held = None if self.keep_before is None else next(
            (s for s in reversed(good) if s.step < self.keep_before), None)
        extra = int(held is not None and held not in good[-2:])
        if len(good) > 2 + extra:
            return next(s for s in good if s is not held)
        pending = [s for s in self.snapshots if not s.good and not s.pinned]
        if len(pending) > max(self.keep - 1, 1) + self.pending_slack:
            return pending[0]   # more than due() allows (taken out of schedule)
        return None

    def drop_pinned(self, step: int) -> None:
        """Forget the pinned snapshot of ``step`` (the run's start, about to be retaken after
        the pre-flight learning-rate check changed its rate)."""
        for snap in [s for s in self.snapshots if s.pinned and s.step == step]:
            self.snapshots.remove(snap)
            self._delete(snap)

    def drop(self, steps: Iterable[int]) -> list[int]:
        """Forget the snapshots of ``steps`` (pinned or not; under ``torch.distributed``: ones
        another rank could not take, so no rank rolls back where another cannot); returns
        the steps dropped."""
        steps = set(steps)
        gone = [s for s in self.snapshots if s.step in steps]
        for snap in gone:
            self.snapshots.remove(snap)
            self._delete(snap)
        return [s.step for s in gone]

    def _delete(self, snap: Snapshot) -> None:
        if snap.path:
            for p in (Path(snap.path), Path(snap.path).with_suffix(".json")):
                try:
                    p.unlink()
                except OSError:
                    pass

    # --- health ------------------------------------------------------------------------------
    def promote(self, quiet_through: int) -> list[Snapshot]:
        """Mark pending snapshots good whose quiet window ended by step ``quiet_through``."""
        promoted = []
        for s in self.snapshots:
            if not s.good and s.step + self.good_after <= quiet_through:
                s.good = True
                promoted.append(s)
        if promoted:
            self._trim()   # a third known-good one: the oldest good one goes
        return promoted

    def discard_pending(self, after_step: int | None = None) -> int:
        """Forget pending snapshots (all, or those after ``after_step``): they may be unhealthy."""
        drop = [s for s in self.snapshots if not s.good and
                (after_step is None or s.step > after_step)]
        for s in drop:
            self.snapshots.remove(s)
            self._delete(s)
        return len(drop)

    def discard_after(self, step: int) -> int:
        """Forget every snapshot taken after ``step``, known good or not (never a pinned one):
        a rollback to ``step`` abandoned the trajectory they belong to."""
        drop = [s for s in self.snapshots if s.step > step and not s.pinned]
        for s in drop:
            self.snapshots.remove(s)
            self._delete(s)
        return len(drop)

    def latest_good(self) -> Snapshot | None:
        return next((s for s in reversed(self.snapshots) if s.good), None)

    def good_before(self, step: int) -> Snapshot | None:
        """The newest known-good snapshot taken before ``step``."""
        return next((s for s in reversed(self.snapshots) if s.good and s.step < step), None)

    def latest_before(self, step: int) -> Snapshot | None:
        """The newest snapshot (good or pending) taken before ``step``."""
        return next((s for s in reversed(self.snapshots) if s.step < step), None)

    def latest(self) -> Snapshot | None:
        return self.snapshots[-1] if self.snapshots else None
