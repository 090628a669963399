"""The rule key ``given``: a detector sees the latest value of another metric with every value.

The ``drop`` detector uses it to judge an evaluation against earlier evaluations made at a
comparable learning rate (a cyclical schedule judged phase by phase)."""

from __future__ import annotations

import json
import math
import random

import pytest

from lrwatch.errors import RuleError
from lrwatch.rules import Engine, load_pack
from lrwatch.rules.detectors import Drop
from lrwatch.rules.schema import parse_rules
from lrwatch.samples import Sample


def _acc_stream(seed: int, n: int = 120) -> list[float]:
    """Learning, a noisy plateau, and a few drops of several points."""
    rng = random.Random(seed)
    xs = [0.9 - 0.4 * math.exp(-i / 5) + rng.gauss(0, 0.004) for i in range(n)]
    for start in rng.sample(range(20, n - 5), 3):
        for k in range(rng.randint(1, 4)):
            xs[start + k] -= rng.uniform(0.01, 0.08)
    return xs


def _decide(det: Drop, xs: list[float], rates: list[float | None] | None) -> list[bool | None]:
    if rates is None:
        return [det.update(x) for x in xs]
    return [det.update_given(x, g) for x, g in zip(xs, rates)]


@pytest.mark.parametrize("seed", range(8))
def test_a_constant_or_decaying_rate_changes_nothing(seed):
    """Every earlier rate is comparable (>= current / 1.5): the plain test's decisions."""
    xs = _acc_stream(seed)
    kw = dict(mode="max", z=4.0, count=2, window=12, warmup=8)
    plain = _decide(Drop(**kw), xs, None)
    assert any(plain)  # the stream has drops that fire
    assert _decide(Drop(**kw), xs, [None] * len(xs)) == plain         # unknown rate
    assert _decide(Drop(**kw), xs, [0.1] * len(xs)) == plain          # constant
    decay = [0.1 * 0.5 * (1 + math.cos(math.pi * i / len(xs))) for i in range(len(xs))]
    assert _decide(Drop(**kw), xs, decay) == plain                    # cosine to zero


def test_a_value_is_judged_only_against_comparable_rates():
    det = Drop(mode="min", z=5.0, count=1, window=8, warmup=6)
    jitter = [0.0, -0.01, 0.01, 0.0, -0.01, 0.0, 0.01, 0.0, -0.01, 0.01]
    assert [det.update_given(1.0 + j, 0.01) for j in jitter][-1] is False
    # the first value at a 3x rate has no comparable reference: normal, and the reference
    assert det.update_given(1.3, 0.03) is False and det.statistic is None
    # more at that rate: judged against it (1.3), not against the best at 0.01 (0.99)
    assert [det.update_given(1.3 + j, 0.03) for j in jitter] == [False] * len(jitter)
    assert det.update_given(1.6, 0.03) is True            # worse than the high-rate best
    assert det.update_given(1.3, 0.01) is True            # a low rate: against all, 0.99
    wide = Drop(mode="min", z=5.0, count=1, window=8, warmup=6, given_factor=4.0)
    [wide.update_given(1.0 + j, 0.01) for j in jitter]
    assert wide.update_given(1.3, 0.03) is True           # 0.01 is comparable within 4x


def test_references_stay_bounded_on_a_long_decay():
    det = Drop(mode="min", z=5.0, window=16, warmup=10)
    n = 20000
    for i in range(n):  # the rate decays over 10 octaves; every evaluation improves
        det.update_given(1.0 / (1 + i), 0.1 * 2.0 ** (-10 * i / n))
    assert len(det.state_dict()["refs"]) <= 16 * 10 + 2


@pytest.mark.parametrize("seed", range(4))
def test_state_round_trip_with_given(seed):
    rng = random.Random(seed)
    xs = _acc_stream(seed, 150)
    rates = [rng.choice([0.01, 0.02, 0.05, 0.1, None]) for _ in xs]
    cut = rng.randrange(10, 140)
    ref = Drop(mode="max", z=3.0, count=2, window=10, warmup=6)
    want = _decide(ref, xs, rates)
    a = Drop(mode="max", z=3.0, count=2, window=10, warmup=6)
    head = _decide(a, xs[:cut], rates[:cut])
    b = Drop(mode="max", z=3.0, count=2, window=10, warmup=6)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert head + _decide(b, xs[cut:], rates[cut:]) == want


