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
"""

from __future__ import annotations

import inspect
import itertools
import json
import logging
import os
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
                      log_completed_step, lr_find_args, note_pending, rng_kept, scalar,
                      skip_sampler_of, start_at_suggestion, stop_snapshot,
                      undo_step_after_stop, with_clip, wrap_dataloader)

__all__ = ["LrwatchCallback", "STATE_FILE"]

#: The file lrwatch writes into every checkpoint folder.
STATE_FILE = "lrwatch_state.json"
_FROM_TRAINER = ("model", "optimizer", "scheduler", "scaler", "step_hooks", "start_step",
                 "export")
_WATCHER_ARGS = frozenset(inspect.signature(Watcher.__init__).parameters) - {"self"}


class LrwatchCallback(TrainerCallback):
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
        self._gradient_state = getattr(optimizer, "gradient_state", None)
        self._backward_probe = scaler is None  # fp16: grads are still scaled after backward
        # Under DDP with average_tokens_across_devices (the default), num_items_in_batch counts
        # the tokens of *every* rank, so the model's loss is this rank's sum over the global
        # count; compute_loss multiplies it by the number of processes (what DDP's gradient
        # average undoes). Do the same, so the mean over ranks is the global per-token loss.
        self._loss_world = (int(getattr(args, "world_size", 1) or 1)
                            if getattr(args, "average_tokens_across_devices", False)
                            and int(getattr(args, "n_gpu", 1) or 1) <= 1 else 1)
        if scaler is not None:
            warnings.warn("lrwatch: with fp16 and a GradScaler the Trainer unscales gradients "
                          "only when it clips them; lrwatch measures them at "
                          "on_pre_optimizer_step, after clipping", stacklevel=2)
        if self.lr_find and self.lr_find_result is None and int(state.global_step) == 0:
            self._find_lr(args, model, inner, sched, scaler, train_dataloader)
        rank = int(getattr(args, "process_index", 0) or 0)
        kw = with_clip(export_kwargs(self.watcher_kwargs, rank, self.export),
                       getattr(args, "max_grad_norm", None))
        # A rollback that must measure its rate (recovery probe="auto") runs the model on the
        # recent batches the forward hook remembers.
        kw.setdefault("probe_loss", _model_loss)
        w = self.watcher = Watcher(model, inner, sched, scaler=scaler, step_hooks=False,
                                   start_step=int(state.global_step), **kw)
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
        self._sampler = skip_sampler_of(train_dataloader)
        self._pass = None
        if self._sampler is not None:   # (the Trainer's epoch and the step it begins at)
            start, pad = None, 0
            if saved is not None and saved.get("data_pass"):
                start, pad = _resume_pass(self._sampler, saved["data_pass"], args, state,
                                          train_dataloader)
            self._pass = {"epoch": _trainer_position(args, state, train_dataloader)[0] - 1,
                          "start": None, "armed": start, "pad": pad}
        self._measured = self._stepped = False
        self._micro = 0
        self._loss_sum, self._loss_n, self._done, self._eval = None, 0, None, {}
        self._stopped_at = None
        if int(state.global_step) == 0 and w.untrained_batches and train_dataloader is not None:
            w.measure_untrained(_sample_batches(
                train_dataloader, w.untrained_batches,
                int(getattr(args, "per_device_train_batch_size", 0) or 0), model))

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

    def _saved_state(self, args: Any, state: Any) -> dict[str, Any] | None:
        folder = self.resume_from
        if folder is None and state.global_step > 0:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        path = os.path.join(folder, STATE_FILE) if folder else None
        if path is None or not os.path.isfile(path):
            if path is not None:   # the Trainer resumes, or resume_from names a folder
                logging.getLogger("lrwatch").warning(
                    "lrwatch: the Trainer resumes at step %d, but %s holds no lrwatch state "
                    "(the Trainer does not tell callbacks which checkpoint it resumed from): "
                    "the rollback budget, the rate's scale and the detectors start afresh; "
                    "pass resume_from=<that checkpoint folder> to LrwatchCallback",
                    state.global_step, folder)
            return None
        with open(path, encoding="utf-8") as fh:
            saved = json.load(fh)
        if int(saved.get("step", state.global_step)) != int(state.global_step):
            # (resume_from names another checkpoint than the one the Trainer resumes from, or
            # the Trainer starts afresh): lrwatch's step must stay the Trainer's global step
            logging.getLogger("lrwatch").warning(
                "lrwatch: %s holds lrwatch's state at step %s, but the Trainer starts at step "
                "%d: not loaded, lrwatch starts afresh at the Trainer's step; pass "
                "resume_from=<the checkpoint folder the Trainer resumes from>",
                path, saved.get("step"), state.global_step)
            return None
        return saved

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

    # --- the step ------------------------------------------------------------------------------
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
        normalises = ratio < n ** -0.5   # between 1/n (normalised) and 1 (its own mean)
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

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The pass a checkpoint describes (``data_pass``): the Trainer's epoch, and the step
        it began at (a resumed pass replayed: the step the checkpoint's began at)."""
        p = self._pass
        if p is None:
            return
        p["epoch"] += 1
        if p["pad"]:   # copies for the Trainer to drop: no step runs in this epoch
            p["pad"] -= 1
            return
        p["start"] = state.global_step if p["armed"] is None else p["armed"]
        p["armed"] = None

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

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._boundary(control)

    def _boundary(self, control: Any) -> None:
        if log_completed_step(self):
            control.should_training_stop = True
            self._stopped_at = stop_snapshot(self.watcher)   # (None once the step ran)

    # --- checkpoints ---------------------------------------------------------------------------
    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.watcher is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            return
        note_pending(self)   # the step's loss and evaluation, logged at the next boundary
        saved = self.watcher.state_dict()
        if self._sampler is not None and self._pass is not None:   # (_resume_pass)
            saved["data_pass"] = {**self._sampler.pass_state(), "start": self._pass["start"],
                                  "epoch": self._pass["epoch"] + self._sampler.epoch_shift}
        tmp = os.path.join(folder, STATE_FILE + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(saved, fh, allow_nan=True)
        os.replace(tmp, os.path.join(folder, STATE_FILE))

    def state_dict(self) -> dict[str, Any]:
        return self.watcher.state_dict() if self.watcher is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.watcher is not None:
            self.watcher.load_state_dict(state)


class _DatasetBatches:
    """Batches of the training dataset, drawn with a private generator (``seed``) and collated
    by the dataloader's ``collate_fn``, on the model's device; iterating again gives the same
    batches. The Trainer's own dataloader is never iterated (accelerate's keeps state across
    passes) and no global random generator moves."""

    def __init__(self, dataset: Any, collate: Any, batch_size: int, device: Any,
                 seed: int = 0) -> None:
        self.dataset, self.collate, self.batch_size = dataset, collate, batch_size
        self.device, self.seed = device, seed

    @classmethod
    def of(cls, loader: Any, batch_size: int, model: Any) -> _DatasetBatches | None:
        """``None`` for an iterable dataset or a loader without a dataset or ``collate_fn``."""
        ds = getattr(loader, "dataset", None)
        collate = getattr(loader, "collate_fn", None)
        if (batch_size < 1 or collate is None or ds is None
                or isinstance(ds, torch.utils.data.IterableDataset)
                or not hasattr(ds, "__len__") or not hasattr(ds, "__getitem__")
                or len(ds) < batch_size):
            return None
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return cls(ds, collate, batch_size, device)

    def __iter__(self) -> Any:
        n, bs = len(self.dataset), self.batch_size
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        for k in range(n // bs):
            batch = self.collate([self.dataset[i] for i in order[k * bs:(k + 1) * bs]])
            if isinstance(batch, Mapping):
                batch = {key: v.to(self.device, non_blocking=True)
                         if isinstance(v, torch.Tensor) else v for key, v in batch.items()}
            yield batch


def _sample_batches(loader: Any, n: int, batch_size: int, model: Any) -> list[Any]:
    """``n`` batches of the training data for the untrained loss (:class:`_DatasetBatches`,
    seed 0); empty for an iterable dataset or a loader without a dataset or ``collate_fn``."""
    batches = _DatasetBatches.of(loader, batch_size, model)
    if batches is None:
        return []
    with rng_kept():   # a collator that masks at random (MLM) draws from the global RNGs
        return list(itertools.islice(iter(batches), n))


def _trainer_position(args: Any, state: Any, loader: Any) -> tuple[int, int, int]:
    """Where the Trainer resumes at ``state.global_step``: the epoch, the batches it
    fast-forwards into it (``Trainer._init_training_state``: global_step // and % the
    optimizer steps of an epoch, the latter x accumulation), and the accumulation."""
    n, acc = len(loader), max(1, int(getattr(args, "gradient_accumulation_steps", 1) or 1))
    per_epoch = max(n // acc + int(n % acc > 0), 1)
    step = int(state.global_step)
    return step // per_epoch, step % per_epoch * acc, acc


def _resume_pass(sampler: Any, carried: Mapping[str, Any], args: Any, state: Any,
                 loader: Any) -> tuple[int | None, int]:
    """The Trainer resumes (see :func:`_trainer_position`) counting optimizer steps; the
    batches a rollback's skip window dropped are none, so it would land that many batches
    early and train them. The checkpoint's pass is replayed instead
    (:meth:`SkipSampler.resume`: its batches dropped and yielded as they were, not counted
    again), and the fast-forward is met where it lands: where batches dropped in an
    earlier epoch moved the pass's start, as many more of the pass's first batches are
    passed by as it falls short; where it goes further into its epoch than the pass had
    got (skips worth an epoch or more: the Trainer resumes an epoch behind the run), that
    epoch is a pass of copies for it to drop, and the pass goes on in its next; and the
    Trainer's epoch numbers are shifted to the run's (``SkipSampler.epoch_shift``: the
    sampler's order is the run's). So the resumed run trains the batches the run would
    have trained next. Not with ``ignore_data_skip``; said, not corrected, where the
    Trainer would resume in a later epoch than the run's (not seen). Returns the step the
    pass began at, where it goes on, and the epochs that are copies to drop (0 or 1)."""
    epoch, forward, acc = _trainer_position(args, state, loader)
    pass_epoch, start = carried.get("epoch"), carried.get("start")
    drops, earlier = list(carried.get("drops", ())), int(carried.get("earlier", 0))
    sampler.earlier = earlier + len(drops)
    if pass_epoch is None or start is None or getattr(args, "ignore_data_skip", False):
        return None, 0
    trained = (int(state.global_step) - int(start)) * acc   # this pass's batches trained
    yielded = int(carried.get("yielded", 0))
    fresh = bool(carried.get("done")) and trained >= yielded   # the pass is over
    real = int(pass_epoch) + fresh
    trained = 0 if fresh else trained
    pad = int(forward > trained)   # the Trainer's first epoch: copies to drop
    if real - epoch - pad < 0 or trained > yielded:
        logging.getLogger("lrwatch").warning(
            "lrwatch: rollbacks' skip windows dropped %d batch(es) before the checkpoint: the "
            "Trainer resumes in epoch %d, %d batch(es) in, where the run was %d batch(es) "
            "into epoch %d: the resumed run does not train the batches the run would have "
            "trained next (not corrected; docs/integrations.md)", sampler.earlier, epoch,
            forward, trained, real)
        return None, 0
    sampler.epoch_shift = real - epoch - pad   # the Trainer's epoch e is the run's e + shift
    if fresh:
        sampler.resume({"earlier": sampler.earlier}, pad=forward if pad else 0)
        return None, pad
    sampler.resume(carried, hide=trained - forward * (1 - pad), pad=forward if pad else 0)
    return int(start), pad


def _best_loaded(args: Any, state: Any, model: Any) -> dict[str, torch.Tensor] | None:
    """A host copy of the weights the Trainer loaded from its best checkpoint after the loop
    (``load_best_model_at_end``, as the Trainer decides it), or ``None`` when it loaded none."""
    if (model is None or not getattr(args, "load_best_model_at_end", False)
            or getattr(state, "best_model_checkpoint", None) is None):
        return None
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _model_loss(model: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    """The loss a ``transformers`` model computes for ``batch`` (its ``labels`` included)."""
    out = model(**batch)
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None and isinstance(out, tuple) and out:
        loss = out[0]   # return_dict=False: the loss leads the tuple
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ConfigError("the model returned no loss for a training batch; pass probe_loss= "
                          "to LrwatchCallback to probe the learning rate")
    return loss
