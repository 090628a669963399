"""The Watcher's step path: how an optimizer step becomes a recorded row.

:class:`StepHooks` attaches to torch: it registers the optimizer's step pre/post hooks and wraps
``GradScaler.update`` (a step the scaler skips for overflow runs no optimizer hook; the update is
the only sign of it), and :meth:`StepHooks.remove` undoes both.

:class:`StepPath` is the part of the :class:`~lrwatch.watch.Watcher` those hooks call (or a
framework adapter, through :meth:`StepPath.before_step` / :meth:`StepPath.after_step`): it
measures the gradients before the step, closes the step's row after it, advances the step
counter, and reaches the iteration boundary. Nothing here converts a tensor to a Python number
(the :class:`~lrwatch.steps.StepRecorder` keeps device scalars until the flush), and nothing
here raises into the training step (fail open), but for a pipeline stage that completes its
second step without ever calling ``log()`` (:meth:`StepPath._refuse_unlogged_stage`: the other
stages' next flush would wait for it until the collective timeout). Range tests (``_probing``) are not the run's
steps and are not recorded.

Like :class:`~lrwatch.recovery.executor.PlanExecutor`, :class:`StepPath` is a mixin over the
Watcher's state (``optimizer``, ``scaler``, ``recorder``, ``store``, ``step``,
``flush_every``, ``_closed``, ``_probing``) and its ``flush``, ``_boundary`` and
``_internal_error``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .errors import ConfigError
from .pipeline import UNLOGGED_STAGE, stages_of
from .recovery.throwaway import watch_steps

__all__ = ["StepHooks", "StepPath"]

Hook = Callable[[Any, Any, Any], None]   # hook(optimizer, args, kwargs), as torch calls it


def _closure(args: Any, kwargs: Any) -> Any:
    """The closure an ``optimizer.step(closure)`` call was given, or ``None`` (torch hands
    the hooks the step's arguments with the optimizer first)."""
    for a in args or ():
        if callable(a) and not isinstance(a, torch.optim.Optimizer):
            return a
    c = kwargs.get("closure") if isinstance(kwargs, dict) else None
    return c if callable(c) else None


class StepHooks:
    """Registers the Watcher's step callbacks with torch (see the module docstring).

    Parameters
    ----------
    optimizer:
        Gets ``pre`` and ``post`` as its step pre/post hooks when ``register`` is true
        (framework adapters that call ``before_step``/``after_step`` themselves pass false).
    scaler:
        A ``torch.amp.GradScaler`` (or ``None``): ``before_update()`` is called at the start of
        each of its ``update()`` calls.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: Any, *, pre: Hook,
                 post: Hook, before_update: Callable[[], None], register: bool = True) -> None:
        self._handles = [optimizer.register_step_pre_hook(pre),
                         optimizer.register_step_post_hook(post)] if register else []
        self._scaler = scaler
        self._original_update: Any = None
        if scaler is not None:
            original = self._original_update = scaler.update

            def update(*args: Any, **kwargs: Any) -> Any:
                before_update()
                return original(*args, **kwargs)

            scaler.update = update

    def remove(self) -> None:
        """Remove the hooks and give the scaler its own ``update`` back."""
        for h in self._handles:
            h.remove()
        if self._original_update is not None:
            try:
                del self._scaler.update
            except AttributeError:  # pragma: no cover
                pass


class StepPath:
    """The Watcher's step path (see the module docstring)."""

    # attributes the Watcher provides (declared for readers and type checkers)
    optimizer: Any
    scaler: Any
    recorder: Any
    store: Any
    step: int
    flush_every: int
    _closed: bool
    _probing: bool
    policy: Any
    _snaps: Any   # the SnapshotKeeper (None without recovery): counts the scaler's skips
    flush: Callable[[], Any]
    _boundary: Callable[[str], None]
    _internal_error: Callable[[str], None]
    dist: Any
    _stages = False          # the group's ranks hold different parameters (pipeline stages)
    _logged_once = False     # log() was called (LogApi)
    _unlogged_steps = 0      # steps completed before any log()

    def _refuse_unlogged_stage(self) -> None:
        """Raise :class:`~lrwatch.errors.ConfigError` on a pipeline stage that completed a
        step and never called ``log()`` (at the next batch :meth:`batches` draws, or the next
        step's end): it would flush a step later than the stages that log, and their gathers
        wait for each other until the collective timeout (seventeenth round's audit). Failing
        here, before the stage sends its next activations, ends the others' wait too."""
        if self._stages and not self._logged_once and self._unlogged_steps:
            raise ConfigError(UNLOGGED_STAGE.format(step=self.step,
                                                    stages=stages_of(self.dist.peers)))

    def _attach_step_hooks(self, register: bool) -> None:
        self._stepped_since_update = False   # an optimizer step ran since the scaler's update
        self._hooks = StepHooks(self.optimizer, self.scaler, pre=self._pre_step,
                                post=self._post_step, before_update=self._scaler_updating,
                                register=register)
        if register:   # an lr_find from outside tells these hooks its steps are not the run's
            watch_steps(self.optimizer, self)

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
            self._count_scaler_skip()
        self._post_step(self.optimizer, (), {})

    # --- no host sync here: the recorder keeps device scalars until the flush ----------------
    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._probing:   # a range test's throw-away steps are not the run's
            return
        if _closure(args, kwargs) is not None:   # its gradients come inside the step: after
            return
        self._measure(guard=True)

    def _measure(self, *, guard: bool) -> None:
        try:
            self.recorder.measure_grads(self.step + 1, skipped=False, guard=guard)
        except Exception:  # fail open: monitoring never breaks the step
            self._internal_error("measuring gradients")

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._probing and _closure(args, kwargs) is not None:
            # optimizer.step(closure) (LBFGS): the gradients are the closure's last, which
            # the step already used; measured now, and too late for the guard to hold
            self._measure(guard=False)
        self.recorder.step_done()
        if self._probing:
            return
        self._refuse_unlogged_stage()
        try:
            self._finish_step()
        except Exception:
            self._internal_error("recording the step")
        self._boundary("post")

    def _finish_step(self) -> None:
        row, seconds = self.recorder.finish_step(self.step + 1)
        warming = self.policy.restart_warmup()   # None until lrwatch restarts the run
        if warming is not None:
            row.host["recovery_warmup"] = warming
        if seconds is not None and self.store is not None:
            self.store.observe_step_time(seconds)
        self.step += 1
        self._stepped_since_update = True
        if not (row.logged or self._logged_once):
            self._unlogged_steps += 1
        if row.logged:
            self.recorder.commit()

    def _count_scaler_skip(self) -> None:
        """A step the scaler skipped: a loop may leave its per-step scheduler unstepped
        there, which a rollback's reading of the scheduler's cadence must know
        (:mod:`lrwatch.recovery.loop_schedule`)."""
        if getattr(self, "_snaps", None) is not None:
            self._snaps.scaler_skips += 1

    def _scaler_updating(self) -> None:
        """Before each GradScaler.update(): a step the scaler skipped for overflow ran no
        optimizer hook, so it is recorded here (as non-finite)."""
        if not self._stepped_since_update and not self._closed and not self._probing:
            try:
                self.recorder.measure_grads(self.step + 1, skipped=True)
                self._finish_step()
                self._count_scaler_skip()
            except Exception:
                self._internal_error("recording a skipped AMP step")
        self._stepped_since_update = False
