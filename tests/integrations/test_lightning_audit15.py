"""Fifteenth audit round (6 December): the Lightning callback with a real
``lightning.Trainer`` on the tiny MLP of ``test_lightning`` (CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pl = pytest.importorskip("lightning.pytorch")

from lrwatch.exporters.trace import read_trace  # noqa: E402
from lrwatch.integrations.lightning import LrwatchCallback  # noqa: E402

from .test_lightning import TinyMLP, _loader, _trainer  # noqa: E402


class Batches(pl.Callback):
    """Counts the epochs started and the batches the fit loop offered."""

    def __init__(self) -> None:
        self.epochs = self.batches = 0

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.epochs += 1

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, i: int) -> None:
        self.batches += 1


@pytest.mark.parametrize("minimum", [{"min_steps": 150}, {"min_epochs": 5}])
def test_a_stop_ends_the_fit_before_the_trainers_minimum(tmp_path: Path,
                                                         minimum: dict[str, int]) -> None:
    """Lightning ignores ``should_stop`` until ``min_steps``/``min_epochs`` are met: after
    lrwatch's stop (the rollback budget spent at step 49, in the second epoch of 40 batches)
    the fit went on through epochs that each ended at their first batch (the stop answers
    -1 there) until ``max_epochs`` -- with ``max_steps`` and no ``max_epochs``, for ever."""
    cb = LrwatchCallback(flush_every=1, recovery={"guard": "off", "good_after": 3,
                                                  "min_interval": 3, "cooldown": 0,
                                                  "max_rollbacks": 2, "start_check": "off"})
    seen = Batches()
    trainer = _trainer(tmp_path, [cb, seen], max_steps=200, max_epochs=25, **minimum)
    trainer.fit(TinyMLP(sched=False, nan_from=20), _loader())
    w = cb.watcher
    assert w is not None and w.should_stop and cb.exit_status == 4
    assert trainer.global_step == w.step < 60
    assert seen.epochs == 2 and seen.batches == w.step + 1   # not 23 more empty epochs


def test_a_validate_after_the_fit_joins_no_step_of_the_next_fit(tmp_path: Path) -> None:
    """``trainer.validate()`` after a fit (the callback still in the trainer) evaluated the
    fit's end state; its results waited in the callback and joined the first step of the next
    fit with the same callback, and ``keep_best`` kept that step's weights for them."""
    cb = LrwatchCallback(flush_every=5, recovery={"start_check": "off"})
    model = TinyMLP(sched=False)
    trainer = _trainer(tmp_path, [cb], max_steps=10, limit_val_batches=2)
    trainer.fit(model, _loader())
    assert trainer.validate(model, _loader(64, seed=1), verbose=False)[0]["val_acc"] > 0
    trace = tmp_path / "second.jsonl"
    cb.watcher_kwargs["trace"] = str(trace)
    _trainer(tmp_path, [cb], max_steps=10).fit(TinyMLP(sched=False), _loader())
    samples = read_trace(trace)
    assert [s.step for s in samples] == list(range(1, 11))
    assert not any("eval_loss" in s.values for s in samples)   # no validation in this fit
    assert cb.watcher is not None and cb.watcher.best_eval is None


def test_a_checkpoint_carries_its_own_steps_loss_and_validation(tmp_path: Path) -> None:
    """Lightning writes a checkpoint between the optimizer step and the next batch, where the
    callback logs the step: the step's row went into the checkpoint without its loss and
    without the validation that preceded the checkpoint, and a run resumed from it judged
    that step without them."""
    import torch

    ck = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", monitor="val_loss",
                                      save_top_k=-1, filename="{step}")
    trace = tmp_path / "run.jsonl"
    cb = LrwatchCallback(flush_every=4, trace=str(trace), recovery={"start_check": "off"})
    _trainer(tmp_path, [cb, ck], max_steps=20, val_check_interval=10, limit_val_batches=2,
             enable_checkpointing=True).fit(TinyMLP(sched=False), _loader(),
                                            _loader(64, seed=1))
    by_step = {s.step: s.values for s in read_trace(trace)}
    saved = torch.load(tmp_path / "ck" / "step=10.ckpt", weights_only=False)["callbacks"]
    state = next(v for k, v in saved.items() if "LrwatchCallback" in k)
    own = [r for r in state["unjudged"] if r["step"] == 10]
    assert state["step"] == 10 and len(own) == 1
    for key in ("loss", "eval_loss", "eval_accuracy"):
        assert own[0].get(key) == pytest.approx(by_step[10][key], rel=1e-6), key
