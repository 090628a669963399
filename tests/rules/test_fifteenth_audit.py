"""Defects found by the fifteenth round's audit of the rules language and its tools
(6 December; docs/rules.md, "Defects found by the fifteenth round's audit"). Each test failed
on the code before its fix."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest

from lrwatch.errors import ConfigError, RuleError
from lrwatch.rules import Engine
from lrwatch.rules.replay import replay_trace
from lrwatch.rules.schema import parse_rules
from lrwatch.samples import Sample

# --- 1. annotation templates reached module globals and the environment --------------------

_LEAK = ("{labels.__class__.__missing__.__globals__[__loader__].__class__.__init__"
         ".__globals__[_os].environ}")


def _rule_file(summary: str) -> str:
    return textwrap.dedent(f"""\
        rules:
          - name: a
            metric: loss
            detector: threshold
            params: {{above: 1}}
            severity: info
            labels: {{team: ml}}
            annotations:
              summary: "{summary}"
        """)


def test_a_template_may_not_follow_attributes_to_the_environment(monkeypatch) -> None:
    """str.format follows attributes and indexes: a summary walked from the rendering
    context's labels to os.environ, 'rules check' said ok, and every firing carried the
    process environment (tokens included) to the trace, Alertmanager and the log."""
    monkeypatch.setenv("LRWATCH_AUDIT_SECRET", "hunter2")
    with pytest.raises(RuleError) as info:
        parse_rules(_rule_file(_LEAK), "f.yml")
    assert info.value.errors == [
        f"f.yml:9: key 'rules[0].annotations.summary': '{_LEAK}': a field is a plain name or "
        "labels[NAME], without attributes or other indexes"]
    # a Rule built in Python skips the file's checks: rendering refuses the field too
    rule = next(iter(parse_rules(_rule_file("{rule} {labels[team]}{labels[x]} {value:.1f}"))))
    ok = Engine([rule]).update(Sample(step=1, values={"loss": 5.0}))
    assert ok[0].message == "a ml 5.0"
    hostile = dataclasses.replace(rule, annotations={"summary": _LEAK})
    events = Engine([hostile]).update(Sample(step=1, values={"loss": 5.0}))
    assert "hunter2" not in events[0].message and events[0].message == _LEAK


# --- 2. a trace line nested too deeply ended the trace, --lenient or not -------------------

def test_a_line_nested_too_deeply_is_one_malformed_line(tmp_path) -> None:
    """json's recursion limit raised RecursionError out of the trace reader: replay ended the
    trace at once, with --lenient too (the lines after it never read), blamed the rules ('the
    rules failed on this line') and named the line before it."""
    deep = "[" * 100_000 + "]" * 100_000
    path = tmp_path / "t.jsonl"
    path.write_text(f'{{"step": 1, "loss": 1.0}}\n{{"step": 2, "loss": {deep}}}\n'
                    f'{{"step": 3, "loss": 1.0}}\n{{"step": 4, "loss": 1{"0" * 5000}}}\n'
                    '{"step": 5, "loss": "nan"}\n')
    rules = parse_rules("rules:\n  - {name: n, metric: loss, detector: nonfinite, "
                        "severity: critical}\n")
    strict = replay_trace(path, rules)
    assert strict.error == (f"{path}:2: a value nested too deeply to read (a corrupt line)")
    lenient = replay_trace(path, rules, strict=False)
    assert lenient.error is None
    assert (lenient.samples, lenient.skipped) == (3, 2)
    assert [(e.rule, e.step) for e in lenient.firings] == [("n", 5)]
    assert lenient.bad_lines[1] == (f"{path}:4: an integer of more than 4300 digits (a corrupt "
                                    "line: trace values are floats, steps integers)")


# --- 3. a state saved under other rules: the difference named, nothing half-loaded ---------

def test_resuming_with_a_rule_turned_off_names_it_and_loads_nothing(tmp_path) -> None:
    """A checkpoint of a run watched with the training pack, resumed with a file that turns
    'stalled' off: the error listed both sets of rule names whole (2.6 kB, 62 names each, the
    difference left to the reader), and came after the Watcher had taken the checkpoint's
    step and policy (a caller that went on ran a half-resumed Watcher)."""
    import torch
    from torch import nn

    import lrwatch

    off = tmp_path / "off.yml"
    off.write_text("rules:\n  - {name: stalled, enabled: false}\n")
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    w = lrwatch.Watcher(model, opt)
    for _ in range(12):
        opt.zero_grad()
        loss = model(torch.randn(4, 3)).pow(2).mean()
        loss.backward()
        opt.step()
        w.log(loss=loss)
    state = w.state_dict()
    w.close()
    w2 = lrwatch.Watcher(model, opt, rules=["training", str(off)])
    try:
        with pytest.raises(ConfigError) as info:
            w2.load_state_dict(state)
        assert str(info.value) == (
            "the engine state was saved under other rules: it holds rules these rules lack "
            "(turned off, renamed or removed since): stalled. Load it with the rules it was "
            "saved with (the same packs and files, in the same order)")
        assert w2.step == 0 and w2.policy.state.resumed_at is None
    finally:
        w2.close()


def test_a_state_that_does_not_load_leaves_the_engine_as_it_was() -> None:
    """A rule replaced by one with another detector on the same metric: the rules before it
    took the saved state, the error ('state is for detector ...') named no rule, and the
    engine was left half-loaded."""
    saved_rules = parse_rules("rules:\n"
                              "  - {name: a, metric: x, detector: threshold, params: {above: 1},"
                              " for: 3, severity: info}\n"
                              "  - {name: b, metric: x, detector: spike, severity: info}\n")
    now_rules = parse_rules("rules:\n"
                            "  - {name: a, metric: x, detector: threshold, params: {above: 1},"
                            " for: 3, severity: info}\n"
                            "  - {name: b, metric: x, detector: nonfinite, severity: info}\n")
    old = Engine(saved_rules)
    for step in (1, 2):
        old.update(Sample(step=step, values={"x": 5.0}))
    eng = Engine(now_rules)
    eng.update(Sample(step=1, values={"x": 0.0}))
    before = eng.state_dict()
    with pytest.raises(ConfigError) as info:
        eng.load_state_dict(old.state_dict())
    assert str(info.value) == ("rule 'b', metric 'x': state is for detector 'spike', not "
                               "'nonfinite' (the rule was changed since the state was saved)")
    assert eng.state_dict() == before and eng.open_onsets() == {}


# --- 4. a rule file that is not UTF-8, a pack's name misspelt ------------------------------

def test_a_file_not_utf8_names_its_line_and_a_misspelt_pack_its_name(tmp_path) -> None:
    """A Latin-1 file (an accent in a summary) was refused at line 1 as "key 'rules': cannot
    read the file: 'utf-8' codec can't decode byte 0xe9 in position 118", whatever its line,
    and did not say what to do; '--rules trainig' said only that no such file exists."""
    from click.testing import CliRunner

    from lrwatch.cli import cli
    from lrwatch.rules.schema import load_rules

    path = tmp_path / "latin.yml"
    path.write_bytes("rules:\n  - {name: a, metric: loss, detector: nonfinite, severity: info,\n"
                     "     annotations: {summary: \"perte non définie\"}}\n".encode("latin-1"))
    with pytest.raises(RuleError) as info:
        load_rules(path)
    assert info.value.errors == [f"{path}:3: the file is not UTF-8 text (byte 0xe9 at column "
                                 "41): save it as UTF-8"]
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"step": 1, "loss": 1.0}\n')
    res = CliRunner().invoke(cli, ["replay", str(trace), "--rules", "trainig"])
    assert res.exit_code == 2
    assert ("trainig:1: key 'rules': cannot read the file: No such file or directory; did you "
            "mean the pack 'training'? (valid choices for a pack: training, serving, "
            "plateau_cut)") in res.output


