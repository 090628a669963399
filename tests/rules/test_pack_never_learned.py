"""The default pack on runs that never learn: a loss flat at its untrained level is critical
(never_learned) after 100 steps; the same loss with a held-out metric that still improves is a
slow starter, and the veto (`unless`) keeps it quiet."""

from __future__ import annotations

import math
import random

from lrwatch.rules import Engine, load_pack
from lrwatch.samples import Sample


def _run(n: int, seed: int, eval_loss) -> list[Sample]:
    rng = random.Random(seed)
    out = []
    for step in range(1, n + 1):
        # flat at the untrained level (the first step's loss), with 3% noise
        vals = {"loss": 2.3 * (1.03 * math.exp(rng.gauss(0, 0.03)) if step > 1 else 1.0)}
        if step % 10 == 0:
            vals["eval_loss"] = eval_loss(step)
        out.append(Sample(step=step, values=vals))
    return out


def _critical(samples: list[Sample]) -> list[tuple[str, int]]:
    eng = Engine(load_pack("training"))
    return [(e.rule, e.step) for s in samples for e in eng.update(s)
            if e.kind == "firing" and e.severity == "critical"]


def test_a_network_that_never_learned_is_critical_after_80_steps():
    for seed in range(3):
        crit = _critical(_run(160, seed, lambda step: 2.3 * (1 + 0.01 * math.sin(0.7 * step))))
        steps = [s for r, s in crit if r == "never_learned"]
        assert steps and 80 <= steps[0] <= 110, (seed, crit)


def test_a_slow_starter_whose_held_out_loss_improves_is_not():
    for seed in range(3):
        crit = _critical(_run(160, seed, lambda step: 2.3 * (1 - 0.002 * step)))
        assert not [r for r, _ in crit if r in ("never_learned", "loss_not_learning")], crit
