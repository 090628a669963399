"""The default pack on evaluation streams: a silent regression (accuracy and loss both worse
than their own noise explains) is critical within 3 evaluations; over-fitting (the loss rises,
the accuracy holds) and a noisy plateau are not critical."""

from __future__ import annotations

import math
import random

from lrwatch.rules import Engine
from lrwatch.rules.schema import pack_text, parse_rules
from lrwatch.samples import Sample
from pack_firings import critical

EVERY = 10


def _evals(acc: list[float], loss: list[float]) -> list[Sample]:
    return [Sample(step=(i + 1) * EVERY, values={"eval_accuracy": a, "eval_loss": l})
            for i, (a, l) in enumerate(zip(acc, loss))]


def _learning_then_plateau(n: int, seed: int) -> tuple[list[float], list[float]]:
    rng = random.Random(seed)
    acc = [0.90 - 0.4 * math.exp(-i / 3) + rng.gauss(0, 0.004) for i in range(n)]
    loss = [0.30 + 1.0 * math.exp(-i / 3) + rng.gauss(0, 0.006) for i in range(n)]
    return acc, loss


def test_silent_regression_is_critical_within_three_evaluations():
    for seed in range(5):
        acc, loss = _learning_then_plateau(20, seed)
        onset = len(acc)
        # from the onset the model loses 2 accuracy points per evaluation; its loss follows
        acc += [acc[-1] - 0.02 * (k + 1) for k in range(5)]
        loss += [loss[-1] * (1 + 0.05 * (k + 1)) for k in range(5)]
        crit = critical(_evals(acc, loss))
        assert crit, f"seed {seed}: no critical firing"
        first_step = min(step for _, step in crit)
        assert (onset + 1) * EVERY <= first_step <= (onset + 3) * EVERY, (seed, crit)
        assert "eval_regression_both" in {r for r, _ in crit}


def test_overfitting_and_plateaus_are_not_critical():
    for seed in range(5):
        acc, loss = _learning_then_plateau(30, seed)
        plateau = _evals(acc, loss)
        assert critical(plateau) == [], seed
        # over-fitting: the held-out loss creeps up 1% per evaluation, the accuracy holds
        over = _evals(acc, loss[:15] + [loss[14] * (1 + 0.01 * k) for k in range(1, 16)])
        assert not [r for r, _ in critical(over) if r == "eval_regression_both"], seed


def _with_rate(evals: list[Sample], rate) -> list[Sample]:
    """Every step carries the learning rate ``rate(step)``; evaluations every EVERY steps."""
    out = []
    for s in evals:
        for step in range(s.step - EVERY + 1, s.step + 1):
            out.append(Sample(step=step, values={"lr": rate(step),
                                                 **(s.values if step == s.step else {})}))
    return out


def _triangle(step: int) -> float:
    """A cyclical schedule: 0.01 -> 0.1 -> 0.01 every 100 steps (a tenfold swing)."""
    phase = (step % 100) / 50.0
    return 0.01 + 0.09 * (phase if phase <= 1.0 else 2.0 - phase)


def _cyclical(n: int, seed: int) -> tuple[list[float], list[float]]:
    """Held-out metrics that learn and are worse at the peaks of the rate, as on a cyclical
    schedule: 5 accuracy points and +25% loss at the peak."""
    acc, loss = _learning_then_plateau(n, seed)
    swing = [math.log10(_triangle((i + 1) * EVERY) / 0.01) for i in range(n)]
    return ([a - 0.05 * w for a, w in zip(acc, swing)],
            [l * (1 + 0.25 * w) for l, w in zip(loss, swing)])


def test_a_cyclical_schedule_is_judged_against_the_same_phase():
    for seed in range(5):
        acc, loss = _cyclical(30, seed)
        assert critical(_with_rate(_evals(acc, loss), _triangle)) == [], seed
        # the same rules judging against the best at any rate fire at the peaks
        plain = Engine(parse_rules(pack_text("training").replace("    given: lr\n", "")))
        fired = [e for s in _with_rate(_evals(acc, loss), _triangle) for e in plain.update(s)
                 if e.kind == "firing" and e.severity == "critical"]
        assert fired, seed


