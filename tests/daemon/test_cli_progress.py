"""`lrwatch baseline build` reports calibration progress on stderr; stdout keeps the summary."""

from __future__ import annotations

import json
import random
import re

from click.testing import CliRunner

from daemon_helpers import make_record
from lrwatch.cli import cli


def _data(tmp_path):
    rng = random.Random(5)
    data = tmp_path / "ref.jsonl"
    data.write_text("\n".join(json.dumps(make_record(rng, i)) for i in range(600)))
    return data


def test_calibration_progress_goes_to_stderr_and_does_not_change_the_result(tmp_path):
    data = _data(tmp_path)
    runner = CliRunner(env={"LRWATCH_PROGRESS_INTERVAL": "0"})  # a line at every step
    out = tmp_path / "a.json"
    res = runner.invoke(cli, ["baseline", "build", str(data), "-o", str(out),
                              "--window-size", "100", "--sims", "300"])
    assert res.exit_code == 0, res.output
    err = res.stderr.splitlines()
    assert err[0] == f"calibrating: reading {data}"
    assert "600 records" in err[1]
    resamples = [ln for ln in err if re.match(r"calibrating: \d+/300 resamples", ln)]
    assert [int(ln.split(":")[1].split("/")[0]) for ln in resamples] == [0, 100, 200, 300]
    assert any(re.match(r"calibrating: 4000/4000 null streams \(", ln) for ln in err)
    # stdout: only the summary, and one line on performance estimation (no labels here)
    summary, estimation = res.stdout.splitlines()
    assert summary.startswith(f"{out}: 600 records") and "calibrating:" not in res.stdout
    assert estimation.startswith("no performance estimation: the reference has no labels")
    # --quiet: nothing on stderr, the same reference (progress changes nothing)
    out2 = tmp_path / "b.json"
    res = runner.invoke(cli, ["baseline", "build", str(data), "-o", str(out2),
                              "--window-size", "100", "--sims", "300", "--quiet"])
    assert res.exit_code == 0, res.output
    assert res.stderr == "" and res.stdout.startswith(f"{out2}: 600 records")
    a, b = json.loads(out.read_text()), json.loads(out2.read_text())
    for ref in (a, b):  # all but when it was made and how long it took
        ref.pop("created")
        ref["calibration"].pop("seconds")
    assert a == b


def test_default_interval_keeps_a_short_calibration_to_a_few_lines(tmp_path):
    data = _data(tmp_path)
    res = CliRunner().invoke(cli, ["baseline", "build", str(data), "-o",
                                   str(tmp_path / "r.json"), "--window-size", "100",
                                   "--sims", "1000"])
    assert res.exit_code == 0, res.output
    # start and end of each stage, plus two set-up lines; nothing in between within 3 s
    assert len(res.stderr.splitlines()) <= 8, res.stderr