def test_a_state_saved_before_given_existed_loads():
    xs = _acc_stream(3)
    cur = Drop(mode="max", z=4.0, count=2, window=12, warmup=8)
    _decide(cur, xs[:60], None)
    old = {k: v for k, v in cur.state_dict().items() if k != "refs"}
    old["best"] = cur.state_dict()["refs"][0][1]          # the one best value it used to keep
    resumed = Drop(mode="max", z=4.0, count=2, window=12, warmup=8)
    resumed.load_state_dict(old)
    assert _decide(resumed, xs[60:], None) == _decide(cur, xs[60:], None)


# ------------------------------------------------------------------------------- rule files

def _errors(text: str) -> list[str]:
    with pytest.raises(RuleError) as exc:
        parse_rules(text, "f.yml")
    return exc.value.errors


def test_given_is_parsed():
    rs = parse_rules("rules: [{name: d, metric: eval_loss, detector: drop, given: lr, "
                     "params: {mode: min, given_factor: 2}, severity: info}]")
    assert rs["d"].given == "lr" and rs["d"].params["given_factor"] == 2.0


@pytest.mark.parametrize("text, error", [
    ("rules: [{name: s, metric: loss, detector: spike, given: lr, severity: info}]",
     "f.yml:1: key 'rules[0].given': detector 'spike' takes no 'given' (valid choices: baseline, start_ratio, untrained, drop)"),
    ("rules: [{name: d, metric: eval_loss, detector: drop, params: {given_factor: 2}, "
     "severity: info}]",
     "f.yml:1: key 'rules[0].params': parameter 'given_factor' of detector 'drop' needs the "
     "rule key 'given' (e.g. given: lr)"),
    ("rules: [{name: d, metric: lr, detector: drop, given: lr, severity: info}]",
     "f.yml:1: key 'rules[0].given': 'given' must be another metric than the watched 'lr'"),
    ("rules: [{name: d, metric: eval_loss, detector: drop, given: 3, severity: info}]",
     "f.yml:1: key 'rules[0].given': 'given' must be a metric name, got 3"),
    ("rules: [{name: a, metric: x, detector: nonfinite, severity: info}, "
     "{name: w, when: {firing: a}, given: lr, severity: info}]",
     "f.yml:1: key 'rules[1].given': a rule with 'when' fires on other rules and takes no "
     "metric, detector, params or given; give one or the other"),
    ("rules: [{name: d, metric: eval_loss, detector: drop, gven: lr, severity: info}]",
     "f.yml:1: key 'rules[0].gven': unknown key; did you mean 'given'?"),
])
def test_given_validation_errors(text, error):
    errs = _errors(text)
    assert any(e.startswith(error) for e in errs), errs


# ------------------------------------------------------------------------------------ engine

_RULE = """
rules:
  - {name: acc_drop, metric: eval_accuracy, detector: drop, given: lr,
     params: {mode: max, z: 3.0, count: 1, window: 8, warmup: 6}, severity: warning}
"""


