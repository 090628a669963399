"""The training pack's stall cut (`loss_plateau_rate_cut`): a loss that stalls after learning
something beyond a constant prediction asks for `reduce_lr`; a loss that stalls at the constant
prediction's level (a network that learned nothing a bias could not) does not, and is left to
`never_learned` and the dead-network rules, which a cut would only delay (blind set O: a
DeepSets classifier at 30x its rate was cut three times at chance instead of restarted)."""

from __future__ import annotations

import math
import random

from lrwatch.rules import Engine, load_pack
from lrwatch.samples import Sample


def _flat(level: float, constant: float | None, n: int = 200, seed: int = 0) -> list[Sample]:
    """A loss that falls from 1.4 to ``level`` over 20 steps and stays there (5% noise)."""
    rng = random.Random(seed)
    out = []
    for step in range(1, n + 1):
        base = level + (1.4 - level) * max(0.0, (20 - step) / 20)
        vals = {"loss": base * math.exp(rng.gauss(0.0, 0.05)), "grad_norm": 1.0, "lr": 0.01}
        if step == 1:
            vals["untrained_loss"] = 1.4
            if constant is not None:
                vals["constant_loss"] = constant
        out.append(Sample(step=step, values=vals))
    return out


def _fired(samples: list[Sample]) -> set[str]:
    eng = Engine(load_pack("training"))
    return {e.rule for s in samples for e in eng.update(s) if e.kind == "firing"}


def test_a_stall_below_the_constant_level_asks_for_the_cut() -> None:
    for seed in range(3):
        fired = _fired(_flat(0.5, constant=1.39, seed=seed))
        assert {"loss_plateau", "loss_plateau_rate_cut"} <= fired, seed
        assert "loss_at_constant" not in fired


def test_a_stall_at_the_constant_level_is_not_cut() -> None:
    for seed in range(3):
        fired = _fired(_flat(1.40, constant=1.39, seed=seed))
        assert {"loss_plateau", "loss_at_constant"} <= fired, seed
        assert "loss_plateau_rate_cut" not in fired


def test_without_a_measured_constant_level_every_stall_asks_for_the_cut() -> None:
    fired = _fired(_flat(1.40, constant=None))
    assert "loss_plateau_rate_cut" in fired and "loss_at_constant" not in fired
    rule = load_pack("training")["loss_plateau_rate_cut"]
    assert rule.action_params == {"reduce_lr": {"unscheduled": True}}
