"""The engine: for / hysteresis / cooldown / resolution, staleness, resume, and the packs."""

from __future__ import annotations

import json
import math
import random

import pytest

from lrwatch.errors import ConfigError
from lrwatch.rules import Engine, Firing, load_pack, parse_rules
from lrwatch.samples import Sample


def one_rule(extra: str = "", metric: str = "x", detector: str = "threshold",
             params: str = "{above: 1.0}") -> Engine:
    return Engine(parse_rules(f"""
rules:
  - name: r
    metric: {metric}
    detector: {detector}
    params: {params}
    severity: warning
    actions: [alert]
    labels: {{team: ml}}
    annotations: {{summary: "{{metric}}={{value:g}} step {{step}}", description: "{{labels[team]}}"}}
{extra}"""))


def run(eng: Engine, xs, times=None, start=0):
    out = []
    for i, x in enumerate(xs):
        vals = {} if x is None else {"x": x}
        t = times[i] if times else None
        for e in eng.update(Sample(step=start + i, time=t, values=vals)):
            out.append((e.kind, e.step))
    return out


def test_fires_and_resolves():
    eng = one_rule()
    assert run(eng, [0, 2, 3, 0, 0, 2]) == [("firing", 1), ("resolved", 3), ("firing", 5)]
    f = eng.active["r"]
    assert isinstance(f, Firing) and f.kind == "firing" and f.severity == "warning"
    assert f.actions == ("alert",) and f.value == 2.0 and f.metric == "x"
    assert f.message == "x=2 step 5" and f.labels == {"team": "ml"}
    assert f.annotations == {"summary": "x=2 step 5", "description": "ml"}


def test_for_counts_consecutive_samples():
    eng = one_rule("    for: 3")
    assert run(eng, [2, 2, 0, 2, 2, 2, 2]) == [("firing", 5)]


def test_for_duration_uses_sample_times():
    eng = one_rule("    for: 10s")
    times = [0.0, 4.0, 8.0, 12.0, 13.0]
    assert run(eng, [2, 2, 2, 2, 2], times) == [("firing", 3)]


def test_hysteresis_needs_consecutive_normal_samples():
    eng = one_rule("    hysteresis: 3")
    assert run(eng, [2, 0, 0, 2, 0, 0, 0, 0]) == [("firing", 0), ("resolved", 6)]


def test_cooldown_in_steps_and_duration():
    eng = one_rule("    cooldown: 5")
    # resolved at step 1; steps 2..5 are inside the cooldown; the anomaly persisting at 6 fires
    assert run(eng, [2, 0, 2, 2, 2, 2, 2]) == [("firing", 0), ("resolved", 1), ("firing", 6)]
    eng = one_rule("    cooldown: 1m")
    times = [0.0, 10.0, 20.0, 69.0, 71.0]
    assert run(eng, [2, 0, 2, 2, 2], times) == [("firing", 0), ("resolved", 1), ("firing", 4)]


def test_absent_metric_does_not_update():
    eng = one_rule("    for: 2")
    # None = the sample does not carry the metric: the run of anomalies is not broken
    assert run(eng, [2, None, None, 2, None, 0]) == [("firing", 3), ("resolved", 5)]


def test_nan_gives_no_decision_for_threshold():
    eng = one_rule()
    assert run(eng, [2, math.nan, math.nan, 0]) == [("firing", 0), ("resolved", 3)]


def test_multiple_metrics_any_fires():
    eng = Engine(parse_rules("""
rules:
  - name: nf
    metrics: [a, b]
    detector: nonfinite
    severity: critical
"""))
    ev = eng.update(Sample(step=1, values={"a": 1.0, "b": math.inf}))
    assert [(e.rule, e.metric, e.value) for e in ev] == [("nf", "b", math.inf)]
    assert ev[0].message == "nf: b = inf at step 1"  # the default summary
    assert eng.update(Sample(step=2, values={"a": 1.0}))[0].kind == "resolved"


def test_staleness_from_sample_times_and_tick():
    eng = Engine(parse_rules("""
rules:
  - name: stalled
    metric: step
    detector: staleness
    params: {seconds: 60}
    severity: warning
"""))
    assert eng.update(Sample(step=1, time=1000.0)) == []
    assert eng.tick(1030.0) == []
    ev = eng.tick(1100.0)
    assert [(e.kind, e.step, e.value) for e in ev] == [("firing", 1, 100.0)]
    assert eng.tick(1200.0) == []  # still firing, nothing new
    ev = eng.update(Sample(step=2, time=1201.0))
    assert [e.kind for e in ev] == ["resolved"]
    # replay: a gap between two samples fires and resolves at the later sample
    ev = eng.update(Sample(step=3, time=1400.0))
    assert [(e.kind, e.step) for e in ev] == [("firing", 3), ("resolved", 3)]


