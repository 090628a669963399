"""Fifteenth audit round (6 December): the Hugging Face callback with a real
``transformers.Trainer`` on the tiny GPT-2 of ``test_transformers`` (CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from lrwatch.exporters.trace import read_trace  # noqa: E402
from lrwatch.integrations.transformers import LrwatchCallback  # noqa: E402

from .test_transformers import _train  # noqa: E402


def test_resume_from_a_checkpoint_of_another_step_is_not_loaded(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``resume_from=`` naming a checkpoint of another step than the one the Trainer starts
    at (a fresh ``train()``, or a resume from a later checkpoint): its state was loaded as it
    was, and lrwatch's step ran ahead of or behind the Trainer's global step for the whole
    run (a fresh run's trace began at step 7). It is not loaded now, and a warning says so."""
    _train(tmp_path / "a", LrwatchCallback(flush_every=2), max_steps=6,
           save_strategy="steps", save_steps=6)
    trace = tmp_path / "run.jsonl"
    caplog.set_level("WARNING", logger="lrwatch")
    cb = LrwatchCallback(flush_every=2, trace=str(trace),
                         resume_from=str(tmp_path / "a" / "out" / "checkpoint-6"))
    trainer = _train(tmp_path / "b", cb, max_steps=4)
    assert cb.watcher is not None and cb.watcher.step == 4 == trainer.state.global_step
    assert [s.step for s in read_trace(trace)] == [1, 2, 3, 4]
    said = [r.getMessage() for r in caplog.records if "Trainer starts at step 0" in r.getMessage()]
    assert len(said) == 1 and "step 6" in said[0]


def test_a_checkpoint_carries_its_own_steps_loss_and_evaluation(tmp_path: Path) -> None:
    """The Trainer saves (``on_save``) after the step and its evaluation, before the next
    ``on_step_begin`` where the callback logs the step: the step's row went into
    ``lrwatch_state.json`` without its loss and evaluation, and a run resumed from it judged
    that step without them."""
    import json

    from lrwatch.integrations.transformers import STATE_FILE

    trace = tmp_path / "run.jsonl"
    cb = LrwatchCallback(flush_every=4, trace=str(trace), recovery={"start_check": "off"})
    _train(tmp_path, cb, max_steps=6, save_strategy="steps", save_steps=6,
           eval_strategy="steps", eval_steps=6)
    by_step = {s.step: s.values for s in read_trace(trace)}
    state = json.loads((tmp_path / "out" / "checkpoint-6" / STATE_FILE).read_text())
    own = [r for r in state["unjudged"] if r["step"] == 6]
    assert state["step"] == 6 and len(own) == 1
    for key in ("loss", "eval_loss"):
        assert own[0].get(key) == pytest.approx(by_step[6][key], rel=1e-6), key


def test_an_epoch_a_skip_shortened_leaves_no_gradient_to_the_next_step(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Under gradient accumulation the Trainer plans an epoch's optimizer steps on its full
    length; a rollback's ``skip_batches`` (the ``SkipSampler``) shortened the epoch, so its
    last micro-batch got no step of its own: its gradient went into the next epoch's first
    step (three micro-batches, one of them weighted double) and that step's loss was the sum
    of three (6.5 on a loss of 3.3, a spike the rules read). The callback dropped those
    gradients at the epoch's end; since the sixteenth round the epoch is refilled to its full
    length (``SkipSampler.refill``: the first batches of the next epoch's order), so no
    micro-batch is left over, and the run takes every step it planned."""
    import math

    from transformers import Trainer, TrainerCallback

    from .test_transformers import Poison, Seqs, _args, _collate, _model

    held: list[int] = []

    class NoGradientHeld(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                          **kw: Any) -> None:
            if any(p.grad is not None and bool(p.grad.ne(0).any())
                   for p in model.parameters()):
                held.append(state.global_step + 1)

    model = _model()
    trace = tmp_path / "run.jsonl"
    cb = LrwatchCallback(flush_every=2, trace=str(trace),
                         recovery={"guard": "off", "start_check": "off", "good_after": 2,
                                   "min_interval": 2, "cooldown": 0, "skip_batches": 4})
    caplog.set_level("INFO", logger="lrwatch")
    # 7 batches an epoch, 2 per step: steps of 2, 2, 2 and 1 micro-batches; a NaN at step 4
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=-1, num_train_epochs=3,
                                              gradient_accumulation_steps=2),
                      train_dataset=Seqs(56), data_collator=_collate,
                      callbacks=[cb, Poison(model, {4}), NoGradientHeld()])
    trainer.train()
    assert cb.rollbacks >= 1 and cb.watcher is not None and cb.watcher.skipped_batches == 4
    assert held == []
    losses = [s.values["loss"] for s in read_trace(trace) if math.isfinite(s.values["loss"])]
    assert max(losses) < 4.0   # log(32) = 3.47: the untrained loss on 32 tokens
    assert not any("micro-batch" in r.getMessage() for r in caplog.records)
    assert trainer.state.global_step == 3 * 4 == cb.watcher.step   # three full epochs


def test_a_skip_window_longer_than_an_epoch_does_not_end_the_training(tmp_path: Path) -> None:
    """The Trainer reads an epoch that yields no batch as the end of the data ("There seems
    not to be a single sample in your epoch_iterator") and stops: a rollback's
    ``skip_batches`` longer than an epoch (5 on epochs of 3 batches) ended the run at step 3
    of 18. The epoch the window would empty keeps its last batch now, and the window goes on
    after it; since the sixteenth round each epoch is refilled to its full length from the
    next epoch's order (``SkipSampler.refill``), and the run takes all 18 steps."""
    from transformers import Trainer

    from .test_transformers import Poison, Seqs, _args, _collate, _model

    model = _model()
    cb = LrwatchCallback(flush_every=1, recovery={"guard": "off", "start_check": "off",
                                                  "good_after": 1, "min_interval": 1,
                                                  "cooldown": 0, "skip_batches": 5})
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=-1, num_train_epochs=6),
                      train_dataset=Seqs(24), data_collator=_collate,
                      callbacks=[cb, Poison(model, {2})])
    trainer.train()
    w = cb.watcher
    assert w is not None and cb.rollbacks == 1 and w.skipped_batches == 5
    assert trainer.state.global_step == 6 * 3 == w.step
