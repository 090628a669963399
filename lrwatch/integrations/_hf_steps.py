"""The ``transformers`` callback's measurements of each step (a mixin of
:class:`lrwatch.integrations.transformers.LrwatchCallback`, whose attributes it uses).

A forward hook on the model keeps the training loss on the device (one value per step: the
mean over micro-batches, or their sum when the Trainer passes ``num_items_in_batch``) and
puts a gradient hook on it, which queues the end-of-backward callback that measures the
gradients before the Trainer clips them (after DDP's reducer has averaged them); the
optimizer's post-step hook ends the step; ``on_step_end`` hands the step's loss to the next
boundary. The fallbacks (no loss tensor, fp16 with a GradScaler) are described in
:mod:`lrwatch.integrations.transformers`; the decisions on plain numbers are in
:mod:`lrwatch.integrations._hf_decisions`.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch

from ._common import scalar, undo_step_after_stop
from ._hf_decisions import divides_by_items

__all__ = ["StepMeasures"]


class StepMeasures:
    """The step's loss and gradient measurements (a mixin; the callback provides the rest)."""

    # provided by the callback
    watcher: Any
    _gradient_state: Any
    _backward_probe: bool
    _measured: bool
    _queued: bool
    _loss_sum: torch.Tensor | None
    _loss_n: int
    _loss_summed: bool
    _sums_items: bool | None
    _loss_world: int
    _hook_loss: bool
    _said_no_loss: bool
    _stepped: bool
    _micro: int
    _done: dict[str, Any] | None
    _stopped_at: Any

    def _forward_hook(self, module: Any, args: Any, kwargs: Any, output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        w = self.watcher
        if w is not None and w._probing:   # a range test's throw-away step, not the run's
            return
        self._micro += 1
        if w is not None and kwargs and not args:
            w.remember_batch(dict(kwargs))
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if loss is None and isinstance(output, tuple) and output and "labels" in (kwargs or {}):
            loss = output[0]   # return_dict=False: the loss leads the tuple when labels came
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            return
        if w is not None and kwargs and not args:   # the model computes its own loss on it
            w.start_check_batch(dict(kwargs))
        self._hook_loss = True
        d = loss.detach()
        self._loss_sum = d if self._loss_sum is None else self._loss_sum + d
        self._loss_n += 1
        self._loss_summed = kwargs.get("num_items_in_batch") is not None
        if self._backward_probe and loss.requires_grad:
            loss.register_hook(self._on_loss_grad)

    def _on_loss_grad(self, grad: torch.Tensor) -> None:
        # Runs inside the backward pass; the queued callback runs when it has finished.
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._requeue)

    def _requeue(self) -> None:
        # End-of-backward callbacks run in the order they were queued, and ours was queued
        # first (the loss's gradient is the first one computed). DDP's reducer queues its own
        # during the backward pass: the one that waits for the all-reduce and writes the
        # *averaged* gradients into ``.grad``. Queued again from here, we run after it.
        torch.autograd.Variable._execution_engine.queue_callback(self._after_backward)

    def _after_backward(self) -> None:
        self._queued = False
        gs = self._gradient_state
        if self.watcher is not None and (gs is None or gs.sync_gradients):
            self.watcher.before_step()  # the last micro-batch: final, unclipped gradients
            self._measured = True

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.watcher is not None and not self._measured:
            self.watcher.before_step()  # fallback: after the Trainer's clipping
        self._measured = False

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._micro = 0
        if self.watcher is not None:
            self.watcher.after_step()
            self._stepped = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self._hook_loss and not self._said_no_loss and self._stepped:
            self._said_no_loss = True
            logging.getLogger("lrwatch").warning(
                "lrwatch: the model's forward returned no loss (the Trainer computes it "
                "itself: label_smoothing_factor, a custom compute_loss): lrwatch reads the "
                "loss the Trainer logs every logging_steps (%s), measures gradient norms after "
                "the Trainer's clipping, and runs no start check", args.logging_steps)
        done: dict[str, Any] = {}
        if self._loss_sum is not None:
            n = self._loss_n
            if self._loss_summed and n > 1 and self._sums_items is None:
                self._sums_items = self._model_normalises(n)
            if self._loss_summed and self._sums_items is not False:
                done["loss"] = self._loss_sum * self._loss_world if self._loss_world > 1 \
                    else self._loss_sum
            else:
                done["loss"] = self._loss_sum if n == 1 else self._loss_sum / n
        self._loss_sum, self._loss_n = None, 0
        if self._stepped or self._done is None:
            self._done = done
        self._stepped = False
        # a stop at on_step_begin: the Trainer still ran this step; it is undone
        stopped, self._stopped_at = self._stopped_at, None
        undo_step_after_stop(self.watcher, stopped)

    def _model_normalises(self, n: int) -> bool | None:
        """At the first step of ``n`` micro-batches with ``num_items_in_batch``: whether the
        model divides its loss by it (each micro-batch's loss then a share of the step's), or
        ignores it and returns each micro-batch's own mean (a model that takes ``**kwargs``,
        BertForSequenceClassification for one), measured against the untrained loss: a
        micro-batch's loss near the untrained level, not near 1/n of it. One host read, once.
        ``None`` (the Trainer's word taken) without an untrained loss."""
        level = getattr(self.watcher, "untrained_level", None)
        if level is None:
            return None
        ratio = float(self._loss_sum / n) / max(float(level), 1e-12)
        normalises = divides_by_items(ratio, n)
        if not normalises:
            logging.getLogger("lrwatch").info(
                "lrwatch: the model ignores num_items_in_batch (each micro-batch's loss is "
                "its own mean, %.3g of the untrained loss): the step's loss is their mean", ratio)
        return normalises

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None,
               **kwargs: Any) -> None:
        # Fallback only: the Trainer's float loss every logging_steps (it synced for it).
        if not self._hook_loss and logs and "loss" in logs and self._done is not None:
            v = scalar(logs["loss"])
            if v is not None:
                self._done.setdefault("loss", v)

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None,
                     **kwargs: Any) -> None:
        """An epoch that a rollback's skip window shortened (the ``SkipSampler``) can end in
        the middle of a gradient accumulation: the Trainer plans its optimizer steps on the
        epoch's full length, so the micro-batches after the last step got no step of their
        own, and their gradients (and losses) went into the next epoch's first step. They are
        dropped here, as the skipped batches are."""
        if not self._micro:
            return
        model = model if model is not None else getattr(self.watcher, "model", None)
        if model is not None:
            model.zero_grad(set_to_none=True)
        logging.getLogger("lrwatch").info(
            "lrwatch: the epoch ended %d micro-batch(es) into a gradient accumulation (a "
            "rollback's skipped batches shortened it): their gradients are dropped, not "
            "carried into the next epoch's first step", self._micro)
        self._micro, self._loss_sum, self._loss_n = 0, None, 0
