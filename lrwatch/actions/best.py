"""The best evaluated state: a copy of the model at its best evaluation so far.

A ``stop`` action can put it back (``actions: [alert, {stop: {restore: best}}]``) when the
evaluation regresses while the training loss looks fine, and users can call
``Watcher.restore_best()`` after training. What is kept: the model's ``state_dict()`` (parameters
and buffers) and, beside it, the buffers it leaves out (``persistent=False``: a running
statistic kept for evaluation, a rotary table; :func:`model_state`, under keys that start with
:data:`LOOSE_PREFIX`, so a state file holds them too); a state kept before they were has none,
and restores as before (those buffers left as they are). Not the optimizer: the state is for stopping at or deploying the best model, not for
resuming training from it, and Adam's moments would triple the memory.

Cost, without a host–device sync on the step path:

- an evaluation logged as a Python number is judged at once; when it improves, the state is
  copied to the CPU (or written under ``directory``) right then;
- one logged as a tensor is judged at the next flush, from the flush's one transfer. Its state is
  cloned on the device at the evaluation step and stays *pending* until then. A second evaluation
  before the flush is merged into the same pending copy on the device (``torch.where`` on a
  device-side comparison), so at most one pending copy exists; the flush replays the same
  comparisons on the host values to know which step won.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from ..errors import ConfigError
from .host_copy import memory_key
from .loose_buffers import loose_buffers, restore_loose
from .snapshot import load_verified, save_verified

__all__ = ["BestEval", "BestState", "KEEP_BEST_MODES", "AUTO_METRICS", "LOOSE_PREFIX", "mode_for",
           "keep_best_state", "model_state"]

log = logging.getLogger("lrwatch")

#: Values of ``keep_best_mode``.
KEEP_BEST_MODES = ("auto", "max", "min")
#: What ``keep_best=True`` watches, in order of preference, with its mode.
AUTO_METRICS = (("eval_accuracy", "max"), ("eval_loss", "min"))
# Name parts that say which way is better (for a metric named in keep_best with mode "auto").
_MAX_WORDS = ("acc", "accuracy", "f1", "auc", "auroc", "precision", "recall", "bleu", "rouge",
              "iou", "dice", "map", "score", "top1", "top5")
_MIN_WORDS = ("loss", "error", "err", "perplexity", "ppl", "wer", "cer", "mse", "mae", "rmse",
              "nll")

StateFn = Callable[[], Mapping[str, Any]]

#: Where the kept state holds a ``persistent=False`` buffer: this prefix and the buffer's name
#: in the model (no ``state_dict()`` key starts with it: module and buffer names have no ``<``).
LOOSE_PREFIX = "<lrwatch persistent=False buffer>."


def model_state(model: torch.nn.Module) -> Mapping[str, Any]:
    """What the best state keeps of ``model`` (live tensors, not copies): its ``state_dict()``
    and its ``persistent=False`` buffers under :data:`LOOSE_PREFIX` (the state dict itself,
    ``_metadata`` included, when it has none)."""
    state = model.state_dict()
    loose = loose_buffers(model)
    if not loose:
        return state
    out = _with_metadata(state, dict(state))
    out.update((LOOSE_PREFIX + name, t) for name, t in loose.items())
    return out


def _load_model_state(model: torch.nn.Module, state: Mapping[str, Any]) -> None:
    """Put a kept state back into ``model``: the state dict, then the ``persistent=False``
    buffers (:func:`~lrwatch.actions.loose_buffers.restore_loose`; none in a state kept
    before they were, or with a ``state_fn`` other than :func:`model_state`)."""
    n = len(LOOSE_PREFIX)
    loose = {k[n:]: v for k, v in state.items() if k.startswith(LOOSE_PREFIX)}
    if loose:
        state = _with_metadata(state, {k: v for k, v in state.items()
                                       if not k.startswith(LOOSE_PREFIX)})
    model.load_state_dict(state)
    restore_loose(model, loose)


def mode_for(metric: str) -> str | None:
    """``"max"`` or ``"min"`` from a metric's name, ``None`` when the name does not say.

    >>> [mode_for(m) for m in ("eval_accuracy", "eval_loss", "val_f1", "eval_bleu_x", "eval_z")]
    ['max', 'min', 'max', 'max', None]
    """
    words = set(re.split(r"[^a-z0-9]+", metric.lower()))
    is_max, is_min = bool(words & set(_MAX_WORDS)), bool(words & set(_MIN_WORDS))
    return "max" if is_max and not is_min else "min" if is_min and not is_max else None


@dataclass(frozen=True)
class BestEval:
    """The best evaluation so far: its step, metric and value, and where its state is kept
    (``"memory"``, or the path of the file under ``snapshot_dir``)."""

    step: int
    metric: str
    value: float
    where: str

    def describe(self) -> str:
        return f"the best evaluated state of step {self.step} ({self.metric}={self.value:.4g})"


class BestState:
    """Keeps the model state at the best value of one evaluation metric.

    Parameters
    ----------
    metric:
        The metric to watch, or ``None`` for the first of :data:`AUTO_METRICS` that is logged.
    mode:
        ``"max"``, ``"min"`` or ``"auto"`` (from the metric's name; see :func:`mode_for`).
    directory:
        Keep the state in ``directory / filename`` (atomic write, sha256, ``weights_only`` load)
        instead of in CPU memory. If a write fails with ``OSError`` (read-only, full, gone),
        that state and every later one are kept in memory (``directory`` becomes ``None``),
        said once, as the snapshots do.
    on_error:
        Called (no arguments) when the state cannot be copied or written (fail open: the
        previous best stays), and once when the directory cannot be written.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Linear(2, 1)
    >>> best = BestState("eval_loss")
    >>> best.offer(10, 0.5, model.state_dict)          # a number: judged at once
    >>> with torch.no_grad():
    ...     _ = model.weight.add_(1.0)
    >>> best.offer(20, 0.7, model.state_dict)          # worse: nothing copied
    >>> best.offer(30, torch.tensor(0.4), model.state_dict)   # a tensor: pending until a flush
    >>> best.record.step, best.pending
    (10, True)
    >>> best.decide_at_flush([float(v) for v in best.pending_values()]).step
    30
    """

    def __init__(self, metric: str | None = None, mode: str = "auto", *,
                 directory: str | Path | None = None, filename: str = "best-eval.pt",
                 on_error: Callable[[], None] | None = None) -> None:
        if mode not in KEEP_BEST_MODES:
            raise ConfigError(f"keep_best_mode must be one of {list(KEEP_BEST_MODES)}, "
                              f"got {mode!r}")
        if metric is None and mode != "auto":
            raise ConfigError(f"keep_best_mode={mode!r} needs a metric name in keep_best "
                              f"(keep_best=True picks the metric and its mode itself: "
                              f"{', '.join(f'{m} {d}' for m, d in AUTO_METRICS)})")
        if metric is not None and mode == "auto":
            mode = mode_for(metric) or ""
            if not mode:
                raise ConfigError(f"cannot tell from its name whether a higher {metric} is "
                                  f"better; pass keep_best_mode='max' or 'min' "
                                  f"(valid choices: {list(KEEP_BEST_MODES)})")
        self.metric = metric
        self.mode = mode or None  # None until an auto metric is picked
        self.directory = Path(directory) if directory is not None else None
        self.filename = filename
        self.on_error = on_error
        self.copies = 0  # states copied to the host or disk (improvements)
        self._record: BestEval | None = None
        self._checksum: str | None = None
        self._state: dict[str, Any] | None = None  # CPU copy (in memory)
        self._pending: dict[str, Any] | None = None  # device clone awaiting the flush
        self._pending_value: torch.Tensor | None = None
        self._candidates: list[tuple[int, torch.Tensor]] = []

    # --- read-only state ---------------------------------------------------------------------
    @property
    def record(self) -> BestEval | None:
        """The best evaluation decided so far (pending ones not included)."""
        return self._record

    @property
    def pending(self) -> bool:
        """Whether a tensor evaluation waits for the flush."""
        return bool(self._candidates)

    # --- feeding -----------------------------------------------------------------------------
    def metric_for(self, names: Iterable[str]) -> str | None:
        """The watched metric if it is among ``names`` (an auto metric is fixed on first sight)."""
        names = set(names)
        if self.metric is not None:
            return self.metric if self.metric in names else None
        for metric, mode in AUTO_METRICS:
            if metric in names:
                self.metric, self.mode = metric, mode
                return metric
        return None

    def offer(self, step: int, value: torch.Tensor | float, state_fn: StateFn) -> None:
        """An evaluation of the current model: ``value`` of the watched metric at ``step``.

        ``state_fn()`` returns the live state (:func:`model_state`, or ``model.state_dict``
        without the ``persistent=False`` buffers); it is copied only when
        the value improves (a number) or, for a tensor, cloned on the device without a sync.
        """
        if isinstance(value, torch.Tensor) or self._candidates:
            self._add_candidate(step, value, state_fn)
        elif self._better(float(value), self._best_value()):
            self._commit(step, float(value), _host_copy(state_fn(), owned=False))

    def pending_values(self) -> list[torch.Tensor]:
        """The device values of the pending evaluations, for the flush's one transfer."""
        return [v for _, v in self._candidates]

    def decide_at_flush(self, host_values: Sequence[float]) -> BestEval | None:
        """Judge the pending evaluations from their host values (in :meth:`pending_values`
        order); returns the new best, or ``None`` when none improved."""
        cands, state = self._candidates, self._pending
        self._candidates, self._pending, self._pending_value = [], None, None
        if not cands or state is None:
            return None
        # Replay the device-side merge on the host: the same float32 values, the same order
        # and tie rule, so the winner is the one whose state the pending copy holds.
        win = 0
        for i in range(1, len(cands)):
            if self._better(host_values[i], host_values[win]):
                win = i
        value = float(host_values[win])
        if not self._better(value, self._best_value()):
            return None
        return self._commit(cands[win][0], value, _host_copy(state, owned=True))

    def discard_pending(self) -> None:
        self._candidates, self._pending, self._pending_value = [], None, None

    # --- using it ----------------------------------------------------------------------------
    def load(self) -> dict[str, Any] | None:
        """The kept state (CPU tensors), or ``None``; from disk it is checksum-verified."""
        if self._record is None:
            return None
        if self._state is not None:
            return self._state
        return load_verified(self._record.where, self._checksum)

    def restore(self, model: torch.nn.Module,
                load: Callable[[], dict[str, Any] | None] | None = None) -> BestEval | None:
        """Load the best state into ``model`` in place; ``None`` (nothing done) if none is kept.
        ``load``: what reads the state instead of :meth:`load` (one that agrees with the
        other ranks before anything is put in)."""
        state = (load or self.load)()
        if state is None:
            return None
        with torch.no_grad():
            _load_model_state(model, state)
        return self._record

    def state_dict(self) -> dict[str, Any]:
        """Bookkeeping only (JSON-serialisable); the tensors stay in memory or on disk."""
        rec = self._record
        return {"metric": self.metric, "mode": self.mode,
                "best": None if rec is None else {"step": rec.step, "metric": rec.metric,
                                                  "value": rec.value, "where": rec.where,
                                                  "sha256": self._checksum}}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        """Resume: the metric and mode carry over; the best carries over only when its state is
        in a file that still exists (a state kept in memory died with the process, and comparing
        against a value whose state is gone would keep nothing until it is beaten).

        Under torch.distributed each rank keeps its own file (``best-eval.rank<r>.pt``); a
        checkpoint that names another rank's (rank 0 wrote it, every rank loads it) resumes
        from this rank's own file, as its own ``.json`` beside it describes it."""
        if d.get("metric") is not None and (self.metric is None or self.metric == d["metric"]):
            self.metric, self.mode = d["metric"], d.get("mode") or self.mode
        best = d.get("best")
        if not best or best.get("metric") != self.metric:
            return
        rec = BestEval(int(best["step"]), str(best["metric"]), float(best["value"]),
                       str(best["where"]))
        checksum = best.get("sha256")
        if rec.where != "memory" and Path(rec.where).name != self.filename:
            own, checksum = self._own_record(Path(rec.where).with_name(self.filename), rec)
            if own is None:
                log.info("lrwatch: the resumed best evaluated state is another rank's (%s) "
                         "and this rank kept no %s of its own; it is tracked afresh",
                         Path(rec.where).name, self.filename)
                return
            rec = own
        if rec.where != "memory" and Path(rec.where).is_file():
            self._record, self._checksum, self._state = rec, checksum, None
        else:
            log.info("lrwatch: %s was kept in memory and is gone after the resume; the best "
                     "evaluated state is tracked afresh", rec.describe())

    # --- internals ---------------------------------------------------------------------------
    def _own_record(self, path: Path, theirs: BestEval) -> tuple[BestEval | None, str | None]:
        """This rank's own state at ``path``, from the ``.json`` written beside it (its step,
        value and checksum), where ``theirs`` is another rank's; ``None`` without one."""
        try:
            meta = json.loads(path.with_suffix(".json").read_text())
            if meta.get("metric") != theirs.metric or meta.get("file") != path.name:
                return None, None
            return (BestEval(int(meta["step"]), theirs.metric, float(meta["value"]), str(path)),
                    meta.get("sha256"))
        except (OSError, ValueError, KeyError, TypeError):
            return None, None

    def _best_value(self) -> float | None:
        return self._record.value if self._record is not None else None

    def _better(self, new: float, old: float | None) -> bool:
        """Strictly better (a tie keeps the earlier state); NaN is never better."""
        if new != new:
            return False
        if old is None or old != old:
            return True
        return new > old if self.mode == "max" else new < old

    def _better_t(self, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """:meth:`_better` on the device (a bool tensor, no sync)."""
        cmp = new > old if self.mode == "max" else new < old
        return ~new.isnan() & (old.isnan() | cmp)

    def _add_candidate(self, step: int, value: torch.Tensor | float,
                       state_fn: StateFn) -> None:
        live = state_fn()
        with torch.no_grad():
            if self._pending is None:
                self._pending = _with_metadata(live, _copies(live, _clone))
                dev = _device_of(self._pending)
                v = _as_device_value(value, dev)
                self._pending_value = v
            else:
                assert self._pending_value is not None
                v = _as_device_value(value, self._pending_value.device)
                better = self._better_t(v, self._pending_value)
                on: dict[torch.device, torch.Tensor] = {}
                for k, t in self._pending.items():
                    src = live.get(k)
                    if not isinstance(t, torch.Tensor) or not isinstance(src, torch.Tensor) \
                            or (k.startswith(LOOSE_PREFIX) and src.shape != t.shape):
                        continue  # non-tensor extra state, or a persistent=False cache that
                        # grew since: kept from the first pending one (choosing needs a sync)
                    c = on.get(t.device)
                    if c is None:
                        c = on[t.device] = better.to(t.device, non_blocking=True)
                    t.copy_(torch.where(c, src.detach(), t))
                self._pending_value = torch.where(better, v, self._pending_value)
        self._candidates.append((step, v))

    def _commit(self, step: int, value: float, state: dict[str, Any]) -> BestEval | None:
        assert self.metric is not None
        checksum = None
        try:
            if self.directory is not None:
                checksum = self._write(step, value, state)
        except OSError as exc:   # read-only, full, gone: this state and later ones in memory
            self._fall_back_to_memory(step, exc)
        except Exception as exc:  # it cannot be written at all: keep the previous best, train on
            log.warning("lrwatch: keeping the evaluated state of step %d failed (%s); the "
                        "previous best stays", step, exc)
            if self.on_error is not None:
                self.on_error()
            return None
        where = str(self.directory / self.filename) if self.directory is not None else "memory"
        self._record = BestEval(step, self.metric, value, where)
        self._checksum = checksum
        self._state = state if self.directory is None else None
        self.copies += 1
        return self._record

    def _write(self, step: int, value: float, state: dict[str, Any]) -> str:
        """Write ``state`` and its ``.json`` under ``directory``; the sha256."""
        assert self.directory is not None and self.metric is not None
        path = self.directory / self.filename
        checksum = save_verified(state, path)
        meta = {"step": step, "metric": self.metric, "value": value, "sha256": checksum,
                "file": path.name}
        path.with_suffix(".json").write_text(json.dumps(meta))
        return checksum

    def _fall_back_to_memory(self, step: int, exc: OSError) -> None:
        """``directory`` cannot be written (read-only, full, gone): keep this best state and
        every later one in memory, as the snapshots do (said once, reported to
        ``on_error``). A file the failed write left (a temporary one, or a state whose
        ``.json`` could not follow) is removed: it describes no best the run keeps."""
        where, self.directory = self.directory, None
        assert where is not None
        path = where / self.filename
        for stale in (path.with_suffix(path.suffix + ".tmp"), path, path.with_suffix(".json")):
            try:
                stale.unlink(missing_ok=True)
            except OSError:
                pass
        log.warning("lrwatch: cannot write the best evaluated state to %s (%s); keeping it in "
                    "memory from step %d on, and training goes on", where, exc, step)
        if self.on_error is not None:
            self.on_error()


def keep_best_state(keep_best: bool | str, mode: str, rules: Sequence[Any], *,
                    snapshot_dir: str | None, filename: str,
                    on_error: Callable[[], None] | None = None) -> BestState | None:
    """The best evaluated state a Watcher keeps for ``keep_best``/``keep_best_mode``, or None.

    ``True`` watches ``eval_accuracy`` if it is logged, else ``eval_loss``; a metric name
    watches that metric; ``False`` keeps nothing, which rules that stop with
    ``restore: best`` cannot do without (a :class:`ConfigError` names them).
    """
    best = None
    if keep_best is not False:
        best = BestState(None if keep_best is True else str(keep_best), mode,
                         directory=snapshot_dir, filename=filename, on_error=on_error)
    elif mode not in KEEP_BEST_MODES:
        raise ConfigError(f"keep_best_mode must be one of {list(KEEP_BEST_MODES)}, "
                          f"got {mode!r}")
    wants = [r.name for r in rules if r.action_params.get("stop", {}).get("restore") == "best"]
    if wants and best is None:
        raise ConfigError(f"rule(s) {wants} stop with restore: best, which needs the best "
                          f"evaluated state: pass keep_best=True or a metric name, not False")
    return best


def _clone(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    return copy.deepcopy(v)


def _device_of(state: Mapping[str, Any]) -> torch.device:
    return next((v.device for v in state.values() if isinstance(v, torch.Tensor)),
                torch.device("cpu"))


def _as_device_value(value: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """A float32 scalar on ``device``: what the flush transfers and the host compares."""
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(()).to(device=device, dtype=torch.float32,
                                             non_blocking=True)
    # A fill kernel, not a host-to-device copy of a host tensor (which can block).
    return torch.full((), float(value), dtype=torch.float32, device=device)


def _copies(state: Mapping[str, Any], make: Callable[[Any], Any]) -> dict[str, Any]:
    """``{k: make(v)}``, but entries that are the same tensor (tied weights, by
    :func:`~lrwatch.actions.host_copy.memory_key`) get one copy between them, shared as in
    ``state``: the best state holds a tied matrix once, on the device and on the host."""
    out: dict[str, Any] = {}
    made: dict[Any, Any] = {}
    for k, v in state.items():
        key = memory_key(v) if isinstance(v, torch.Tensor) else None
        if key is None:
            out[k] = make(v)
        else:
            out[k] = made[key] if key in made else made.setdefault(key, make(v))
    return out


def _host_copy(state: Mapping[str, Any], *, owned: bool) -> dict[str, Any]:
    """``state`` on the CPU; ``owned`` tensors (our own clones) already there are not copied."""
    def host(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            v = v.detach()
            return v if owned and v.device.type == "cpu" else v.to("cpu", copy=True)
        return v if owned else copy.deepcopy(v)
    return _with_metadata(state, _copies(state, host))


def _with_metadata(src: Mapping[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    """Carry ``state_dict()``'s ``_metadata`` (module versions ``load_state_dict`` reads)."""
    meta = getattr(src, "_metadata", None)
    if meta is not None:
        from collections import OrderedDict

        out = OrderedDict(out)
        out._metadata = copy.deepcopy(meta)  # type: ignore[attr-defined]
    return out
