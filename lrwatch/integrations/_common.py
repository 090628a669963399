"""Pieces both framework adapters share (no framework imported here)."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import numbers
from typing import Any, Callable, Iterator, Mapping

import torch

from ..distributed import EXPORT_CHOICES, EXPORT_KEYS
from ..errors import ConfigError
from ..watch import rank_trace_path

__all__ = ["SkipSampler", "wrap_dataloader", "skip_sampler_of", "export_kwargs", "eval_name", "scalar",
           "EXPORT_CHOICES", "reapply_best", "check_lr_find", "lr_find_args", "LR_FIND_KEYS",
           "start_at_suggestion", "with_clip"]


class SkipSampler:
    """Wraps a ``BatchSampler``'s index sampler and drops whole batches on request.

    ``take()`` is asked once per batch drawn (``Watcher.skip_batch``); when it says ``True`` the
    batch's indices are dropped, so the framework never sees that batch: its step counters, the
    scheduler and the loss all stay untouched. The epoch simply ends that many batches early;
    with ``refill`` (the Hugging Face Trainer, which plans its epochs on their full length) it
    is topped up to its full length from the next epoch's order instead (:meth:`_chunks`).
    """

    def __init__(self, sampler: Any, batch_size: int, take: Callable[[], bool],
                 group: int = 1, never_empty: bool = False, refill: bool = False) -> None:
        self.sampler = sampler
        #: a pass yields its full length: the batches dropped are replaced by the first
        #: ones of the next epoch's order (:meth:`_stream`); the epoch last set
        self.refill = refill
        self._epoch = 0
        #: the current pass: the batches yielded, and for each batch dropped the number
        #: yielded before it (what a checkpoint carries: :meth:`pass_state`)
        self.yielded = 0
        self.drops: list[int] = []
        #: batches dropped in the passes before the current one (resumes included)
        self.earlier = 0
        self.done = False   # the current pass has run out
        #: added to the epoch the framework sets (a resumed Hugging Face Trainer counts
        #: fewer epochs than ran where skips shortened them: the order stays the run's)
        self.epoch_shift = 0
        self._replay: tuple[int, list[int], int] | None = None
        #: orders of the next passes a refill drew ahead of them (a sampler whose order is
        #: not a function of ``set_epoch``: a random one on a generator draws a new one at
        #: each pass), each taken by its pass
        self._early: list[list[Any]] = []
        self._pad = 0   # a pass of that many copies of a first batch comes first
        self.batch_size = int(batch_size)
        self.take = take
        # the Hugging Face Trainer reads a pass that yields no batch as the end of the data
        # and stops training: a skip window longer than a pass leaves it its last batch
        self.never_empty = never_empty
        # Under a sharding wrapper that deals whole batches round-robin to ``group`` processes,
        # one batch *per process* is ``group`` batches here: take() is asked once per group and
        # drops the whole group, so every rank drops the same per-rank batches.
        self.group = max(1, int(group))

    def __iter__(self) -> Iterator[Any]:
        size = self.batch_size * self.group
        if self._pad:   # (not counted: a resumed framework fast-forwards past them)
            pad, self._pad = self._pad, 0
            first = list(itertools.islice(iter(self.sampler), size))
            for _ in range(pad if first else 0):
                yield from first
            return
        replay, self._replay = self._replay, None
        self.earlier += len(self.drops)
        self.yielded, self.drops = (replay[0], list(replay[1])) if replay else (0, [])
        left, ys = (list(replay[1]), 0) if replay else ([], self.yielded)
        hide, self.done = (replay[2] if replay else 0), False
        # refill: the pass ends at its full length, a short last batch (``tail``) last, and
        # the next batch is drawn only once this one is decided (the next epoch's order is
        # drawn only where the pass needs it: a sampler without set_epoch is not moved on)
        full = -(-len(self.sampler) // size) if self.refill else None
        # (a replayed pass draws its own order: the ones drawn early are its refill's)
        chunks, tail = self._chunks(size, own_early=replay is None), None
        chunk, yielded = next(chunks, []), False
        while chunk:
            following = next(chunks, []) if full is None else [0]   # (indices only: cheap)
            if left and left[0] == ys:   # resumed: dropped before the checkpoint
                left.pop(0)
            elif ys < self.yielded:   # resumed: yielded before it (the framework skips them,
                ys += 1               # but for the first ``hide``, which it counts as none)
                if ys > hide:
                    yielded = True
                    yield from chunk
            # never_empty: the pass's last batch, none yielded yet, is kept (not counted
            # by take(): the skip window goes on in the next pass)
            elif (self.never_empty and not yielded and not following) or not self.take():
                yielded = True
                ys = self.yielded = self.yielded + 1
                yield from chunk
            else:
                self.drops.append(self.yielded)
            if full is None:
                chunk = following
            elif ys >= full:
                chunk = []
            elif tail is not None and ys + 1 == full:
                chunk, tail = tail, None
            else:
                chunk = next(chunks, [])
                if 0 < len(chunk) < size and ys + 1 < full:   # its own short last batch:
                    tail, chunk = chunk, next(chunks, [])      # kept for the end
        self.done = True

    def _chunks(self, size: int, own_early: bool = True) -> Iterator[list[Any]]:
        """A pass's batches of indices: its epoch's order, and with ``refill`` the full
        batches of the next epochs' orders after it (the wrapped sampler's ``set_epoch``
        moved on; the framework sets it again for its next epoch), as far as the pass takes
        them. A framework that plans its epochs on their full length before it starts (the
        Hugging Face Trainer, whose ``max_steps`` is a number of such epochs) then reaches
        the steps it planned; the batches a pass tops up with are trained again in the next
        epoch, at their place in its order. A sampler without ``set_epoch`` draws a new order
        at each pass: the order drawn for the refill is kept for the next pass (before the
        seventeenth round that pass drew another, so the batches topped up with were from
        an order never trained, and every later epoch's order was one draw further on).
        ``own_early=False``: a pass a checkpoint's resume replays, which draws its own order
        from the sampler; the orders drawn early that came with the checkpoint are its
        refill's."""
        # an order a refill drew ahead of its pass (a sampler without set_epoch): its pass
        # takes it, so the batches topped up with come again at their place
        it = iter(self._early.pop(0)) if self._early and own_early else iter(self.sampler)
        while chunk := list(itertools.islice(it, size)):
            yield chunk
        set_epoch = getattr(self.sampler, "set_epoch", None)
        for k in range(1, 1001 if self.refill else 1):
            if set_epoch is not None:
                set_epoch(self._epoch + k)
                it = iter(self.sampler)
            else:   # each pass over it draws a new order: the next pass's, drawn early
                if len(self._early) < k:
                    self._early.append(list(self.sampler))
                it = iter(self._early[k - 1])
            got = False
            while len(chunk := list(itertools.islice(it, size))) == size:
                got = True
                yield chunk
            if not got:
                return

    def pass_state(self) -> dict[str, Any]:
        """What a checkpoint carries of the current pass: the batches it yielded, the
        batches it dropped (each as the number yielded before it), and the batches dropped
        in the passes before it; and the orders a refill drew ahead of the next passes
        (``early``; a sampler without ``set_epoch``), where there are any and they are
        indices: a run resumed before those passes trains them as the run does."""
        state: dict[str, Any] = {"yielded": self.yielded, "drops": list(self.drops),
                                 "earlier": self.earlier, "done": self.done}
        early = [[int(i) for i in order] for order in self._early
                 if all(isinstance(i, numbers.Integral) for i in order)]
        if early and len(early) == len(self._early):
            state["early"] = early
        return state

    def resume(self, state: Mapping[str, Any], hide: int = 0, pad: int = 0) -> None:
        """Continue the pass :meth:`pass_state` describes: the next pass is that one again,
        its batches yielded and dropped as they were (not counted again: the checkpoint's
        ``data_position`` and skip window have them), and the framework, which fast-forwards
        past the batches it trained on, lands where the checkpoint was. The pass's order must
        be the same (the Hugging Face Trainer's resume restores the sampler's epoch and
        seed). ``hide``: the first that many batches it yielded are passed by too (the
        framework's fast-forward falls that many short: batches dropped in an earlier pass
        moved the pass's start). ``pad``: a pass of that many copies of a first batch comes
        before it, for a framework that fast-forwards further into an epoch than the
        checkpoint's pass had got (it drops them, and its epoch ends there). The orders a
        refill had drawn ahead (``early``) are taken by the passes after it, as in the run."""
        self.earlier = int(state.get("earlier", 0))
        yielded, drops = int(state.get("yielded", 0)), [int(x) for x in state.get("drops", ())]
        self._replay = (yielded, drops, int(hide)) if yielded or drops else None
        self._pad = int(pad)
        self.yielded, self.drops = 0, []
        # the orders the run's refill drew ahead (not in a checkpoint before the seventeenth
        # round's audit: the resumed run drew those passes' orders afresh)
        self._early = [list(order) for order in state.get("early", ())]

    def set_epoch(self, epoch: int) -> None:
        """The wrapped sampler's ``set_epoch``, ``epoch_shift`` added (a no-op without one)."""
        self._epoch = epoch + self.epoch_shift
        inner = getattr(self.sampler, "set_epoch", None)
        if inner is not None:
            inner(epoch + self.epoch_shift)

    def __len__(self) -> int:
        return len(self.sampler)

    def __getattr__(self, name: str) -> Any:  # set_epoch, generator, ... of the wrapped sampler
        if name == "sampler":
            raise AttributeError(name)
        return getattr(self.sampler, name)


def skip_sampler_of(loader: Any) -> SkipSampler | None:
    """The :class:`SkipSampler` :func:`wrap_dataloader` put under ``loader``, or ``None``."""
    bs = getattr(loader, "batch_sampler", None)
    for _ in range(4):
        inner = getattr(bs, "batch_sampler", None)
        if inner is None:
            break
        bs = inner
    found = getattr(bs, "sampler", None)
    return found if isinstance(found, SkipSampler) else None


def wrap_dataloader(loader: Any, take: Callable[[], bool], never_empty: bool = False,
                    refill: bool = False) -> bool:
    """Put a :class:`SkipSampler` under ``loader``'s batch sampler, in place.

    Follows wrappers that keep the real batch sampler in ``.batch_sampler`` down to the innermost
    one (accelerate's ``BatchSamplerShard`` is itself a ``BatchSampler`` subclass, but iterates
    the global batch sampler it wraps, dealing its batches round-robin to ``num_processes``
    ranks: then one ``take()`` covers that many global batches, one per rank). Returns ``False``
    when there is no ``torch`` ``BatchSampler`` to wrap (iterable datasets, custom batch
    samplers): then a rollback cannot skip extra batches. ``never_empty``: a pass the skip
    window would leave without a batch keeps its last one (:class:`SkipSampler`).
    """
    bs = getattr(loader, "batch_sampler", None)
    group = 1
    for _ in range(4):
        inner = getattr(bs, "batch_sampler", None)
        if inner is None:
            break
        if not getattr(bs, "split_batches", False):  # split: one global batch is one step
            group *= max(1, int(getattr(bs, "num_processes", 1) or 1))
        bs = inner
    if not isinstance(bs, torch.utils.data.BatchSampler) or bs.batch_size is None:
        return False
    if not isinstance(bs.sampler, SkipSampler):
        bs.sampler = SkipSampler(bs.sampler, bs.batch_size, take, group, never_empty, refill)
    else:
        bs.sampler.take, bs.sampler.group = take, max(1, group)
        bs.sampler.never_empty, bs.sampler.refill = never_empty, refill
    return True


def export_kwargs(kwargs: Mapping[str, Any], rank: int, export: str) -> dict[str, Any]:
    """Watcher arguments for this rank: exporters on rank zero only, or on every rank.

    With ``torch.distributed`` initialised the Watcher decides itself (its ``export``
    argument). Otherwise the framework's ``rank`` decides here: ``rank0`` drops the exporters on
    other ranks; ``all`` gives each rank a trace with ``.rank{N}`` before the suffix (the
    Watcher's own name, :func:`~lrwatch.watch.rank_trace_path`) and serves
    ``port + rank`` (port 0 stays 0: each picks a free port).
    """
    out = dict(kwargs)
    out["export"] = export
    dist = torch.distributed
    if rank == 0 or (dist.is_available() and dist.is_initialized()):
        return out
    if export == "rank0":
        for key in EXPORT_KEYS:
            out.pop(key, None)
        return out
    if out.get("trace") is not None:
        out["trace"] = rank_trace_path(out["trace"], rank)
    if isinstance(out.get("port"), int) and out["port"] > 0:
        out["port"] = out["port"] + rank
    return out


def check_export(export: str) -> str:
    if export not in EXPORT_CHOICES:
        raise ConfigError(f"export must be one of {list(EXPORT_CHOICES)}, got {export!r}")
    return export


_SKIP_EVAL = ("runtime", "samples_per_second", "steps_per_second", "epoch")


def eval_name(key: str, prefixes: tuple[str, ...]) -> str | None:
    """The lrwatch name of a framework evaluation result, or ``None`` when it is not one.

    ``val_loss``/``val/loss``/``eval_loss`` -> ``eval_loss``; ``val_acc`` -> ``eval_accuracy``.
    """
    for p in prefixes:
        if key.startswith(p) and len(key) > len(p):
            rest = key[len(p):].lstrip("_/")
            if not rest or rest in _SKIP_EVAL:
                return None
            if rest in ("acc", "accuracy"):
                rest = "accuracy"
            return "eval_" + rest.replace("/", "_")
    return None


def scalar(value: Any) -> torch.Tensor | float | None:
    """A number or a one-element tensor as the Watcher takes it (no host sync), else ``None``."""
    if isinstance(value, torch.Tensor):
        return value.detach() if value.numel() == 1 else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def reapply_best(watcher: Any) -> None:
    """Put the best evaluated state back after the step a framework runs past a stop.

    Both frameworks finish the step in progress after the stop flag is set at the boundary, so
    a ``{stop: {restore: best}}`` restore is undone by one more optimizer step; call this after
    that step (before the framework saves or evaluates).
    """
    if watcher is not None and watcher.best is not None and watcher._stop_restored is not None:
        watcher.best.restore(watcher.model)
        watcher._stop_restored = None


def stop_snapshot(watcher: Any) -> Any:
    """The snapshot a stop took of the state it left the run in (the last known-good state,
    the best evaluated one, or the state at the stop), or ``None``: kept at the boundary
    where the stop happened, for :func:`undo_step_after_stop`."""
    store = getattr(watcher, "store", None) if watcher is not None else None
    snap = store.latest() if store is not None else None
    return snap if snap is not None and snap.step == watcher.step else None


def undo_step_after_stop(watcher: Any, snapshot: Any) -> None:
    """Put the state a stop left the run in back after the step a framework runs past it
    (the HF Trainer honours a stop only after the step in progress, which trained on top of
    it): the stop's final ``snapshot`` (model, optimizer, scheduler, scaler); without one, the
    best evaluated state when the stop restored it (:func:`reapply_best`)."""
    if watcher is None or snapshot is None:
        reapply_best(watcher)
        return
    from ..actions.snapshot import restore_state

    try:
        restore_state(snapshot.load(), watcher.model, watcher.optimizer, watcher.scheduler,
                      watcher.scaler)
        watcher._stop_restored = None
    except Exception:   # fail open, as the Watcher does
        watcher._internal_error("putting the stop's state back after the framework's step")


def log_completed_step(callback: Any, *, start_check: bool = True) -> bool:
    """Hand the completed step (and the evaluation that followed it) to the Watcher.

    ``callback`` has ``watcher``, ``_done`` (the step's metrics, or ``None``) and ``_eval``.
    Called at the framework's iteration boundary, where the Watcher flushes when due and carries
    out rollback, skip, reduce_lr or stop, and runs the start check when it is due (on the
    batches the adapter handed to ``start_check_batch``; not with ``start_check=False``, at the
    end of training). Returns whether the run must stop.
    """
    w = callback.watcher
    if w is None:
        return False
    if callback._done is not None:
        metrics = {**callback._done, **callback._eval}
        callback._done, callback._eval = None, {}
        w.log(**metrics)
    if start_check:   # not once the framework has finished (its checkpoints are written)
        w.start_check_boundary()
    return bool(w.should_stop)


def note_pending(callback: Any) -> None:
    """Before the Watcher's ``state_dict`` for a framework checkpoint: the completed step's
    values (its loss) and the evaluation after it wait in ``callback`` for the next boundary;
    they go into the step's row (``Watcher.note_unlogged``), so the checkpoint carries them."""
    w = callback.watcher
    if w is not None and callback._done is not None:
        w.note_unlogged(**{**callback._done, **callback._eval})


#: The ``lrwatch.lr_find`` arguments a callback's ``lr_find={...}`` may set (the rest it passes).
LR_FIND_KEYS = ("min_lr", "max_lr", "num_steps", "rule", "fraction", "beta", "diverge",
                "process_group")


def check_lr_find(lr_find: Any) -> Any:
    """The callbacks' ``lr_find`` argument: ``True``/``False`` or a dict of ``lr_find`` args."""
    if not isinstance(lr_find, (bool, Mapping)):
        raise ConfigError(f"lr_find must be True/False or a dict of lrwatch.lr_find "
                          f"arguments, got {type(lr_find).__name__}")
    if isinstance(lr_find, Mapping):   # now, not when the fit has started
        bad = sorted(str(k) for k in lr_find if k not in LR_FIND_KEYS)
        if bad:
            raise ConfigError(f"unknown lr_find argument(s) {bad}; valid: "
                              f"{', '.join(LR_FIND_KEYS)} (the callback passes the model, "
                              f"optimizer, data, loss, scheduler and scaler itself)")
    return lr_find


def lr_find_args(lr_find: Any) -> dict[str, Any]:
    return dict(lr_find) if isinstance(lr_find, Mapping) else {}


@contextlib.contextmanager
def rng_kept() -> Iterator[None]:
    """Every random generator a data pipeline may draw from -- torch's (CPU, and CUDA when it
    is initialised), Python's ``random`` and numpy's global one -- as it was afterwards:
    lrwatch's own passes over the data (the untrained loss) must not move the run's masking,
    augmentation or order."""
    import random

    py = random.getstate()
    try:
        import numpy as np
        npst: Any = np.random.get_state()
    except Exception:   # numpy missing or odd: nothing to keep
        np, npst = None, None   # type: ignore[assignment]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and \
        torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py)
        if np is not None and npst is not None:
            np.random.set_state(npst)


