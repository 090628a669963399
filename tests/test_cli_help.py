"""Every ``lrwatch`` subcommand's ``--help`` says what it does, its defaults and an example.

The fourteenth round's audit of the user-facing docs read every ``--help``: no subcommand gave
an example, `lrwatch rules detectors` listed the parameters without their defaults, and
several options of `lrwatch daemon`, `replay` and `demo` said nothing of what happens when
they are not given (`--window-size`, `--live-reference`, `--fail-on`, ...).
"""

from __future__ import annotations

import inspect
import re
import shlex

import click
import pytest
from click.testing import CliRunner

from lrwatch.cli import cli
from lrwatch.rules.detectors import DETECTORS


def _leaves(cmd: click.Command, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    if isinstance(cmd, click.Group):
        return [leaf for name, sub in sorted(cmd.commands.items())
                for leaf in _leaves(sub, path + (name,))]
    return [(path, cmd)]


LEAVES = _leaves(cli)
#: click 8.2+ gives an option declared without a default this marker (older clicks: None).
_UNSET = getattr(getattr(click, "_utils", None), "UNSET", None)


def _help(path: tuple[str, ...]) -> str:
    res = CliRunner().invoke(cli, [*path, "--help"], terminal_width=100)
    assert res.exit_code == 0, res.output
    return res.output


def test_every_subcommand_is_covered() -> None:
    names = {" ".join(p) for p, _ in LEAVES}
    assert {"demo", "replay", "report", "lr-find", "rules check", "rules show",
            "rules detectors", "daemon", "baseline build", "baseline recalibrate", "stack",
            "dashboards generate"} <= names


@pytest.mark.parametrize("path, cmd", LEAVES, ids=[" ".join(p) for p, _ in LEAVES])
def test_help_ends_with_examples_that_use_real_options(path: tuple[str, ...],
                                                        cmd: click.Command) -> None:
    text = _help(path)
    assert "Examples:" in text, f"lrwatch {' '.join(path)} --help gives no example"
    lines = [ln.strip() for ln in text.split("Examples:", 1)[1].splitlines() if ln.strip()]
    prefix = "lrwatch " + " ".join(path)
    assert lines and all(ln.startswith(prefix) for ln in lines), lines
    known = {o for p in cmd.params for o in (*p.opts, *getattr(p, "secondary_opts", ()))}
    for line in lines:
        args = shlex.split(line.split(" #", 1)[0].split(">", 1)[0])[1 + len(path):]
        for a in args:
            if a.startswith("-"):
                assert a.split("=", 1)[0] in known, f"example {line!r}: no option {a}"


@pytest.mark.parametrize("path, cmd", LEAVES, ids=[" ".join(p) for p, _ in LEAVES])
def test_every_option_says_its_default(path: tuple[str, ...], cmd: click.Command) -> None:
    """An option that takes a value says what happens without it (a file the user names, a
    repeatable option and a flag need not)."""
    for p in cmd.params:
        if not isinstance(p, click.Option) or p.is_flag or p.multiple or p.name == "help":
            continue
        no_default = p.get_default(click.Context(cmd)) in (None, _UNSET)
        if p.required or (isinstance(p.type, (click.Path, click.File)) and no_default):
            continue
        said = p.show_default or "default" in (p.help or "").lower()
        assert said, f"lrwatch {' '.join(path)} {p.opts[-1]}: its help does not say the default"


def test_rules_detectors_shows_every_parameters_default() -> None:
    text = _help(("rules", "detectors"))
    assert "defaults" in text.split("Options:")[0]
    out = CliRunner().invoke(cli, ["rules", "detectors"]).output
    shown = {}
    detector = ""
    for line in out.splitlines():
        m = re.match(r"^(\w+): ", line)
        if m:
            detector = m.group(1)
        m = re.match(r"^    (\w+): .* \[default: (\S+)\]$", line)
        if m:
            shown[detector, m.group(1)] = m.group(2)
    for name, det in DETECTORS.items():
        sig = inspect.signature(det.__init__).parameters
        for pname in det.PARAMS:
            default = sig[pname].default
            want = ("null" if default is None else str(default).lower()
                    if isinstance(default, bool) else str(default))
            assert shown.get((name, pname)) == want, (name, pname, shown.get((name, pname)))
    assert shown["spike", "window"] == "50" and shown["stall", "log"] == "true"
