"""Escalation: rules on rules (``when``): semantics, resume, replay, and every validation error."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from lrwatch.cli import cli
from lrwatch.errors import ConfigError, RuleError
from lrwatch.exporters.trace import TraceWriter, read_trace
from lrwatch.rules import Engine, Rule, load_rules, parse_rules
from lrwatch.rules.replay import replay_trace
from lrwatch.rules.schema import When, when_order
from lrwatch.samples import Sample

# two metric rules that fire while x (resp. y) is above 1: the signals the 'when' rules watch
BASE = """\
rules:
  - {name: a, metric: x, detector: threshold, params: {above: 1}, severity: warning}
  - {name: b, metric: y, detector: threshold, params: {above: 1}, severity: warning}
"""


def engine(extra: str) -> Engine:
    return Engine(parse_rules(BASE + textwrap.indent(textwrap.dedent(extra), "  ")))


def feed(eng: Engine, xs: list[float], ys: list[float] | None = None,
         start: int = 0) -> list[tuple[str, str, int]]:
    """(rule, kind, step) of every event; sample i has step start + i."""
    ys = ys if ys is not None else [0.0] * len(xs)
    out = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        for e in eng.update(Sample(step=start + i, values={"x": x, "y": y})):
            out.append((e.rule, e.kind, e.step))
    return out


def only(events: list[tuple[str, str, int]], *rules: str) -> list[tuple[str, str, int]]:
    return [e for e in events if e[0] in rules]


# --------------------------------------------------------------------------- semantics

def test_firing_with_for_fires_after_the_warning_persisted():
    eng = engine("""\
        - name: p
          when: {firing: a}
          for: 3
          severity: critical
          actions: [rollback]
    """)
    # a fires at 1 and 5; the first streak (1-2) is too short, the second lasts 5..8
    ev = feed(eng, [0, 2, 2, 0, 0, 2, 2, 2, 2, 0])
    assert ev == [("a", "firing", 1), ("a", "resolved", 3), ("a", "firing", 5),
                  ("p", "firing", 7), ("a", "resolved", 9), ("p", "resolved", 9)]


def test_event_fields_templates_and_default_summary():
    eng = engine("""\
        - name: p
          when: {firing: a}
          for: 2
          severity: critical
          actions: [rollback, alert]
          labels: {team: ml}
          annotations:
            summary: "{rule}: {metric}={value:g} for {statistic:.0f} ({detector}) at {step}"
            description: "{labels[team]} {severity}"
        - name: q
          when: {all: [a, b], within: 20}
          severity: critical
        - name: t
          when: {any: [b, a]}
          severity: info
    """)
    events = []
    for i, (x, y) in enumerate([(0, 0), (3, 0), (2, 0), (0, 5)]):
        events += eng.update(Sample(step=i, values={"x": x, "y": y}))
    p = next(e for e in events if e.rule == "p")
    assert (p.kind, p.step, p.metric, p.value) == ("firing", 2, "x", 3.0)  # a's firing value
    assert p.message == "p: x=3 for 2 (when) at 2"
    assert p.annotations == {"summary": p.message, "description": "ml critical"}
    assert p.actions == ("rollback", "alert") and p.labels == {"team": "ml"}
    q = next(e for e in events if e.rule == "q")
    # b fired most recently, so q reports b's metric and value
    assert (q.step, q.metric, q.value) == (3, "y", 5.0)
    assert q.message == "q: a and b within 20 steps at step 3"
    t = next(e for e in events if e.rule == "t")
    assert (t.step, t.metric, t.value, t.message) == (1, "x", 3.0, "t: b or a firing at step 1")
    # a tie (both start firing on the same sample) goes to the rule listed first
    eng = engine("""\
        - name: t
          when: {any: [b, a]}
          severity: info
    """)
    t = eng.update(Sample(step=0, values={"x": 2.0, "y": 4.0}))[-1]
    assert (t.rule, t.metric, t.value) == ("t", "y", 4.0)


def test_all_fires_when_the_second_signal_comes_within_k_steps():
    rule = """\
        - name: c
          when: {all: [a, b], within: 3}
          severity: critical
    """
    # a fires at 2 only; b at 5: 5 - 3 <= 2, so c fires at 5 and resolves when the window ends
    ev = feed(engine(rule), [0, 0, 2, 0, 0, 0, 0], [0, 0, 0, 0, 0, 2, 2])
    assert only(ev, "c") == [("c", "firing", 5), ("c", "resolved", 6)]
    # the same pair one step later than k: never
    ev = feed(engine(rule), [0, 0, 2, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 2])
    assert only(ev, "b") == [("b", "firing", 6)] and only(ev, "c") == []
    # the order of the signals does not matter
    ev = feed(engine(rule), [0, 0, 0, 0, 2, 0], [0, 2, 0, 0, 0, 0])
    assert only(ev, "c") == [("c", "firing", 4), ("c", "resolved", 5)]


def test_all_without_within_needs_both_firing_now():
    ev = feed(engine("""\
        - name: c
          when: {all: [a, b]}
          severity: critical
    """), [2, 2, 2, 0, 2], [0, 2, 2, 2, 0])
    assert only(ev, "c") == [("c", "firing", 1), ("c", "resolved", 3)]


def test_any_now_and_within():
    ev = feed(engine("""\
        - name: d
          when: {any: [a, b]}
          severity: warning
        - name: e
          when: {any: [a, b], within: 2}
          severity: warning
    """), [0, 2, 0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 2, 2, 0, 0, 0])
    assert only(ev, "d") == [("d", "firing", 1), ("d", "resolved", 2),
                             ("d", "firing", 5), ("d", "resolved", 7)]
    # a last fired at step 1: e holds through step 3; b at 5-6: through step 8
    assert only(ev, "e") == [("e", "firing", 1), ("e", "resolved", 4),
                             ("e", "firing", 5), ("e", "resolved", 9)]


def test_within_run_remembers_a_firing_for_the_rest_of_the_run():
    eng = engine("""\
        - name: e
          when: {any: [a, b], within: run}
          severity: info
        - name: f
          when: {all: [b, e]}
          severity: critical
    """)
    # a fires once at step 1; e holds from then on, however long ago that was
    ev = feed(eng, [0, 2] + [0] * 10_000 + [0, 0], [0] * 10_002 + [2, 0])
    assert only(ev, "e") == [("e", "firing", 1)]
    assert only(ev, "f") == [("f", "firing", 10_002), ("f", "resolved", 10_003)]
    assert eng.rules[2].when.describe() == "a or b at any step so far"
    # and after a resume (the last firing is in the state)
    again = engine("""\
        - name: e
          when: {any: [a, b], within: run}
          severity: info
    """)
    feed(again, [2, 0])
    state = json.loads(json.dumps(again.state_dict()))
    fresh = engine("""\
        - name: e
          when: {any: [a, b], within: run}
          severity: info
    """)
    fresh.load_state_dict(state)
    assert only(feed(fresh, [0] * 5, start=2), "e") == []  # still firing: no new transition


def test_unless_vetoes_the_condition_while_the_other_rule_fires():
    eng = engine("""\
        - name: p
          when: {firing: a, unless: [b]}
          severity: critical
    """)
    # a fires from 1 on; b fires on 1-2 (vetoes p), then stops: p fires at 3, resolves when b
    # comes back at 5
    ev = only(feed(eng, [0, 2, 2, 2, 2, 2, 2], [0, 2, 2, 0, 0, 2, 2]), "p")
    assert ev == [("p", "firing", 3), ("p", "resolved", 5)]
    assert eng.rules[-1].when.describe() == "a firing unless b"
    assert "b" in eng.rules[-1].references


def test_unless_may_name_a_when_rule_and_is_ordered_after_it():
    eng = engine("""\
        - name: p
          when: {firing: a, unless: [q]}
          severity: critical
        - name: q
          when: {firing: b}
          severity: info
    """)
    ev = only(feed(eng, [2, 2, 2], [2, 0, 0]), "p")
    assert ev == [("p", "firing", 1)]


def test_chain_is_evaluated_in_dependency_order():
    # q and s are listed before p but refer to it: p must be judged first within each sample
    eng = engine("""\
        - name: q
          when: {all: [p, b], within: 5}
          severity: critical
        - name: s
          when: {firing: p}
          severity: critical
        - name: p
          when: {firing: a}
          for: 2
          severity: warning
    """)
    assert [r.name for r in when_order(eng.rules)] == ["p", "q", "s"]
    ev = feed(eng, [2, 2, 2, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 2, 0, 0])
    assert ev == [("a", "firing", 0), ("p", "firing", 1), ("s", "firing", 1),
                  ("a", "resolved", 3), ("p", "resolved", 3), ("s", "resolved", 3),
                  ("b", "firing", 6), ("q", "firing", 6),
                  ("b", "resolved", 7), ("q", "resolved", 8)]  # p last fired at 2: 8 - 5 > 2
    # p fired at 1..2 only: b at step 8 is more than 5 steps later
    ev = feed(engine("""\
        - name: q
          when: {all: [p, b], within: 5}
          severity: critical
        - name: p
          when: {firing: a}
          for: 2
          severity: warning
    """), [2, 2, 2, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0, 2])
    assert only(ev, "q") == []


def test_hysteresis_delays_the_resolution():
    ev = feed(engine("""\
        - name: p
          when: {firing: a}
          hysteresis: 3
          severity: critical
    """), [2, 2, 0, 0, 2, 0, 0, 0, 0])
    # the condition breaks at 2-3 (only 2 normal samples), again from 5: resolves at 7
    assert only(ev, "p") == [("p", "firing", 0), ("p", "resolved", 7)]


def test_cooldown_after_a_resolution():
    ev = feed(engine("""\
        - name: p
          when: {firing: a}
          cooldown: 5
          severity: critical
    """), [2, 0, 0, 2, 2, 2, 2, 0])
    # resolved at 1; a fires again at 3 but p stays quiet until step 1 + 5
    assert only(ev, "p") == [("p", "firing", 0), ("p", "resolved", 1), ("p", "firing", 6),
                             ("p", "resolved", 7)]


def test_tick_judges_when_rules_on_time_based_rules():
    eng = Engine(parse_rules("""\