def start_at_suggestion(curve: Any, optimizer: Any, scheduler: Any) -> None:
    """Scale every rate the optimizer and scheduler hold so that group 0 starts at the range
    test's suggestion (the schedule keeps its shape), and say so; without a suggestion the
    configured rate stays (a warning says why)."""
    from ..actions.rollback import scale_learning_rate

    log = logging.getLogger("lrwatch")
    if curve.suggestion is None:
        log.warning("lrwatch: lr_find: %s; the configured rate stays", curve.reason)
        return
    current = configured_rate(optimizer, scheduler)
    factor = curve.suggestion / current if current > 0 else 1.0
    scale_learning_rate(optimizer, scheduler, factor)
    log.warning("lrwatch: lr_find: starting at %.3g (x%.3g of the configured %.3g): %s",
                curve.suggestion, factor, current, curve.reason)


def configured_rate(optimizer: Any, scheduler: Any) -> float:
    """The configured rate of the group the range test's rates are (group 0, or the first
    with a rate when group 0 is frozen at 0): the schedule's base rate (its peak, for a
    warm-up that starts at 0), else the rate the optimizer was built with, else its rate now."""
    from ..recovery.lr_find import leading_rate

    return leading_rate(optimizer, scheduler)[1]


def with_clip(kwargs: dict[str, Any], clip: Any) -> dict[str, Any]:
    """``kwargs`` for the Watcher with ``RecoveryConfig.clip_grad_norm`` set to the norm the
    framework clips gradients to (``clip``; ``None`` or 0: it does not), unless the user set
    it or turned recovery off: the shadow and range-test steps then clip as the run does."""
    if not isinstance(clip, (int, float)) or isinstance(clip, bool) or not clip > 0:
        return kwargs
    from ..recovery.policy import RecoveryConfig

    rc = RecoveryConfig.coerce(kwargs.get("recovery", True))
    if rc is None or rc.clip_grad_norm is not None:
        return kwargs
    return {**kwargs, "recovery": dataclasses.replace(rc, clip_grad_norm=float(clip))}
