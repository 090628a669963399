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


def _run(tmp_path: Path, resume: str | None = None, rows: int = 2000, poison: int = 5,
         save: int = 10, **kw: Any) -> tuple[Any, Batches, Any]:
    model = _model()
    seen = Batches(model)
    cb = LrwatchCallback(flush_every=1, recovery=_REC)
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=save + 6,
                                              save_strategy="steps", save_steps=save, **kw),
                      train_dataset=Seqs(rows), data_collator=_collate,
                      callbacks=[cb, Poison(model, {poison}), seen])
    trainer.train(resume_from_checkpoint=resume)
    return cb, seen, trainer


@pytest.mark.parametrize("rows,poison,save,accumulation", [
    (2000, 5, 10, 1), (2000, 5, 10, 2), (48, 2, 8, 1), (64, 2, 12, 1), (24, 2, 8, 1),
    (32, 2, 9, 1), (20, 2, 8, 1), (36, 2, 9, 1)])
def test_a_resume_after_a_skip_trains_the_batches_the_whole_run_trains(
        tmp_path: Path, rows: int, poison: int, save: int, accumulation: int,
        caplog: pytest.LogCaptureFixture) -> None:
    """A NaN at step ``poison`` rolls back and the skip window drops the next 3 batches; the
    checkpoint at step ``save``. The Trainer fast-forwards ``global_step`` x accumulation
    batches into the epoch ``global_step`` // steps per epoch, but the dropped batches are
    no steps: the resumed run landed 3 batches early, trained the very batches the skip had
    dropped (250 batches an epoch: at steps 11-13) and the rest of the epoch 3 batches late,
    and counted the fast-forwarded batches in ``data_position`` again. Now the checkpoint
    carries what the skip dropped of the current epoch, the Trainer's epoch and the step the
    epoch began at, and the resumed run's sampler passes the same batches by, also where
    the drops were in an earlier epoch (6 and 8 batches an epoch): it trains what the
    whole run trains, and counts as it does. With 3 and 4 batches an epoch the whole run
    ended before ``max_steps``, at 12 and 13 (the Trainer plans its epochs on their full
    length before it starts, and the skips ran it out of epochs), and a run resumed at 8,
    the Trainer an epoch behind the run, went on to 14 (20 rows, 3 batches the last of 4
    rows: 12 and 14). Now each epoch is refilled to its full length with the first batches
    of the next epoch's order (a short last batch kept last), and both reach
    ``max_steps``."""
    kw = dict(rows=rows, poison=poison, save=save, gradient_accumulation_steps=accumulation)
    whole, seen, first = _run(tmp_path / "a", **kw)
    assert whole.rollbacks == 1 and whole.watcher.skipped_batches == 3
    ck = tmp_path / "a" / "out" / f"checkpoint-{save}"
    saved = json.loads((ck / STATE_FILE).read_text())
    assert saved["skip_remaining"] == 0 and saved["data_pass"]["epoch"] >= (rows < 100)
    resumed, again, second = _run(tmp_path / "a", resume=str(ck), **kw)
    after = [s for s in range(save + 1, save + 7) if s in seen.by_step]
    assert after == list(range(save + 1, save + 7)) and sorted(again.by_step) == after
    assert {s: again.by_step[s] for s in after} == {s: seen.by_step[s] for s in after}
    assert first.state.global_step == second.state.global_step == save + 6
    assert resumed.watcher.data_position == whole.watcher.data_position
    assert "not corrected" not in caplog.text
