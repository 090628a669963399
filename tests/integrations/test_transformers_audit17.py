"""Seventeenth audit round (6 December): the Hugging Face callback's resume after a refill
from a sampler whose order is not a function of ``set_epoch``, with a real
``transformers.Trainer`` on the tiny GPT-2 of ``test_transformers`` (CPU)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch  # noqa: E402
from transformers import Trainer  # noqa: E402

from lrwatch.integrations.transformers import STATE_FILE, LrwatchCallback  # noqa: E402

from .test_transformers import Poison, Seqs, _args, _collate, _model  # noqa: E402
from .test_transformers_audit16 import _REC, Batches  # noqa: E402


class DrawnTrainer(Trainer):
    """A Trainer whose sampler draws a new order at each pass from the global random state
    and has no ``set_epoch`` (a ``WeightedRandomSampler``: accelerate leaves it as it is)."""

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        n = len(self.train_dataset)
        return torch.utils.data.WeightedRandomSampler(torch.ones(n), n, replacement=False)


def _run(tmp_path: Path, save: int, resume: str | None = None) -> tuple[Any, Batches, Any]:
    """48 rows, 6 batches an epoch; a NaN at step 2 (rolled back, 3 batches skipped: the
    first pass is topped up with the first 3 of an order drawn early); the checkpoint at
    ``save``; 14 steps."""
    model = _model()
    seen = Batches(model)
    cb = LrwatchCallback(flush_every=1, recovery=_REC)
    trainer = DrawnTrainer(model=model, args=_args(tmp_path, max_steps=14, save_strategy="steps",
                                                   save_steps=save),
                           train_dataset=Seqs(48), data_collator=_collate,
                           callbacks=[cb, Poison(model, {2}), seen])
    trainer.train(resume_from_checkpoint=resume)
    return cb, seen, trainer


@pytest.mark.parametrize("save", [6, 5])
def test_a_resume_after_a_refill_from_a_sampler_without_set_epoch_trains_the_order_drawn(
        tmp_path: Path, save: int, caplog: pytest.LogCaptureFixture) -> None:
    """The first pass dropped 3 batches and was topped up from the next pass's order, drawn
    early (kept for that pass since the seventeenth round). The checkpoint did not carry
    it: a run resumed between the refill and the next pass (at the end of the first epoch,
    6; inside the refill, 5) drew that pass's order afresh from the random state the
    Trainer restored, already past the early draw, and trained an order the whole run
    never trains. Now the checkpoint carries the orders drawn early (``data_pass``'s
    ``early``), and the resumed run trains, step for step, what the whole run trains."""
    whole, seen, first = _run(tmp_path / "a", save)
    assert whole.rollbacks == 1 and whole.watcher.skipped_batches == 3
    ck = tmp_path / "a" / "out" / f"checkpoint-{save}"
    saved = json.loads((ck / STATE_FILE).read_text())
    assert saved["data_pass"].get("early"), saved["data_pass"]
    resumed, again, second = _run(tmp_path / "a", save, resume=str(ck))
    after = list(range(save + 1, 15))
    assert sorted(again.by_step) == after and all(s in seen.by_step for s in after)
    assert {s: again.by_step[s] for s in after} == {s: seen.by_step[s] for s in after}
    assert first.state.global_step == second.state.global_step == 14
    assert resumed.watcher.data_position == whole.watcher.data_position
    assert "not corrected" not in caplog.text


def test_a_checkpoint_without_the_orders_drawn_early_still_resumes(tmp_path: Path) -> None:
    """A checkpoint written before the seventeenth round's audit carries no ``early``: it
    loads, and the resumed run draws the next pass's order afresh, as it did then."""
    whole, seen, _ = _run(tmp_path / "a", 6)
    ck = tmp_path / "a" / "out" / "checkpoint-6"
    saved = json.loads((ck / STATE_FILE).read_text())
    del saved["data_pass"]["early"]
    (ck / STATE_FILE).write_text(json.dumps(saved))
    resumed, again, second = _run(tmp_path / "a", 6, resume=str(ck))
    assert sorted(again.by_step) == list(range(7, 15)) and second.state.global_step == 14
    assert resumed.watcher.data_position == whole.watcher.data_position
    assert resumed.watcher.skipped_batches == 3
