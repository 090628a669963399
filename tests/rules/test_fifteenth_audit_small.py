"""The small defects the fifteenth round's audit found in the rules language and its tools and
first left (docs/rules.md, "Defects found by the fifteenth round's audit"). Each test failed
on the code before its fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from lrwatch.cli import cli
from lrwatch.errors import RuleError
from lrwatch.rules.schema import parse_rules

_RULE = "  - {name: a, metric: loss, detector: nonfinite, severity: info}\n"


def _file(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _errors(text: str) -> list[str]:
    with pytest.raises(RuleError) as info:
        parse_rules(text, "f.yml")
    return info.value.errors


# --- 'rules check' wrote its errors to stdout and its summary to stderr ------------------------

def test_rules_check_writes_its_errors_and_summary_to_stderr(tmp_path: Path) -> None:
    """The error lines went to stdout, the count of bad files to stderr: `rules check f.yml
    2>/dev/null` showed the errors without the count, `> out.txt` split them apart. Errors go
    to stderr with the count (as replay's do); a good file's 'ok' line stays on stdout."""
    good = _file(tmp_path, "good.yml", "rules:\n" + _RULE)
    bad = _file(tmp_path, "bad.yml", "rules:\n  - {name: b, metric: loss, detector: nonfinite, "
                                     "severity: urgent}\n")
    res = CliRunner().invoke(cli, ["rules", "check", str(good), str(bad)])
    assert res.exit_code == 1
    assert res.stdout == f"{good}: ok (1 rule)\n"
    assert res.stderr == (f"{bad}:2: key 'rules[0].severity': 'urgent' is not a severity "
                          f"(valid choices: critical, warning, info)\n"
                          f"1 of 2 file(s) have errors\n")


# --- 'rules: []' was "ok (0 rules)" -------------------------------------------------------------

def test_an_empty_rule_list_is_an_error_and_a_file_that_only_turns_rules_off_is_not(
        tmp_path: Path) -> None:
    """`rules: []` passed `rules check` as "ok (0 rules)" and replay replayed nothing, exit 0
    (a file emptied by mistake, or a list written under another key, checked nothing). A file
    of only `{name: X, enabled: false}` entries, joined after a pack, stays valid, and so does
    a file whose own rules are all turned off."""
    empty = _file(tmp_path, "empty.yml", "version: 1\nrules: []\n")
    msg = (f"{empty}:2: key 'rules': the list is empty: a rule file holds at least one rule, "
           f"or an entry {{name: X, enabled: false}} that turns off a rule of an earlier rule set")
    for extra in ([], ["--with", "training"]):
        res = CliRunner().invoke(cli, ["rules", "check", str(empty), *extra])
        assert res.exit_code == 1, res.output
        assert res.stderr.splitlines()[0] == msg
    trace = _file(tmp_path, "t.jsonl", '{"step": 1, "loss": 1.0}\n')
    res = CliRunner().invoke(cli, ["replay", str(trace), "--rules", str(empty)])
    assert res.exit_code == 2 and msg in res.stderr
    off = _file(tmp_path, "off.yml", "rules:\n  - {name: stalled, enabled: false}\n")
    res = CliRunner().invoke(cli, ["rules", "check", str(off), "--with", "training"])
    assert res.exit_code == 0, res.output
    assert "0 replacing and 1 turning off a rule of training" in res.stdout
    own_off = _file(tmp_path, "own_off.yml", "rules:\n" + _RULE.replace("}", ", enabled: false}"))
    res = CliRunner().invoke(cli, ["rules", "check", str(own_off)])
    assert res.exit_code == 0 and res.stdout == f"{own_off}: ok (0 rules)\n"


# --- 'actions: rollback' (a string, not a list) was accepted without being documented ----------

def test_a_list_key_given_one_name_says_how_to_write_the_list() -> None:
    """`actions: rollback` and `metrics: loss` were taken as one-item lists, undocumented,
    where the lists of `when` (`any`, `all`, `unless`) refuse a name alone: one spelling for
    every list key, and the message shows it."""
    text = ("rules:\n  - {name: a, metric: loss, detector: nonfinite, severity: info, "
            "actions: rollback}\n"
            "  - {name: b, metrics: loss, detector: nonfinite, severity: info}\n"
            "  - {name: c, when: {any: a}, severity: info}\n")
    assert _errors(text) == [
        "f.yml:2: key 'rules[0].actions': expected a list of actions: write actions: "
        "[rollback] (valid choices: rollback, reduce_lr, skip, stop, alert, hook)",
        "f.yml:3: key 'rules[1].metrics': expected a list of metric names: write "
        "metric: loss or metrics: [loss]",
        "f.yml:4: key 'rules[2].when.any': expected a list of at least 1 rule name, got 'a'"]
    ok = parse_rules("rules:\n  - {name: a, metrics: [loss], detector: nonfinite, "
                     "severity: info, actions: [rollback]}\n"
                     "  - {name: b, metric: loss, detector: nonfinite, severity: info, "
                     "actions: null}\n")
    assert [r.actions for r in ok] == [("rollback",), ()]


# --- 'annotations: {value: ...}' replaced lrwatch's own 'value' annotation ---------------------

def test_an_annotation_lrwatch_sets_itself_is_reserved() -> None:
    """`annotations: {value: "see runbook"}` passed `rules check`, and every alert of the rule
    carried that text as its `value`, where lrwatch puts the firing's value (Alertmanager's
    templates, the log line `(value=...)`); `step` and `metric` likewise. They are refused,
    in a file (with the key) and in a Rule built in Python."""
    from lrwatch.actions.alerts import Alert
    from lrwatch.errors import ConfigError
    from lrwatch.rules import Engine
    from lrwatch.rules.schema import Rule
    from lrwatch.samples import Sample

    text = ("rules:\n  - name: a\n    metric: loss\n    detector: threshold\n"
            "    params: {above: 1}\n    severity: info\n    annotations:\n"
            "      value: see runbook\n      step: '{step}'\n      metric: m\n"
            "      runbook_url: http://x/{metric}\n")
    assert _errors(text) == [
        f"f.yml:{line}: key 'rules[0].annotations.{key}': reserved: every alert sets the "
        f"annotation {key!r} itself ({what}, which a template writes as {{{key}}}); rename "
        f"the annotation"
        for line, key, what in ((8, "value", "the firing's value"),
                                (9, "step", "the firing's step"),
                                (10, "metric", "the metric that fired"))]
    with pytest.raises(ConfigError, match="rule 'a': annotation 'value': reserved"):
        Rule("a", ("loss",), "nonfinite", annotations={"value": "see runbook"})
    # the names a rule may use still reach the alert beside lrwatch's own
    rs = parse_rules(text.replace("      value: see runbook\n      step: '{step}'\n"
                                  "      metric: m\n", ""))
    firing = Engine(rs).update(Sample(step=7, values={"loss": 5.0}))[0]
    ann = Alert.from_firing(firing).annotations
    assert (ann["value"], ann["step"], ann["metric"]) == ("5", "7", "loss")
    assert ann["runbook_url"] == "http://x/loss"


# --- a trace line with a key twice kept the last value without a word --------------------------

def test_a_trace_line_with_a_key_twice_is_one_malformed_line(tmp_path: Path) -> None:
    """`{"step": 2, "loss": 1.0, "loss": "nan"}` was read as a NaN loss (json keeps the last
    value), and the rule on NaN fired on a line another JSON reader takes as finite. The trace
    is lrwatch's own format, which writes each key once: the line is malformed, named with the
    key, and with --lenient skipped and counted like any malformed line, the others kept."""
    rules = _file(tmp_path, "r.yml", "rules:\n" + _RULE)
    trace = _file(tmp_path, "t.jsonl", '{"step": 1, "loss": 1.0}\n'
                                       '{"step": 2, "loss": 1.0, "loss": "nan"}\n'
                                       '{"step": 3, "loss": 1.0}\n')
    msg = (f"{trace}:2: key 'loss' is given twice on the line (a trace line holds each key "
           f"once: which value is meant is not known)")
    res = CliRunner().invoke(cli, ["replay", str(trace), "--rules", str(rules)])
    assert res.exit_code == 2 and msg in res.stderr, res.output
    res = CliRunner().invoke(cli, ["replay", str(trace), "--rules", str(rules), "--lenient"])
    assert res.exit_code == 0, res.output
    assert f"warning: {trace}: skipped 1 malformed line(s); first: {msg}" in res.stderr
    assert res.stdout.splitlines()[-2:] == [
        "no rule fired", "1 trace(s), 2 samples, 0 firing(s) (critical: 0, warning: 0, "
        "info: 0), 1 malformed line(s) skipped"]
    res = CliRunner().invoke(cli, ["report", str(trace)])
    assert res.exit_code != 0 and msg in res.output


# --- a window (or 'for:') of 10**12 was accepted -------------------------------------------------

def test_a_window_past_what_a_detector_may_keep_and_a_span_past_any_run_are_errors() -> None:
    """`params: {window: 1000000000000}` passed `rules check`: the spike detector then kept
    every value of the run (its memory and the state every checkpoint holds grew with it);
    `for: 1000000000000` made a rule that never fires, without a word. A parameter that sizes
    what a detector keeps is at most MAX_KEPT values, any other count (and for, hysteresis,
    cooldown) at most MAX_COUNT, each with its reason; the bounds themselves are accepted."""
    from lrwatch.errors import ConfigError
    from lrwatch.rules import Engine
    from lrwatch.rules.detectors import DETECTORS
    from lrwatch.rules.detectors.base import MAX_COUNT, MAX_KEPT
    from lrwatch.samples import Sample

    big = 10 ** 12
    text = ("rules:\n"
            f"  - {{name: a, metric: loss, detector: spike, params: {{window: {big}}}, "
            f"severity: info}}\n"
            f"  - {{name: b, metric: loss, detector: plateau, params: {{patience: {big}}}, "
            f"severity: info}}\n"
            f"  - {{name: c, metric: loss, detector: nonfinite, severity: info, for: {big}, "
            f"hysteresis: {big}, cooldown: {big}}}\n"
            f"  - {{name: d, metric: loss, detector: nonfinite, severity: info, "
            f"for: 100000000000s}}\n")
    assert _errors(text) == [
        f"f.yml:2: key 'rules[0].params.window': parameter 'window' must be an integer >= 3 "
        f"and <= {MAX_KEPT}, got {big}: the detector keeps this many values, in memory and in "
        f"the state every checkpoint holds",
        f"f.yml:3: key 'rules[1].params.patience': parameter 'patience' must be an integer "
        f">= 1 and <= {MAX_COUNT}, got {big}: more values than a run has (it would never "
        f"decide)",
        f"f.yml:4: key 'rules[2].for': must be at most {MAX_COUNT} samples, got {big}: more "
        f"than a run has; the rule would never fire (to turn it off write enabled: false)",
        f"f.yml:4: key 'rules[2].cooldown': must be at most {MAX_COUNT} samples, got {big}: "
        f"more than a run has; a cooldown of {MAX_COUNT} already lasts the whole run",
        f"f.yml:4: key 'rules[2].hysteresis': must be at most {MAX_COUNT} samples, got {big}: "
        f"more than a run has; the rule would never resolve",
        f"f.yml:5: key 'rules[3].for': must be at most {MAX_COUNT}s (about 31 years), got "
        f"'100000000000s': longer than a run; the rule would never fire (to turn it off "
        f"write enabled: false)"]
    with pytest.raises(ConfigError, match="keeps this many values"):
        DETECTORS["trend"](window=MAX_KEPT + 1)   # a detector built in Python too
    rs = parse_rules("rules:\n"
                     f"  - {{name: a, metric: loss, detector: spike, params: {{window: "
                     f"{MAX_KEPT}}}, severity: info}}\n"
                     f"  - {{name: c, metric: loss, detector: nonfinite, severity: info, "
                     f"for: {MAX_COUNT}, cooldown: {MAX_COUNT}}}\n")
    Engine(rs).update(Sample(step=1, values={"loss": 1.0}))
