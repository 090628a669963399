"""Layered rule sets (docs/rules.md, "Layering rule sets"): rule sets joined in order resolve
`when` references across all of them, and a later set disables (`{name: X, enabled: false}`)
or replaces (`override: true`) a rule of an earlier one, explicitly. The Watcher's list,
`lrwatch replay --rules A --rules B` and `lrwatch rules check B --with A` join alike."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import lrwatch
from lrwatch.cli import cli
from lrwatch.errors import ConfigError, RuleError
from lrwatch.rules import Engine, load_pack
from lrwatch.rules.schema import parse_rules
from lrwatch.samples import Sample
from lrwatch.wiring import rule_set


def _file(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip())
    return p


def _errors(rules: list[object]) -> list[str]:
    with pytest.raises(RuleError) as info:
        rule_set(rules)
    return info.value.errors


# the user's file of the journey: an escalation on a pack rule, a pack rule turned off and one
# replaced with the user's own version
_MY_RULES = """
    rules:
      - name: lr_bug_seen                 # escalation on the pack's lr_anomaly
        when: {firing: lr_anomaly}
        severity: warning
        actions: [alert]
      - name: stalled                     # turns the pack's rule off
        enabled: false
      - name: lr_anomaly                  # replaces the pack's rule (in its place)
        override: true
        metric: lr
        detector: ema_ratio
        params: {alpha: 0.3, above: 3.0, warmup: 3}
        severity: warning
        actions: [alert]
    """


# --- references across the joined sets ------------------------------------------------------

def test_a_when_rule_refers_to_a_rule_of_the_pack_it_is_joined_with(tmp_path: Path) -> None:
    my = _file(tmp_path, "my.yml", """
        rules:
          - name: loss_shift_long
            when: {firing: loss_shift}
            for: 30
            severity: critical
            actions: [rollback]
        """)
    rs = rule_set(["training", str(my)])
    assert rs is not None and rs.names[-1] == "loss_shift_long"
    assert rs.names[:-1] == load_pack("training").names
    assert rs["loss_shift_long"].source == f"{my}:2"
    # a RuleSet in the list is a set like any other
    rs2 = rule_set([load_pack("training"), str(my)])
    assert rs2 is not None and rs2.names == rs.names
    # and the escalation fires on the pack's rule
    eng = Engine(rs)
    fired = []
    for step in range(1, 400):
        loss = 1.0 + 0.01 * math.sin(step) + (3.0 if step > 100 else 0.0)
        fired += [e.rule for e in eng.update(Sample(step=step, values={"loss": loss, "lr": 0.1}))
                  if e.kind == "firing"]
    assert "loss_shift" in fired


def test_references_resolve_in_both_directions_and_every_when_form(tmp_path: Path) -> None:
    a = _file(tmp_path, "a.yml", """
        rules:
          - {name: a_high, metric: loss, detector: threshold, params: {above: 5}, severity: info}
          - name: a_and_b                   # refers to a rule of the later set
            when: {all: [a_high, b_high], within: 3, unless: [b_low]}
            severity: warning
        """)
    b = _file(tmp_path, "b.yml", """
        rules:
          - {name: b_high, metric: loss, detector: threshold, params: {above: 7}, severity: info}
          - {name: b_low, metric: lr, detector: threshold, params: {below: 0.001}, severity: info}
          - name: b_any
            when: {any: [a_high, a_and_b]}
            severity: warning
        """)
    rs = rule_set([str(a), str(b)])
    assert rs is not None
    assert rs.names == ("a_high", "a_and_b", "b_high", "b_low", "b_any")


def test_an_unknown_reference_in_a_join_names_file_line_key_and_rule(tmp_path: Path) -> None:
    my = _file(tmp_path, "my.yml", """
        rules:
          - name: esc
            when: {all: [lr_anomaly, loss_shfit]}
            severity: critical
        """)
    errs = _errors(["training", str(my)])
    assert len(errs) == 1
    assert errs[0].startswith(f"{my}:3: key 'rules[0].when.all[1]': unknown rule 'loss_shfit'; "
                              f"did you mean 'loss_shift'?")


def test_a_reference_cycle_across_files_is_reported(tmp_path: Path) -> None:
    a = _file(tmp_path, "a.yml", """
        rules:
          - {name: x, metric: loss, detector: nonfinite, severity: info}
          - name: p
            when: {any: [x, q]}
            severity: warning
        """)
    b = _file(tmp_path, "b.yml", """
        rules:
          - name: q
            when: {firing: p}
            severity: warning
        """)
    errs = _errors([str(a), str(b)])
    assert len(errs) == 1, errs
    # told at the rule of the later file, saying where the other rules of the cycle are
    assert errs[0].startswith(f"{b}:3: key 'rules[0].when': reference cycle: q -> p -> q")
    assert errs[0].endswith(f"(p at {a}:3)")
    # a replacement that closes a cycle with the pack's rules: told in the user's file
    c = _file(tmp_path, "c.yml", """
        rules:
          - name: lr_anomaly
            override: true
            when: {firing: lr_jump_divergence}
            severity: warning
        """)
    errs = _errors(["training", str(c)])
    assert len(errs) == 1, errs
    assert errs[0].startswith(f"{c}:4: key 'rules[0].when': reference cycle: lr_anomaly -> "
                              f"lr_jump_divergence -> lr_anomaly")
    assert "lr_jump_divergence at <pack training>:" in errs[0]


# --- disabling and replacing a rule of an earlier set ----------------------------------------

def test_a_later_set_disables_and_replaces_pack_rules_explicitly(tmp_path: Path) -> None:
    my = _file(tmp_path, "my.yml", _MY_RULES)
    pack = load_pack("training")
    rs = rule_set(["training", str(my)])
    assert rs is not None
    assert "stalled" not in rs.names
    # replaced in place: the pack's order is kept, the new rule is the user's
    want = tuple(n for n in pack.names if n != "stalled") + ("lr_bug_seen",)
    assert rs.names == want
    assert rs["lr_anomaly"].params["above"] == 3.0 and pack["lr_anomaly"].params["above"] == 4.0
    assert rs["lr_anomaly"].source.startswith(str(my))
    # the pack's rules that refer to the replaced one refer to the new one
    assert "lr_anomaly" in rs["lr_jump_divergence"].references


def test_the_same_name_twice_without_saying_so_is_an_error_that_says_how(tmp_path: Path) -> None:
    my = _file(tmp_path, "my.yml", """
        rules:
          - {name: x, metric: loss, detector: nonfinite, severity: info}
          - {name: lr_anomaly, metric: lr, detector: threshold, params: {above: 1}, severity: info}
        """)
    errs = _errors(["training", str(my)])
    assert len(errs) == 1
    msg = errs[0]
    assert msg.startswith(f"{my}:3: key 'rules[1].name': duplicate rule names: lr_anomaly")
    assert "<pack training>:" in msg and "override: true" in msg and "enabled: false" in msg
    # a Watcher's ConfigError as before (it is a RuleError too, with the file and line)
    with pytest.raises(ConfigError, match="duplicate rule names: lr_anomaly"):
        rule_set(["training", str(my)])


def test_override_and_disable_must_name_a_rule_of_an_earlier_set(tmp_path: Path) -> None:
    my = _file(tmp_path, "my.yml", """
        rules:
          - {name: lr_anomaly_x, override: true, metric: lr, detector: nonfinite, severity: info}
          - {name: stalld, enabled: false}
        """)
    errs = _errors(["training", str(my)])
    assert len(errs) == 2, errs
    assert errs[0].startswith(f"{my}:2: key 'rules[0].override': no earlier rule set has a "
                              f"rule 'lr_anomaly_x' to replace; did you mean 'lr_anomaly'?")
    assert errs[1].startswith(f"{my}:3: key 'rules[1].enabled': no earlier rule set has a rule "
                              f"'stalld' to disable; did you mean 'stalled'?")
    # a later set's rule is no earlier set's: b disables nothing that came before it
    b = _file(tmp_path, "b.yml", "rules: [{name: z, enabled: false}]\n")
    z = _file(tmp_path, "z.yml", "rules: [{name: z, metric: loss, detector: nonfinite, "
                                 "severity: info}]\n")
    assert any("'z' to disable" in e for e in _errors([str(b), str(z)]))


def test_disabling_a_rule_that_another_rule_refers_to_names_both(tmp_path: Path) -> None:
    my = _file(tmp_path, "my.yml", """
        rules:
          - {name: loss_shift, enabled: false}
        """)
    errs = _errors(["training", str(my)])
    assert len(errs) == 1
    msg = errs[0]
    assert msg.startswith(f"{my}:2: key 'rules[0].enabled': rule 'loss_shift' is disabled here")
    assert "'lr_jump_divergence' (<pack training>:" in msg and "grad_loss_divergence" in msg
    # turned off with the rules that refer to it, it is gone
    ok = _file(tmp_path, "ok.yml", """
        rules:
          - {name: loss_shift, enabled: false}
          - {name: lr_jump_divergence, enabled: false}
          - {name: grad_loss_divergence, enabled: false}
        """)
    rs = rule_set(["training", str(ok)])
    assert rs is not None and not {"loss_shift", "lr_jump_divergence"} & set(rs.names)
    # a user rule that refers to a rule a later set disables: named too
    esc = _file(tmp_path, "esc.yml", "rules: [{name: e, when: {firing: stalled}, "
                                     "severity: info}]\n")
    off = _file(tmp_path, "off.yml", "rules: [{name: stalled, enabled: false}]\n")
    errs = _errors(["training", str(esc), str(off)])
    assert len(errs) == 1 and f"'e' ({esc}:1)" in errs[0]
    # a RuleSet in the list: its references count as well
    errs = _errors([load_pack("training"), str(my)])
    assert len(errs) == 1 and "'lr_jump_divergence' (<pack training>:" in errs[0]


def test_a_file_alone_keeps_its_own_rules(tmp_path: Path) -> None:
    """Without a join the new entries are errors that suggest one; a file whose rules stand
    alone parses as before."""
    with pytest.raises(RuleError) as info:
        parse_rules("rules: [{name: loss_shift, enabled: false}]\n", "f.yml")
    assert info.value.errors[0].startswith(
        "f.yml:1: key 'rules[0].enabled': no earlier rule set has a rule 'loss_shift' to "
        "disable")
    assert "--with training" in info.value.errors[0]
    with pytest.raises(RuleError, match="override: true.* same file"):
        parse_rules("rules: [{name: a, metric: loss, detector: nonfinite, severity: info},\n"
                    "        {name: a, override: true, metric: lr, detector: nonfinite, "
                    "severity: info}]\n", "f.yml")
    with pytest.raises(RuleError, match="key 'rules\\[0\\].override': expected true or false"):
        parse_rules("rules: [{name: a, override: 1, metric: loss, detector: nonfinite, "
                    "severity: info}]\n", "f.yml")


# --- lrwatch rules check --with ----------------------------------------------------------------

def test_rules_check_with_validates_a_file_as_it_will_be_joined(tmp_path: Path) -> None:
    my = _file(tmp_path, "my.yml", _MY_RULES)
    res = CliRunner().invoke(cli, ["rules", "check", str(my), "--with", "training"])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith(f"{my}: ok (2 rules")
    # alone: the disabled and replaced rules are unknown; the message says which pack holds
    # them and how to check the file with it
    res = CliRunner().invoke(cli, ["rules", "check", str(my)])
    assert res.exit_code == 1
    lines = res.stderr.splitlines()
    assert lines.pop() == "1 of 1 file(s) have errors"
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"{my}:7: key 'rules[1].enabled': no earlier rule set has a "
                               f"rule 'stalled' to disable")
    assert lines[1].startswith(f"{my}:9: key 'rules[2].override': no earlier rule set has a "
                               f"rule 'lr_anomaly' to replace")
    assert all(f"lrwatch rules check {my} --with training" in line for line in lines), lines
    # and so is a reference
    esc = _file(tmp_path, "esc.yml", "rules: [{name: e, when: {firing: lr_anomaly}, "
                                     "severity: info}]\n")
    res = CliRunner().invoke(cli, ["rules", "check", str(esc)])
    assert res.exit_code == 1
    assert res.stderr.startswith(f"{esc}:1: key 'rules[0].when.firing': unknown rule "
                                 f"'lr_anomaly'; 'lr_anomaly' is a rule of pack 'training': "
                                 f"join the pack first (lrwatch rules check {esc} --with "
                                 f"training;")
    res = CliRunner().invoke(cli, ["rules", "check", str(esc), "--with", "training"])
    assert res.exit_code == 0 and res.stdout.startswith(f"{esc}: ok (1 rule, 0 replacing")
    # --with is repeatable and takes files; errors still name the file, line and key
    extra = _file(tmp_path, "extra.yml", "rules: [{name: e2, when: {firing: lr_bug_seen}, "
                                         "severity: info}]\n")
    res = CliRunner().invoke(cli, ["rules", "check", str(extra), "--with", "training",
                                   "--with", str(my)])
    assert res.exit_code == 0, res.output
    bad = _file(tmp_path, "bad.yml", "rules: [{name: e3, when: {firing: lr_bug_sen}, "
                                     "severity: info}]\n")
    res = CliRunner().invoke(cli, ["rules", "check", str(bad), "--with", "training",
                                   "--with", str(my)])
    assert res.exit_code == 1
    assert res.stderr.startswith(f"{bad}:1: key 'rules[0].when.firing': unknown rule "
                                 f"'lr_bug_sen'; did you mean 'lr_bug_seen'?")


# --- replay with repeated --rules equals the Watcher's list, on a real run --------------------

def test_a_layered_run_replays_equal_to_live(tmp_path: Path) -> None:
    my = _file(tmp_path, "my.yml", _MY_RULES)
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = (x @ torch.randn(10, 1)).squeeze(1)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=300)
    trace = tmp_path / "live.jsonl"
    seen: list[Sample] = []
    w = lrwatch.Watcher(model, opt, sched, trace=trace, flush_every=7, listeners=[seen.append],
                        rules=["training", str(my)],
                        recovery={"good_after": 20, "min_interval": 10})
    assert "stalled" not in {r.name for r in w.engine.rules}
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        idx = torch.randint(0, 256, (32,), generator=g)
        if sched.last_epoch == 120:   # a configuration bug: the rate x200
            sched.base_lrs = [b * 200 for b in sched.base_lrs]
            for group in opt.param_groups:
                group["lr"] *= 200
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x[idx]).squeeze(1), y[idx])
        loss.backward()
        opt.step()
        sched.step()
        w.log(loss=loss)
    w.close()
    live = [(e["rule"], e["step"], e["severity"]) for s in seen for e in s.events
            if e.get("type") == "firing"]
    assert any(r == "lr_bug_seen" for r, _, _ in live), live   # the user's escalation fired
    res = CliRunner().invoke(cli, ["replay", str(trace), "--json", "--rules", "training",
                                   "--rules", str(my)])
    assert res.exit_code == 0, res.output
    replayed = [(r["rule"], r["step"], r["severity"]) for r in map(json.loads,
                                                                   res.stdout.splitlines())]
    assert replayed == live


# --- engine state of a layered set --------------------------------------------------------------

def _samples() -> list[Sample]:
    out = []
    for step in range(1, 301):
        lr = 0.1 * (50 if 150 <= step < 160 else 1)
        loss = 2.0 * math.exp(-step / 100) + 0.02 * math.sin(step * 1.7)
        if 150 <= step < 200:
            loss *= 4
        out.append(Sample(step=step, time=1000.0 + step, values={"loss": loss, "lr": lr,
                                                                 "grad_norm": 1.0 + loss}))
    return out


@pytest.mark.parametrize("cut", [40, 155, 170])
def test_engine_state_of_a_layered_set_resumes_exactly(tmp_path: Path, cut: int) -> None:
    my = _file(tmp_path, "my.yml", _MY_RULES + """
      - name: lr_bug_then_shift
        when: {all: [lr_bug_seen, loss_shift], within: 30}
        severity: critical
    """)
    spec = ["training", str(my)]

    def key(events: list) -> list[tuple]:
        return [(e.rule, e.step, e.kind, e.severity) for e in events]

    eng = Engine(rule_set(spec))
    whole = [e for s in _samples() for e in eng.update(s)]
    assert {"lr_anomaly", "lr_bug_seen"} <= {e.rule for e in whole}
    first = Engine(rule_set(spec))
    before = [e for s in _samples()[:cut] for e in first.update(s)]
    state = json.loads(json.dumps(first.state_dict()))
    second = Engine(rule_set(spec))
    second.load_state_dict(state)
    after = [e for s in _samples()[cut:] for e in second.update(s)]
    assert key(before + after) == key(whole)
