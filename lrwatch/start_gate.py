"""The start check's gate: no shadow where the run's first steps made no batch worse.

:class:`StartGate` is a mixin of :class:`lrwatch.start_check_side.StartCheckSide` (so of the
Watcher). It keeps the run's loss at its first steps and the untouched network's loss on the
same batches, and before the start check trains its shadow it asks
:func:`~lrwatch.recovery.start_check.worst_ratio` whether any step left a batch worse than
``RecoveryConfig.start_check_gate`` times the untouched network's loss on it. Where it did
not, the rate stands at no shadow's cost.

The untouched network's losses come from the untrained-loss measurement when its batches are
the run's own first ones (``batches()`` yields them first; an adapter's second pass over a
loader may draw the same ones, which is compared). Otherwise -- the ``transformers`` callback
samples its own, an iterable dataset gives none, a loader shuffled anew -- the gate measures
them at the check itself: the start state is put in, the first batches the run trained on are
scored with ``probe_loss`` as the untrained loss is, and the run is put back. Those forwards
are booked against the budget like the shadow's.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from .actions.snapshot import capture_state, restore_state
from .recovery.probe import FORWARD_COST
from .recovery.shadow import same_batches
from .recovery.start_check import worst_ratio
from .untrained import measure_untrained_loss

__all__ = ["StartGate"]

log = logging.getLogger("lrwatch")


class StartGate:
    """The gate's material and its reading (a mixin; the Watcher provides the rest)."""

    # provided by the Watcher and its other parts
    untrained_batches: int
    recovery: Any
    policy: Any
    outputs: Any
    dist: Any
    model: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    step: int
    _probe_loss: Any
    _late_records: list[Any]
    _internal_error: Any

    #: the untouched network's loss on each untrained batch (device scalars), the batches
    #: themselves (until the gate has read them), and whether they are the run's own first
    #: batches by construction (``batches()``: they are yielded first)
    _untrained_each: list[Any] = []
    _untrained_inputs: list[Any] = []
    _untrained_own: bool = False
    #: the run's loss at steps 1.._gate_steps, until the gate has read them
    _early_losses: dict[int, float] | None = None
    _gate_steps: int = 0
    _early_listening: bool = False
    #: forwards the gate ran itself at the check (booked with the shadow's, if it runs)
    _gate_forwards: int = 0

    def _listen_early(self) -> None:
        """Keep the run's loss at its first steps for the gate (once per run)."""
        n = min(int(self.untrained_batches or 0), self.recovery.start_check_steps)
        if n < 2 or self._early_losses is not None or not self.recovery.start_check_gate:
            return
        self._early_losses, self._gate_steps = {}, n
        if not self._early_listening:
            self._early_listening = True
            self.outputs.add_listener(self._note_early_loss)

    def _note_early_loss(self, sample: Any) -> None:
        if self._early_losses is not None and sample.step <= self._gate_steps:
            loss = sample.values.get("loss")
            if isinstance(loss, float):
                self._early_losses[sample.step] = loss

    def _forget_gate(self) -> None:
        """Drop what the gate keeps (the untrained batches, the first losses)."""
        self._early_losses, self._untrained_inputs, self._untrained_each = None, [], []

    def _start_gate_closed(self, held: list[Any], start: Any = None) -> bool:
        """No shadow when the run's first steps left no batch worse than
        ``start_check_gate`` times the untouched network's loss on it: the rate stands (at
        the cost of the gate's own forwards, if it ran any). Said in the log and the trace."""
        gate = self.recovery.start_check_gate
        self._gate_forwards = 0
        ratio = self._start_gate_ratio(held, start) if gate else None
        if ratio is None or ratio > gate:
            return False
        cost = math.ceil(self._gate_forwards * FORWARD_COST - 1e-9)
        self.policy.start_checked(cost)
        reason = (f"the run's first steps left no batch it met worse than x{gate:g} the "
                  f"untouched network's loss on it (at most x{ratio:.3g}): no shadow")
        log.info("lrwatch: start check: the configured rate stands (%s)", reason)
        self._late_records.append({"type": "start_check", "step": self.step, "steps": 0,
                                   "cost_steps": cost, "lr_factor": 1.0,
                                   "worst_ratio": ratio, "reason": reason})
        return True

    def _start_gate_ratio(self, held: list[Any], start: Any = None) -> float | None:
        """:func:`~lrwatch.recovery.start_check.worst_ratio` of the run's first steps against
        the untouched network on the same batches, the worst over the ranks; ``None`` where
        it cannot be read (a step's loss missing, no start state to measure from)."""
        ratio = None
        early, n = self._early_losses, self._gate_steps
        base: list[Any] | None = self._untrained_each[:n]
        inputs = self._untrained_inputs[:n]
        self._forget_gate()   # read once
        if early is not None and (len(base or ()) < n or not (
                self._untrained_own or self._same(inputs, held[:n]))):
            base = self._untouched_losses(start, held[:n])
        if early is not None and base:
            run = [early.get(i + 1) for i in range(len(base))]
            if all(x is not None for x in run):
                try:
                    untrained = [float(x) for x in base]   # one-off host reads, at the check
                    ratio = worst_ratio(run, untrained)   # type: ignore[arg-type]
                except Exception:
                    self._internal_error("reading the untrained losses for the start check")
        if self.dist.active:   # every rank gates alike: the worst rank's batches decide
            got = self.dist.gather(ratio)
            ratio = None if any(r is None for r in got) else max(got)
        return ratio

    @staticmethod
    def _same(inputs: list[Any], held: list[Any]) -> bool:
        try:
            return len(inputs) == len(held) and same_batches(inputs, held)
        except Exception:
            return False

    def _untouched_losses(self, start: Any, batches: list[Any]) -> list[Any] | None:
        """The untouched network's loss on each of ``batches`` (the run's first ones): the
        start state put in, each scored as the untrained loss is, the run put back."""
        if start is None or len(batches) < 2:
            return None
        now = None
        try:
            now = capture_state(self.model, self.optimizer, self.scheduler, self.scaler)
            restore_state(start, self.model, self.optimizer, self.scheduler, self.scaler)
            each: list[Any] = []
            measure_untrained_loss(self.model, batches, self._probe_loss, per_batch=each)
            self._gate_forwards = len(batches)
            return each
        except Exception:
            self._internal_error("measuring the untouched network for the start check")
            return None
        finally:
            if now is not None:
                restore_state(now, self.model, self.optimizer, self.scheduler, self.scaler)
