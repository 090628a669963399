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


def _frozen_late(seed: int, rate) -> list[Sample]:
    """A loss flat at 0.8x its untrained level; evaluations that wobble, then freeze from step
    250 (the same value, bit for bit); the learning rate ``rate(step)`` on every step."""
    rng = random.Random(seed)
    out = []
    for step in range(1, 301):
        vals = {"lr": rate(step),
                "loss": 2.3 if step == 1 else 1.84 * math.exp(rng.gauss(0, 0.03))}
        if step % 10 == 0:
            vals["eval_loss"] = 1.9 * (1 + 0.01 * math.sin(0.7 * min(step, 250)))
        out.append(Sample(step=step, values=vals))
    return out


def test_frozen_evaluations_at_an_annealed_rate_are_not_a_dead_network():
    def cosine(step: int) -> float:
        return 0.05 * (1 + math.cos(math.pi * step / 300))

    for seed in range(3):
        dead = [s for r, s in _critical(_frozen_late(seed, lambda step: 0.1))
                if r == "dead_network"]
        assert dead and 270 <= dead[0] <= 280, (seed, dead)       # a constant rate: dead
        # the same evaluations freeze as a cosine schedule reaches 2% of its largest rate
        assert cosine(270) < 0.05 * cosine(1)
        assert "dead_network" not in {r for r, _ in _critical(_frozen_late(seed, cosine))}