# --- 5. an escalation's onset when the rules that hold change during its 'for:' window -----

def test_an_any_escalation_keeps_the_onset_of_the_rule_that_began_its_window() -> None:
    """'any: [a, b]' with 'for: 3': a (for: 2, its condition from step 1) fires at 2 and
    resolves at 3 as b fires; the escalation fires at 4 on b alone. Its onset was 2 (its own
    window's first step), not 1 where a's failure began: the onset counted only the
    firings that held when it fired, though the docs promise the earliest onset of those it
    combines, and a checkpoint inside the window (Engine.open_onsets) said 2 too."""
    rules = parse_rules("rules:\n"
                        "  - {name: a, metric: x, detector: threshold, params: {above: 1}, "
                        "for: 2, severity: info}\n"
                        "  - {name: b, metric: y, detector: threshold, params: {above: 1}, "
                        "severity: info}\n"
                        "  - {name: w, when: {any: [a, b]}, for: 3, severity: critical, "
                        "actions: [rollback]}\n")
    eng = Engine(rules)
    fired = {}
    opened = []
    for step, (x, y) in enumerate([(5, 0), (5, 0), (0, 5), (0, 5)], 1):
        for e in eng.update(Sample(step=step, values={"x": float(x), "y": float(y)})):
            if e.kind == "firing":
                fired[e.rule] = (e.step, e.onset)
        opened.append(eng.open_onsets().get("w"))
    assert fired == {"a": (2, 1), "b": (3, 3), "w": (4, 1)}
    assert opened == [None, 1, 1, None]


