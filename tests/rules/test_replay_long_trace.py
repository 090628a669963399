"""Progress inside one long trace (fourteenth round's audit, docs/rules.md): a line came only
when a trace was done, so a trace of millions of steps replayed for minutes in silence, with
``--progress`` or without."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from lrwatch.cli import cli
from lrwatch.rules.cli import _PROGRESS_SAMPLES


def _long_trace(path: Path, n: int) -> None:
    with open(path, "w") as fh:
        fh.writelines(f'{{"step": {i}, "loss": {2.0 + (i % 7) * 0.01}}}\n'
                      for i in range(1, n + 1))


def test_a_long_trace_reports_progress_while_it_is_replayed(tmp_path: Path) -> None:
    path = tmp_path / "long.jsonl"
    _long_trace(path, 2 * _PROGRESS_SAMPLES + 1)
    res = CliRunner().invoke(cli, ["replay", "--json", str(path)])
    assert res.exit_code == 0, res.output
    within = [line for line in res.stderr.splitlines() if "samples so far" in line]
    assert within == [f"replay: {path}: {k * _PROGRESS_SAMPLES} samples so far"
                      for k in (1, 2)]
    assert "samples so far" not in res.stdout   # the JSON stays clean
    quiet = CliRunner().invoke(cli, ["replay", "--no-progress", str(path)])
    assert quiet.exit_code == 0 and "samples so far" not in quiet.stderr
