"""The sixteenth round's audit in a real ``lightning.Trainer.fit``: Lightning steps a
scheduler once per epoch by default, and a rollback across an epoch's end left the schedule
an epoch behind the fit (docs/integrations.md, "Defects found by the sixteenth round's
audit")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from flag_rules import NONFINITE_ROLLBACK  # noqa: E402
from lrwatch.integrations.lightning import LrwatchCallback  # noqa: E402


class EpochStepped(pl.LightningModule):
    """A classifier whose StepLR halves the rate at every epoch's end (Lightning's default
    ``interval: "epoch"``); its loss is NaN at global step ``poison_at`` until rolled back."""

    def __init__(self, poison_at: int | None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
        self.poison_at = poison_at
        self.cb: Any = None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        w = self.cb.watcher if self.cb is not None else None
        bad = (self.poison_at is not None and self.trainer.global_step == self.poison_at
               and w is not None and not w.rollbacks)
        loss = nn.functional.cross_entropy(self.net(x), y)
        return loss * float("nan") if bad else loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)}


def _fit(tmp_path: Path, poison_at: int | None) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(160, 8, generator=g)
    y = (x[:, 0] > 0).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    rules = tmp_path / "nonfinite.yml"
    rules.write_text(NONFINITE_ROLLBACK)
    cb = LrwatchCallback(flush_every=1, rules=str(rules),
                         recovery={"cooldown": 0, "sudden_hold": 0, "sudden_margin": 0,
                                   "guard": "off", "start_check": "off", "min_interval": 6,
                                   "max_interval": 6, "good_after": 3})
    torch.manual_seed(0)
    model = EpochStepped(poison_at)
    model.cb = cb
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, callbacks=[cb],
                         max_epochs=4)
    trainer.fit(model, loader)
    return cb.watcher, trainer


def test_a_rollback_across_an_epoch_end_keeps_lightnings_per_epoch_schedule(
        tmp_path: Path) -> None:
    """Ten steps an epoch; a failure at step 22 (epoch 2) rolls back to the snapshot of step
    18 (epoch 1). The scheduler was put back to epoch 1 and the fit ended with its rate at
    0.1 x 0.5**3 instead of 0.1 x 0.5**4 (``last_epoch`` 3 of 4)."""
    _, clean = _fit(tmp_path, None)
    w, trainer = _fit(tmp_path, 22)
    assert w.rollbacks == 1
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.last_epoch == clean.lr_scheduler_configs[0].scheduler.last_epoch == 4
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 4)