def _samples(seed: int) -> list[Sample]:
    """The rate on every step, evaluations every 5 steps, some steps without a rate."""
    rng = random.Random(seed)
    xs = _acc_stream(seed, 60)
    out = []
    for step in range(1, 301):
        vals: dict[str, float] = {}
        if rng.random() < 0.8:
            vals["lr"] = 0.01 * (1 + 9 * ((step // 40) % 2)) * rng.uniform(0.9, 1.1)
        if step % 5 == 0:
            vals["eval_accuracy"] = xs[step // 5 - 1]
        out.append(Sample(step=step, values=vals))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_the_engine_hands_over_the_latest_rate(seed):
    samples = _samples(seed)
    eng = Engine(parse_rules(_RULE))
    det = Drop(mode="max", z=3.0, count=1, window=8, warmup=6)
    lr = None
    want, got = [], []
    for s in samples:
        lr = s.values.get("lr", lr)  # carried over from the last sample that had it
        if "eval_accuracy" in s.values:
            want.append(det.update_given(s.values["eval_accuracy"], lr))
        got += [(e.kind, e.step) for e in eng.update(s)]
    fired, state = [], False
    for s, r in zip([s for s in samples if "eval_accuracy" in s.values], want):
        if r and not state:
            fired.append(("firing", s.step))
        elif r is False and state:
            fired.append(("resolved", s.step))
        state = bool(r) if r is not None else state
    assert got == fired and any(k == "firing" for k, _ in got)


@pytest.mark.parametrize("seed", range(4))
def test_engine_state_keeps_the_latest_rate(seed):
    samples = _samples(seed)
    rs = parse_rules(_RULE)
    whole = Engine(rs)
    want = [(e.kind, e.step) for s in samples for e in whole.update(s)]
    cut = random.Random(seed).randrange(20, 280)
    a = Engine(rs)
    got = [(e.kind, e.step) for s in samples[:cut] for e in a.update(s)]
    state = json.loads(json.dumps(a.state_dict()))
    assert "given" in state
    b = Engine(rs)
    b.load_state_dict(state)
    got += [(e.kind, e.step) for s in samples[cut:] for e in b.update(s)]
    assert got == want


def test_a_pack_without_given_keeps_its_state_format():
    rs = parse_rules("rules: [{name: n, metric: loss, detector: nonfinite, severity: info}]")
    assert "given" not in Engine(rs).state_dict()
    assert "given" in Engine(load_pack("training")).state_dict()


def test_given_only_waits_for_the_measured_level_and_never_falls_back():
    from lrwatch.rules.detectors import StartRatio

    plain, only = StartRatio(below=0.85, window=1), StartRatio(below=0.85, window=1,
                                                               given_only=True)
    losses = [2.0, 1.5, 1.4, 1.3]
    # without a measurement the plain detector judges against the first loss, given_only not
    assert [plain.update_given(x, None) for x in losses] == [None, True, True, True]
    assert [only.update_given(x, None) for x in losses] == [None, None, None, None]
    # once measured, both judge against it; it stays the level when later samples lack it
    assert [only.update_given(x, g) for x, g in [(1.0, 1.5), (1.3, None), (1.2, None)]] == \
        [True, False, True]
    rs = parse_rules("rules: [{name: v, metric: loss, detector: start_ratio, given: constant_loss, "
                     "params: {below: 0.85, given_only: true}, severity: info}]")
    assert rs["v"].params["given_only"] is True
    errs = _errors("rules: [{name: v, metric: loss, detector: start_ratio, "
                   "params: {below: 0.85, given_only: true}, severity: info}]")
    assert any("parameter 'given_only' of detector 'start_ratio' needs the rule key 'given'" in e
               for e in errs), errs


def test_a_restored_state_that_never_saw_a_measured_level_keeps_it() -> None:
    """A restart goes back to the state before the first step, saved before the untrained
    loss was measured (it rides on step 1): the level is the run's, so it stays known, and
    the rules that judge against it go on judging against it after the restart."""
    engine = Engine(load_pack("training"))
    before = engine.state_dict()          # the state a restart to the start goes back to
    engine.update(Sample(step=1, values={"loss": 2.0, "untrained_loss": 2.3,
                                         "constant_loss": 2.1, "lr": 0.1}))
    engine.load_state_dict(before)
    assert engine.state_dict()["given"]["untrained_loss"] == 2.3
    assert engine.state_dict()["given"]["constant_loss"] == 2.1
    # a value the saved state had seen is restored as it was
    engine.update(Sample(step=2, values={"loss": 1.9, "lr": 0.05}))
    at_two = engine.state_dict()
    engine.update(Sample(step=3, values={"loss": 1.8, "lr": 0.01}))
    engine.load_state_dict(at_two)
    assert engine.state_dict()["given"]["lr"] == 0.05
    # a fresh engine loading a state (a resume) gets exactly that state
    fresh = Engine(load_pack("training"))
    fresh.load_state_dict(before)
    assert fresh.state_dict()["given"]["untrained_loss"] is None
