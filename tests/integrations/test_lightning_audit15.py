"""Fifteenth audit round (6 December): the Lightning callback with a real
``lightning.Trainer`` on the tiny MLP of ``test_lightning`` (CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pl = pytest.importorskip("lightning.pytorch")

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
