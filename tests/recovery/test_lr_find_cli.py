"""``lrwatch lr-find`` through click's runner, on a real model from a target file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from lrwatch.cli import cli

from lr_find_targets import TARGET


@pytest.fixture()
def target(tmp_path: Path) -> str:
    f = tmp_path / "mytask.py"
    f.write_text(TARGET)
    return str(f)


def test_summary_plot_and_json(target: str, tmp_path: Path) -> None:
    runner = CliRunner()
    png = tmp_path / "curve.png"
    res = runner.invoke(cli, ["lr-find", f"{target}:make", "--steps", "40", "--plot", str(png)])
    assert res.exit_code == 0, res.output
    assert "suggested learning rate" in res.output and "<- largest stable" in res.output
    assert "configured with 0.05" in res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = runner.invoke(cli, ["lr-find", f"{target}:make", "--steps", "40", "--json",
                              "--fraction", "0.3"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)  # progress lines go to stderr
    assert d["stopped"] in ("diverged", "nonfinite", "end") and len(d["lrs"]) == len(d["losses"])
    assert d["suggestion"] == pytest.approx(0.3 * d["largest_stable"])


def test_bad_targets_say_what_to_return(target: str) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["lr-find", f"{target}:broken"])
    assert res.exit_code == 2 and "must return a dict (or an object" in res.output
    assert "model, optimizer, loader" in res.output
    res = runner.invoke(cli, ["lr-find", "nocolon"])
    assert res.exit_code == 2 and "module:function" in res.output
    res = runner.invoke(cli, ["lr-find", f"{target}:nothere"])
    assert res.exit_code == 2 and "no callable 'nothere'" in res.output


def test_no_suggestion_exits_1_and_says_why(target: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A loss that is not finite at the first step: no rate can help (it advised a lower
    min_lr and exited 0); the JSON writes the stand-in smoothed value as the loss was."""
    runner = CliRunner()
    res = runner.invoke(cli, ["lr-find", f"{target}:nan_loss", "--steps", "20", "-q"])
    assert res.exit_code == 1 and "not finite at the first step" in res.output
    res = runner.invoke(cli, ["lr-find", f"{target}:nan_loss", "-q", "--json"])
    d = json.loads(res.stdout)
    assert res.exit_code == 1 and d["suggestion"] is None and d["smoothed"] == ["nan"]
    # a bad --plot is refused before the test runs; a module target is found in the cwd
    res = runner.invoke(cli, ["lr-find", f"{target}:make", "--plot", str(tmp_path / "no" / "c.png")])
    assert res.exit_code == 2 and "does not exist" in res.output and "range test" not in res.output
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", ".")])
    res = runner.invoke(cli, ["lr-find", "mytask:make", "--steps", "5", "-q"])
    assert "range test: 5 steps" in res.output and res.exit_code in (0, 1), res.output
    rows = [ln for ln in res.output.splitlines() if ln.strip()[:1].isdigit()]
    assert len(rows) == 5   # every step of a short run is a row of the chart
    res = runner.invoke(cli, ["lr-find", "nosuchmod:make", "-q"])
    assert res.exit_code == 2 and "cannot be imported" in res.output


def test_listed_in_help() -> None:
    res = CliRunner().invoke(cli, ["--help"])
    assert "lr-find" in res.output


@pytest.mark.parametrize("source, expect", [
    ("def make(:\n    pass\n", "SyntaxError"),                        # a typo in the file
    ("import no_such_dependency_xyz\n", "No module named 'no_such_dependency_xyz'"),
    ("def make():\n    raise ValueError('no data here')\n", "ValueError: no data here"),
])
def test_a_target_that_fails_is_a_usage_error_not_a_traceback(
        tmp_path: Path, source: str, expect: str) -> None:
    """The fourteenth round's audit: a target file with a syntax error, an import that fails or
    a factory that raises ended `lrwatch lr-find` with a Python traceback (exit 1, which the
    docs give to "no suggestion"); bad input is exit 2 with the error and where it was raised."""
    f = tmp_path / "badtask.py"
    f.write_text(source)
    res = CliRunner().invoke(cli, ["lr-find", f"{f}:make", "-q"])
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert expect in res.output and "Traceback" not in res.output
    if "raise" in source:
        assert f"{f}:2, in make" in res.output      # where in the user's code it was raised