rules:
  - {name: stalled, metric: step, detector: staleness, params: {seconds: 10}, severity: warning}
  - {name: a, metric: x, detector: threshold, params: {above: 1}, severity: warning}
  - name: stuck
    when: {firing: stalled}
    for: 2
    severity: critical
  - name: other
    when: {firing: a}
    severity: info
"""))
    assert eng.update(Sample(step=1, time=100.0, values={"x": 2.0}))[-1].rule == "other"
    assert [(e.rule, e.kind) for e in eng.tick(115.0)] == [("stalled", "firing")]
    assert [(e.rule, e.kind, e.step) for e in eng.tick(116.0)] == [("stuck", "firing", 1)]
    assert sorted(eng.active) == ["a", "other", "stalled", "stuck"]


# --------------------------------------------------------------------------- resume and replay

RESUME_RULES = """\
    - {name: c, metric: z, detector: threshold, params: {above: 1.5}, severity: info}
    - name: p
      when: {firing: a}
      for: 3
      hysteresis: 2
      cooldown: 4
      severity: critical
    - name: q
      when: {all: [p, b], within: 6}
      severity: critical
    - name: r
      when: {any: [c, q], within: 3}
      for: 2
      severity: warning
"""


def resume_stream(n: int = 160) -> list[Sample]:
    import random
    rng = random.Random(7)
    out = []
    for i in range(n):
        bump = 1.5 if (i // 12) % 3 == 1 else 0.0
        out.append(Sample(step=i, values={"x": rng.random() + bump, "y": rng.random() * 1.3,
                                          "z": rng.random() * 1.6}))
    return out


def test_state_dict_round_trip_mid_stream_gives_identical_events():
    samples = resume_stream()
    whole = engine(RESUME_RULES)
    expected = [e for s in samples for e in whole.update(s)]
    fired = {e.rule for e in expected if e.kind == "firing"}
    assert {"p", "q", "r"} <= fired  # the stream exercises every 'when' rule
    for cut in (5, 13, 30, 31, 47, 90, 121):
        first = engine(RESUME_RULES)
        got = [e for s in samples[:cut] for e in first.update(s)]
        state = json.loads(json.dumps(first.state_dict()))  # must be JSON, no NaN
        second = engine(RESUME_RULES)
        second.load_state_dict(state)
        got += [e for s in samples[cut:] for e in second.update(s)]
        assert got == expected, cut
        assert second.active == whole.active


def test_state_carries_last_firings_only_for_referenced_rules():
    eng = engine(RESUME_RULES)
    for s in resume_stream(40):
        eng.update(s)
    saved = eng.state_dict()["rules"]
    assert {n for n, d in saved.items() if "last_firing_step" in d} == {"a", "b", "c", "p", "q"}
    assert saved["a"]["last_firing"]["rule"] == "a" and saved["p"]["detectors"] == {}
    plain = Engine(parse_rules(BASE))
    plain.update(Sample(step=1, values={"x": 5.0}))
    assert "last_firing_step" not in plain.state_dict()["rules"]["a"]


def test_state_saved_before_when_rules_loads_as_never_fired():
    old = Engine(parse_rules(BASE))  # what an older version saved: no 'when' rules, no last firings
    feed(old, [0, 2, 0], [0, 0, 0])
    state = json.loads(json.dumps(old.state_dict()))
    eng = engine("""\
        - name: c
          when: {all: [a, b], within: 5}
          severity: critical
    """)
    eng.load_state_dict(state)
    # a fired at step 1, but the saved state does not say so: b at step 3 alone is not enough
    assert feed(eng, [0, 0], [2, 0], start=3) == [("b", "firing", 3), ("b", "resolved", 4)]
    eng.load_state_dict(state)
    assert only(feed(eng, [2, 0, 0, 0, 0, 0, 0], [2] + [0] * 6, start=3), "c") == [
        ("c", "firing", 3), ("c", "resolved", 9)]
    with pytest.raises(ConfigError, match=r"saved under other rules: it lacks rules these rules have \(added since\): d"):
        engine("- {name: d, metric: w, detector: nonfinite, severity: info}").load_state_dict(
            state)


def write_trace(path: Path, samples: list[Sample]) -> Path:
    with TraceWriter(path) as w:
        for s in samples:
            w.write(s)
    return path


def test_replay_equals_live(tmp_path):
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(BASE + textwrap.indent(textwrap.dedent(RESUME_RULES), "  "))
    samples = resume_stream()
    live = Engine(load_rules(rules_file))
    expected = [e for s in samples for e in live.update(s)]
    trace = write_trace(tmp_path / "t.jsonl", samples)
    assert [s.values for s in read_trace(trace)] == [s.values for s in samples]
    res = replay_trace(trace, load_rules(rules_file))
    assert res.error is None and res.events == expected
    out = CliRunner().invoke(cli, ["replay", "--json", "--resolved", "--rules", str(rules_file),
                                   str(trace)])
    assert out.exit_code == 0, out.output
    recs = [json.loads(x) for x in out.stdout.splitlines()]
    assert recs == [{**e.to_json(str(trace)), "kind": e.kind} for e in expected]
    assert any(r["rule"] == "q" for r in recs)


# --------------------------------------------------------------------------- validation

def errors(text: str) -> list[str]:
    with pytest.raises(RuleError) as info:
        parse_rules(textwrap.dedent(text), "f.yml")
    return info.value.errors


CASES = {
    "unknown": ("""\
        rules:
          - {name: loss_shift, metric: loss, detector: cusum, severity: warning}
          - name: p
            when: {firing: loss_shfit}
            severity: critical
        """, ["f.yml:4: key 'rules[1].when.firing': unknown rule 'loss_shfit'; did you mean "
              "'loss_shift'? (valid choices: loss_shift)"]),
    "unknown_in_list": ("""\
        rules:
          - {name: a, metric: x, detector: nonfinite, severity: warning}
          - {name: b, metric: y, detector: nonfinite, severity: warning}
          - name: c
            when: {all: [a, zz], within: 3}
            severity: critical
        """, ["f.yml:5: key 'rules[2].when.all[1]': unknown rule 'zz' (valid choices: a, b)"]),
    "self": ("""\
        rules:
          - name: p
            when: {any: [p]}
            severity: critical
        """, ["f.yml:3: key 'rules[0].when.any[0]': rule 'p' refers to itself; a 'when' rule "
              "watches other rules"]),
    "cycle": ("""\
        rules:
          - name: p
            when: {firing: q}
            severity: critical
          - name: q
            when: {any: [r]}
            severity: critical
          - name: r
            when: {firing: p}
            severity: critical
        """, ["f.yml:3: key 'rules[0].when': reference cycle: p -> q -> r -> p; a rule cannot "
              "depend on itself, directly or through other rules"]),
    "both": ("""\
        rules:
          - {name: a, metric: x, detector: nonfinite, severity: warning}
          - name: p
            metric: loss
            detector: spike
            when: {firing: a}
            severity: critical
        """, ["f.yml:4: key 'rules[1].metric': a rule with 'when' fires on other rules and "
              "takes no metric, detector, params or given; give one or the other",
              "f.yml:5: key 'rules[1].detector': a rule with 'when' fires on other rules and "
              "takes no metric, detector, params or given; give one or the other"]),
    "within_negative": ("""\
        rules:
          - {name: a, metric: x, detector: nonfinite, severity: warning}
          - {name: b, metric: y, detector: nonfinite, severity: warning}
          - name: c
            when: {all: [a, b], within: -1}
            severity: critical
        """, ["f.yml:5: key 'rules[2].when.within': expected a number of steps >= 0 or 'run' (at any step so far), got -1"]),
    "within_text": ("""\
        rules:
          - {name: a, metric: x, detector: nonfinite, severity: warning}
          - name: c
            when: {any: [a], within: 5m}
            severity: critical
        """, ["f.yml:4: key 'rules[1].when.within': expected a number of steps >= 0 or 'run' (at any step so far), got '5m'"]),
    "within_on_firing": ("""\
        rules:
          - {name: a, metric: x, detector: nonfinite, severity: warning}
          - name: c
            when: {firing: a, within: 3}
            severity: critical
        """, ["f.yml:4: key 'rules[1].when.within': 'within' applies to 'all' and 'any' only "
              "('firing' means firing now; use the rule's 'for' to ask for persistence)"]),
    "disabled": ("""\
        rules:
          - {name: a, metric: x, detector: nonfinite, severity: warning, enabled: false}
          - name: c
            when: {firing: a}
            severity: critical
        """, ["f.yml:4: key 'rules[1].when.firing': rule 'a' is disabled (enabled: false); "
              "enable it or remove the reference"]),
    "unknown_key": ("""\
        rules:
          - {name: a, metric: x, detector: nonfinite, severity: warning}
          - {name: b, metric: y, detector: nonfinite, severity: warning}
          - name: c
            when: {all: [a, b], withn: 3}
            severity: critical
        """, ["f.yml:5: key 'rules[2].when.withn': unknown key; did you mean 'within'? "
              "(valid choices: firing, all, any, within, unless)"]),
    "two_modes": ("""\
        rules:
          - {name: a, metric: x, detector: nonfinite, severity: warning}
          - name: c
            when: {firing: a, any: [a]}
            severity: critical
        """, ["f.yml:4: key 'rules[1].when.any': give exactly one of 'firing', 'all', 'any', "
              "not both 'firing' and 'any'"]),
    "no_mode": ("""\
        rules:
          - name: c
            when: {within: 3}
            severity: critical
        """, ["f.yml:3: key 'rules[0].when': missing one of 'firing', 'all', 'any' "
              "(valid choices: firing, all, any)"]),
    "all_of_one": ("""\
        rules:
          - {name: a, metric: x, detector: nonfinite, severity: warning}
          - name: c
            when: {all: [a]}
            severity: critical
        """, ["f.yml:4: key 'rules[1].when.all': expected a list of at least 2 rule names "
              "('firing' watches one rule), got ['a']"]),
    "listed_twice": ("""\
        rules:
          - {name: a, metric: x, detector: nonfinite, severity: warning}
          - name: c
            when: {any: [a, a]}
            severity: critical
        """, ["f.yml:4: key 'rules[1].when.any[1]': rule 'a' listed twice"]),
    "not_a_mapping": ("""\
        rules:
          - {name: a, metric: x, detector: nonfinite, severity: warning}
          - name: c
            when: a
            severity: critical
        """, ["f.yml:4: key 'rules[1].when': expected a mapping with one of 'firing', 'all', "
              "'any', e.g. {firing: loss_shift} or {all: [a, b], within: 20} "
              "(valid choices: firing, all, any, within, unless)"]),
    "unless_unknown": ("""\
        rules:
          - {name: a, metric: x, detector: nonfinite, severity: warning}
          - name: c
            when: {firing: a, unless: [nope]}
            severity: critical
        """, ["f.yml:4: key 'rules[1].when.unless[0]': unknown rule 'nope' (valid choices: "
              "a)"]),
    "unless_also_condition": ("""\
        rules:
          - {name: a, metric: x, detector: nonfinite, severity: warning}
          - {name: b, metric: y, detector: nonfinite, severity: warning}
          - name: c
            when: {all: [a, b], unless: [b]}
            severity: critical
        """, ["f.yml:5: key 'rules[2].when.unless[0]': rule 'b' is both a condition and in "
              "'unless'"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_validation_errors(case, tmp_path):
    text, expected = CASES[case]
    assert errors(text) == expected
    f = tmp_path / "f.yml"
    f.write_text(textwrap.dedent(text))
    with pytest.raises(RuleError) as info:
        load_rules(f)
    assert info.value.errors == [e.replace("f.yml:", f"{f}:", 1) for e in expected]
    out = CliRunner().invoke(cli, ["rules", "check", str(f)])
    assert out.exit_code == 1
    assert out.stderr.splitlines() == info.value.errors + ["1 of 1 file(s) have errors"]
    assert out.stdout == ""


def test_all_errors_are_collected_and_cli_accepts_a_good_file(tmp_path):
    errs = errors("""\
        rules:
          - {name: a, metric: x, detector: nonfinite, severity: warning}
          - name: c
            when: {any: [zz]}
            severity: urgent
          - name: d
            when: {firing: d}
            severity: info
    """)
    assert [e.split(": ")[0] + ": " + e.split(": ")[1] for e in errs] == [
        "f.yml:5: key 'rules[1].severity'", "f.yml:4: key 'rules[1].when.any[0]'",
        "f.yml:7: key 'rules[2].when.firing'"]
    good = tmp_path / "good.yml"
    good.write_text(BASE + textwrap.indent(textwrap.dedent(RESUME_RULES), "  "))
    out = CliRunner().invoke(cli, ["rules", "check", str(good)])
    assert out.exit_code == 0 and out.stdout == f"{good}: ok (6 rules)\n"


def test_when_rule_fields():
    rs = parse_rules(BASE + textwrap.indent(textwrap.dedent(RESUME_RULES), "  "))
    q = rs["q"]
    assert q.when == When("all", ("p", "b"), 6) and q.metrics == () and q.detector == ""
    assert q.references == ("p", "b") and rs["a"].references == ()
    assert rs["p"].when == When("firing", ("a",)) and rs["p"].for_.count == 3
    with pytest.raises(ConfigError, match="has no detector"):
        q.make_detector()


def test_ruleset_without_refuses_to_drop_a_referenced_rule():
    rs = parse_rules(BASE + textwrap.indent(textwrap.dedent(RESUME_RULES), "  "))
    with pytest.raises(ConfigError) as info:
        rs.without("a", "b")
    assert str(info.value) == ("cannot drop 'a' (used by p), 'b' (used by q): 'when' rules "
                               "refer to them; drop those rules too")
    with pytest.raises(ConfigError, match=r"^cannot drop 'p' \(used by q\): 'when' rules refer "
                                          r"to it; drop those rules too$"):
        rs.without("p")
    assert rs.without("r", "q", "p", "c").names == ("a", "b")
    with pytest.raises(KeyError):
        rs.without("nope")


def test_programmatic_rules_are_checked():
    a = Rule("a", ("x",), "nonfinite")
    with pytest.raises(ConfigError, match="takes no metrics"):
        Rule("p", ("x",), "nonfinite", when=When("firing", ("a",)))
    with pytest.raises(ConfigError, match="needs metrics and a detector"):
        Rule("p")
    with pytest.raises(ConfigError, match="bad when"):
        When("all", ("a",))
    with pytest.raises(ConfigError, match="unknown or disabled rule 'b'"):
        Engine([a, Rule("p", when=When("firing", ("b",)))])
    with pytest.raises(ConfigError, match="unknown or disabled rule 'a'"):
        Engine([Rule("a", ("x",), "nonfinite", enabled=False),
                Rule("p", when=When("firing", ("a",)))])
    with pytest.raises(ConfigError, match=r"reference cycle: p -> q -> p"):
        Engine([a, Rule("p", when=When("firing", ("q",))), Rule("q", when=When("firing", ("p",)))])


def test_since_is_where_the_evidence_began():
    # a fires at 2, b at 5: the escalation fires at 5 and its evidence began at 2; a chain on
    # it inherits that start; a rollback for it goes back before step 2 (the Watcher's target)
    eng = engine("""\
        - name: c
          when: {all: [a, b], within: 3}
          severity: critical
        - name: d
          when: {firing: c}
          severity: critical
    """)
    firings = {}
    for i, (x, y) in enumerate(zip([0, 0, 2, 0, 0, 0], [0, 0, 0, 0, 0, 2])):
        for e in eng.update(Sample(step=i, values={"x": x, "y": y})):
            if e.kind == "firing":
                firings[e.rule] = e
    assert firings["c"].step == 5 and firings["c"].since == 2
    assert firings["d"].since == 2
    assert firings["a"].since is None                 # metric rules carry no `since`
    # and it survives the engine's state round trip
    from lrwatch.rules.engine import Firing
    assert Firing.from_dict(firings["c"].to_dict()).since == 2
