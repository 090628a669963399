"""The default pack warns before the first non-finite value where no history helps: a loss that
overflows at the third step with an update far beyond the weights' norm, a geometric climb of
six steps; and it stays quiet on an adaptive optimizer's early spike that training comes back
from, however high (docs/detection.md, "Warned before the first non-finite value (sixteenth
round)")."""

from __future__ import annotations

import math

from lrwatch.rules import Engine, load_pack
from lrwatch.samples import Sample

NAN = math.nan


def _samples(losses, grads, ratios=None, untrained=None) -> list[Sample]:
    out = []
    for i, (loss, grad) in enumerate(zip(losses, grads)):
        vals = {"loss": loss, "grad_norm": grad}
        if ratios is not None:
            vals["update_ratio"] = ratios[i]
        if i == 0 and untrained is not None:
            vals["untrained_loss"] = untrained
        out.append(Sample(step=i + 1, values=vals))
    return out


def _alarms(samples) -> list[tuple[str, int]]:
    """(rule, step) of every warning or critical firing of the training pack."""
    eng = Engine(load_pack("training"))
    return [(e.rule, e.step) for s in samples for e in eng.update(s)
            if e.kind == "firing" and e.severity in ("warning", "critical")]


def _first_nonfinite(samples) -> int:
    return next(s.step for s in samples if not all(math.isfinite(v) for v in s.values.values()))


def _warned_before_nonfinite(samples) -> list[tuple[str, int]]:
    nf = _first_nonfinite(samples)
    return [(r, s) for r, s in _alarms(samples) if s < nf]


def test_a_loss_that_overflows_at_the_third_step_is_warned_at_the_second_finite_one():
    # a Fourier neural operator under momentum at 100x its rate (blind set AF): 0.52, 3.5,
    # 2e8, NaN -- one finite step up there, nothing to compare it with; its update at that
    # step is 8.5e7 times the weights' norm
    s = _samples([0.517, 3.47, 2.0e8, NAN], [0.17, 4.9, 3.9e8, NAN],
                 ratios=[0.29, 7.7, 8.5e7, NAN], untrained=0.517)
    assert ("nonfinite_ahead", 3) in _warned_before_nonfinite(s), _alarms(s)


def test_a_geometric_climb_ten_times_above_the_untrained_loss_is_warned():
    # a deep kernel learner under momentum at 100x (blind set AK): 1.3 -> 18 in six steps,
    # then NaN; its largest finite loss is 13x the untrained one, no single step far up
    s = _samples([1.31, 1.72, 1.66, 5.69, 8.79, 11.0, 12.0, 15.5, 17.9, NAN],
                 [0.43, 0.68, 1.87, 7.77, 16.0, 27.6, 0.5, 0.5, NAN, NAN], untrained=1.38)
    warned = _warned_before_nonfinite(s)
    assert ("nonfinite_ahead", 8) in warned, _alarms(s)


def test_a_step_ten_times_the_weights_on_a_loss_ten_times_up_is_warned():
    # a LISTA sparse coder under momentum at 30x (blind set AD): the loss 42x the untrained
    # one at step 4, its update 119x the weights' norm, overflow at step 5
    s = _samples([4.56, 3.26, 3.01, 208.0, 1e26, NAN], [4.07, 1.79, 1.63, 1393.0, math.inf, NAN],
                 ratios=[0.75, 0.66, 0.45, 119.0, math.inf, NAN], untrained=4.94)
    assert ("nonfinite_ahead", 4) in _warned_before_nonfinite(s), _alarms(s)


def test_an_adaptive_optimizers_early_spike_that_comes_back_is_not_warned():
    # an IRNN under Adam at 30x (blind set AH, healthy): its second loss 8.4e4x the untrained
    # one, its first update 128x the weights' norm (Adam's first step moves every weight by
    # the rate), then it trains
    losses = [2.3, 2.3 * 8.4e4, 2.3 * 40, 2.3 * 3] + [2.3 * 0.9 ** k for k in range(40)]
    grads = [1.0, 8.6e5, 50.0, 3.0] + [1.0] * 40
    ratios = [128.0, 0.9, 0.5, 0.2] + [0.05] * 40
    s = _samples(losses, grads, ratios=ratios, untrained=2.3)
    assert not [a for a in _alarms(s) if a[0] == "nonfinite_ahead"], _alarms(s)


def test_a_first_spike_a_million_times_the_untrained_loss_that_comes_back_is_not_warned():
    # an N-BEATS forecaster under RMSprop at 10x (blind set AM, healthy): its second loss
    # 1.8e6x the untrained one, down to 1.04x by step 8, then it trains; a line on the loss
    # alone (10^6x, the candidate before AM was read) warned it
    u = 2.346
    losses = [2.377, 4.148e6, 1.268e6, 5287.0, 4.158e4, 112.0, 18.57, 2.437, 1.603, 1.501] + \
        [1.4 * 0.99 ** k for k in range(40)]
    grads = [0.517, 3.44e7, 8.78e6, 4.6e4, 2.87e5, 1120.0, 325.0, 26.5, 6.26, 12.7] + [5.0] * 40
    ratios = [1.21, 0.555, 0.335, 0.186, 0.149, 0.113, 0.095, 0.040, 0.039, 0.037] + [0.03] * 40
    s = _samples(losses, grads, ratios=ratios, untrained=u)
    assert not [a for a in _alarms(s) if a[0] == "nonfinite_ahead"], _alarms(s)
