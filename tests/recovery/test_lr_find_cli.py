"""``lrwatch lr-find`` through click's runner, on a real model from a target file."""

from __future__ import annotations

import json
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
    assert res.exit_code == 2 and "must return model, optimizer, loader" in res.output
    res = runner.invoke(cli, ["lr-find", "nocolon"])
    assert res.exit_code == 2 and "module:function" in res.output
    res = runner.invoke(cli, ["lr-find", f"{target}:nothere"])
    assert res.exit_code == 2 and "no callable 'nothere'" in res.output


def test_listed_in_help() -> None:
    res = CliRunner().invoke(cli, ["--help"])
    assert "lr-find" in res.output
