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
from pathlib import Path

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


def _readme_synopsis() -> dict[str, str]:
    """README's "Command line" synopsis: each leaf command -> the text of its entry (an entry
    starts at a line `lrwatch COMMAND` and runs on over the indented lines after it)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Command line", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    leaves = sorted((" ".join(p) for p, _ in LEAVES), key=len, reverse=True)
    entries: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        if line.startswith("lrwatch "):
            rest = line[len("lrwatch "):]
            current = next((name for name in leaves if rest == name or rest.startswith(name + " ")),
                           None)
            assert current is not None, f"README synopsis: no such command in {line!r}"
            assert current not in entries, f"README synopsis: {current} twice"
            entries[current] = rest[len(current):]
        elif line.startswith(" ") and current is not None:
            entries[current] += " " + line.strip()
    return entries


@pytest.mark.parametrize("path, cmd", LEAVES, ids=[" ".join(p) for p, _ in LEAVES])
def test_readme_synopsis_names_every_option_and_no_other(path: tuple[str, ...],
                                                          cmd: click.Command) -> None:
    """The seventeenth round's audit: the README's synopsis left out 52 of the commands' long
    options (`daemon ...`, `stack ...`) and the `baseline recalibrate` command, and 15 of
    those options no doc named at all (`demo --flush-every`, `lr-find --min-lr`, `daemon
    --tail`, `baseline build --sims`, ...)."""
    entries = _readme_synopsis()
    name = " ".join(path)
    assert name in entries, f"README's synopsis has no `lrwatch {name}` line"
    named = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", entries[name]))
    known = {o for p in cmd.params if isinstance(p, click.Option)
             for o in (*p.opts, *p.secondary_opts)} - {"-h", "--help"}
    assert named <= known, f"lrwatch {name}: README names {sorted(named - known)}, which it lacks"
    assert known <= named, f"lrwatch {name}: README's synopsis leaves out {sorted(known - named)}"