def test_a_warm_up_from_0_is_compared_with_the_schedules_base_rate(target: str) -> None:
    """The optimizer's rate is 0 under a warm-up from 0: the suggestion is given against the
    schedule's base rate (it crashed dividing by 0), and the JSON's configured_lr is it."""
    runner = CliRunner()
    res = runner.invoke(cli, ["lr-find", f"{target}:warm_up", "--steps", "30", "-q"])
    assert res.exit_code == 0, res.output
    assert "the schedule's base rate is 0.05: the suggestion is x" in res.output
    res = runner.invoke(cli, ["lr-find", f"{target}:warm_up", "--steps", "30", "-q", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["configured_lr"] == 0.05


def test_a_plot_that_cannot_be_written_keeps_the_curve(target: str, tmp_path: Path) -> None:
    """A --plot file the test cannot write: a traceback after the whole test, exit status 1
    (the status of "no suggestion"), and the curve lost. Now a file that exists and cannot be
    written is refused before the test (2), and a write that fails after it (here: a full
    disk) leaves the curve on stdout and exits 2 saying why."""
    from services import fill_filesystem, tmpfs

    runner = CliRunner()
    locked = tmp_path / "locked.png"
    locked.write_bytes(b"")
    locked.chmod(0o444)
    if not os.access(locked, os.W_OK):   # (root may write it anyway: the next case covers it)
        res = runner.invoke(cli, ["lr-find", f"{target}:make", "-q", "--plot", str(locked)])
        assert res.exit_code == 2 and "exists and cannot be written" in res.output
        assert "range test" not in res.output
    with tmpfs(tmp_path / "small", "size=64k") as where:
        fill_filesystem(where / "filler")
        res = runner.invoke(cli, ["lr-find", f"{target}:make", "--steps", "20", "-q", "--json",
                                  "--plot", str(where / "curve.png")])
    assert res.exit_code == 2, res.output
    assert json.loads(res.stdout)["suggestion"] is not None   # the curve came out
    assert "--plot" in res.stderr and "not written" in res.stderr and "No space" in res.stderr


def test_a_target_that_raises_exits_2_with_its_traceback(target: str) -> None:
    """The target's own code raising (here its loss: a shape mismatch) left Python's exit
    status 1, which the command documents as "no suggestion": a script read a broken target
    as a curve without a suggestion. Now it is bad input, 2, with the traceback."""
    res = CliRunner().invoke(cli, ["lr-find", f"{target}:wrong_loss", "--steps", "10", "-q"])
    assert res.exit_code == 2, res.output
    assert "Traceback" in res.stderr and "cross_entropy" in res.stderr
    assert "Error: the target raised" in res.stderr and "range test" not in res.stdout


def test_a_group_frozen_at_rate_0_is_named_and_the_leading_group_compared(target: str) -> None:
    """Group 0 frozen at rate 0: the suggestion is compared with the rate of the group the
    curve's rates are (group 1), and the output says which group that is."""
    runner = CliRunner()
    res = runner.invoke(cli, ["lr-find", f"{target}:frozen_first", "--steps", "30", "-q"])
    assert res.exit_code == 0, res.output
    assert "rates are parameter group 1's" in res.output
    assert "the optimizer is configured with 0.05: the suggestion is x" in res.output
    res = runner.invoke(cli, ["lr-find", f"{target}:frozen_first", "--steps", "30", "-q",
                              "--json"])
    d = json.loads(res.stdout)
    assert d["param_group"] == 1 and d["configured_lr"] == 0.05
