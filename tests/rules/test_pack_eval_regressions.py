"""The default pack on evaluation streams: a silent regression (accuracy and loss both worse
than their own noise explains) is critical within 3 evaluations; over-fitting (the loss rises,
the accuracy holds) and a noisy plateau are not critical."""

from __future__ import annotations

import math
import random

from lrwatch.rules import Engine, load_pack
from lrwatch.samples import Sample

EVERY = 10


def _evals(acc: list[float], loss: list[float]) -> list[Sample]:
    return [Sample(step=(i + 1) * EVERY, values={"eval_accuracy": a, "eval_loss": l})
            for i, (a, l) in enumerate(zip(acc, loss))]


def _learning_then_plateau(n: int, seed: int) -> tuple[list[float], list[float]]:
    rng = random.Random(seed)
    acc = [0.90 - 0.4 * math.exp(-i / 3) + rng.gauss(0, 0.004) for i in range(n)]
    loss = [0.30 + 1.0 * math.exp(-i / 3) + rng.gauss(0, 0.006) for i in range(n)]
    return acc, loss


def _critical(samples: list[Sample]) -> list[tuple[str, int]]:
    eng = Engine(load_pack("training"))
    return [(e.rule, e.step) for s in samples for e in eng.update(s)
            if e.kind == "firing" and e.severity == "critical"]


def test_silent_regression_is_critical_within_three_evaluations():
    for seed in range(5):
        acc, loss = _learning_then_plateau(20, seed)
        onset = len(acc)
        # from the onset the model loses 2 accuracy points per evaluation; its loss follows
        acc += [acc[-1] - 0.02 * (k + 1) for k in range(5)]
        loss += [loss[-1] * (1 + 0.05 * (k + 1)) for k in range(5)]
        crit = _critical(_evals(acc, loss))
        assert crit, f"seed {seed}: no critical firing"
        first_step = min(step for _, step in crit)
        assert (onset + 1) * EVERY <= first_step <= (onset + 3) * EVERY, (seed, crit)
        assert "eval_regression_both" in {r for r, _ in crit}


def test_overfitting_and_plateaus_are_not_critical():
    for seed in range(5):
        acc, loss = _learning_then_plateau(30, seed)
        plateau = _evals(acc, loss)
        assert _critical(plateau) == [], seed
        # over-fitting: the held-out loss creeps up 1% per evaluation, the accuracy holds
        over = _evals(acc, loss[:15] + [loss[14] * (1 + 0.01 * k) for k in range(1, 16)])
        assert not [r for r, _ in _critical(over) if r == "eval_regression_both"], seed


def test_a_regression_while_the_schedule_raised_the_rate_waits_for_the_rise_to_pass():
    acc, loss = _learning_then_plateau(20, 0)
    onset_step = (len(acc) + 1) * EVERY
    # a warm restart triples the rate at the onset; the held-out metrics get worse and stay so
    acc += [acc[-1] - 0.06] * 16
    loss += [loss[-1] * 1.3] * 16
    samples = []
    for s in _evals(acc, loss):
        for step in range(s.step - EVERY + 1, s.step + 1):   # every step carries the rate
            lr = 0.3 if step >= onset_step else 0.1
            vals = {"lr": lr, **(s.values if step == s.step else {})}
            samples.append(Sample(step=step, values=vals))
    crit = [(r, st) for r, st in _critical(samples) if r.startswith("eval_")]
    assert crit, "the regression outlasted the rise and must fire"
    assert min(st for _, st in crit) >= onset_step + 99, crit   # the 100-step window passed
