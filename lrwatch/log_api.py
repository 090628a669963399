"""The Watcher's logging API: :meth:`LogApi.log` (a step's metrics, from the training loop)
and :meth:`LogApi.log_evaluation` (an evaluation of the step logged last, from a framework
adapter) and :meth:`LogApi.note_unlogged` (a step's values before a checkpoint, ditto), and the checks both apply to each value (a bad one is warned about once, counted
and left out: logging never raises into the loop).

:class:`LogApi` is a mixin over the Watcher's state (``recorder``, ``step``, ``_evals``,
``_faults``, ``_closed``, ``_in_flight``, ``flush_in_flight``, ``_going_back``) and its
``_boundary``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from .steps import LOGGED_NORM, Row, as_value

__all__ = ["LogApi"]


class LogApi:
    """The Watcher's ``log`` and ``log_evaluation`` (see the module docstring)."""

    # attributes the Watcher provides (declared for readers and type checkers)
    recorder: Any
    step: int
    _evals: Any
    _faults: Any
    _closed: bool
    _in_flight: Any
    flush_in_flight: bool
    _going_back: bool
    _boundary: Callable[[str], None]
    _last_logged: Row | None = None   # the row log() gave values last
    _logged_once = False   # log() was called (a pipeline stage must: StepPath)

    def log(self, *, batch_size: int | None = None, **metrics: torch.Tensor | float | int) -> None:
        """Record this step's metrics (``loss=``, ``accuracy=``, or any other name).

        Tensors are kept on the device (detached, no host sync); numbers are taken as they are.
        Call it once per optimizer step, before or after ``optimizer.step()``, or several
        times: after the step, a call that logs none of the names already logged for that
        step joins it (the loss, then an evaluation's values after an evaluation pass, go on
        one trace line); before the step, every call joins the step about to happen (a name
        logged again there: the last value wins). A name logged again after the step starts
        the next step's values. With ``flush_lag=0`` a call after the step whose flush came
        at its first ``log()`` (every ``flush_every``-th step) is too late for it: its values
        go with the next step, with a warning (log them in the step's first call, or use
        ``flush_lag=1``).

        A loop that clips its gradients before ``optimizer.step()`` logs the norm
        ``clip_grad_norm_`` returns as ``grad_norm=``: the step hook runs after the clipping
        and measures the clipped gradients (the norm flat at ``max_norm`` while clipping is
        active), where ``grad_norm`` is the norm before clipping (the guard still judges the
        gradients the optimizer is given). A logged ``grad_norm`` is the step's, whichever
        side of the step ``log`` is called on.
        """
        if self._closed:
            return
        if self._join_last_step(metrics, batch_size):
            return
        row = self.recorder.row_for_log(self.step + 1)
        self._put_metrics(row, metrics, on_host=False)
        if "grad_norm" in metrics and as_value("grad_norm", metrics["grad_norm"])[0] is not None:
            row.host[LOGGED_NORM] = 1.0   # (the loop's own, before its clipping)
        row.logged_keys.update(metrics)
        self._last_logged = row
        self._logged_once = True
        if batch_size is not None:
            row.host["_batch"] = float(batch_size)
        row.logged = True
        if row.stepped:
            self.recorder.commit()
            self._boundary("log")

    def _join_last_step(self, metrics: Mapping[str, Any], batch_size: int | None) -> bool:
        """Put ``metrics`` into the row of the step completed last when they belong to it: a
        ``log()`` after its step's first one, before the next step, with none of the names
        logged for it (the row waits for the flush, or is in flight: its device values then
        follow in a copy of their own). ``False``: they go to the open row, as a first call's."""
        if self.recorder.open is not None:
            return False
        in_flight = self._in_flight
        row = self.recorder.last_logged(self.step)
        if row is None and in_flight is not None and in_flight.rows \
                and in_flight.rows[-1].step == self.step and in_flight.rows[-1].logged:
            row = in_flight.rows[-1]
        else:
            in_flight = None
        if row is None:
            last = self._last_logged
            if last is not None and last.step == self.step and last.stepped \
                    and not (metrics.keys() & last.logged_keys):
                self._faults.warn_once("log:judged", (
                    f"lrwatch: log({', '.join(metrics)}) came after step {self.step} was judged "
                    f"(its flush came before this call; with flush_lag=0 at that step's first "
                    f"log()): the values "
                    f"go with step {self.step + 1}; log them in the step's first log() call, "
                    f"or use Watcher(flush_lag=1)"), stacklevel=4)
                self._put_late(metrics, batch_size)
                return True
            return False
        if metrics.keys() & row.logged_keys:
            return False
        late: dict[str, torch.Tensor] = {}   # (device values after the copy was queued)
        self._put_metrics(row, metrics, on_host=False, stacklevel=5,
                          device_into=late if in_flight is not None else None)
        if in_flight is not None:
            in_flight.add_late(row, late)
        row.logged_keys.update(metrics)
        if batch_size is not None:
            row.host["_batch"] = float(batch_size)
        return True

    def _put_late(self, metrics: Mapping[str, Any], batch_size: int | None) -> None:
        """Values that came after their step was judged, into the next step's row without
        logging it: that step's own ``log()`` calls still complete it as in any other step
        (marked logged, the row would be committed at its optimizer step, before the loop's
        loss; each later call then a step late, the rest of the run shifted by one step, a
        rollback's abandoned values on the replayed step)."""
        row = self.recorder.row_for_log(self.step + 1)
        self._put_metrics(row, metrics, on_host=False, stacklevel=6)
        if batch_size is not None:
            row.host["_batch"] = float(batch_size)

    def log_evaluation(self, **metrics: torch.Tensor | float | int) -> bool:
        """Record an evaluation of the last completed step after that step was logged (a
        framework that validates between the micro-batches of the next step: the model still
        holds that step's weights). The values join that step's sample, and the best
        evaluated state is kept for it. Before this Watcher's first step (an evaluation of
        the start or resumed state, as the Hugging Face Trainer's ``eval_on_start`` runs) no
        sample holds the values: the watched one is offered to the best evaluated state as
        the start's (a fine-tuning that only gets worse restores its start), and ``True``
        says the values are taken. Returns ``False``, recording nothing, when that step is
        judged already (its flush came at its log, ``flush_lag=0``): log the values with the
        next step instead."""
        if self._closed:
            return False
        in_flight = self._in_flight is not None and any(
            r.step == self.step for r in self._in_flight.rows)
        rows = self.recorder.rows
        row = self._in_flight.rows[-1] if in_flight else (
            rows[-1] if rows and rows[-1].step == self.step else None)
        if row is None and self.flushes == 0 and self._in_flight is None \
                and not any(r.stepped for r in rows):
            self._offer_start(metrics)
            return True
        if row is None:
            return False
        # (a row in flight has its device values copied already: host numbers join it)
        self._put_metrics(row, metrics, on_host=in_flight)
        return True

    def note_unlogged(self, **metrics: torch.Tensor | float | int) -> None:
        """Put values into the row of the step that has happened and is not logged yet,
        without logging it: for adapters whose framework writes a checkpoint between the
        optimizer step and the boundary where the adapter calls :meth:`log` (Lightning's
        ``ModelCheckpoint``, the Hugging Face ``on_save``). :meth:`state_dict` then carries
        them with that step's row (a resumed run judges the step with its loss and
        evaluation); :meth:`log` delivers them again at the boundary. Bad values are left
        out (``log`` warns about them)."""
        row = self.recorder.open
        if self._closed or row is None or not row.stepped or row.logged:
            return
        for key, value in metrics.items():
            v, _ = as_value(key, value)
            if v is not None:
                row.put(key, v)

    def _offer_start(self, metrics: Mapping[str, Any]) -> None:
        """The watched evaluation of the state before this Watcher's first step, to the best
        keeper (no sample holds it; a bad value is warned about once and left out)."""
        best = self._evals.metric_for(metrics)
        if best is None:
            return
        v, why = as_value(best, metrics[best])
        if v is None:
            self._faults.warn_once(f"bad:{best}", why or "", stacklevel=4)
            return
        self._evals.offer(self.step, v)

    def _put_metrics(self, row: Row, metrics: Mapping[str, Any], *, on_host: bool,
                     device_into: dict[str, torch.Tensor] | None = None,
                     stacklevel: int = 4) -> None:
        """Put the good values into ``row`` (as host numbers with ``on_host``; with
        ``device_into``, its device values there instead), and offer the watched evaluation
        to the best keeper; warn about the bad ones once each."""
        best = self._evals.metric_for(metrics)
        for key, value in metrics.items():
            v, why = as_value(key, value)
            if v is None:   # (points at the caller of log())
                self._faults.warn_once(f"bad:{key}", why or "", stacklevel=stacklevel)
                continue
            if on_host:
                row.host[key] = float(v)
            elif device_into is not None and isinstance(v, torch.Tensor):
                device_into[key] = v
            else:
                row.put(key, v)
            if key == best:
                self._evals.offer(row.step, v, self.flush_in_flight or self._going_back)
