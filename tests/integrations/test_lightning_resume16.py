"""Sixteenth audit round (6 December): the Lightning callback's mid-epoch resume after a
rollback's ``skip_batches``, with a real ``lightning.Trainer`` on the tiny MLP of
``test_lightning`` (CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from lrwatch.integrations.lightning import LrwatchCallback  # noqa: E402

from .test_lightning import TinyMLP  # noqa: E402

_REC = {"guard": "off", "start_check": "off", "good_after": 1, "min_interval": 1,
        "cooldown": 0, "skip_batches": 3}


class Resumable(torch.utils.data.DataLoader):
    """A DataLoader that resumes mid-epoch, as Lightning asks of one (``state_dict`` /
    ``load_state_dict``): it counts the batches it yielded in the epoch, and a loaded state
    passes that many by (as torchdata's ``StatefulDataLoader`` does for a sampler without a
    state of its own)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.yielded = self._skip = 0

    def __iter__(self) -> Iterator[Any]:
        skip, self._skip, self.yielded = self._skip, 0, 0
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                self.yielded = i + 1
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state["yielded"])


class Batches(pl.Callback):
    """The batch each global step trained on (its first sample id; the last one wins)."""

    def __init__(self) -> None:
        self.by_step: dict[int, int] = {}

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, i: int) -> None:
        self.by_step[trainer.global_step + 1] = int(batch[2][0])


def _run(tmp_path: Path, rows: int, save: int, resume: str | None = None
         ) -> tuple[LrwatchCallback, Batches, Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 8, generator=g)
    data = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long(), torch.arange(rows))
    cb, seen = LrwatchCallback(flush_every=1, recovery=_REC), Batches()
    ck = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=save,
                                      save_top_k=-1)
    trainer = pl.Trainer(max_steps=save + 6, max_epochs=20, callbacks=[cb, seen, ck],
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, limit_val_batches=0)
    torch.manual_seed(0)
    trainer.fit(TinyMLP(sched=False, nan_from=12), Resumable(data, batch_size=16),
                ckpt_path=resume)
    return cb, seen, trainer


@pytest.mark.parametrize("rows,save", [(640, 16), (160, 16)])
def test_a_mid_epoch_resume_after_a_skip_trains_the_batches_the_whole_run_trains(
        tmp_path: Path, rows: int, save: int) -> None:
    """A NaN at step 12 rolls back and the skip window drops the next 3 batches; the
    checkpoint at step 16, mid-epoch (40 batches an epoch; 10: in the second epoch). A
    loader that resumes mid-epoch passes by the batches it yielded, but the dropped ones
    are none: the resumed run landed 3 batches early, trained the dropped batches (steps
    17-19 got batches 16-18 where the whole run has 19-21) and counted the passed-by
    batches in ``data_position`` again (42 against 26). Now the checkpoint carries the
    pass and the resumed run replays it, as the Hugging Face callback does."""
    whole, seen, _ = _run(tmp_path / "a", rows, save)
    assert whole.rollbacks == 1 and whole.watcher is not None
    assert whole.watcher.skipped_batches == 3
    ck = next((tmp_path / "a" / "ck").glob(f"*step={save}.ckpt"))
    resumed, again, trainer = _run(tmp_path / "b", rows, save, resume=str(ck))
    after = range(save + 1, save + 7)
    assert [again.by_step.get(s) for s in after] == [seen.by_step[s] for s in after]
    assert resumed.watcher is not None and trainer.global_step == save + 6
    assert resumed.watcher.data_position == whole.watcher.data_position