# --- 6. an annotation name Alertmanager refuses lost the alerts sent with it ---------------

def test_an_annotation_name_alertmanager_refuses_is_an_error_and_loses_no_other_alert(
        alertmanager) -> None:
    """'runbook-url' passed 'rules check', and Alertmanager refuses an alert with such an
    annotation (HTTP 400, not retried): every alert of the rule was lost, and the batch it
    came in counted as a failed delivery. The file is refused now, and an alert built with
    such a name (a Rule made in Python) is refused by name before it is sent."""
    from lrwatch.actions.alerts import Alert, AlertmanagerSink, AlertSender
    from lrwatch.actions.notify import Notifier

    text = textwrap.dedent("""\
        rules:
          - {name: nan_loss, metric: loss, detector: nonfinite, severity: critical}
          - name: loss_high
            metric: loss
            detector: threshold
            params: {above: 1}
            severity: warning
            annotations: {runbook-url: "https://example.org/runbook"}
        """)
    with pytest.raises(RuleError) as info:
        parse_rules(text, "f.yml")
    assert info.value.errors == [
        "f.yml:8: key 'rules[1].annotations.runbook-url': not a valid annotation name: "
        "letters, digits and underscores, not starting with a digit (Alertmanager refuses "
        "others)"]
    # a Rule built in Python skips the file's checks: its alert alone is refused
    good, bad = parse_rules(text.replace("runbook-url", "runbook_url"))
    bad = dataclasses.replace(bad, annotations={"runbook-url": "https://example.org/runbook"})
    eng = Engine([good, bad])
    events = eng.update(Sample(step=1, values={"loss": float("inf")}))
    assert [e.rule for e in events] == ["nan_loss", "loss_high"]
    with pytest.raises(ConfigError, match="alert annotation name 'runbook-url' is invalid"):
        Alert.from_firing(events[1])
    errors: list[int] = []
    with AlertSender([AlertmanagerSink(alertmanager.url)], backoff=(0.01, 0.05),
                     on_error=lambda: errors.append(1)) as sender:
        notifier = Notifier(sender, on_error=lambda: errors.append(1))
        for e in events:
            notifier.fire(e)
        assert sender.flush(10)
    assert [a["labels"]["rule"] for a in alertmanager.alerts()] == ["nan_loss"]
    assert errors == [1]


# --- 7. 'for: true' was reported as 'got None' ----------------------------------------------

def test_a_boolean_for_or_hysteresis_is_echoed_as_written() -> None:
    """The message said 'got None' for 'for: true' (the value was dropped before the
    message): the file says true, and nothing in it is None."""
    with pytest.raises(RuleError) as info:
        parse_rules("rules:\n  - {name: a, metric: x, detector: nonfinite, severity: info, "
                    "for: true, hysteresis: false}\n", "f.yml")
    assert info.value.errors == [
        f"f.yml:2: key 'rules[0].{key}': expected a number of samples or a duration such as "
        f"'30s', '5m', '1h', got {value}" for key, value in (("for", True),
                                                             ("hysteresis", False))]


# --- the lead's follow-up: a rule set given twice ------------------------------------------


def test_a_rule_set_given_twice_is_one_error_naming_it(tmp_path) -> None:
    """'--rules training --rules training' printed 62 duplicate-name errors, one per rule of
    the pack, and never said that the pack was given twice; the same file under two spellings
    of its path did the same."""
    from click.testing import CliRunner

    from lrwatch.cli import cli
    from lrwatch.rules.layering import join

    trace = tmp_path / "t.jsonl"
    trace.write_text('{"step": 1, "loss": 1.0}\n')
    res = CliRunner().invoke(cli, ["replay", str(trace), "--rules", "training",
                                   "--rules", "training"])
    assert res.exit_code == 2
    assert "rule set 'training' is given twice (rule sets 1 and 2)" in res.output
    assert "duplicate rule names" not in res.output
    mine = tmp_path / "mine.yml"
    mine.write_text("rules:\n  - {name: a, metric: loss, detector: nonfinite, severity: info}\n")
    with pytest.raises(ConfigError, match="is given twice .rule sets 2 and 3."):
        join(["training", str(mine), str(tmp_path / "." / "mine.yml")])
    assert join(["training", str(mine)]).names[-1] == "a"