def test_staleness_by_samples_for_sparse_metric():
    eng = Engine(parse_rules("""
rules:
  - name: no_eval
    metric: eval_loss
    detector: staleness
    params: {samples: 3}
    severity: info
"""))
    ev = []
    for step in range(8):
        vals = {"eval_loss": 1.0} if step in (0, 7) else {"loss": 1.0}
        ev += [(e.kind, e.step) for e in eng.update(Sample(step=step, values=vals))]
    assert ev == [("firing", 3), ("resolved", 7)]


def _faulty_run(seed: int = 0, n: int = 400):
    rng = random.Random(seed)
    samples = []
    loss = 2.3
    for i in range(n):
        if i < 300:
            loss = 0.3 + 2.0 * math.exp(-i / 60) * math.exp(rng.gauss(0, 0.1))
        else:
            try:  # super-exponential growth: overflows to inf within ~20 steps
                loss = loss ** 1.5 + 1.0
            except OverflowError:
                loss = math.inf
        vals = {"loss": loss if loss < 1e300 else math.inf, "lr": 1e-3 * min(1, (i + 1) / 50),
                "grad_norm": math.exp(rng.gauss(0, 0.3)) * (1 if i < 300 else 3.0 ** (i - 299))}
        if i % 50 == 49:
            vals["eval_loss"] = 0.4 + 2 * math.exp(-i / 60) + rng.gauss(0, 0.01)
        if i == 250:
            vals["lr"] = 0.5
        samples.append(Sample(step=i, time=1000.0 + i, values=vals, lr_groups=(vals["lr"],)))
    return samples


def _events(eng, samples):
    return [e.to_dict() for s in samples for e in eng.update(s)]


def test_state_dict_resumes_exactly_with_training_pack():
    samples = _faulty_run()
    whole = _events(Engine(load_pack("training")), samples)
    assert any(e["rule"] == "loss_blowup" for e in whole)
    active = _active(samples).keys()   # the same at every cut: computed once
    for cut in (0, 1, 120, 251, 305, 399):
        first = Engine(load_pack("training"))
        got = _events(first, samples[:cut])
        state = json.loads(json.dumps(first.state_dict(), allow_nan=False))
        second = Engine(load_pack("training"))
        second.load_state_dict(state)
        got += _events(second, samples[cut:])
        assert got == whole, cut
        assert second.active.keys() == active


def _active(samples):
    eng = Engine(load_pack("training"))
    for s in samples:
        eng.update(s)
    return eng.active


def test_load_state_dict_rejects_other_rules():
    state = Engine(load_pack("training")).state_dict()
    with pytest.raises(ConfigError, match="saved under other rules"):
        Engine(load_pack("serving")).load_state_dict(state)
    with pytest.raises(ConfigError, match="version"):
        Engine(load_pack("training")).load_state_dict({"version": 9})


def test_deterministic():
    samples = _faulty_run(seed=3)
    assert _events(Engine(load_pack("training")), samples) == \
        _events(Engine(load_pack("training")), samples)


def test_firing_to_json_contract():
    f = Firing(rule="r", step=3, time=None, severity="critical", actions=("rollback",),
               value=math.nan, message="m")
    assert f.to_json("a.jsonl") == {"trace": "a.jsonl", "rule": "r", "step": 3,
                                    "severity": "critical", "actions": ["rollback"],
                                    "value": "nan", "message": "m"}
    assert Firing.from_dict(f.to_dict()).to_json("a") == f.to_json("a")


# ------------------------------------------------------------------- the training pack's intent

