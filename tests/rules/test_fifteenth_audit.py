"""Defects found by the fifteenth round's audit of the rules language and its tools
(6 December; docs/rules.md, "Defects found by the fifteenth round's audit"). Each test failed
on the code before its fix."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest

from lrwatch.errors import RuleError
from lrwatch.rules import Engine
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
