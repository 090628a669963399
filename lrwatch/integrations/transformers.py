"""Hugging Face ``Trainer`` callback: one line gives a ``Trainer`` run the whole Watcher.

    trainer = Trainer(..., callbacks=[LrwatchCallback(port=9400, trace="run.jsonl")])

Where each measurement comes from (all on the device, no per-step host sync):

- gradients *before clipping*: the ``Trainer`` clips (``max_grad_norm``, 1.0 by default) before
  its ``on_pre_optimizer_step`` event, so that event only sees clipped gradients. The callback
  instead measures at the end of the backward pass of the last micro-batch of each step: a
  forward hook on the model puts a gradient hook on the loss, which queues a callback that the
  autograd engine runs once the backward pass has written every ``.grad``. Fallback (the model
  returns no loss tensor, e.g. a custom ``compute_loss``): ``on_pre_optimizer_step``, after
  clipping. With fp16 and a GradScaler, gradients are still scaled at that point, so the
  callback measures at ``on_pre_optimizer_step`` (after the Trainer unscaled, and clipped) and
  says so once;
- the step and its learning rate: the optimizer's post-step hook (the learning rate the
  scheduler set for this step, as the Trainer's own ``learning_rate`` log);
- train loss: the model output's ``loss`` tensor, captured by the same forward hook (kept on the
  device, one value per step: the mean over micro-batches, or their sum when the Trainer passes
  ``num_items_in_batch``). Fallback: the ``loss`` the Trainer logs every ``logging_steps``;
- evaluation: the ``metrics`` of ``on_evaluate`` (``eval_loss``, ``eval_accuracy``, ...).

The iteration boundary (rollback, snapshots, stop) is the next ``on_step_begin`` (and
``on_train_end``), after the scheduler step, evaluation and checkpointing of the step before.
A stop sets ``control.should_training_stop``; the Trainer honours it after the step in progress,
which is then undone: the state the stop left the run in (its final snapshot) is put back.
lrwatch's state is written to ``lrwatch_state.json`` in each checkpoint folder (``on_save``) and
read back when the Trainer resumes from that checkpoint.

The callback is set-up, evaluation and the boundary; its parts are mixins and helpers:
:mod:`._hf_steps` (the step's measurements), :mod:`._hf_resume` (checkpoints and the data pass
they carry), :mod:`._hf_data` (lrwatch's own draws of the training data, the model's loss),
:mod:`._hf_decisions` (the decisions on plain numbers, torch-free).
"""

from __future__ import annotations

import inspect
import logging
import warnings
from typing import Any, Mapping

import torch

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError("lrwatch.integrations.transformers needs transformers: "
                      "pip install 'lrwatch[transformers]'") from exc

from ..errors import ConfigError
from ..watch import Watcher
from ._common import (check_export, check_lr_find, eval_name, export_kwargs,
                      log_completed_step, lr_find_args, scalar, start_at_suggestion,
                      stop_snapshot, with_clip, wrap_dataloader)
from ._hf_data import _best_loaded, _DatasetBatches, _model_loss, _sample_batches
from ._hf_decisions import loss_world
from ._hf_resume import STATE_FILE, CheckpointSide
from ._hf_steps import StepMeasures

__all__ = ["LrwatchCallback", "STATE_FILE"]

_FROM_TRAINER = ("model", "optimizer", "scheduler", "scaler", "step_hooks", "start_step",
                 "export")
_WATCHER_ARGS = frozenset(inspect.signature(Watcher.__init__).parameters) - {"self"}