def test_a_regression_at_a_high_rate_fires_without_waiting_for_a_trough():
    for seed in range(5):
        acc, loss = _cyclical(30, seed)
        onset = 22     # step 230, the rate rising towards its peak at step 250
        acc = acc[:onset] + [a - 0.03 * (k + 1) for k, a in enumerate(acc[onset:])]
        loss = loss[:onset] + [l * (1 + 0.08 * (k + 1)) for k, l in enumerate(loss[onset:])]
        crit = critical(_with_rate(_evals(acc, loss), _triangle))
        assert crit, seed
        first = min(st for _, st in crit)
        assert (onset + 1) * EVERY <= first <= (onset + 3) * EVERY, (seed, crit)
        assert _triangle(first) > 0.05, (seed, first)   # judged on the rise, not at a trough


def test_a_regression_after_a_warm_restart_fires_once_the_rate_is_comparable_again():
    acc, loss = _learning_then_plateau(20, 0)
    onset_step = (len(acc) + 1) * EVERY
    # a warm restart triples the rate at the onset and decays it back over 100 steps; the
    # held-out metrics get worse and stay so
    acc += [acc[-1] - 0.06] * 16
    loss += [loss[-1] * 1.3] * 16

    def rate(step: int) -> float:
        return 0.1 if step < onset_step else 0.1 + 0.2 * max(0.0, 1 - (step - onset_step) / 100)

    crit = [(r, st) for r, st in critical(_with_rate(_evals(acc, loss), rate))
            if r.startswith("eval_")]
    assert crit, "the regression outlasted the rise and must fire"
    first = min(st for _, st in crit)
    # judged against the evaluations before the restart once the rate is within 1.5x of theirs
    assert rate(first) <= 0.15 and first <= onset_step + 100, crit


def test_slight_overfitting_on_a_large_evaluation_set_is_not_critical():
    """A point of accuracy lost slowly on an evaluation set so large that the accuracy barely
    jitters (0.1 points) is many noise sigmas, but below the 2-point floor (`min_drop`): no
    critical firing. The same run losing 2 points per evaluation is caught within 3."""
    for seed in range(5):
        rng = random.Random(seed)
        acc = [0.85 - 0.1 * math.exp(-i / 2) + rng.gauss(0, 0.001) for i in range(12)]
        loss = [0.35 + 0.3 * math.exp(-i / 2) + rng.gauss(0, 0.001) for i in range(12)]
        slight = (acc + [acc[-1] - 0.001 * (k + 1) for k in range(18)],
                  loss + [loss[-1] * (1 + 0.004 * (k + 1)) for k in range(18)])
        assert critical(_evals(*slight)) == [], seed
        silent = (acc + [acc[-1] - 0.02 * (k + 1) for k in range(5)],
                  loss + [loss[-1] * (1 + 0.03 * (k + 1)) for k in range(5)])
        crit = critical(_evals(*silent))
        assert crit and min(s for _, s in crit) <= (12 + 3) * EVERY, (seed, crit)


# ------------------------------------------------------------- a held-out loss alone (regressors)

def _loss_evals(loss: list[float]) -> list[Sample]:
    return [Sample(step=(i + 1) * EVERY, values={"eval_loss": x, "lr": 0.1})
            for i, x in enumerate(loss)]


def _jittery_plateau(rng: random.Random, n: int, jitter: float = 0.12) -> list[float]:
    """A regression's held-out loss under plain SGD: learns, then jitters 12% (log sd) from one
    evaluation to the next (benchmarks/detection.py's Friedman runs jitter 10-30%)."""
    return [(0.25 + 0.5 * math.exp(-i / 3)) * math.exp(rng.gauss(0, jitter)) for i in range(n)]


def _without_the_trend_path():
    return parse_rules(pack_text("training").replace(
        "when: {any: [eval_loss_far_above_best, eval_loss_rising_above_best]}",
        "when: {firing: eval_loss_far_above_best}"))


def _first_eval(crit: list[tuple[str, int]], onset: int) -> int | None:
    steps = [s for r, s in crit if r == "eval_loss_drop"]
    return min(steps) // EVERY - onset if steps else None


def test_a_held_out_loss_rising_at_every_evaluation_is_caught_before_it_is_far_out():
    """A jittery held-out loss that rises 25% per evaluation: the steady rise is caught within
    6 evaluations on every seed, and never later than the comparison with the best alone."""
    sooner = 0
    for seed in range(8):
        rng = random.Random(seed)
        loss = _jittery_plateau(rng, 16)
        onset = len(loss)
        loss += [0.25 * 1.25 ** (k + 1) * math.exp(rng.gauss(0, 0.12)) for k in range(8)]
        new = _first_eval(critical(_loss_evals(loss)), onset)
        old = _first_eval(critical(_loss_evals(loss), _without_the_trend_path()), onset)
        assert new is not None and 1 <= new <= 6, (seed, new)
        assert old is None or new <= old, (seed, new, old)
        sooner += old is None or new < old
    assert sooner >= 6, sooner


