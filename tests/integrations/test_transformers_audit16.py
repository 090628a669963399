"""Sixteenth audit round (6 December): the Hugging Face callback's resume after a
rollback's ``skip_batches``, with a real ``transformers.Trainer`` on the tiny GPT-2 of
``test_transformers`` (CPU)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import Trainer, TrainerCallback  # noqa: E402

from lrwatch.integrations.transformers import STATE_FILE, LrwatchCallback  # noqa: E402

from .test_transformers import Poison, Seqs, _args, _collate, _model  # noqa: E402

_REC = {"guard": "off", "start_check": "off", "good_after": 1, "min_interval": 1,
        "cooldown": 0, "skip_batches": 3}


class Batches(TrainerCallback):
    """The batches each optimizer step trained on (each sequence's first token: the
    dataset's random starts tell them apart), by global step."""

    def __init__(self, model: Any) -> None:
        self.by_step: dict[int, list[list[int]]] = {}
        self.step = 0
        model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: Any, kwargs: Any, output: Any) -> None:
        if module.training and "input_ids" in kwargs:
            self.by_step.setdefault(self.step, []).append(kwargs["input_ids"][:, 0].tolist())

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.step = state.global_step + 1


def _run(tmp_path: Path, resume: str | None = None, **kw: Any) -> tuple[Any, Batches, Any]:
    model = _model()
    seen = Batches(model)
    cb = LrwatchCallback(flush_every=1, recovery=_REC)
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=16, save_strategy="steps",
                                              save_steps=10, **kw),
                      train_dataset=Seqs(2000), data_collator=_collate,
                      callbacks=[cb, Poison(model, {5}), seen])
    trainer.train(resume_from_checkpoint=resume)
    return cb, seen, trainer


@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_resume_after_a_skip_trains_the_batches_the_whole_run_trains(
        tmp_path: Path, accumulation: int) -> None:
    """A NaN at step 5 rolls back and the skip window drops the next 3 batches; the
    checkpoint at step 10. The Trainer fast-forwards ``global_step`` x accumulation batches
    into the epoch, but the dropped batches are no steps: the resumed run landed 3 batches
    early, trained the very batches the skip had dropped at steps 11-13 and the rest of the
    epoch 3 batches late, and counted the fast-forwarded batches in ``data_position`` again.
    Now the checkpoint carries what the skip dropped of the current epoch, and the resumed
    run's sampler passes the same batches by: it trains what the whole run trains, and
    counts as it does."""
    whole, seen, _ = _run(tmp_path / "a", gradient_accumulation_steps=accumulation)
    assert whole.rollbacks == 1 and whole.watcher.skipped_batches == 3
    ck = tmp_path / "a" / "out" / "checkpoint-10"
    saved = json.loads((ck / STATE_FILE).read_text())
    assert saved["skip_remaining"] == 0
    resumed, again, _ = _run(tmp_path / "a", resume=str(ck),
                             gradient_accumulation_steps=accumulation)
    assert sorted(again.by_step) == list(range(11, 17))
    assert {s: again.by_step[s] for s in range(11, 17)} == {
        s: seen.by_step[s] for s in range(11, 17)}
    assert resumed.watcher.data_position == whole.watcher.data_position
