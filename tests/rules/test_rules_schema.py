"""Rule files: one test per error class, each asserting file, line and key; the packs; the CLI."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from lrwatch.cli import cli
from lrwatch.errors import RuleError
from lrwatch.rules import PACKS, Span, load_pack, load_rules, pack_text, parse_rules

GOOD = """\
version: 1
rules:
  - name: loss_spike
    metric: loss
    detector: spike
    params: {window: 30, threshold: 6, log: true}
    for: 2
    cooldown: 5m
    hysteresis: 3
    severity: critical
    actions: [rollback, {reduce_lr: {factor: 0.5}}]
    labels: {team: ml}
    annotations:
      summary: "loss {value:.3g} at step {step}"
      description: "z={statistic:.1f} team={labels[team]}"
"""


def errors_of(tmp_path: Path, text: str, name: str = "r.yml") -> list[str]:
    f = tmp_path / name
    f.write_text(textwrap.dedent(text))
    with pytest.raises(RuleError) as info:
        load_rules(f)
    for e in info.value.errors:
        assert e.startswith(f"{f}:"), e
    return [e[len(str(f)) + 1:] for e in info.value.errors]  # "LINE: key '...': ..."


def rule(body: str) -> str:
    return "rules:\n  - name: r\n" + textwrap.indent(textwrap.dedent(body), "    ")


def test_good_file_loads_every_field(tmp_path):
    f = tmp_path / "good.yml"
    f.write_text(GOOD)
    rs = load_rules(f)
    r = rs["loss_spike"]
    assert r.metrics == ("loss",) and r.detector == "spike"
    assert dict(r.params) == {"window": 30, "threshold": 6.0, "log": True}
    assert r.for_ == Span(count=2) and r.cooldown == Span(count=0, seconds=300.0)
    assert r.hysteresis == Span(count=3)
    assert r.actions == ("rollback", "reduce_lr")
    assert dict(r.action_params["reduce_lr"]) == {"factor": 0.5}
    assert dict(r.labels) == {"team": "ml"} and "summary" in r.annotations
    assert r.source == f"{f}:3"


def test_bad_yaml(tmp_path):
    errs = errors_of(tmp_path, "rules:\n  - name: [unclosed\n    metric: loss\n")
    assert len(errs) == 1 and errs[0].startswith("3: invalid YAML")


def test_unknown_rule_key_suggests_and_lists_choices(tmp_path):
    errs = errors_of(tmp_path, rule("""\
        metric: loss
        detector: nonfinite
        severty: critical
    """))
    assert errs[0].startswith("5: key 'rules[0].severty': unknown key; did you mean 'severity'?")
    assert "(valid choices: name, metric, metrics, detector" in errs[0]
    assert any("key 'rules[0].severity': missing required key" in e for e in errs)


def test_unknown_top_level_key(tmp_path):
    errs = errors_of(tmp_path, "rule: []\n")
    assert errs[0] == ("1: key 'rule': unknown key; did you mean 'rules'? "
                       "(valid choices: version, rules)")
    assert errs[1].startswith("1: key 'rules': missing required key")


def test_a_prometheus_rule_file_is_named_as_one(tmp_path):
    errs = errors_of(tmp_path, "groups:\n  - name: lrwatch\n    rules: []\n")
    assert errs[0].startswith("1: key 'groups': unknown key: this looks like a Prometheus")
    assert "promtool check rules" in errs[0]


def test_unknown_detector(tmp_path):
    errs = errors_of(tmp_path, rule("""\
        metric: loss
        detector: spik
        severity: info
    """))
    assert errs == ["4: key 'rules[0].detector': unknown detector 'spik'; did you mean 'spike'? "
                    "(valid choices: nonfinite, threshold, spike, ema_ratio, cusum, page_hinkley,"
                    " trend, regression, plateau, baseline, start_ratio, rate, staleness, untrained, frozen, drop, above_min, below_max, fewer, stall)"]


def test_bad_param_type(tmp_path):
    errs = errors_of(tmp_path, rule("""\
        metric: loss
        detector: spike
        params:
          window: fifty
        severity: info
    """))
    assert errs == ["6: key 'rules[0].params.window': parameter 'window' must be an integer "
                    ">= 3 and <= 100000, got 'fifty'"]


def test_bad_param_choice_and_unknown_param(tmp_path):
    errs = errors_of(tmp_path, rule("""\
        metric: loss
        detector: spike
        params: {direction: sideways, windw: 3}
        severity: info
    """))
    assert errs[0] == ("5: key 'rules[0].params.direction': parameter 'direction': 'sideways' "
                       "is not valid (valid choices: up, down, both)")
    assert errs[1].startswith("5: key 'rules[0].params.windw': unknown parameter of detector "
                              "'spike'; did you mean 'window'? (valid choices: window, threshold")


def test_cross_parameter_error(tmp_path):
    errs = errors_of(tmp_path, rule("""\
        metric: loss
        detector: threshold
        severity: info
    """))
    assert errs == ["4: key 'rules[0].params': threshold needs 'above', 'below' or both; "
                    "add a 'params' mapping"]
    errs = errors_of(tmp_path, rule("""\
        metric: loss
        detector: threshold
        params: {above: 1, below: 2}
        severity: info
    """))
    assert errs == ["5: key 'rules[0].params': threshold 'below' (2.0) must not exceed "
                    "'above' (1.0)"]


def test_bad_severity(tmp_path):
    errs = errors_of(tmp_path, rule("""\
        metric: loss
        detector: nonfinite
        severity: urgent
    """))
    assert errs == ["5: key 'rules[0].severity': 'urgent' is not a severity "
                    "(valid choices: critical, warning, info)"]


def test_bad_action(tmp_path):
    errs = errors_of(tmp_path, rule("""\
        metric: loss
        detector: nonfinite
        severity: info
        actions:
          - alert
          - page
          - alert
    """))
    assert errs[0] == ("8: key 'rules[0].actions[1]': unknown action 'page' "
                       "(valid choices: rollback, reduce_lr, skip, stop, alert, hook)")
    assert errs[1] == "9: key 'rules[0].actions[2]': action 'alert' listed twice"


def test_missing_metric_and_both_metric_forms(tmp_path):
    errs = errors_of(tmp_path, rule("""\
        detector: nonfinite
        severity: info
    """))
    assert errs == ["2: key 'rules[0].metric': missing required key (the metric the rule "
                    "watches, or 'metrics' with a list)"]
    errs = errors_of(tmp_path, rule("""\
        metric: loss
        metrics: [loss]
        detector: nonfinite
        severity: info
    """))
    assert errs == ["4: key 'rules[0].metrics': give either 'metric' or 'metrics', not both"]
    errs = errors_of(tmp_path, rule("""\
        metrics: []
        detector: nonfinite
        severity: info
    """))
    assert errs[0].startswith("3: key 'rules[0].metrics': expected a non-empty list")


def test_missing_and_duplicate_names(tmp_path):
    errs = errors_of(tmp_path, """\
        rules:
          - metric: loss
            detector: nonfinite
            severity: info
          - name: a
            metric: loss
            detector: nonfinite
            severity: info
          - name: a
            metric: loss
            detector: nonfinite
            severity: info
    """)
    assert errs == ["2: key 'rules[0].name': missing required key",
                    "9: key 'rules[2].name': duplicate rule name 'a' (first at rules[1])"]


def test_bad_durations(tmp_path):
    errs = errors_of(tmp_path, rule("""\
        metric: loss
        detector: nonfinite
        severity: info
        for: 0
        cooldown: soon
        hysteresis: -1s
    """))
    assert errs[0] == "6: key 'rules[0].for': must be at least 1, got 0"
    assert errs[1].startswith("7: key 'rules[0].cooldown': expected a number of samples or a "
                              "duration such as '30s'")
    assert errs[2].startswith("8: key 'rules[0].hysteresis':")


def test_bad_template_and_labels(tmp_path):
    errs = errors_of(tmp_path, rule("""\
        metric: loss
        detector: nonfinite
        severity: info
        labels: {"bad-label": x}
        annotations:
          summary: "{loss} is bad"
          description: "{value:.3q}"
    """))
    assert errs[0] == "6: key 'rules[0].labels.bad-label': not a valid Prometheus label name"
    assert errs[1].startswith("8: key 'rules[0].annotations.summary': unknown template field "
                              "{loss} (valid choices: rule, metric, value, step")
    assert errs[2].startswith("9: key 'rules[0].annotations.description': bad template:")


def test_labels_every_alert_sets_itself_are_reserved(tmp_path):
    """A rule label ``alertname`` made every alert of the rule fail to build (lost), a
    ``severity`` one gave alerts a severity outside critical|warning|info; both passed
    ``rules check``."""
    errs = errors_of(tmp_path, rule("""\
        metric: loss
        detector: nonfinite
        severity: critical
        actions: [alert]
        labels: {alertname: NanLoss, severity: page, rule: other, team: ml}
    """))
    assert errs == [
        "7: key 'rules[0].labels.alertname': reserved: every alert sets 'alertname' itself "
        "(from the rule's name); rename the label",
        "7: key 'rules[0].labels.severity': reserved: every alert sets 'severity' itself "
        "(from the rule's severity); rename the label",
        "7: key 'rules[0].labels.rule': reserved: every alert sets 'rule' itself "
        "(from the rule's name); rename the label"]


def test_an_alias_bomb_is_refused_and_long_values_are_shortened(tmp_path):
    """385 bytes of nested aliases (9**8 strings) made ``rules check`` take 1 GB and print
    226 MB: the expansion is bounded and named by line, values in messages are cut short,
    and aliases a file really uses (a merge key) still work."""
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for prev, name in zip("abcdefg", "bcdefgh"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb = tmp_path / "bomb.yml"
    bomb.write_text("\n".join(lines) + "\nrules:\n  - {name: q, metric: loss, detector: "
                    "threshold, params: {above: *h}, severity: warning}\n")
    res = CliRunner().invoke(cli, ["rules", "check", str(bomb)])
    assert res.exit_code == 1 and len(res.output) < 500, res.output[:500]
    assert (f"{bomb}:6: invalid YAML: aliases expand the file past 100000 values; "
            "write it out or use fewer") in res.output
    errs = errors_of(tmp_path, "a: &a [1, *a]\nrules: []\n")
    assert errs == ["1: invalid YAML: an alias refers to a node that holds it"]
    many = "[" + ", ".join(["1"] * 5000) + "]"
    errs = errors_of(tmp_path, rule(f"""\
        metric: loss
        detector: threshold
        params: {{above: {many}}}
        severity: {"x" * 5000}
    """))
    assert len(errs) == 2 and all(len(e) < 300 for e in errs), errs
    assert errs[0].startswith("5: key 'rules[0].params.above': parameter 'above' must be a "
                              "number or null, got [1, 1, 1, 1, 1, 1, 1, 1, ...]")
    shared = parse_rules("rules:\n"
                         "  - {name: a, metric: loss, detector: threshold, params: &p {above: 5}, "
                         "severity: info}\n"
                         "  - {name: b, metric: x, detector: threshold, params: *p, "
                         "severity: info}\n")
    assert [dict(r.params) for r in shared] == [{"above": 5}, {"above": 5}]


def test_structure_errors(tmp_path):
    assert errors_of(tmp_path, "") == [
        "1: key 'rules': the file is empty; expected a mapping with a 'rules' list"]
    assert errors_of(tmp_path, "- a\n- b\n") == [
        "1: key '<top>': expected a mapping with a 'rules' list"]
    assert errors_of(tmp_path, "rules: {a: 1}\n") == ["1: key 'rules': expected a list of rules"]
    assert errors_of(tmp_path, "version: 2\nrules: []\n") == [
        "1: key 'version': unsupported version 2 (valid choices: 1)",
        "2: key 'rules': the list is empty: a rule file holds at least one rule, or an entry "
        "{name: X, enabled: false} that turns off a rule of an earlier rule set"]
    errs = errors_of(tmp_path, "rules:\n  - just a string\n")
    assert errs[0].startswith("2: key 'rules[0]': each rule must be a mapping")


def test_duplicate_key_and_unsafe_tag(tmp_path):
    errs = errors_of(tmp_path, rule("""\
        metric: loss
        metric: grad_norm
        detector: nonfinite
        severity: info
    """))
    assert errs == ["4: key 'rules[0].metric': duplicate key"]
    errs = errors_of(tmp_path, rule("""\
        metric: !!python/object:os.system loss
        detector: nonfinite
        severity: info
    """))
    assert len(errs) == 1 and errs[0].startswith("3: invalid YAML")


def test_all_errors_are_collected(tmp_path):
    errs = errors_of(tmp_path, """\
        rules:
          - name: a
            metric: loss
            detector: spike
            params: {window: 1}
            severity: urgent
          - name: b
            detector: nope
            severity: info
    """)
    keys = [e.split("key ", 1)[1].split(":", 1)[0] for e in errs]
    assert keys == ["'rules[0].params.window'", "'rules[0].severity'", "'rules[1].metric'",
                    "'rules[1].detector'"]


def test_unreadable_file(tmp_path):
    with pytest.raises(RuleError, match=r"missing\.yml:1: key 'rules': cannot read the file"):
        load_rules(tmp_path / "missing.yml")


def test_disabled_rules_are_dropped():
    rs = parse_rules(rule("metric: loss\ndetector: nonfinite\nseverity: info\nenabled: false\n"))
    assert len(rs) == 0


@pytest.mark.parametrize("name", PACKS)
def test_packs_validate(name):
    rs = load_pack(name)
    assert len(rs) >= (1 if name == "plateau_cut" else 5)
    assert all(r.annotations.get("summary") and r.annotations.get("description") for r in rs)


def test_training_pack_has_the_required_rules():
    rs = load_pack("training")
    want = {"nonfinite": ("critical", "rollback"), "loss_blowup": ("critical", "rollback"),
            "loss_collapse": ("critical", "rollback"), "vanishing_gradient": ("critical",
                                                                              "rollback"),
            "grad_explosion": ("info", None), "lr_anomaly": ("warning", None),
            "eval_loss_regression": ("info", None),
            "eval_accuracy_regression": ("info", None), "loss_plateau": ("info", None),
            "loss_plateau_rate_cut": ("info", "reduce_lr"),
            "eval_accuracy_drop": ("critical", "stop"), "eval_loss_drop": ("critical", "stop"),
            "dead_network": ("critical", "rollback"), "lr_jump_divergence": ("critical",
                                                                            "rollback")}
    for name, (sev, action) in want.items():
        assert rs[name].severity == sev
        if action:
            assert action in rs[name].actions


def test_unknown_pack():
    with pytest.raises(Exception, match="valid choices: training, serving, plateau_cut"):
        load_pack("nope")


# --------------------------------------------------------------------------------------- CLI

def test_rules_check_cli(tmp_path):
    good = tmp_path / "good.yml"
    good.write_text(GOOD)
    bad = tmp_path / "bad.yml"
    bad.write_text(rule("metric: loss\ndetector: spike\nseverity: urgent\n"))
    res = CliRunner().invoke(cli, ["rules", "check", str(good), str(bad)])
    assert res.exit_code == 1
    assert f"{good}: ok (1 rule)" in res.stdout
    assert (f"{bad}:5: key 'rules[0].severity': 'urgent' is not a severity "
            "(valid choices: critical, warning, info)") in res.stderr
    assert "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["rules", "check", str(good)])
    assert res.exit_code == 0
    # action parameters are checked too (they used to wait until a Watcher was built)
    params = tmp_path / "params.yml"
    params.write_text(rule("metric: loss\ndetector: nonfinite\nseverity: info\n"
                           "actions: [{reduce_lr: {factor: 2}}]\n"))
    res = CliRunner().invoke(cli, ["rules", "check", str(params)])
    assert res.exit_code == 1 and "reduce_lr: factor: must be a number > 0 and < 1, got 2" in res.stderr
    # parameters on an action that takes none were ignored without a word; 5e-1 was refused
    params.write_text(rule("metric: loss\ndetector: nonfinite\nseverity: critical\n"
                           "actions: [{rollback: {lr_factor: 0.1}}]\n"))
    exp = tmp_path / "exp.yml"
    exp.write_text(rule("metric: loss\ndetector: nonfinite\nseverity: info\n"
                        "actions: [{reduce_lr: {factor: 5e-1}}]\n"))
    res = CliRunner().invoke(cli, ["rules", "check", str(params), str(exp)])
    assert res.exit_code == 1 and f"{exp}: ok (1 rule)" in res.stdout
    # (at the action's line, naming its key since the twelfth round's audit, docs/rules.md)
    assert (f"{params}:6: key 'rules[0].actions[0]': rollback: takes no parameters, got "
            f"'lr_factor'" in res.stderr)


def test_rules_show_and_detectors_cli():
    res = CliRunner().invoke(cli, ["rules", "show", "training"])
    assert res.exit_code == 0 and res.stdout == pack_text("training")
    assert parse_rules(res.stdout).names == load_pack("training").names
    res = CliRunner().invoke(cli, ["rules", "detectors"])
    assert res.exit_code == 0 and "regression:" in res.stdout and "confidence:" in res.stdout


@pytest.mark.parametrize("text, want", [("1e-5", 1e-5), ("1.0e5", 1e5), ("-2E+3", -2e3),
                                        (".5e-3", 5e-4)])
def test_exponent_numbers_yaml_reads_as_text_are_numbers(text, want):
    # PyYAML (YAML 1.1) reads 1e-5 and 1.0e5 as strings; a float parameter takes them
    rs = parse_rules(f"version: 1\nrules:\n  - {{name: r, metric: loss, detector: threshold, "
                     f"severity: info, params: {{above: {text}}}}}\n", source="t.yml")
    assert rs.rules[0].params["above"] == pytest.approx(want)


def test_text_that_is_not_a_number_still_fails_clearly():
    with pytest.raises(RuleError, match=r"parameter 'above' must be a number.*got '1e'"):
        parse_rules("version: 1\nrules:\n  - {name: r, metric: loss, detector: threshold, "
                    "severity: info, params: {above: 1e}}\n", source="t.yml")
    # an integer parameter does not take exponent text
    with pytest.raises(RuleError, match=r"parameter 'window' must be an integer"):
        parse_rules("version: 1\nrules:\n  - {name: r, metric: loss, detector: spike, "
                    "severity: info, params: {window: 1e2}}\n", source="t.yml")
