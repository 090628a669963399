"""PyTorch Lightning 2.x callback: one line gives a Lightning run the whole Watcher.

    trainer = lightning.Trainer(callbacks=[LrwatchCallback(port=9400, trace="run.jsonl")])

Where each measurement comes from (all on the device, no per-step host sync):

- gradients: ``on_before_optimizer_step``. Lightning runs it after the closure (forward and
  backward) and after AMP unscaling, and *before* gradient clipping and the optimizer step
  (the optimizer's own pre-step hook cannot be used: automatic optimization calls
  ``optimizer.step(closure)``, so that hook fires before the backward pass);
- the step and its learning rate: the optimizer's post-step hook, i.e. the learning rate the
  scheduler set for this step and the optimizer applied (a step the GradScaler skips is recorded
  through the scaler, as in a plain loop);
- train loss: the ``loss`` tensor Lightning hands to ``on_train_batch_end`` (kept on the device;
  averaged over gradient-accumulation batches);
- evaluation: ``trainer.callback_metrics`` at ``on_validation_end`` (``val_loss`` ->
  ``eval_loss``, ``val_acc``/``val_accuracy`` -> ``eval_accuracy``, ``val_x`` -> ``eval_x``).
  A validation between micro-batches (``accumulate_grad_batches`` with a
  ``val_check_interval`` that is not a multiple of it) evaluated the last completed step, whose
  boundary has passed: it joins that step (``Watcher.log_evaluation``; under accumulation the
  Watcher runs with ``flush_lag=1`` unless given, so that step is not judged yet).

The iteration boundary (rollback, snapshots, stop) is ``on_train_batch_start`` of the next batch
(and ``on_train_end``): by then the scheduler has stepped and validation has run, so a step's
evaluation results join that step's sample, and a rollback restores module, optimizer, scheduler,
GradScaler and RNG at the same point of the loop where snapshots are taken. A stop sets
``trainer.should_stop`` and has the module's ``on_train_batch_start`` answer ``-1`` once
(Lightning reads a ``-1`` from the module's hook only), so the batch at hand is not trained,
and lifts the Trainer's ``min_steps``/``min_epochs`` (which would keep the fit going).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
from typing import Any, Mapping

import torch

try:  # the unified package first, then the standalone one
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as exc:
        raise ImportError("lrwatch.integrations.lightning needs PyTorch Lightning: "
                          "pip install 'lrwatch[lightning]'") from exc

from ..errors import ConfigError
from ..watch import Watcher
from ._common import (check_export, check_lr_find, eval_name, export_kwargs,
                      log_completed_step, lr_find_args, note_pending, reapply_best, rng_kept,
                      scalar, skip_sampler_of, start_at_suggestion, with_clip,
                      wrap_dataloader)

__all__ = ["LrwatchCallback"]

#: Watcher arguments the callback fills in from the Trainer.
_FROM_TRAINER = ("model", "optimizer", "scheduler", "scaler", "step_hooks", "start_step",
                 "export")
_WATCHER_ARGS = frozenset(inspect.signature(Watcher.__init__).parameters) - {"self"}


class LrwatchCallback(pl.Callback):
    """Watches a Lightning ``fit`` with an :class:`lrwatch.Watcher`, inside the fit loop.

    Parameters
    ----------
    export:
        ``"rank0"`` (default): only global rank 0 serves ``/metrics``, writes the trace and
        sends alerts; ``"all"``: every rank does. Passed to the Watcher, which decides from
        ``torch.distributed``; without it, the trainer's global rank decides.
    eval_prefixes:
        Keys of ``trainer.callback_metrics`` that are validation results.
    lr_find:
        Before the first step, run a learning-rate range test (:func:`lrwatch.lr_find`) with
        the module's own ``training_step`` on the training data, and start from its
        suggestion: every rate the optimizer and scheduler hold is scaled so that group 0
        starts at it (the schedule keeps its shape). ``True``, or a dict of ``lr_find``
        arguments (``num_steps``, ``min_lr``, ``max_lr``, ``fraction``, ...). The model,
        optimizer state, RNG and data are left as they were; the result is in
        :attr:`lr_find_result`.
    **watcher_kwargs:
        Any :class:`~lrwatch.watch.Watcher` argument except the ones taken from the trainer
        (model, optimizer, scheduler, scaler, start_step): ``port``, ``trace``, ``rules``,
        ``recovery``, ``flush_every``, ``alertmanager``, ...
    """

    def __init__(self, *, export: str = "rank0",
                 eval_prefixes: tuple[str, ...] = ("val_", "val/", "validation_"),
                 lr_find: bool | Mapping[str, Any] = False,
                 **watcher_kwargs: Any) -> None:
        self.lr_find = check_lr_find(lr_find)
        self.lr_find_result: Any = None
        bad = sorted(set(watcher_kwargs) - (_WATCHER_ARGS - set(_FROM_TRAINER)))
        if bad:
            valid = sorted(_WATCHER_ARGS - set(_FROM_TRAINER))
            raise ConfigError(f"unknown LrwatchCallback argument(s) {bad}; valid: {valid}")
        self.export = check_export(export)
        self.eval_prefixes = tuple(eval_prefixes)
        self.watcher_kwargs = watcher_kwargs
        self.watcher: Watcher | None = None
        self._loaded: dict[str, Any] | None = None
        self._from_checkpoint = False   # _loaded came from Lightning's checkpoint
        self._handle: Any = None
        self._optimizer: Any = None
        self._stepped = False
        self._loss_sum: torch.Tensor | None = None
        self._loss_n = 0
        self._done: dict[str, Any] | None = None  # the last step's values, logged at the boundary
        self._eval: dict[str, Any] = {}
        self._untrained_due = False   # measure the untrained loss at the first batch
        self._measured = False   # manual optimization: measured before training_step clipped
        self._clip_wrapped: Any = None   # the module whose clip_gradients measures first
        self._sampler: Any = None   # the training loader's SkipSampler (a single loader)

    # --- convenience ---------------------------------------------------------------------------
    @property
    def exit_status(self) -> int:
        """0, or the Watcher's exit status after a stop (3: a rule, 4: rollback budget spent)."""
        return self.watcher.exit_status if self.watcher is not None else 0

    @property
    def metrics_url(self) -> str | None:
        return self.watcher.metrics_url if self.watcher is not None else None

    @property
    def rollbacks(self) -> int:
        """Rollbacks and restarts the Watcher carried out so far (0 before training starts)."""
        return self.watcher.rollbacks if self.watcher is not None else 0

    # --- set-up and tear-down ------------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.optimizers:
            raise ConfigError("LrwatchCallback needs an optimizer (configure_optimizers)")
        several = len(trainer.optimizers) > 1
        if several:
            import warnings
            warnings.warn(f"lrwatch watches the first of {len(trainer.optimizers)} optimizers "
                          "and could restore only its state: recovery (rollback, restart, "
                          "the start check) is off; metrics, rules and alerts stay on",
                          stacklevel=2)
        self._close()
        opt = trainer.optimizers[0]
        configs = getattr(trainer, "lr_scheduler_configs", None) or []
        sched = configs[0].scheduler if configs else None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if self.lr_find and self.lr_find_result is None and int(trainer.global_step) == 0:
            self._find_lr(trainer, pl_module, opt, sched, scaler)
        kw = export_kwargs(self.watcher_kwargs, int(trainer.global_rank), self.export)
        if several:   # a rollback would rewind every weight but only one optimizer's state
            kw["recovery"] = False
        if int(getattr(trainer, "accumulate_grad_batches", 1) or 1) > 1:
            # a validation between micro-batches joins the step logged before it, whose flush
            # must not be judged yet then: the flush is landed a step late (flush_lag=1)
            kw.setdefault("flush_lag", 1)
        if getattr(trainer, "gradient_clip_algorithm", None) in (None, "norm"):
            kw = with_clip(kw, getattr(trainer, "gradient_clip_val", None))
        # A rollback that must measure its rate runs the module's own training_step -- not
        # under manual optimization, where training_step steps the optimizer itself.
        if getattr(pl_module, "automatic_optimization", True):
            kw.setdefault("probe_loss", _training_step_loss)
        elif "probe_loss" not in kw:
            logging.getLogger("lrwatch").warning(
                "lrwatch: manual optimization: training_step steps the optimizer itself, so "
                "lrwatch does not run it on a copy of the run; pass probe_loss=lambda module, "
                "batch: loss to LrwatchCallback for the untrained loss, the start check and "
                "the restart's range test")
        self.watcher = Watcher(pl_module, opt, sched, scaler=scaler, step_hooks=False,
                               start_step=int(trainer.global_step), **kw)
        saved = self._resumable(int(trainer.global_step))
        if saved is not None:
            self.watcher.load_state_dict(saved)
        self._optimizer = opt
        self._handle = opt.register_step_post_hook(self._post_step)
        self._stepped, self._loss_sum, self._loss_n, self._done = False, None, 0, None
        self._eval = {}
        self._untrained_due = int(trainer.global_step) == 0 and self.watcher.untrained_batches > 0
        self._wrap_data(trainer)
        if saved is not None and saved.get("data_pass") and self._sampler is not None:
            _resume_pass(self._sampler, saved["data_pass"], trainer)
        if not getattr(pl_module, "automatic_optimization", True) and scaler is None:
            self._measure_before_clipping(pl_module)

    def _find_lr(self, trainer: Any, pl_module: Any, opt: Any, sched: Any,
                 scaler: Any) -> None:
        """The range test before training; start at its suggestion (see ``lr_find``)."""
        from ..recovery.lr_find import lr_find

        loader = getattr(trainer, "train_dataloader", None)
        if loader is None:
            raise ConfigError("lr_find=True needs a training dataloader")
        curve = lr_find(pl_module, opt, loader, batch_loss=_training_step_loss,
                        scheduler=sched, scaler=scaler, **lr_find_args(self.lr_find))
        self.lr_find_result = curve
        start_at_suggestion(curve, opt, sched)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._wrap_data(trainer)  # reload_dataloaders_every_n_epochs builds new loaders

    def _wrap_data(self, trainer: Any) -> None:
        w = self.watcher
        if w is None:
            return
        loaders = getattr(trainer, "train_dataloader", None)
        stack, self._sampler = [loaders], None
        while stack:
            obj = stack.pop()
            if isinstance(obj, Mapping):
                stack.extend(obj.values())
            elif isinstance(obj, (list, tuple)):
                stack.extend(obj)
            elif obj is not None and wrap_dataloader(obj, w.skip_batch) and obj is loaders:
                self._sampler = skip_sampler_of(obj)   # (_resume_pass)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        log_completed_step(self, start_check=False)   # the fit is over: no check now
        if self.watcher is not None:
            self.watcher.flush()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._close()

    def _close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._clip_wrapped is not None:
            self._clip_wrapped.__dict__.pop("clip_gradients", None)
            self._clip_wrapped = None
        # (a closed Watcher's state is kept already; a checkpoint's loaded since must stay)
        if self.watcher is not None and not self.watcher._closed:
            self._loaded, self._from_checkpoint = self.watcher.state_dict(), False
            self.watcher.close()

    def _resumable(self, step: int) -> dict[str, Any] | None:
        """The state the fit starting at global step ``step`` resumes: a checkpoint's (as it is:
        under manual optimization with several optimizers Lightning's global step counts every
        optimizer's steps, lrwatch's the first one's), or this callback's last fit's where the
        fit goes on from where it ended (the same Trainer). A fresh fit (a new Trainer, no
        checkpoint) starts afresh: lrwatch's step is the framework's global step."""
        saved = self._loaded
        if saved is None or self._from_checkpoint or int(saved.get("step", step)) == step:
            return saved
        logging.getLogger("lrwatch").info(
            "lrwatch: this fit starts at step %d, not where the state kept from the last one "
            "ends (step %s): lrwatch starts afresh", step, saved.get("step"))
        return None

    # --- the step ------------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.watcher is not None and _unwrap(optimizer) is self._optimizer \
                and not self._measured:
            self.watcher.before_step()

    def _measure_before_clipping(self, pl_module: Any) -> None:
        """Manual optimization clips in ``training_step`` (``self.clip_gradients``) before
        ``opt.step()``, inside which Lightning calls ``on_before_optimizer_step``: the
        gradients are measured (and guarded) when ``clip_gradients`` is called instead, as
        they are before Lightning's own clipping under automatic optimization. (A GradScaler's
        gradients are still scaled there: measured in the step, after clipping.)"""
        original = pl_module.clip_gradients

        def clip_gradients(optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            if self.watcher is not None and _unwrap(optimizer) is self._optimizer:
                self.watcher.before_step()
                self._measured = True
            return original(optimizer, *args, **kwargs)

        pl_module.clip_gradients = clip_gradients
        self._clip_wrapped = pl_module

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._measured = False
        if self.watcher is not None:
            self.watcher.after_step()
            self._stepped = True

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            loss = loss.detach()
            # automatic optimization hands over the loss divided by accumulate_grad_batches
            n = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
            if n > 1 and getattr(pl_module, "automatic_optimization", True):
                loss = loss * n
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._loss_n += 1
        reapply_best(self.watcher)
        if self._stepped:  # the optimizer stepped in this batch (not mid-accumulation)
            self._stepped = False
            done: dict[str, Any] = {}
            if self._loss_sum is not None:
                done["loss"] = self._loss_sum / self._loss_n if self._loss_n > 1 else self._loss_sum
            self._done = done
            self._loss_sum, self._loss_n = None, 0

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or self.watcher is None or not _fitting(trainer):
            return   # (trainer.validate() after a fit evaluated no step of a fit to come)
        results: dict[str, Any] = {}
        for key, value in trainer.callback_metrics.items():
            name = eval_name(str(key), self.eval_prefixes)
            v = scalar(value) if name is not None else None
            if v is not None:
                results[name] = v
        # Between micro-batches (the last step logged at its boundary, the next one not
        # taken yet) the weights evaluated are the last step's: the results join it
        if results and not (self._done is None and self.watcher.log_evaluation(**results)):
            self._eval.update(results)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any,
                             batch_idx: int) -> int | None:
        self._measured = False   # (a clip_gradients call with no step after it)
        self._boundary(trainer)
        if self.watcher is not None and self.watcher.should_stop:
            _end_epoch_before_this_batch(pl_module)   # should_stop then ends the fit
            return -1
        if self.watcher is not None:
            self._follow_scheduler(trainer)
            if self._untrained_due:   # in a batch hook, where training_step may self.log
                self._untrained_due = False
                # where a second pass cannot be read (a stream, persistent workers), the
                # batch the run is about to train on, before it does
                self.watcher.measure_untrained(
                    _first_batches(trainer, self.watcher.untrained_batches) or [batch])
            self.watcher.remember_batch(batch)   # for a rollback's range test
            self.watcher.start_check_batch(batch)
        return None

    def _follow_scheduler(self, trainer: Any) -> None:
        """A scheduler swapped in mid-fit (``StochasticWeightAveraging`` puts ``SWALR`` in at
        its start epoch) is the one lrwatch cuts and restores from then on."""
        configs = getattr(trainer, "lr_scheduler_configs", None) or []
        sched = configs[0].scheduler if configs else None
        assert self.watcher is not None
        if sched is not None and sched is not self.watcher.scheduler:
            logging.getLogger("lrwatch").info(
                "lrwatch: the scheduler is now %s (was %s): rate cuts and rollbacks follow it",
                type(sched).__name__, type(self.watcher.scheduler).__name__)
            self.watcher.rebind_scheduler(sched)

    def _boundary(self, trainer: Any) -> None:
        """Log the completed step (with any evaluation that followed it): the Watcher then
        flushes when due, and carries out rollback, skip, reduce_lr or stop right here."""
        if log_completed_step(self):
            trainer.should_stop = True
            _lift_minimums(trainer)

    # --- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The Watcher's counters and detector state (saved in Lightning's checkpoint), with
        the step just completed (logged at the next boundary) and its values."""
        if self.watcher is not None:
            note_pending(self)
            saved = self.watcher.state_dict()
            if self._sampler is not None:   # the current pass (_resume_pass)
                saved["data_pass"] = self._sampler.pass_state()
            return saved
        return dict(self._loaded or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict) if state_dict else None
        self._from_checkpoint = self._loaded is not None
        # Lightning calls this before on_train_start: a Watcher here is the last fit's, closed
        # (loading into it opened its trace again, and the new Watcher could not write it)
        if self.watcher is not None and not self.watcher._closed and self._loaded:
            self.watcher.load_state_dict(self._loaded)


def _resume_pass(sampler: Any, carried: Mapping[str, Any], trainer: Any) -> None:
    """A fit resumed from a checkpoint written mid-epoch. Lightning restores the epoch and
    its batch count, and a training loader that resumes mid-epoch (``state_dict`` /
    ``load_state_dict``, as Lightning asks of one: torchdata's ``StatefulDataLoader``)
    passes by the batches it yielded; the batches a rollback's skip window dropped are none,
    so it would land that many batches early, train them, and the ``SkipSampler`` would
    count the passed-by batches in ``data_position`` again. The checkpoint's pass is
    replayed instead (:meth:`SkipSampler.resume`: its batches yielded and dropped as they
    were, not counted again). A loader that does not resume starts the epoch afresh
    (Lightning warns that the results are unreliable): the pass is not replayed there, nor
    where it had run out (the fit goes on in a fresh epoch)."""
    loader = getattr(trainer, "train_dataloader", None)
    resumes = callable(getattr(loader, "state_dict", None)) and callable(
        getattr(loader, "load_state_dict", None))
    if resumes and not carried.get("done"):
        sampler.resume(carried)
    else:
        sampler.earlier = int(carried.get("earlier", 0)) + len(carried.get("drops", ()))


def _first_batches(trainer: Any, n: int) -> list[Any]:
    """The first ``n`` batches of a fresh pass over the training dataloader, on the module's
    device, with the random generators it draws its order from as they were (the fit loop's
    own pass is unchanged). Empty when there is no single dataloader to read, or when it keeps
    persistent workers (a second iterator would reset the fit loop's)."""
    from ..recovery.lr_find import _generators

    loader = getattr(trainer, "train_dataloader", None)
    if (loader is None or isinstance(loader, (Mapping, list, tuple))
            or getattr(loader, "persistent_workers", False)
            # a stream: a second pass may draw from the run's own (a one-pass stream lost
            # its batches 3-10 to the measurement)
            or isinstance(getattr(loader, "dataset", None), torch.utils.data.IterableDataset)):
        return []
    gens = _generators(loader)
    states = [g.get_state() for g in gens]
    try:
        with rng_kept():
            batches = list(itertools.islice(iter(loader), n))
    finally:
        for g, st in zip(gens, states):
            g.set_state(st)
    move = getattr(trainer.strategy, "batch_to_device", None)
    return [move(b) for b in batches] if callable(move) else batches


def _training_step_loss(pl_module: Any, batch: Any) -> torch.Tensor:
    """The loss of ``training_step`` on ``batch`` (a tensor, or a dict's ``"loss"``), with
    its ``self.log``/``self.log_dict`` calls dropped: lrwatch's extra calls (the untrained
    loss, the start check's shadow, a range test) must not reach the user's logged metrics
    (an epoch mean of the training loss would average them in). It runs in the precision
    plugin's ``train_step_context`` (autocast under ``bf16-mixed``/``16-mixed``), as the fit
    loop runs it: a shadow adopted by the start check is then the run at its rate."""
    saved = {k: pl_module.__dict__[k] for k in ("log", "log_dict") if k in pl_module.__dict__}
    pl_module.log = pl_module.log_dict = _drop
    # under the precision plugin's context (bf16/16-mixed: autocast), as the fit loop runs it
    plugin = getattr(getattr(pl_module, "_trainer", None), "precision_plugin", None)
    context = getattr(plugin, "train_step_context", None)
    try:
        with context() if callable(context) else contextlib.nullcontext():
            out = pl_module.training_step(batch, 0)
    finally:
        for k in ("log", "log_dict"):
            if k in saved:
                setattr(pl_module, k, saved[k])
            else:
                pl_module.__dict__.pop(k, None)
    loss = out.get("loss") if isinstance(out, Mapping) else out
    if not isinstance(loss, torch.Tensor):
        raise ConfigError("training_step returned no loss tensor; pass probe_loss= to "
                          "LrwatchCallback to probe the learning rate")
    return loss


def _fitting(trainer: Any) -> bool:
    """Whether the trainer runs ``fit`` (not ``validate``/``test``/``predict``)."""
    fn = getattr(getattr(trainer, "state", None), "fn", None)
    return fn is None or fn == "fit"


def _lift_minimums(trainer: Any) -> None:
    """Let lrwatch's stop end the fit before ``min_steps``/``min_epochs``: Lightning ignores
    ``should_stop`` until they are met, so the fit went on through epochs that each ended at
    their first batch (the stop answers ``-1`` there), until ``max_epochs`` -- for ever with
    ``max_steps`` and no ``max_epochs``. Said once, with the minimums lifted."""
    loop = getattr(trainer, "fit_loop", None)
    epoch_loop = getattr(loop, "epoch_loop", None)
    if loop is None or epoch_loop is None:
        return
    min_steps, min_epochs = getattr(epoch_loop, "min_steps", None), loop.min_epochs
    progress = getattr(getattr(loop, "epoch_progress", None), "current", None)
    short_steps = bool(min_steps) and int(trainer.global_step) < int(min_steps)
    # (the epoch at hand ends at the stop's -1 and counts: min_epochs=1, Lightning's
    # default, is met by then in the first epoch)
    short_epochs = bool(min_epochs) and progress is not None and \
        int(progress.processed) + 1 < int(min_epochs)
    if not (short_steps or short_epochs):
        return
    logging.getLogger("lrwatch").warning(
        "lrwatch: stopping at step %d before the Trainer's min_steps=%s / min_epochs=%s, "
        "which would keep the fit going: lrwatch's stop lifts them",
        int(trainer.global_step), min_steps, min_epochs)
    epoch_loop.min_steps = None
    loop.min_epochs = None


def _end_epoch_before_this_batch(pl_module: Any) -> None:
    """Lightning skips the batch at hand (and ends the epoch) on a ``-1`` from the module's
    ``on_train_batch_start``, which it calls right after the callbacks' -- a callback's own
    ``-1`` is ignored, and the batch was trained on top of a stop's restored state. The
    module's hook answers ``-1`` for this one call."""
    def on_train_batch_start(*args: Any, **kwargs: Any) -> int:
        pl_module.__dict__.pop("on_train_batch_start", None)
        return -1

    pl_module.on_train_batch_start = on_train_batch_start


def _drop(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``LightningModule.log`` while lrwatch runs ``training_step`` itself."""


def _unwrap(optimizer: Any) -> Any:
    """The torch optimizer inside a ``LightningOptimizer``."""
    return getattr(optimizer, "_optimizer", optimizer)
