"""Twelfth audit round (6 December): the Hugging Face callback under unusual but legitimate
use, with a real ``transformers.Trainer`` on the tiny GPT-2 of ``test_transformers`` (CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
safetensors = pytest.importorskip("safetensors.torch")

from lrwatch.integrations.transformers import LrwatchCallback  # noqa: E402

from .test_transformers import Poison, _model, _train  # noqa: E402


def test_load_best_model_at_end_keeps_the_best_checkpoint(tmp_path: Path) -> None:
    """The last steps fail; the Trainer loads its best checkpoint after the loop and only then
    calls on_train_end, where lrwatch's last flush judged the failure and rolled the model
    back (here: restarted it from its initial weights) over the best checkpoint the user
    asked for."""
    model = _model()
    cb = LrwatchCallback(flush_every=5, recovery={"guard": "off"})
    trainer = _train(tmp_path, cb, [Poison(model, {19, 20})], model=model, max_steps=20,
                     eval_strategy="steps", eval_steps=10, save_strategy="steps", save_steps=10,
                     load_best_model_at_end=True)
    best = trainer.state.best_model_checkpoint
    assert best is not None and cb.rollbacks >= 1       # the failure was acted on
    saved = safetensors.load_file(str(Path(best) / "model.safetensors"))
    mine = model.state_dict()
    for name, value in saved.items():
        assert torch.equal(mine[name], value), name


def test_the_step_the_trainer_runs_after_a_stop_is_undone(tmp_path: Path) -> None:
    """The rollback budget spent: the stop puts the last known-good state back and takes a
    final snapshot of it; the Trainer honours the stop only after the step in progress, which
    trained on top of it (the run ended neither at the known-good state nor at the snapshot
    lrwatch said it stopped at; only a best-state restore was put back after that step)."""
    model = _model()
    cb = LrwatchCallback(flush_every=1, recovery={"guard": "off", "good_after": 3,
                                                  "min_interval": 3, "cooldown": 0,
                                                  "max_rollbacks": 2})
    _train(tmp_path, cb, [Poison(model, set(range(20, 400, 12)))], model=model, max_steps=120)
    w = cb.watcher
    assert w is not None and w.should_stop and cb.exit_status == 4
    assert w.store is not None
    final = w.store.latest()
    assert final is not None
    kept = final.load()["model"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, kept[name]), name
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_resume_from_a_checkpoint_elsewhere_says_lrwatchs_state_is_not_found(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``train(resume_from_checkpoint=<a folder outside output_dir>)``: the callback looks for
    its state in ``output_dir/checkpoint-N`` only (the Trainer does not tell callbacks where it
    resumed from), and went on without it in silence: the rollback budget, the rate's scale
    and the detectors started afresh. It now says so and names ``resume_from=``, which
    loads it."""
    import shutil

    first = LrwatchCallback(flush_every=2)
    _train(tmp_path / "a", first, max_steps=6, save_strategy="steps", save_steps=6)
    moved = tmp_path / "kept" / "checkpoint-6"
    shutil.copytree(tmp_path / "a" / "out" / "checkpoint-6", moved)
    caplog.set_level("WARNING", logger="lrwatch")
    cb = LrwatchCallback(flush_every=2)
    _train(tmp_path / "b", cb, max_steps=8, resume=str(moved))
    said = [r.getMessage() for r in caplog.records if "resume_from" in r.getMessage()]
    assert len(said) == 1 and "checkpoint-6" in said[0]
    caplog.clear()
    cb = LrwatchCallback(flush_every=2, resume_from=str(moved))
    _train(tmp_path / "c", cb, max_steps=8, resume=str(moved))
    assert not [r for r in caplog.records if "resume_from" in r.getMessage()]
    assert cb.watcher is not None and cb.watcher.policy.state.resumed_at == 6
