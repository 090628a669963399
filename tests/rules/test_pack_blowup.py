"""The default pack's `loss_blowup` on heavy-tailed batch losses: a run of far-up batches is a
blow-up when the run's own history makes it unlikely, so a healthy autoencoder whose single hard
batches reach 5x its typical loss is not rolled back for two of them in a row, while a
light-tailed run's blow-up is still caught on its second step."""

from __future__ import annotations

import math
import random

from lrwatch.samples import Sample
from pack_firings import critical


def _run(seed: int, hard_every: int | None, blowup_at: int | None = None,
         pair_at: int | None = None, n: int = 260) -> list[Sample]:
    """A trained loss around 0.35 with 10% batch noise; every ``hard_every`` steps one hard
    batch at 5.7x; a pair of hard batches (3x, 4.5x) at ``pair_at``; from ``blowup_at`` a loss
    that climbs 3x per step."""
    rng = random.Random(seed)
    out = []
    for step in range(1, n + 1):
        loss = 0.35 * math.exp(rng.gauss(0.0, 0.1))
        if step < 30:
            loss *= 1.0 + 2.0 * (30 - step) / 30       # the first steps' fall
        if hard_every and step > 40 and step % hard_every == 0:
            loss *= 5.7
        if pair_at is not None and step in (pair_at, pair_at + 1):
            loss *= 3.0 if step == pair_at else 4.5
        if blowup_at is not None and step >= blowup_at:
            loss *= 3.0 ** (step - blowup_at + 1)
        vals = {"loss": loss, "grad_norm": 1.0, "lr": 0.01}
        if step == 1:
            vals.update(untrained_loss=1.0, constant_loss=0.95)
        out.append(Sample(step=step, values=vals))
    return out


def test_two_hard_batches_in_a_row_on_a_heavy_tailed_run_are_not_a_blowup() -> None:
    for seed in range(5):
        fired = [s for r, s in critical(_run(seed, hard_every=17, pair_at=200))
                 if r == "loss_blowup"]
        assert fired == [], (seed, fired)


def test_a_blowup_is_caught_on_its_second_step_on_a_light_tailed_run() -> None:
    for seed in range(5):
        fired = [s for r, s in critical(_run(seed, hard_every=None, blowup_at=200))
                 if r == "loss_blowup"]
        assert fired and fired[0] == 201, (seed, fired[:3])


def test_a_blowup_on_a_heavy_tailed_run_is_still_caught_within_a_few_steps() -> None:
    for seed in range(5):
        fired = [s for r, s in critical(_run(seed, hard_every=17, blowup_at=200))
                 if r == "loss_blowup"]
        assert fired and 201 <= fired[0] <= 204, (seed, fired[:3])
