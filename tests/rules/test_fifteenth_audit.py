"""Defects found by the fifteenth round's audit of the rules language and its tools
(6 December; docs/rules.md, "Defects found by the fifteenth round's audit"). Each test failed
on the code before its fix."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest

from lrwatch.errors import RuleError
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
