"""The default pack on early blow-ups: a loss that spikes far above its untrained level in the
first steps and comes straight back down is a transient (loss_above_start waits while it falls);
one that stays up there, or climbs, is a divergence within a few steps."""

from __future__ import annotations

import math
import random

from lrwatch.samples import Sample
from pack_firings import critical


def _run(levels: list[float], seed: int, n: int = 120) -> list[Sample]:
    """Loss ``levels[i]`` (times the untrained loss 1.0) at step i+1, then a healthy decay to
    0.3x, with 10% batch noise; step 1 carries the measured start levels."""
    rng = random.Random(seed)
    out = []
    for step in range(1, n + 1):
        base = levels[step - 1] if step <= len(levels) else 0.3 + 0.4 * math.exp(-step / 20)
        vals = {"loss": base * math.exp(rng.gauss(0.0, 0.1)), "grad_norm": 1.0, "lr": 0.01}
        if step == 1:
            vals.update(untrained_loss=1.0, constant_loss=0.95)
        out.append(Sample(step=step, values=vals))
    return out


def _decay(peak: float, steps: int) -> list[float]:
    """From ``peak`` at step 2 geometrically down to 0.7x the untrained loss over ``steps``."""
    return [1.0] + [peak * (0.7 / peak) ** (i / steps) for i in range(steps + 1)]


def test_an_early_spike_that_comes_straight_down_is_not_critical():
    for seed in range(5):
        for peak, steps in ((36.0, 20), (1800.0, 12), (30.0, 10)):
            fired = [s for r, s in critical(_run(_decay(peak, steps), seed))
                     if r == "loss_above_start"]
            assert fired == [], (seed, peak, fired)


def test_a_loss_that_stays_far_above_its_start_or_climbs_is_critical():
    for seed in range(5):
        stays = [1.0] + [30.0] * 60
        climbs = [1.0] + [12.0 * 1.3 ** i for i in range(60)]
        for levels in (stays, climbs):
            fired = [s for r, s in critical(_run(levels, seed, n=61))
                     if r == "loss_above_start"]
            assert fired and fired[0] <= 9, (seed, fired[:3])
