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