def test_a_jittery_held_out_loss_on_a_plateau_is_not_critical():
    for seed in range(8):
        rng = random.Random(seed)
        loss = _jittery_plateau(rng, 16) + [0.25 * math.exp(rng.gauss(0, 0.12))
                                             for _ in range(20)]
        assert critical(_loss_evals(loss)) == [], seed


def test_a_held_out_loss_that_lags_a_cyclical_rate_is_not_a_steady_rise():
    """The held-out loss follows a tenfold cyclical rate 25 steps late (it keeps rising after
    the peak; a quarter of the 100-step cycle): the rise is the schedule's, so
    `lr_raised_lately` holds the trend back. Without that veto the lagging rise fires on 5 of
    the 8 seeds. (At 30 steps late, one seed in 8 fires even with the veto: docs/detection.md.)"""
    fired_without = 0
    for seed in range(8):
        _, loss = _learning_then_plateau(30, seed)
        swing = [math.log10(_triangle(max(1, (i + 1) * EVERY - 25)) / 0.01) for i in range(30)]
        evals = [Sample(step=s.step, values={"eval_loss": s.values["eval_loss"]})
                 for s in _loss_evals([x * (1 + 0.25 * w) for x, w in zip(loss, swing)])]
        samples = _with_rate(evals, _triangle)
        assert critical(samples) == [], seed
        no_veto = parse_rules(pack_text("training").replace(", unless: [lr_raised_lately]", ""))
        fired_without += bool(critical(samples, no_veto))
    assert fired_without >= 3


def test_an_accuracy_falling_at_every_evaluation_is_caught_sooner_without_a_loss():
    """A classifier scored by its held-out accuracy alone (a contrastive encoder's
    nearest-centroid accuracy: no held-out loss moves with it), jittering 1 point: a drop of
    2 points per evaluation is caught by the steady-fall path no later than by the comparison
    with the best, and sooner on at least half the seeds; a plateau is not critical."""
    def evals(acc: list[float]) -> list[Sample]:
        return [Sample(step=(i + 1) * EVERY, values={"eval_accuracy": a, "lr": 0.1})
                for i, a in enumerate(acc)]

    without = parse_rules(pack_text("training").replace(
        "when: {any: [eval_accuracy_far_below_best, eval_accuracy_falling_below_best]}",
        "when: {firing: eval_accuracy_far_below_best}"))
    sooner = 0
    for seed in range(8):
        rng = random.Random(seed)
        acc = [0.8 - 0.4 * math.exp(-i / 3) + rng.gauss(0, 0.01) for i in range(16)]
        onset = len(acc)
        drop = acc + [0.8 - 0.02 * (k + 1) + rng.gauss(0, 0.01) for k in range(8)]
        firsts = []
        for rules in (None, without):
            steps = [s for r, s in critical(evals(drop), rules) if r == "eval_accuracy_drop"]
            firsts.append(min(steps) // EVERY - onset if steps else None)
        new, old = firsts
        assert new is not None and (old is None or new <= old), (seed, new, old)
        sooner += old is None or new < old
        plateau = acc + [0.8 + rng.gauss(0, 0.01) for _ in range(20)]
        assert critical(evals(plateau)) == [], seed
    assert sooner >= 4, sooner


def test_a_smooth_held_out_loss_creeping_up_is_over_fitting_not_a_silent_regression():
    """A smooth held-out loss (0.3% jitter) that creeps up 0.5% per evaluation for 25
    evaluations (+13%: an FT-Transformer and an attention LSTM outside the suite) is many noise
    sigmas above its best but under the 25% floor: not critical. The same loss jumping 40%
    and staying there is caught by the comparison with the best within 3 evaluations."""
    for seed in range(5):
        rng = random.Random(seed)
        learn = [(0.2 + 0.5 * math.exp(-i / 3)) * math.exp(rng.gauss(0, 0.003))
                 for i in range(12)]
        creep = [0.2 * 1.005 ** (k + 1) * math.exp(rng.gauss(0, 0.003)) for k in range(25)]
        assert critical(_loss_evals(learn + creep)) == [], seed
        jump = [0.2 * 1.4 * math.exp(rng.gauss(0, 0.003)) for _ in range(6)]
        crit = [s for r, s in critical(_loss_evals(learn + jump)) if r == "eval_loss_drop"]
        assert crit and min(crit) <= (12 + 3) * EVERY, (seed, crit)