class LrwatchCallback(StepMeasures, CheckpointSide, TrainerCallback):
    """Watches a ``transformers.Trainer`` run with an :class:`lrwatch.Watcher`.

    Parameters
    ----------
    export:
        ``"rank0"`` (default): only the world's process zero serves ``/metrics``, writes the
        trace and sends alerts; ``"all"``: every process does (passed to the Watcher, which
        decides from ``torch.distributed``; without it, the Trainer's process index decides).
    resume_from:
        A checkpoint folder to read lrwatch's state from. By default, when the Trainer starts at
        a global step above zero, ``output_dir/checkpoint-{global_step}`` is used if it holds
        lrwatch's state. A state of another step than the one the Trainer starts at is not
        loaded (a warning says so): lrwatch's step is the Trainer's global step.
    lr_find:
        Before the first step, run a learning-rate range test (:func:`lrwatch.lr_find`) with
        the model's own loss on batches of the training dataset (drawn with a private
        generator and collated by the dataloader's ``collate_fn``: the Trainer's dataloader
        is not iterated), and start from its suggestion: every rate the optimizer and
        scheduler hold is scaled so that group 0 starts at it (the schedule keeps its shape).
        ``True``, or a dict of ``lr_find`` arguments (``num_steps``, ``min_lr``, ``max_lr``,
        ``fraction``, ...). The model, optimizer state and RNG are left as they were; the
        result is in :attr:`lr_find_result`. Needs a map-style training dataset.
    **watcher_kwargs:
        Any :class:`~lrwatch.watch.Watcher` argument except the ones taken from the Trainer.
    """

    def __init__(self, *, export: str = "rank0", resume_from: str | None = None,
                 lr_find: bool | Mapping[str, Any] = False, **watcher_kwargs: Any) -> None:
        self.lr_find = check_lr_find(lr_find)
        self.lr_find_result: Any = None
        bad = sorted(set(watcher_kwargs) - (_WATCHER_ARGS - set(_FROM_TRAINER)))
        if bad:
            valid = sorted(_WATCHER_ARGS - set(_FROM_TRAINER))
            raise ConfigError(f"unknown LrwatchCallback argument(s) {bad}; valid: {valid}")
        self.export = check_export(export)
        self.resume_from = resume_from
        self.watcher_kwargs = watcher_kwargs
        self.watcher: Watcher | None = None
        self._handles: list[Any] = []
        self._gradient_state: Any = None
        self._backward_probe = True
        self._measured = False
        self._queued = False
        self._loss_sum: torch.Tensor | None = None
        self._loss_n = 0
        self._loss_summed = False
        self._sums_items: bool | None = None   # the model divides by num_items_in_batch
        self._loss_world = 1  # the Trainer's factor for losses over num_items_in_batch
        self._hook_loss = False  # the forward hook has seen a loss tensor
        self._said_no_loss = False
        self._stepped = False
        self._micro = 0   # the run's training forwards since its last optimizer step
        self._done: dict[str, Any] | None = None
        self._eval: dict[str, Any] = {}
        self._control: Any = None
        self._stopped_at: Any = None   # the stop's final snapshot, until the Trainer's last step
        self._sampler: Any = None   # the SkipSampler under the Trainer's dataloader, or None
        #: its pass: the Trainer's epoch, the step it began at, the step the next one goes on
        #: from (a resumed pass), epochs of copies to drop before it (on_epoch_begin)
        self._pass: dict[str, Any] | None = None

    @property
    def exit_status(self) -> int:
        return self.watcher.exit_status if self.watcher is not None else 0

    @property
    def metrics_url(self) -> str | None:
        return self.watcher.metrics_url if self.watcher is not None else None

    @property
    def rollbacks(self) -> int:
        """Rollbacks and restarts the Watcher carried out so far (0 before training starts)."""
        return self.watcher.rollbacks if self.watcher is not None else 0

    # --- set-up and tear-down ------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       optimizer: Any = None, lr_scheduler: Any = None,
                       train_dataloader: Any = None, **kwargs: Any) -> None:
        self._close()
        if model is None or optimizer is None:
            raise ConfigError("LrwatchCallback needs the Trainer's model and optimizer")
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        sched = getattr(lr_scheduler, "scheduler", lr_scheduler)  # AcceleratedScheduler
        scaler = getattr(optimizer, "scaler", None)
        self._begin_measures(args, optimizer, scaler)
        if self.lr_find and self.lr_find_result is None and int(state.global_step) == 0:
            self._find_lr(args, model, inner, sched, scaler, train_dataloader)
        w = self.watcher = self._new_watcher(args, state, model, inner, sched, scaler)
        saved = self._saved_state(args, state)
        if saved is not None:
            w.load_state_dict(saved)
        self._handles = [inner.register_step_post_hook(self._post_step),
                         model.register_forward_hook(self._forward_hook, with_kwargs=True)]
        if train_dataloader is not None and not wrap_dataloader(
                train_dataloader, w.skip_batch, never_empty=True, refill=True):
            if w.recovery is not None and w.recovery.skip_batches:
                warnings.warn("lrwatch: this train dataloader has no BatchSampler to wrap; "
                              "rollbacks will not skip extra batches", stacklevel=2)
        self._start_pass(args, state, train_dataloader, saved)
        self._measured = self._stepped = False
        self._micro = 0
        self._loss_sum, self._loss_n, self._done, self._eval = None, 0, None, {}
        self._stopped_at = None
        if int(state.global_step) == 0 and w.untrained_batches and train_dataloader is not None:
            w.measure_untrained(_sample_batches(
                train_dataloader, w.untrained_batches,
                int(getattr(args, "per_device_train_batch_size", 0) or 0), model))

    def _begin_measures(self, args: Any, optimizer: Any, scaler: Any) -> None:
        """Where the step's gradients are measured, and the Trainer's factor for a loss over
        ``num_items_in_batch`` (:func:`~._hf_decisions.loss_world`)."""
        self._gradient_state = getattr(optimizer, "gradient_state", None)
        self._backward_probe = scaler is None  # fp16: grads are still scaled after backward
        self._loss_world = loss_world(getattr(args, "world_size", 1),
                                      getattr(args, "n_gpu", 1),
                                      bool(getattr(args, "average_tokens_across_devices", False)))
        if scaler is not None:
            warnings.warn("lrwatch: with fp16 and a GradScaler the Trainer unscales gradients "
                          "only when it clips them; lrwatch measures them at "
                          "on_pre_optimizer_step, after clipping", stacklevel=3)

    def _new_watcher(self, args: Any, state: Any, model: Any, optimizer: Any, sched: Any,
                     scaler: Any) -> Watcher:
        """The Watcher over the Trainer's model, optimizer, scheduler and scaler, at its step."""
        rank = int(getattr(args, "process_index", 0) or 0)
        kw = with_clip(export_kwargs(self.watcher_kwargs, rank, self.export),
                       getattr(args, "max_grad_norm", None))
        # A rollback that must measure its rate (recovery probe="auto") runs the model on the
        # recent batches the forward hook remembers.
        kw.setdefault("probe_loss", _model_loss)
        return Watcher(model, optimizer, sched, scaler=scaler, step_hooks=False,
                       start_step=int(state.global_step), **kw)

    def _find_lr(self, args: Any, model: Any, optimizer: Any, sched: Any, scaler: Any,
                 loader: Any) -> None:
        """The range test before training; start at its suggestion (see ``lr_find``)."""
        from ..recovery.lr_find import lr_find

        batches = _DatasetBatches.of(
            loader, int(getattr(args, "per_device_train_batch_size", 0) or 0), model)
        if batches is None:
            raise ConfigError("lr_find=True needs the Trainer's training dataloader over a "
                              "map-style dataset (with __len__ and __getitem__) and a "
                              "collate_fn; for an iterable dataset call lrwatch.lr_find "
                              "yourself before training")
        curve = lr_find(model, optimizer, batches, batch_loss=_model_loss, scheduler=sched,
                        scaler=scaler, **lr_find_args(self.lr_find))
        self.lr_find_result = curve
        start_at_suggestion(curve, optimizer, sched)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None,
                     **kwargs: Any) -> None:
        kept = _best_loaded(args, state, model)
        rollbacks = self.rollbacks
        log_completed_step(self, start_check=False)   # training is over: no check now
        self._close()   # (its last flush may roll back or restore: carried out on the model)
        if kept is not None:
            # load_best_model_at_end: the Trainer loaded its best checkpoint before this
            # event; the weights it loaded are the run's result, whatever lrwatch did since
            model.load_state_dict(kept)
            if self.rollbacks > rollbacks:
                logging.getLogger("lrwatch").warning(
                    "lrwatch: the rollback at the end of training leaves the weights alone: "
                    "load_best_model_at_end loaded the best checkpoint (%s), which stands",
                    state.best_model_checkpoint)

    def _close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.watcher is not None:
            self.watcher.close()

    # --- evaluation and the iteration boundary (the step's measurements: StepMeasures) ---------
    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None,
                    **kwargs: Any) -> None:
        values: dict[str, Any] = {}
        for key, value in (metrics or {}).items():
            name = eval_name(str(key), ("eval_",))
            v = scalar(value) if name is not None else None
            if v is not None:
                values[name] = v
        # Before the first step (``eval_on_start``) the start state was evaluated: no step's
        # sample holds it (it used to join step 1); the Watcher offers it to the best state
        if values and not (self._done is None and self.watcher is not None
                           and self.watcher.log_evaluation(**values)):
            self._eval.update(values)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._boundary(control)

    def _boundary(self, control: Any) -> None:
        if log_completed_step(self):
            control.should_training_stop = True
            self._stopped_at = stop_snapshot(self.watcher)   # (None once the step ran)

