"""`lrwatch lr-find` reports the range test's progress on stderr; ``--json`` stdout parses."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from lrwatch.cli import cli

from lr_find_targets import TARGET

LINE = re.compile(r"lr-find: (\d+)/40 steps, lr ([0-9.e+-]+)(, loss ([0-9.e+-]+|nan|inf))?")


@pytest.fixture()
def target(tmp_path: Path) -> str:
    f = tmp_path / "task.py"
    f.write_text(TARGET)
    return str(f)


@pytest.mark.parametrize("factory", ["make", "make_batch_loss"])
def test_progress_on_stderr_json_on_stdout(target: str, factory: str) -> None:
    runner = CliRunner(env={"LRWATCH_PROGRESS_INTERVAL": "0"})
    res = runner.invoke(cli, ["lr-find", f"{target}:{factory}", "--steps", "40", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)  # stdout is the JSON object and nothing else
    err = res.stderr.splitlines()
    steps = [LINE.fullmatch(ln.split(" (")[0]) for ln in err[:-1]]
    assert all(steps), err
    done = [int(m.group(1)) for m in steps]
    n = len(d["losses"])
    assert done == list(range(n))
    # each line names the rate about to be tried and the loss of the step before it
    lrs = [float(m.group(2)) for m in steps]
    assert lrs == pytest.approx(d["lrs"], rel=1e-2)
    assert steps[0].group(3) is None
    assert [float(m.group(4)) for m in steps[1:]] == pytest.approx(d["losses"][:-1], rel=1e-3)
    assert err[-1] == f"lr-find: {n} of 40 steps, stopped: {d['stopped']}"
    # the same curve without progress: reporting changes nothing
    quiet = runner.invoke(cli, ["lr-find", f"{target}:{factory}", "--steps", "40", "--json",
                                "-q"])
    assert quiet.exit_code == 0 and quiet.stderr == ""
    assert json.loads(quiet.stdout) == d