def _healthy(schedule: str, n: int = 1500, seed: int = 0, noise: float = 0.15,
             optimizer: str = "adam"):
    rng = random.Random(seed)
    base = 0.1 if optimizer == "sgd" else 1e-3
    out = []
    for i in range(n):
        warm = min(1.0, (i + 1) / 100)
        if schedule == "constant":
            lr = base
        elif schedule == "warmup_cosine":
            lr = base * warm * 0.5 * (1 + math.cos(math.pi * i / n))
        elif schedule == "step":
            lr = base * 0.1 ** (i // 500)
        elif schedule == "exponential":
            lr = base * 0.997 ** i
        elif schedule == "cyclic":
            c = (i % 400) / 200
            lr = base / 10 + (base - base / 10) * (c if c <= 1 else 2 - c)
        else:  # warmup from zero (as Hugging Face schedules do)
            lr = base * i / 200 if i < 200 else base
        drop = 0.7 if schedule == "step" and i >= 500 else 1.0  # a step decay lowers the loss
        loss = (0.2 + 2.1 * math.exp(-i / 150)) * drop * math.exp(rng.gauss(0, noise))
        vals = {"lr": lr, "loss": loss, "grad_norm": math.exp(rng.gauss(0, 0.4)),
                "update_ratio": 1e-3 * math.exp(rng.gauss(0, 0.2))}
        if i % 100 == 99:
            vals["eval_loss"] = 0.25 + 2.1 * math.exp(-i / 150) + rng.gauss(0, 0.005)
            vals["eval_accuracy"] = 0.9 - 0.5 * math.exp(-i / 150) + rng.gauss(0, 0.003)
        out.append(Sample(step=i, time=1000.0 + 0.3 * i, values=vals, lr_groups=(lr,)))
    return out


@pytest.mark.parametrize("schedule", ["constant", "warmup_cosine", "step", "exponential",
                                      "cyclic", "warmup_from_zero"])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_training_pack_no_critical_or_lr_alarm_on_healthy_runs(schedule, optimizer):
    for seed in range(3):
        eng = Engine(load_pack("training"))
        fired = [e for s in _healthy(schedule, seed=seed, optimizer=optimizer)
                 for e in eng.update(s) if e.kind == "firing"]
        assert not [e for e in fired if e.severity == "critical"], fired
        assert not [e for e in fired if e.rule in ("lr_anomaly", "eval_loss_regression",
                                                    "eval_accuracy_regression")], fired


def test_training_pack_noisy_small_batch_loss_has_no_critical():
    for seed in range(5):
        eng = Engine(load_pack("training"))
        fired = [e for s in _healthy("constant", seed=seed, noise=0.35)
                 for e in eng.update(s) if e.kind == "firing"]
        assert not [e for e in fired if e.severity == "critical"], fired


def test_training_pack_catches_faults():
    samples = _faulty_run()
    events = [e for e in _run_pack(samples) if e.kind == "firing"]
    by_rule = {}
    for e in events:
        by_rule.setdefault(e.rule, e.step)
    assert by_rule["lr_anomaly"] == 250
    first_nonfinite = next(s.step for s in samples if not math.isfinite(s.values["loss"]))
    assert by_rule["loss_blowup"] <= 302 < first_nonfinite
    assert by_rule["nonfinite"] == first_nonfinite
    assert by_rule["grad_explosion"] <= 302


def _run_pack(samples, pack="training"):
    eng = Engine(load_pack(pack))
    return [e for s in samples for e in eng.update(s)]


def test_training_pack_catches_collapse_and_eval_regression():
    rng = random.Random(1)
    samples = []
    for i in range(600):
        if i < 400:
            loss = (0.2 + 2.1 * math.exp(-i / 60)) * math.exp(rng.gauss(0, 0.1))
            g = math.exp(rng.gauss(0, 0.3))
        else:  # collapsed: back at ln(10), no gradient
            loss = 2.3 * math.exp(rng.gauss(0, 0.02))
            g = 1e-6
        vals = {"loss": loss, "grad_norm": g, "lr": 1e-3}
        if i % 20 == 19:  # evaluation regresses slowly from step 300 on
            vals["eval_loss"] = 0.3 + 2 * math.exp(-i / 60) + max(0, i - 300) * 0.002 \
                + rng.gauss(0, 0.005)
        samples.append(Sample(step=i, values=vals))
    first = {}
    for e in _run_pack(samples):
        if e.kind == "firing":
            first.setdefault(e.rule, e.step)
    assert 400 <= first["loss_collapse"] <= 406
    assert 400 <= first["vanishing_gradient"] <= 405
    assert 300 < first["eval_loss_regression"] < 400


def test_serving_pack():
    samples = []
    for w in range(40):
        vals = {"drift_detected": 1.0 if w >= 20 else 0.0, "model_accuracy": 0.9,
                "ingest_error_ratio": 0.0, "label_coverage": 0.5}
        if w >= 30:
            vals["model_accuracy"] = 0.7
        samples.append(Sample(step=w, time=1000.0 + 60 * w, values=vals))
    first = {}
    for e in _run_pack(samples, "serving"):
        first.setdefault((e.rule, e.kind), e.step)
    assert first[("data_drift", "firing")] == 21
    assert 30 <= first[("accuracy_regression", "firing")] <= 32
    assert ("ingest_errors", "firing") not in first


def _scale_invariant_start(loss_after: float, seed: int = 0) -> list[Sample]:
    """A cosine-softmax classifier at a far too high rate: one step grows its (scale-invariant)
    weights a hundredfold, so its gradient norm falls from 11 to ~0.002 and stays there, while
    its loss goes to ``loss_after`` (the untrained loss 3.5, a constant prediction's 0.67)."""
    rng = random.Random(seed)
    out = []
    for i in range(1, 80):
        vals = {"lr": 30.0, "loss": (2.1 if i < 3 else loss_after) * math.exp(rng.gauss(0, 0.2)),
                "grad_norm": 11.3 if i == 1 else 0.002 * math.exp(rng.gauss(0, 0.5))}
        if i == 1:
            vals.update(untrained_loss=3.5, constant_loss=0.67)
        out.append(Sample(step=i, values=vals))
    return out


def test_a_vanished_gradient_on_a_network_that_beats_a_constant_prediction_is_not_dead():
    for seed in range(3):
        fired = {e.rule for e in _run_pack(_scale_invariant_start(0.25, seed))
                 if e.kind == "firing"}
        assert "grad_vanished" in fired and "vanishing_gradient" not in fired, seed
        # the same collapse of the gradient with the loss at the constant level: dead
        fired = {e.rule for e in _run_pack(_scale_invariant_start(0.7, seed))
                 if e.kind == "firing"}
        assert "vanishing_gradient" in fired, seed


def _onsets(eng: Engine, xs, start: int = 0) -> list[tuple[str, int, int | None]]:
    return [(e.kind, e.step, e.onset) for i, x in enumerate(xs)
            for e in eng.update(Sample(step=start + i, values={"x": x}))]


def test_a_firing_carries_the_step_its_for_window_began():
    """A ``for: 3`` rule fires on the third anomalous judgement in a row; its firing carries
    the first one (its onset), which the recovery policy compares with a resumed run's
    start. A broken streak starts over; without ``for:`` the onset is the firing step."""
    eng = one_rule("    for: 3")
    assert _onsets(eng, [0, 2, 2, 0, 2, 2, 2, 2, 0]) == [("firing", 6, 4), ("resolved", 8, None)]
    assert _onsets(one_rule(), [0, 2]) == [("firing", 1, 1)]


def test_the_onset_of_a_window_under_way_survives_a_resume():
    """The checkpoint of step 21, written while the window that began at 20 is under way:
    ``open_onsets`` names it, and the resumed engine fires at 22 with onset 20, as the engine
    that was not interrupted does (the onset was lost: the state kept only the count). A
    state saved before onsets were kept gives an unknown onset (``None``), not a wrong one."""
    xs = [0.0] * 20 + [2.0] * 5
    whole = _onsets(one_rule("    for: 3"), xs)
    assert whole == [("firing", 22, 20)]
    first = one_rule("    for: 3")
    got = _onsets(first, xs[:22])
    assert got == [] and first.open_onsets() == {"r": 20}
    state = json.loads(json.dumps(first.state_dict()))
    second = one_rule("    for: 3")
    second.load_state_dict(state)
    assert second.open_onsets() == {"r": 20}
    assert _onsets(second, xs[22:], start=22) == whole
    assert second.open_onsets() == {}   # firing now: no window under way
    del state["rules"]["r"]["pending_step"]
    old = one_rule("    for: 3")
    old.load_state_dict(state)
    assert old.open_onsets() == {} and _onsets(old, xs[22:], start=22) == [("firing", 22, None)]


def test_an_escalation_carries_the_earliest_onset_of_the_firings_it_combines():
    """A ``when`` rule's onset is the earliest onset among the referenced firings that make
    its condition hold (``a`` with ``for: 2`` began at 3, fired at 4; ``b`` began at 6), not
    their firing steps (``since``, 4)."""
    eng = Engine(parse_rules("""
rules:
  - {name: a, metric: x, detector: threshold, params: {above: 1}, severity: warning, for: 2}
  - {name: b, metric: y, detector: threshold, params: {above: 1}, severity: warning}
  - {name: both, when: {all: [a, b], within: 5}, severity: critical, actions: [rollback]}
"""))
    xs = [0, 0, 0, 2, 2, 2, 2, 2]
    ys = [0, 0, 0, 0, 0, 0, 2, 2]
    got = [(e.rule, e.step, e.since, e.onset) for i, (x, y) in enumerate(zip(xs, ys))
           for e in eng.update(Sample(step=i, values={"x": x, "y": y}))]
    assert got == [("a", 4, None, 3), ("b", 6, None, 6), ("both", 6, 4, 3)]
